"""`NearIDScorer`: embed, compare, score and rank images by subject identity.

Scores are cosine similarities of L2-normalised NearID embeddings, in [-1, 1]; higher means more likely the same
object instance. `to_percent` gives the DreamBench convention, 100 * cosine. Scores from different models (NearID vs
frozen SigLIP vs CLIP) are not on a common scale: compare rankings, not raw values, across models.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from itertools import islice
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .attention import CPU_BMM_ATTENTION
from .checkpoint import load_model, load_preprocess_config
from .feature_cache import HubImage
from .names import DEFAULT_MODEL, INPUT_RANGES, READOUTS, REDUCTIONS
from .precision import cpu_has_bf16_matmul as cpu_has_bf16_matmul  # re-exported
from .precision import autocast_for, default_dtype, head_dtype
from .quantization import INT8_OTHER_DTYPE, QuantizationError, check_quantize, compile_trunk, quantize_trunk_int8
from .modeling_nearid import NearIDModel
from .preprocessing import (
    ImageInputError,
    Images,
    PreprocessConfig,
    iter_images,
    file_to_tensor,
    pil_to_tensor,
    preprocess,
    preprocess_images,
    resize,
    stack_equal_shapes,
)

logger = logging.getLogger(__name__)

#: Vision-config fields that change the embeddings (the others are paths, dtypes and bookkeeping), for `fingerprint`.
_FINGERPRINT_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                              "image_size", "patch_size", "num_channels", "hidden_act", "layer_norm_eps")


class DeviceError(ValueError):
    """A device name that is not valid, or names a device this machine / torch build does not have."""


def available_devices() -> list[str]:
    """The devices this torch build can use here, e.g. ['cpu', 'cuda:0', 'cuda:1']."""
    found = ["cpu"]
    for kind in ("cuda", "xpu", "mps"):
        backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
        if backend is None or not backend.is_available():
            continue
        count = backend.device_count() if hasattr(backend, "device_count") else 1
        found += [f"{kind}:{i}" for i in range(count)] if kind != "mps" else ["mps"]
    return found


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device that exists here; None = CUDA if available, else CPU.

    Raises:
        DeviceError: an invalid name, or a device this machine lacks; the message lists the available devices.
    """
    if device is None:
        return default_device()
    available = available_devices()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise DeviceError(f"{device!r} is not a device name; available here: {', '.join(available)}.") from err
    name = resolved.type if resolved.index is None else f"{resolved.type}:{resolved.index}"
    if resolved.type == "cpu" or name in available or (resolved.index is None and f"{name}:0" in available):
        return resolved
    build = "" if torch.cuda.is_available() or resolved.type != "cuda" else (
        " (this torch build has no CUDA support)" if torch.version.cuda is None else " (no CUDA GPU is visible)")
    raise DeviceError(f"Device {str(device)!r} is not available{build}; available here: {', '.join(available)}.")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_percent(cosine: torch.Tensor) -> torch.Tensor:
    """Cosine in [-1, 1] -> the DreamBench 0-100 scale (100 * cosine; negative values stay negative)."""
    return cosine * 100


class _DecodedFiles(Dataset):
    """Image files (or `HubImage` dataset cells) -> (item, [3, h, w] pixels in 0..1 resized for the model, None) or
    (item, None, error message)."""

    def __init__(self, paths: list, config: PreprocessConfig) -> None:
        self.paths, self.config = paths, config

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor | None, str | None]:
        path = self.paths[index]
        try:
            pixels = _cell_to_tensor(path) if isinstance(path, HubImage) else file_to_tensor(path)
        except ImageInputError as err:
            return path, None, str(err)
        return path, resize(pixels[None], self.config)[0], None


def _cell_to_tensor(cell: HubImage) -> torch.Tensor:
    """A dataset image cell -> [3, H, W] float32 in 0..1; every error names the cell."""
    try:
        return pil_to_tensor(cell.load())
    except (ImageInputError, OSError, ValueError) as err:
        raise ImageInputError(f"Image {cell}: {err}") from err


def _one_thread_per_worker(worker_id: int) -> None:
    torch.set_num_threads(1)  # decoding workers must not compete with the model's threads


class NearIDScorer:
    """Identity scorer over a [`NearIDModel`] and the preprocessing that came with its checkpoint.

    Example:
        >>> scorer = NearIDScorer.from_pretrained("Aleksandar/nearid-siglip2")
        >>> scores = scorer.score("reference.png", ["a.png", "b.png"])     # Tensor[2], cosine in [-1, 1]
        >>> order, ranked = scorer.rank(["ref1.png", "ref2.png"], candidates, top_k=3)
    """

    def __init__(
        self,
        model: NearIDModel,
        preprocess_config: PreprocessConfig,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        compile: bool | None = None,
    ) -> None:
        self.device = resolve_device(device)
        check_quantize(quantize, self.device)
        self.dtype = dtype or (INT8_OTHER_DTYPE if quantize else default_dtype(self.device))
        self.model = model.eval()
        self.preprocess_config = preprocess_config
        self.quantize: str | None = None
        self.to(self.device, self.dtype)
        if quantize is not None:
            self._quantized_fingerprint = self._fingerprint(quantize)  # from the weights before they are quantized
            quantize_trunk_int8(self.model)
            self.quantize = quantize
        if compile is None:  # eager int8 layers run slower than bf16; see nearid_core.quantization for bf16
            compile = quantize is not None and self.dtype == torch.float32
        if compile:
            compile_trunk(self.model)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        quantize: str | None = None,
        compile: bool | None = None,
        **kwargs,
    ) -> "NearIDScorer":
        """Load a scorer from a hub id or local path (NearID release, plain SigLIP, or head-only checkpoint).

        Args:
            name_or_path: hub id (downloaded on first use) or local directory / head-only `.safetensors` file.
            device: default CUDA if available, else CPU.
            dtype: default fp16 on CUDA; on CPUs bf16 where it is measured faster, else fp32
                (`nearid_core.precision`). On a CPU in bf16 / fp16 the MAP head runs in fp32.
            quantize: "int8" = the trunk's linears in int8 through torchao (CPU only, opt-in for bulk scoring; needs
                the ``[int8]`` extra); `dtype` then sets everything else, default fp32 (measured fastest with int8).
                See `nearid_core.quantization`.
            compile: wrap each trunk layer in ``torch.compile`` (the first batch pays the compilation); default on
                with `quantize` in fp32 (eager int8 layers run slower than bf16), off otherwise.
            **kwargs: `revision`, `cache_dir`, `local_files_only` for the download; `allowed_roots` to confine local
                paths (see `nearid_core.checkpoint.load_model`).
        """
        device = resolve_device(device)
        check_quantize(quantize, device)  # before the download and load
        dtype = dtype or (INT8_OTHER_DTYPE if quantize else default_dtype(device))
        load_dtype = dtype if head_dtype(device, dtype) == dtype else None  # the head is cast from the file's dtype
        model, config_dir = load_model(name_or_path, dtype=load_dtype, **kwargs)
        preprocess_config = load_preprocess_config(config_dir, model.config.vision_config.image_size)
        return cls(model, preprocess_config, device=device, dtype=dtype, quantize=quantize, compile=compile)

    @property
    def embed_dim(self) -> int:
        return self.model.config.embed_dim

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "NearIDScorer":
        """Move the model (and where inputs go) to another device and/or dtype; returns self.

        Raises:
            QuantizationError: an int8 scorer asked for another device or dtype (load it again instead).
        """
        if self.quantize is not None and ((device is not None and resolve_device(device) != self.device)
                                          or (dtype is not None and dtype != self.dtype)):
            raise QuantizationError(f"This scorer's trunk is quantized ({self.quantize}) on {self.device} with "
                                    f"{self.dtype} elsewhere; it cannot move or change dtype. Load it again with "
                                    "the device and dtype you want.")
        if device is not None:
            self.device = resolve_device(device)
        if dtype is not None:
            self.dtype = dtype
        self.model.to_precision(self.dtype, head_dtype(self.device, self.dtype), device=self.device)
        if self.model.config._attn_implementation == "sdpa":  # an explicit choice (e.g. "eager") is kept
            self.model.set_attn_implementation(CPU_BMM_ATTENTION)  # SDPA itself wherever it is the faster one
        return self

    def __repr__(self) -> str:
        return (f"NearIDScorer(embed_dim={self.embed_dim}, image_size={self.preprocess_config.size}, "
                f"device={self.device}, dtype={self.dtype}"
                + (f", quantize={self.quantize!r})" if self.quantize else ")"))

    # ---------------------------------------------------------------------------------------------------------------

    def _batches(self, images: Images, batch_size: int, progress: bool | None, desc: str,
                 layout: str | None = None) -> Iterator[list[torch.Tensor]]:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
        total = len(images) if isinstance(images, (list, tuple)) else None
        show = progress if progress is not None else (total is not None and total > 4 * batch_size)
        stream = iter_images(images, layout)
        with tqdm(total=total, desc=desc, unit="img", disable=not show) as bar:
            while batch := list(islice(stream, batch_size)):
                yield batch
                bar.update(len(batch))

    def pixel_values(self, images: Images, layout: str | None = None) -> torch.Tensor:
        """Model input [N, 3, h, w] on the scorer's device and dtype (differentiable w.r.t. float tensor inputs)."""
        return self._model_input(list(iter_images(images, layout)))

    def _model_input(self, batch: list[torch.Tensor]) -> torch.Tensor:
        """[3, H, W] images in 0..1 (as `iter_images` yields them) -> preprocessed [N, 3, h, w] in the model dtype."""
        return preprocess_images([im.to(self.device) for im in batch], self.preprocess_config).to(self.dtype)

    def _features(self, pixel_values: torch.Tensor, readout: str) -> torch.Tensor:
        """Model input -> raw (unnormalised) float32 features [N, D] of the chosen readout."""
        with autocast_for(self.device, self.dtype):
            if readout == "map":
                return self.model.get_image_features(pixel_values, normalize=False).float()
            return self.model.encode_tokens(pixel_values).float().mean(dim=1)

    @staticmethod
    def _check_readout(readout: str) -> None:
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {', '.join(READOUTS)}; got {readout!r}.")

    def embed(self, images: Images, batch_size: int = 16, progress: bool | None = None,
              readout: str = "map", layout: str | None = None) -> torch.Tensor:
        """Images -> L2-normalised embeddings [N, D] (float32, on the scorer's device).

        Gradients flow to float tensor inputs that require grad (the weights are frozen); wrap the call in
        `torch.no_grad()` / `torch.inference_mode()` when you do not need them. Batch results equal one-by-one results.

        Args:
            readout: "map" = the NearID embedding (the MAP head); "mean" = the mean of the trunk's patch tokens
                (head skipped: the `siglip2-mean` baseline's readout, a similarity NearID's head was not trained for).
            layout: "channels_last" ([B, H, W, C], ComfyUI IMAGE) or "channels_first" ([B, C, H, W]) for arrays and
                tensors; None reads tensors by shape and refuses shapes that fit both (see `iter_images`).
        """
        self._check_readout(readout)
        out = []
        for batch in self._batches(images, batch_size, progress, "embed", layout):
            out.append(self._features(self._model_input(batch), readout))
        if not out:
            width = self.embed_dim if readout == "map" else self.model.config.vision_config.hidden_size
            return torch.empty(0, width, device=self.device)
        return F.normalize(torch.cat(out), dim=-1)

    def embed_pixels(self, pixels: torch.Tensor, input_range: str = "0,1", readout: str = "map",
                     normalize: bool = True) -> torch.Tensor:
        """A batch of float pixels [N, 3, H, W] (any size, dtype and device) -> embeddings [N, D] float32, graph intact.

        For differentiable uses (reward losses, guidance): values are clamped to `input_range` ("0,1", or "-1,1" for
        VAE decoder output) as when the images are saved, then go through the checkpoint's own preprocessing and model,
        exactly as `embed` sees them.

        Raises:
            ValueError: `pixels` is not a float [N, 3, H, W] tensor, or an unknown `input_range` / `readout`.
        """
        if input_range not in INPUT_RANGES:
            raise ValueError(f"input_range must be one of {', '.join(map(repr, INPUT_RANGES))}; got {input_range!r}.")
        self._check_readout(readout)
        if pixels.ndim != 4 or pixels.shape[1] != 3 or not pixels.is_floating_point():
            raise ValueError(f"pixels must be a float tensor [N, 3, H, W]; got {pixels.dtype} {tuple(pixels.shape)}.")
        x = pixels.to(self.device, torch.float32)
        if input_range == "-1,1":
            x = (x + 1) / 2
        x = preprocess(x.clamp(0, 1), self.preprocess_config).to(self.dtype)
        features = self._features(x, readout)
        return F.normalize(features, dim=-1) if normalize else features

    def embed_files(
        self,
        paths: Sequence[str | os.PathLike],
        batch_size: int = 16,
        num_workers: int = 0,
        skip_unreadable: bool = False,
        progress: bool | None = None,
    ) -> tuple[torch.Tensor, list, list[tuple[Any, str]]]:
        """Embed image files (or `HubImage` cells of a ``datasets.Dataset``), decoding and resizing them in
        `num_workers` background processes (a torch DataLoader) while the model runs; equal to `embed(paths)`.

        Returns:
            (embeddings [N, D] float32 on the scorer's device, the paths embedded, [(path, reason)] skipped). Without
            `skip_unreadable` the first unreadable file raises `ImageInputError` naming it.
        """
        if batch_size < 1 or num_workers < 0:
            raise ValueError(f"batch_size must be >= 1 and num_workers >= 0; got {batch_size}, {num_workers}.")
        loader = DataLoader(_DecodedFiles(list(paths), self.preprocess_config), batch_size=batch_size,
                            num_workers=num_workers, collate_fn=list, worker_init_fn=_one_thread_per_worker)
        rows, kept, skipped = [], [], []
        show = progress if progress is not None else len(paths) > 4 * batch_size
        with torch.inference_mode(), tqdm(total=len(paths), desc="embed", unit="img", disable=not show) as bar:
            for batch in loader:
                for path, _, error in batch:
                    if error is not None and not skip_unreadable:
                        raise ImageInputError(error)
                skipped += [(path, error) for path, _, error in batch if error is not None]
                good = [(path, pixels) for path, pixels, error in batch if error is None]
                # one run per batch, unless the checkpoint skips resizing
                rows += [self.embed_pixels(run) for run in stack_equal_shapes([px for _, px in good])]
                kept += [path for path, _ in good]
                bar.update(len(batch))
        embeddings = torch.cat(rows) if rows else torch.empty(0, self.embed_dim, device=self.device)
        return embeddings, kept, skipped

    def as_embeddings(self, x: Images | torch.Tensor, batch_size: int = 16, layout: str | None = None) -> torch.Tensor:
        """Images or precomputed embeddings -> L2-normalised embeddings [N, D] float32 on the scorer's device.

        A 2-D tensor is read as precomputed embeddings [N, D] and re-normalised; anything else is embedded.

        Raises:
            ValueError: a 2-D tensor of the wrong width, or with NaN / infinite values.
        """
        if isinstance(x, torch.Tensor) and x.ndim == 2:
            if x.shape[1] != self.embed_dim:
                raise ValueError(
                    f"Embeddings have dimension {x.shape[1]} but this model's is {self.embed_dim}; 2-D tensors are "
                    "read as precomputed embeddings, pass images as [B, H, W, C] or [B, 3, H, W]."
                )
            if not torch.isfinite(x).all():
                raise ValueError("Precomputed embeddings contain NaN or infinite values; re-embed those images.")
            return F.normalize(x.to(self.device).float(), dim=-1)
        return self.embed(x, batch_size=batch_size, layout=layout)

    def similarity(self, a: Images | torch.Tensor, b: Images | torch.Tensor, batch_size: int = 16,
                   layout: str | None = None) -> torch.Tensor:
        """Cosine similarity matrix [len(a), len(b)] in [-1, 1] between images or precomputed embeddings."""
        return self.as_embeddings(a, batch_size, layout) @ self.as_embeddings(b, batch_size, layout).T

    def score(
        self,
        references: Images | torch.Tensor,
        candidates: Images | torch.Tensor,
        reduce: str = "mean",
        batch_size: int = 16,
        layout: str | None = None,
    ) -> torch.Tensor:
        """One identity score per candidate: Tensor[len(candidates)], cosine in [-1, 1].

        Args:
            references: one or many images of the subject, or their embeddings [R, D].
            candidates: images (or embeddings) to score.
            reduce: over references: "mean" / "min" / "max" of the cosines, or "centroid" = cosine to the
                normalised mean reference embedding.
            layout: of array / tensor images, as in `embed`.
        """
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
        refs = self.as_embeddings(references, batch_size, layout)
        if refs.shape[0] == 0:
            raise ValueError("references is empty: pass at least one reference image or embedding.")
        cands = self.as_embeddings(candidates, batch_size, layout)
        if reduce == "centroid":
            return cands @ F.normalize(refs.mean(0), dim=-1)
        sims = cands @ refs.T
        if reduce == "mean":
            return sims.mean(dim=1)
        return sims.amin(dim=1) if reduce == "min" else sims.amax(dim=1)

    def rank(
        self,
        references: Images | torch.Tensor,
        candidates: Images | torch.Tensor,
        top_k: int | None = None,
        reduce: str = "mean",
        batch_size: int = 16,
        layout: str | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates ordered best first: (indices [k], scores [k]); ties keep the input order."""
        scores = self.score(references, candidates, reduce=reduce, batch_size=batch_size, layout=layout)
        order = torch.sort(scores, descending=True, stable=True).indices
        if top_k is not None:
            order = order[: max(top_k, 0)]
        return order, scores[order]

    def attention_maps(self, images: Images, size: tuple[int, int] | None = None,
                       layout: str | None = None) -> torch.Tensor | list[torch.Tensor]:
        """Where the MAP head reads identity from: the probe's attention over the patch grid, averaged over heads,
        upsampled to the image and scaled to 0..1 per image.

        Args:
            size: (H, W) of the output maps; default each image's own size.

        Returns:
            Tensor [N, H, W] (float32, CPU) when all maps share a size, otherwise a list of [H, W] tensors.
        """
        maps = []
        with torch.no_grad():
            for batch in self._batches(images, 16, None, "attention", layout):
                with autocast_for(self.device, self.dtype):
                    tokens = self.model.encode_tokens(self._model_input(batch))
                grids = self._attention_grids(tokens)
                sizes = [size or tuple(image.shape[-2:]) for image in batch]
                maps += list(self.attention_to_maps(grids, sizes))
        if maps and all(m.shape == maps[0].shape for m in maps):
            return torch.stack(maps)
        return maps

    def _attention_grids(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, C] -> the probe's attention over the patch grid, float32 [B, gh, gw] on the CPU."""
        vision = self.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        with autocast_for(self.device, self.dtype):
            _, attn = self.model.pool(tokens, output_attentions=True)
        return attn.float().reshape(-1, grid, grid).cpu()

    def embed_and_attend(self, images: Images, batch_size: int = 16,
                         layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Embeddings and MAP-head attention from one trunk pass per image (the trunk is most of the cost), no grad.

        Returns:
            (L2-normalised embeddings [N, D] float32 on the scorer's device, equal to `embed(images)`;
            attention grids [N, gh, gw] float32 on the CPU, the probe's attention over the patches averaged over
            heads: `attention_to_maps` turns them into the maps `attention_maps` returns).
        """
        vision = self.model.config.vision_config
        grid = vision.image_size // vision.patch_size
        embeddings, grids = [], []
        with torch.no_grad():
            for batch in self._batches(images, batch_size, False, "embed", layout):
                with autocast_for(self.device, self.dtype):
                    tokens = self.model.encode_tokens(self._model_input(batch))
                    embeddings.append(self.model.head(tokens).float())  # = get_image_features: trunk, then head
                grids.append(self._attention_grids(tokens))
        if not embeddings:
            return torch.empty(0, self.embed_dim, device=self.device), torch.empty(0, grid, grid)
        return F.normalize(torch.cat(embeddings), dim=-1), torch.cat(grids)

    def attention_to_maps(self, grids: torch.Tensor,
                          sizes: Sequence[tuple[int, int]]) -> torch.Tensor | list[torch.Tensor]:
        """Attention grids [N, gh, gw] (from `embed_and_attend`) -> maps upsampled to `sizes[i]` = (H, W), scaled to
        0..1 per image, as `attention_maps` returns them (a Tensor [N, H, W] when all sizes agree, else a list)."""
        vision = self.model.config.vision_config
        covered = grids.shape[-1] * vision.patch_size / vision.image_size  # the conv never sees the last rows/columns
        maps = []
        for grid, (h, w) in zip(grids.float().cpu(), sizes):
            inner = (max(1, round(h * covered)), max(1, round(w * covered)))
            up = F.interpolate(grid[None, None], size=inner, mode="bilinear", align_corners=False)
            up = F.pad(up, (0, w - inner[1], 0, h - inner[0]), mode="replicate")[0, 0]
            lo, hi = up.min(), up.max()
            maps.append((up - lo) / (hi - lo) if hi > lo else torch.zeros_like(up))
        if maps and all(m.shape == maps[0].shape for m in maps):
            return torch.stack(maps)
        return maps

    def fingerprint(self) -> str:
        """A short content identity (16 hex digits) of what makes the embeddings: architecture, preprocessing and
        weights, so embeddings are comparable exactly when fingerprints match.

        Equal for the same checkpoint however it was reached (path, symlink, copy, hub id) and in whatever dtype or on
        whatever device it runs (weights are hashed rounded to bf16; precisions differ by ~1e-3 in score). Weights
        are sampled, not read whole: up to 256 evenly spaced values of every tensor, with its name and shape, which
        tells fine-tunes of one architecture apart. An int8 scorer (``quantize="int8"``) has a fingerprint of its own,
        taken from its weights before quantization: its error on real weights is not bounded like a dtype's.
        """
        if self.quantize is not None:
            return self._quantized_fingerprint
        return self._fingerprint(None)

    def _fingerprint(self, quantize: str | None) -> str:
        vision = self.model.config.vision_config
        described = {
            "vision": {k: getattr(vision, k, None) for k in _FINGERPRINT_VISION_FIELDS},
            "normalize_embeddings": getattr(self.model.config, "normalize_embeddings", None),
            "preprocess": self.preprocess_config.to_dict(),
            **({"quantize": quantize} if quantize else {}),
        }
        digest = hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=8)
        with torch.no_grad():
            for name, tensor in sorted(self.model.state_dict().items()):
                flat = tensor.detach().reshape(-1)
                if flat.numel():
                    index = torch.linspace(0, flat.numel() - 1, min(flat.numel(), 256), device=flat.device).long()
                    flat = flat[index]
                flat = flat.to(torch.bfloat16) if flat.is_floating_point() else flat.to(torch.int64)
                digest.update(f"{name}{tuple(tensor.shape)}".encode())
                digest.update(flat.cpu().view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()
