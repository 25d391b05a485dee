"""Embed, Score, Best-of-N and Threshold nodes: ComfyUI IMAGE batches -> nearid_core scorer -> outputs + UI text.

Scores are cosine similarities of L2-normalised NearID embeddings, in [-1, 1]; higher means more likely the same
object instance. Tables show 100 x cosine (the DreamBench convention); FLOAT outputs and thresholds are cosines.
Scores from different models are not on a common scale.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nearid_core import to_percent

from . import comfy_env, trunk_cache
from .loader import NearIDModelHandle

logger = logging.getLogger(__name__)

REDUCTIONS = ("mean", "min", "max", "centroid")
ON_EMPTY = ("skip downstream",)
#: Retired on_empty values still found in saved workflows -> what they now do. "empty batch" passed a [0, H, W, 3]
#: IMAGE, on which ComfyUI's Save Image / Preview Image raise IndexError (they read images[0]), failing the prompt.
LEGACY_ON_EMPTY = {"empty batch": "skip downstream"}
SCORE_NOTE = (
    "score = 100 x cosine of NearID embeddings (cosine in [-1, 1]; higher = more likely the same object instance)"
)

_MODEL_INPUT = ("NEARID_MODEL", {"tooltip": "From NearID Model Loader."})
_REDUCE_INPUT = (list(REDUCTIONS), {
    "default": "mean",
    "tooltip": "How several references combine: mean / min / max of the per-reference cosines, or centroid = cosine "
               "to the normalised mean reference embedding. Irrelevant with a single reference.",
})
_REFERENCE_INPUTS = {
    "reference_images": ("IMAGE", {
        "tooltip": "Reference image(s) of the subject, one batch of one size. Combine with reference_embedding to "
                   "mix sizes or reuse references.",
    }),
    "reference_embedding": ("NEARID_EMBEDDING", {
        "tooltip": "References embedded once by NearID Embed (chain several Embed nodes for references of different "
                   "sizes). At least one of reference_images / reference_embedding is required.",
    }),
}


@dataclass(frozen=True, eq=False)
class NearIDEmbedding:
    """What flows through a NEARID_EMBEDDING socket.

    Attributes:
        vectors: [N, D] float32 on the CPU, L2-normalised.
        model_name: short name of the model that produced them, for messages.
        model_id: that model's content fingerprint (`NearIDModelHandle.fingerprint`): embeddings are comparable with a
            model's exactly when the fingerprints match, whatever path the weights were loaded from.
    """

    vectors: torch.Tensor
    model_name: str
    model_id: str = ""

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


# --------------------------------------------------------------------------------------------------------------------
# Shared steps
# --------------------------------------------------------------------------------------------------------------------


def _finite_rows(images: torch.Tensor, role: str) -> torch.Tensor:
    """Validate a ComfyUI IMAGE [B, H, W, C]; return a bool [B] marking images without NaN/inf pixels."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[-1] not in (1, 3, 4):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"NearID: {role} must be a ComfyUI IMAGE tensor [B, H, W, 3] in 0..1, got {shape}.")
    return torch.isfinite(images.flatten(1)).all(1) if images.shape[0] else torch.ones(0, dtype=torch.bool)


def _require_finite(images: torch.Tensor, role: str) -> None:
    bad = (~_finite_rows(images, role)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(
            f"NearID: {role} image(s) {bad} contain NaN or infinite pixel values (often an fp16 VAE overflow); "
            "fix the upstream node, or use NearID Threshold Filter, which rejects such images."
        )


def _embed(handle: NearIDModelHandle, images: torch.Tensor, pbar) -> torch.Tensor:
    """[B, H, W, C] -> [B, D] float32 on the CPU; images the handle has seen before are not run again (progress +
    Cancel per chunk of the loader's batch size)."""
    return trunk_cache.encode(handle, images, pbar)[0]


def _check_embedding(embedding: NearIDEmbedding, handle: NearIDModelHandle) -> None:
    if not isinstance(embedding, NearIDEmbedding):
        raise ValueError(f"NearID: expected a NEARID_EMBEDDING from NearID Embed, got {type(embedding).__name__}.")
    if embedding.model_id != handle.fingerprint:
        raise ValueError(
            f"NearID: the embedding was computed with {embedding.model_name!r} [{embedding.model_id[:8] or '?'}] but "
            f"this node uses {handle.label}: different weights, so the embeddings are not comparable. Use the same "
            "NearID model for both."
        )


def _references(
    handle: NearIDModelHandle, reference_images: torch.Tensor | None, reference_embedding: NearIDEmbedding | None, pbar
) -> torch.Tensor:
    """Reference embeddings [R, D] on the scorer's device, from an embedding input and/or reference images."""
    parts = []
    if reference_embedding is not None:
        _check_embedding(reference_embedding, handle)
        parts.append(reference_embedding.vectors.float().cpu())
    if reference_images is not None:
        _require_finite(reference_images, "reference_images")
        parts.append(_embed(handle, reference_images, pbar))
    if not parts:
        raise ValueError("NearID: connect reference_images and/or reference_embedding (the subject to compare with).")
    refs = torch.cat(parts)
    if refs.shape[0] == 0:
        raise ValueError("NearID: the references are empty (0 images / 0 embeddings); pass at least one reference.")
    return refs


def _scores(
    handle: NearIDModelHandle,
    images: torch.Tensor,
    reference_images: torch.Tensor | None,
    reference_embedding: NearIDEmbedding | None,
    reduce: str,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cosine score per image (float32 [B] on the CPU; NaN where `valid` is False) and the number of references."""
    if reduce not in REDUCTIONS:
        raise ValueError(f"NearID: reduce must be one of {REDUCTIONS}, got {reduce!r}.")
    valid = torch.ones(images.shape[0], dtype=torch.bool) if valid is None else valid
    n_ref_images = 0 if reference_images is None else int(reference_images.shape[0])
    pbar = comfy_env.progress_bar(n_ref_images + int(valid.sum()))
    refs = _references(handle, reference_images, reference_embedding, pbar)
    scores = torch.full((images.shape[0],), float("nan"))
    if valid.any():
        candidates = _embed(handle, images[valid.to(images.device)], pbar)
        scores[valid] = handle.scorer.score(refs, candidates, reduce=reduce).float().cpu()
    return scores, int(refs.shape[0])


def _fmt(cosine: float) -> str:
    if math.isnan(cosine):
        return f"{'invalid':>8}  {'(NaN)':>7}"
    return f"{float(to_percent(torch.tensor(cosine))):>8.2f}  {cosine:>7.4f}"


def score_table(
    scores: Sequence[float],
    rows: Sequence[int],
    n_refs: int,
    reduce: str,
    title: str,
    verdicts: Sequence[str] | None = None,
) -> str:
    """Readable fixed-width table of `scores[i]` for i in `rows` (in that order)."""
    lines = [title, SCORE_NOTE, f"references: {n_refs} (reduce={reduce})"]
    if not rows:
        return "\n".join([*lines, "no images"])
    lines.append(f"{'rank':>4}  {'image':>5}  {'score':>8}  {'cosine':>7}" + ("  verdict" if verdicts else ""))
    order = sorted(range(len(scores)), key=lambda i: -scores[i] if not math.isnan(scores[i]) else math.inf)
    rank = {i: r + 1 for r, i in enumerate(order)}
    for i in rows:
        line = f"{rank[i]:>4}  {i:>5}  {_fmt(scores[i])}"
        lines.append(line + (f"  {verdicts[i]}" if verdicts else ""))
    return "\n".join(lines)


def _result(ui_text: str, *outputs) -> dict:
    return {"ui": {"text": [ui_text]}, "result": tuple(outputs)}


# --------------------------------------------------------------------------------------------------------------------
# Nodes
# --------------------------------------------------------------------------------------------------------------------


class NearIDEmbed:
    """Embed reference images once; the NEARID_EMBEDDING output feeds any number of Score / Best-of-N / Threshold
    nodes without re-running the model on the references."""

    DESCRIPTION = (
        "Computes NearID identity embeddings (L2-normalised vectors) of an IMAGE batch. Connect an existing "
        "embedding to append to it, e.g. to combine reference images of different sizes."
    )
    CATEGORY = "NearID/scoring"
    FUNCTION = "embed"
    RETURN_TYPES = ("NEARID_EMBEDDING",)
    RETURN_NAMES = ("embedding",)
    OUTPUT_TOOLTIPS = ("The input embedding's vectors (if any) followed by one vector per image.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "Images to embed (usually the reference images of the subject)."}),
            },
            "optional": {
                "embedding": ("NEARID_EMBEDDING", {"tooltip": "Append the new vectors to this embedding."}),
            },
        }

    @torch.inference_mode()
    def embed(self, nearid_model: NearIDModelHandle, images: torch.Tensor, embedding: NearIDEmbedding | None = None):
        _require_finite(images, "images")
        parts = []
        if embedding is not None:
            _check_embedding(embedding, nearid_model)
            parts.append(embedding.vectors)
        parts.append(_embed(nearid_model, images, comfy_env.progress_bar(int(images.shape[0]))))
        out = NearIDEmbedding(vectors=torch.cat(parts), model_name=nearid_model.display_name,
                              model_id=nearid_model.fingerprint)
        text = f"{len(out)} NearID embedding(s) of dimension {out.vectors.shape[1]} ({nearid_model.label})"
        return _result(text, out)


class NearIDScore:
    """Score a candidate batch against references and show the table on the node."""

    DESCRIPTION = (
        "Identity score of every candidate image against the reference subject: cosine similarity of NearID "
        "embeddings, in [-1, 1] (higher = more likely the same object instance). The table on the node shows "
        "100 x cosine and the rank. Scores of different models are not comparable."
    )
    CATEGORY = "NearID/scoring"
    FUNCTION = "score"
    OUTPUT_NODE = True
    RETURN_TYPES = ("FLOAT", "INT", "STRING")
    RETURN_NAMES = ("scores", "ranking", "table")
    OUTPUT_IS_LIST = (True, True, False)
    OUTPUT_TOOLTIPS = (
        "One cosine in [-1, 1] per candidate, in batch order (a list: downstream nodes run once per value).",
        "Candidate indices, best first (ties keep batch order).",
        "Readable table: rank, index, 100 x cosine, cosine.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "Candidate images to score (one batch)."}),
                "reduce": _REDUCE_INPUT,
            },
            "optional": dict(_REFERENCE_INPUTS),
        }

    @torch.inference_mode()
    def score(self, nearid_model, images, reduce="mean", reference_images=None, reference_embedding=None):
        _require_finite(images, "images")
        scores, n_refs = _scores(nearid_model, images, reference_images, reference_embedding, reduce)
        ranking = torch.sort(scores, descending=True, stable=True).indices.tolist()
        values = scores.tolist()
        table = score_table(values, ranking, n_refs, reduce, f"NearID score of {len(values)} image(s)")
        return _result(table, values, ranking, table)


class NearIDBestOfN:
    """Keep the top-k images of a batch (and the matching latents and masks)."""

    DESCRIPTION = (
        "Ranks a batch by NearID identity score (cosine in [-1, 1] to the references, higher = same instance; tables "
        "show 100 x cosine) and keeps the best top_k images, best first, with the matching entries of an optional "
        "LATENT and MASK. top_k larger than the batch keeps the whole batch, sorted."
    )
    CATEGORY = "NearID/scoring"
    FUNCTION = "select"
    RETURN_TYPES = ("IMAGE", "INT", "FLOAT", "LATENT", "MASK", "STRING", "STRING")
    RETURN_NAMES = ("images", "indices", "scores", "latent", "mask", "filename_prefix", "table")
    OUTPUT_IS_LIST = (False, True, True, False, False, False, False)
    OUTPUT_TOOLTIPS = (
        "The kept images [k, H, W, 3], best first.",
        "Their indices in the input batch.",
        "Their cosine scores in [-1, 1].",
        "The latent input restricted to the kept images, in the same order (None when no latent is connected).",
        "The mask input restricted to the kept images (a single mask is repeated); all zeros when none is connected.",
        "filename_prefix with the best score appended (e.g. NearID/best_87.3, score = 100 x cosine): connect it to "
        "Save Image's filename_prefix to save the best image with its score.",
        "Readable table of the kept images.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "The batch to choose from, e.g. VAE Decode of a KSampler batch."}),
                "top_k": ("INT", {"default": 1, "min": 1, "max": 4096,
                                  "tooltip": "How many images to keep (clamped to the batch size)."}),
                "reduce": _REDUCE_INPUT,
                "filename_prefix": ("STRING", {"default": "NearID/best",
                                               "tooltip": "Prefix of the filename_prefix output."}),
            },
            "optional": {
                **_REFERENCE_INPUTS,
                "latent": ("LATENT", {"tooltip": "Latent batch the images were decoded from (same batch size)."}),
                "mask": ("MASK", {"tooltip": "Masks of the images: one per image, or a single mask for all."}),
            },
        }

    @torch.inference_mode()
    def select(self, nearid_model, images, top_k=1, reduce="mean", filename_prefix="NearID/best",
               reference_images=None, reference_embedding=None, latent=None, mask=None):
        _require_finite(images, "images")
        n = int(images.shape[0])
        if latent is not None and latent["samples"].shape[0] != n:
            raise ValueError(f"NearID: the latent batch has {latent['samples'].shape[0]} entries but images has {n}.")
        scores, n_refs = _scores(nearid_model, images, reference_images, reference_embedding, reduce)
        keep = torch.sort(scores, descending=True, stable=True).indices[: max(0, min(int(top_k), n))]
        values = scores.tolist()
        kept = keep.tolist()
        best = f"{float(to_percent(scores[keep[0]])):.1f}" if kept else "none"
        table = score_table(values, kept, n_refs, reduce, f"NearID best {len(kept)} of {n} image(s)")
        return _result(
            table,
            images[keep.to(images.device)],
            kept,
            scores[keep].tolist(),
            _select_latent(latent, kept, n),
            _select_mask(mask, kept, n, tuple(images.shape[1:3])),
            f"{filename_prefix}_{best}",
            table,
        )


def _select_latent(latent: dict | None, keep: list[int], n: int) -> dict | None:
    """LATENT {"samples": [n, C, h, w], ...} -> the same dict restricted to `keep` (noise_mask, batch_index too)."""
    if latent is None:
        return None
    out = dict(latent)
    index = torch.tensor(keep, dtype=torch.long)
    out["samples"] = latent["samples"][index.to(latent["samples"].device)]
    noise_mask = latent.get("noise_mask")
    if isinstance(noise_mask, torch.Tensor) and noise_mask.shape[0] == n and n > 1:
        out["noise_mask"] = noise_mask[index.to(noise_mask.device)]
    if "batch_index" in latent and len(latent["batch_index"]) == n:
        out["batch_index"] = [latent["batch_index"][i] for i in keep]
    return out


def _select_mask(mask: torch.Tensor | None, keep: list[int], n: int, size: tuple[int, int]) -> torch.Tensor:
    """MASK [n, H, W] (or one mask [H, W] / [1, H, W] for all) -> [k, H, W]; zeros of the image size when None."""
    if mask is None:
        return torch.zeros((len(keep), *size), dtype=torch.float32)
    mask = mask[None] if mask.ndim == 2 else mask
    if mask.shape[0] == n:
        return mask[torch.tensor(keep, dtype=torch.long, device=mask.device)]
    if mask.shape[0] == 1:
        return mask.expand(len(keep), -1, -1).clone()
    raise ValueError(f"NearID: the mask batch has {mask.shape[0]} entries; expected 1 or {n} (one per image).")


class NearIDThresholdFilter:
    """Split a batch into accepted / rejected by a score threshold."""

    DESCRIPTION = (
        "Splits a batch by NearID identity score (cosine in [-1, 1] to the references; the table shows 100 x cosine): "
        "images with cosine >= threshold are accepted, the rest rejected, both in batch order. Never fails when "
        "nothing passes: the nodes fed by an empty side (e.g. its Save Image) are skipped and the rest of the "
        "prompt runs; the counts say 0. Images containing NaN/inf pixels are rejected (score NaN, 'invalid' in the "
        "table) instead of stopping the run."
    )
    CATEGORY = "NearID/scoring"
    FUNCTION = "split"
    RETURN_TYPES = ("IMAGE", "IMAGE", "INT", "INT", "FLOAT", "STRING")
    RETURN_NAMES = ("accepted", "rejected", "accepted_count", "rejected_count", "scores", "table")
    OUTPUT_IS_LIST = (False, False, False, False, True, False)
    OUTPUT_TOOLTIPS = (
        "Images with cosine >= threshold, in batch order; when none, the nodes it feeds are skipped.",
        "The other images (including invalid ones), in batch order; when none, the nodes it feeds are skipped.",
        "Number of accepted images.",
        "Number of rejected images.",
        "Cosine per input image in batch order (NaN for images with NaN/inf pixels).",
        "Readable table with the verdict per image.",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "nearid_model": _MODEL_INPUT,
                "images": ("IMAGE", {"tooltip": "The batch to split."}),
                "threshold": ("FLOAT", {
                    "default": 0.5, "min": -1.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Minimum cosine in [-1, 1] to accept (0.5 = score 50.0 in the table). Calibrate it on "
                               "your own references: typical same-instance scores depend on the subject.",
                }),
                "reduce": _REDUCE_INPUT,
                "on_empty": (list(ON_EMPTY), {
                    "default": ON_EMPTY[0],
                    "tooltip": "When a side has no images, the nodes it feeds are skipped silently and the prompt "
                               "completes (ComfyUI's Save / Preview Image fail on an empty batch). Saved workflows "
                               "with the retired 'empty batch' run this way too.",
                }),
            },
            "optional": dict(_REFERENCE_INPUTS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, on_empty: str | None = None) -> bool | str:
        """Accept the retired on_empty values of saved workflows (ComfyUI then skips its own dropdown check)."""
        if on_empty is None or on_empty in ON_EMPTY or on_empty in LEGACY_ON_EMPTY:
            return True
        return f"on_empty must be one of {list(ON_EMPTY)}, got {on_empty!r}."

    @torch.inference_mode()
    def split(self, nearid_model, images, threshold=0.5, reduce="mean", on_empty=ON_EMPTY[0], reference_images=None,
              reference_embedding=None):
        note = ""
        if on_empty in LEGACY_ON_EMPTY:
            note = (f"on_empty {on_empty!r} is retired (Save / Preview Image fail on an empty batch): "
                    f"running as {LEGACY_ON_EMPTY[on_empty]!r}")
            logger.warning("NearID Threshold Filter: %s.", note)
            on_empty = LEGACY_ON_EMPTY[on_empty]
        if on_empty not in ON_EMPTY:
            raise ValueError(f"NearID: on_empty must be one of {ON_EMPTY}, got {on_empty!r}.")
        valid = _finite_rows(images, "images")
        if not valid.all():
            logger.warning("NearID Threshold Filter: rejecting images %s with NaN/inf pixels.",
                           (~valid).nonzero().flatten().tolist())
        scores, n_refs = _scores(nearid_model, images, reference_images, reference_embedding, reduce, valid=valid)
        accepted = valid & (scores >= float(threshold))
        values = scores.tolist()
        verdicts = ["accepted" if a else ("rejected (invalid pixels)" if not v else "rejected")
                    for a, v in zip(accepted.tolist(), valid.tolist())]
        n_acc = int(accepted.sum())
        title = (f"NearID threshold {float(threshold):.4f} (score {float(threshold) * 100:.2f}): "
                 f"{n_acc} accepted, {len(values) - n_acc} rejected")
        table = score_table(values, list(range(len(values))), n_refs, reduce, title, verdicts)
        table += f"\n{note}" if note else ""
        mask = accepted.to(images.device)
        sides = [images[mask], images[~mask]]
        sides = [side if side.shape[0] else comfy_env.skip_downstream(side) for side in sides]
        return _result(table, *sides, n_acc, len(values) - n_acc, values, table)
