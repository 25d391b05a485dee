"""Comparison embedders behind one protocol: ``embed(images, batch_size, progress) -> Tensor[N, D]``, L2-normalised.

Registry (name -> default model; every entry takes a hub id or local directory override):

* ``nearid``: NearID (``Aleksandar/nearid-siglip2``) through :class:`~nearid_core.NearIDScorer`.
* ``siglip2-map``: frozen SigLIP2 read out through its own pretrained MAP head (a NearIDScorer built from the plain
  SigLIP checkpoint); the "SigLIP2 (backbone)" readout of the paper's NearID-Bench and MTG columns.
* ``siglip2-mean``: frozen SigLIP2, mean of the patch tokens (729 at 384 px), head skipped; the DreamBench++ column.
* ``clip-vit-l14``: ``openai/clip-vit-large-patch14``, ``CLIPModel.get_image_features`` (projected CLS), with its own
  slow (PIL) CLIP image processor (resize short side 224 bicubic, centre crop 224, CLIP mean/std).
* ``dinov2-l``: ``facebook/dinov2-large``, ``pooler_output`` (layer-normed CLS) with its own slow image processor.

Cosines of different embedders are not on a common scale; compare benchmark metrics, not raw similarities.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F
import transformers
from PIL import Image
from tqdm.auto import tqdm

from ..preprocessing import ImageInput, iter_images, load_image, to_rgb
from ..scorer import DEFAULT_MODEL, NearIDScorer, default_device, default_dtype

logger = logging.getLogger(__name__)

SIGLIP2_MODEL = "google/siglip2-so400m-patch14-384"
CLIP_MODEL = "openai/clip-vit-large-patch14"
DINOV2_MODEL = "facebook/dinov2-large"


@runtime_checkable
class Embedder(Protocol):
    """What the benchmarks need from a model.

    Attributes:
        name: registry name (``nearid``, ``clip-vit-l14``, ...).
        model_id: the hub id or local path the weights came from.
    """

    name: str
    model_id: str

    def embed(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool | None = None) -> torch.Tensor:
        """Images (paths, PIL, numpy, tensors) -> [N, D] float32 L2-normalised embeddings."""
        ...


def model_tag(model_id: str | os.PathLike) -> str:
    """File-name friendly tag of a model: hub ids ``a/b`` -> ``a~b``; local paths -> their last component."""
    text = str(model_id)
    if os.path.exists(text):
        return Path(text).resolve().name or "model"
    return text.replace("/", "~")


def _batched(items: Sequence, size: int) -> list[list]:
    it = iter(items)
    return list(iter(lambda: list(islice(it, size)), []))


class ScorerEmbedder:
    """A NearIDScorer read out through its MAP head (``readout="map"``) or by mean-pooling the trunk's patch tokens
    (``readout="mean"``, head skipped)."""

    def __init__(self, scorer: NearIDScorer, name: str, model_id: str, readout: str = "map") -> None:
        if readout not in ("map", "mean"):
            raise ValueError(f"readout must be 'map' or 'mean', got {readout!r}")
        self.scorer, self.name, self.model_id, self.readout = scorer, name, str(model_id), readout

    def __repr__(self) -> str:
        return f"ScorerEmbedder(name={self.name!r}, model_id={self.model_id!r}, readout={self.readout!r})"

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool | None = None) -> torch.Tensor:
        return self.scorer.embed(list(images), batch_size=batch_size, progress=progress, readout=self.readout)


def _to_pil(item: ImageInput) -> list[Image.Image]:
    """One input (path, PIL, array or tensor, possibly a batch) -> RGB PIL images."""
    if isinstance(item, (str, os.PathLike)):
        return [load_image(item)]
    if isinstance(item, Image.Image):
        return [to_rgb(item)]  # as displayed (EXIF), 16-bit scaled
    out = []
    for t in iter_images([item]):
        arr = (t.detach().float().clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
        out.append(Image.fromarray(arr, "RGB"))
    return out


class HFImageEmbedder:
    """A transformers vision model with its own image processor; ``readout`` picks the embedding:
    ``"image_features"`` (``get_image_features``, e.g. CLIP) or ``"pooler"`` (``pooler_output``, e.g. DINOv2)."""

    def __init__(self, model: torch.nn.Module, processor, name: str, model_id: str, readout: str,
                 device: torch.device, dtype: torch.dtype) -> None:
        if readout not in ("image_features", "pooler"):
            raise ValueError(f"readout must be 'image_features' or 'pooler', got {readout!r}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.name, self.model_id, self.readout = processor, name, str(model_id), readout
        self.device, self.dtype = device, dtype

    def __repr__(self) -> str:
        return (f"HFImageEmbedder(name={self.name!r}, model_id={self.model_id!r}, device={self.device}, "
                f"dtype={self.dtype})")

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.readout == "image_features":
            out = self.model.get_image_features(pixel_values=pixel_values)
            # transformers 4.x returns the tensor, 5.x a BaseModelOutputWithPooling whose pooler_output is projected.
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        return self.model(pixel_values=pixel_values).pooler_output

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool | None = None) -> torch.Tensor:
        out = []
        for batch in tqdm(_batched(list(images), batch_size), desc="embed", disable=not progress):
            pil = [im for item in batch for im in _to_pil(item)]
            pixels = self.processor(images=pil, return_tensors="pt")["pixel_values"]
            out.append(self._features(pixels.to(self.device, self.dtype)).float())
        if not out:
            return torch.empty(0, 0, device=self.device)
        return F.normalize(torch.cat(out), dim=-1)


def slow_image_processor(name_or_path: str, **kwargs):
    """The model's own slow (PIL / numpy) image processor, as the reference baselines use (transformers 4.x and 5.x)."""
    from transformers import AutoImageProcessor

    if int(transformers.__version__.split(".")[0]) >= 5:
        return AutoImageProcessor.from_pretrained(name_or_path, backend="pil", **kwargs)
    return AutoImageProcessor.from_pretrained(name_or_path, use_fast=False, **kwargs)


def _device_dtype(device, dtype) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else default_device()
    return device, dtype or default_dtype(device)


def _load_nearid(name: str, model: str, device, dtype, **kwargs) -> ScorerEmbedder:
    scorer = NearIDScorer.from_pretrained(model, device=device, dtype=dtype, **kwargs)
    return ScorerEmbedder(scorer, name, model, "map")


def _load_siglip_mean(name: str, model: str, device, dtype, **kwargs) -> ScorerEmbedder:
    scorer = NearIDScorer.from_pretrained(model, device=device, dtype=dtype, **kwargs)
    return ScorerEmbedder(scorer, name, model, "mean")


def _load_clip(name: str, model: str, device, dtype, **kwargs) -> HFImageEmbedder:
    from transformers import CLIPModel

    device, dtype = _device_dtype(device, dtype)
    net = CLIPModel.from_pretrained(model, **kwargs)
    return HFImageEmbedder(net, slow_image_processor(model, **kwargs), name, model, "image_features", device, dtype)


def _load_dinov2(name: str, model: str, device, dtype, **kwargs) -> HFImageEmbedder:
    from transformers import AutoModel

    device, dtype = _device_dtype(device, dtype)
    net = AutoModel.from_pretrained(model, **kwargs)
    return HFImageEmbedder(net, slow_image_processor(model, **kwargs), name, model, "pooler", device, dtype)


@dataclass(frozen=True)
class BaselineSpec:
    """A registry entry: default weights and how to build the embedder."""

    name: str
    default_model: str
    description: str
    loader: Callable[..., Embedder]


BASELINES: dict[str, BaselineSpec] = {
    spec.name: spec
    for spec in (
        BaselineSpec("nearid", DEFAULT_MODEL, "NearID MAP head on frozen SigLIP2", _load_nearid),
        BaselineSpec("siglip2-map", SIGLIP2_MODEL, "SigLIP2 through its own pretrained MAP head", _load_nearid),
        BaselineSpec("siglip2-mean", SIGLIP2_MODEL, "SigLIP2 mean-pooled patch tokens (head skipped)",
                     _load_siglip_mean),
        BaselineSpec("clip-vit-l14", CLIP_MODEL, "CLIP ViT-L/14 get_image_features", _load_clip),
        BaselineSpec("dinov2-l", DINOV2_MODEL, "DINOv2-L pooler_output (CLS)", _load_dinov2),
    )
}


def load_embedder(
    name: str = "nearid",
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    **kwargs,
) -> Embedder:
    """Build a registered embedder.

    Args:
        name: registry name, one of :data:`BASELINES`.
        model: hub id or local directory overriding the entry's default weights.
        device: default CUDA if available, else CPU.
        dtype: default fp16 on CUDA, bf16 on CPUs with bf16 matrix units, fp32 otherwise.
        **kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ``local_files_only``).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    spec = BASELINES[name]
    model = str(model) if model is not None else spec.default_model
    logger.info("Loading %s from %s", name, model)
    return spec.loader(name, model, device, dtype, **kwargs)
