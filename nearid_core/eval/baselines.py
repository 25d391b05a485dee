"""Comparison embedders behind one protocol: ``embed(images, batch_size, progress) -> Tensor[N, D]``, L2-normalised.

Registry (name -> default model; every entry takes a hub id or local directory override):

* ``nearid``: NearID (``Aleksandar/nearid-siglip2``) through :class:`~nearid_core.NearIDScorer`.
* ``siglip2-map``: frozen SigLIP2 read out through its own pretrained MAP head (a NearIDScorer built from the plain
  SigLIP checkpoint); the "SigLIP2 (backbone)" readout of the paper's NearID-Bench and MTG columns.
* ``siglip2-mean``: frozen SigLIP2, mean of the patch tokens (729 at 384 px), head skipped; the DreamBench++ column.
* ``clip-vit-l14``: ``openai/clip-vit-large-patch14``, ``CLIPModel.get_image_features`` (projected CLS), with its own
  slow (PIL) CLIP image processor (resize short side 224 bicubic, centre crop 224, CLIP mean/std).
* ``dinov2-l``: ``facebook/dinov2-large``, ``pooler_output`` (layer-normed CLS) with its own slow image processor.
* ``dino-vits8``: DreamBench++'s DINO scorer: DINO v1 ViT-S/8 (``facebook/dino-vits8``, transformers ``ViTModel``),
  CLS token after the final LayerNorm, with DreamBench++'s own transform (resize short side 256 bicubic, centre crop
  224, ImageNet mean/std), fp32 by default.
* ``clip-vit-b32``: DreamBench++'s CLIP-I scorer: ``openai/clip-vit-base-patch32``, ``get_image_features`` with its
  own slow CLIP processor, fp32 by default.

Which Table 1 cell each reproduces: NearID-Bench and MTG of the "CLIP ViT-L/14" and "DINOv2 ViT-L/14" rows come from
``clip-vit-l14`` and ``dinov2-l``, but their DB++ M-H cells (0.493 and 0.492) are DreamBench++'s own CLIP-I and DINO
ratings: ``clip-vit-b32`` and ``dino-vits8``. "SigLIP2 (backbone)": ``siglip2-map`` (NearID-Bench, MTG),
``siglip2-mean`` (DB++ 0.516). The two DreamBench++ scorers read images as DreamBench++ does (EXIF orientation
applied, transparency composited over white).

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

from ..preprocessing import ImageInput, iter_images, load_image, open_image, to_rgb, upright
from ..scorer import DEFAULT_MODEL, NearIDScorer, default_device, default_dtype

logger = logging.getLogger(__name__)

SIGLIP2_MODEL = "google/siglip2-so400m-patch14-384"
CLIP_MODEL = "openai/clip-vit-large-patch14"
DINOV2_MODEL = "facebook/dinov2-large"
DINO_V1_MODEL = "facebook/dino-vits8"  # DreamBench++'s DINO scorer (torch.hub dino_vits8), as ported to transformers
CLIP_B32_MODEL = "openai/clip-vit-base-patch32"  # DreamBench++'s CLIP-I scorer
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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


def dreambench_rgb(img: Image.Image) -> Image.Image:
    """An image as DreamBench++ reads it: EXIF orientation applied, transparency composited over white, then RGB."""
    img = upright(img)
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba)
    return to_rgb(img)


def _to_pil_dreambench(item: ImageInput) -> list[Image.Image]:
    """`_to_pil`, except that files and PIL images are read with `dreambench_rgb` (alpha over white)."""
    if isinstance(item, (str, os.PathLike)):
        return [dreambench_rgb(open_image(item))]
    if isinstance(item, Image.Image):
        return [dreambench_rgb(item)]
    return _to_pil(item)


@dataclass(frozen=True)
class ResizeCenterCrop:
    """DreamBench++'s DINO transform, torchvision's ``Resize(resize, BICUBIC)``, ``CenterCrop(crop)``, ``ToTensor``,
    ``Normalize(mean, std)``, on RGB PIL images; called like a transformers image processor.

    Resize scales the short side to ``resize`` and the long side to ``int(resize * long / short)`` (aspect kept);
    the crop starts at ``round((size - crop) / 2)`` on each axis.
    """

    resize: int = 256
    crop: int = 224
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if not 0 < self.crop <= self.resize:
            raise ValueError(f"need 0 < crop <= resize, got crop={self.crop}, resize={self.resize}")

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize."""
        if width <= height:
            return self.resize, int(self.resize * height / width)
        return int(self.resize * width / height), self.resize

    def crop_box(self, width: int, height: int) -> tuple[int, int, int, int]:
        """PIL (left, top, right, bottom) of the centre crop of a `width` x `height` image."""
        left, top = int(round((width - self.crop) / 2)), int(round((height - self.crop) / 2))
        return left, top, left + self.crop, top + self.crop

    def __call__(self, images: Sequence[Image.Image], return_tensors: str = "pt") -> dict[str, torch.Tensor]:
        """RGB PIL images -> ``{"pixel_values": [B, 3, crop, crop] float32}``."""
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        out = []
        for img in images:
            size = self.resized_size(*img.size)
            if size != img.size:
                img = img.resize(size, Image.Resampling.BICUBIC)
            img = img.crop(self.crop_box(*img.size))
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
            out.append((x - mean) / std)
        return {"pixel_values": torch.stack(out)}


class HFImageEmbedder:
    """A transformers vision model with an image processor; ``readout`` picks the embedding:
    ``"image_features"`` (``get_image_features``, e.g. CLIP), ``"pooler"`` (``pooler_output``, e.g. DINOv2) or
    ``"cls"`` (``last_hidden_state[:, 0]``, e.g. DINO v1's ViT). ``reader`` turns one input into RGB PIL images."""

    READOUTS = ("image_features", "pooler", "cls")

    def __init__(self, model: torch.nn.Module, processor, name: str, model_id: str, readout: str,
                 device: torch.device, dtype: torch.dtype,
                 reader: Callable[[ImageInput], list[Image.Image]] = _to_pil) -> None:
        if readout not in self.READOUTS:
            raise ValueError(f"readout must be one of {self.READOUTS}, got {readout!r}")
        self.model = model.to(device=device, dtype=dtype).eval()
        self.processor, self.name, self.model_id, self.readout = processor, name, str(model_id), readout
        self.device, self.dtype, self.reader = device, dtype, reader

    def __repr__(self) -> str:
        return (f"HFImageEmbedder(name={self.name!r}, model_id={self.model_id!r}, device={self.device}, "
                f"dtype={self.dtype})")

    def _features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if self.readout == "image_features":
            out = self.model.get_image_features(pixel_values=pixel_values)
            # transformers 4.x returns the tensor, 5.x a BaseModelOutputWithPooling whose pooler_output is projected.
            return out if isinstance(out, torch.Tensor) else out.pooler_output
        if self.readout == "cls":
            return self.model(pixel_values=pixel_values).last_hidden_state[:, 0]
        return self.model(pixel_values=pixel_values).pooler_output

    @torch.inference_mode()
    def embed(self, images: Sequence[ImageInput], batch_size: int = 16, progress: bool | None = None) -> torch.Tensor:
        out = []
        for batch in tqdm(_batched(list(images), batch_size), desc="embed", disable=not progress):
            pil = [im for item in batch for im in self.reader(item)]
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


def _device_dtype(device, dtype, default: torch.dtype | None = None) -> tuple[torch.device, torch.dtype]:
    device = torch.device(device) if device is not None else default_device()
    return device, dtype or default or default_dtype(device)


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


def _load_dreambench_clip(name: str, model: str, device, dtype, **kwargs) -> HFImageEmbedder:
    """DreamBench++'s CLIP-I scorer: ``CLIPModel.get_image_features`` through its slow CLIP processor, fp32."""
    from transformers import CLIPModel

    device, dtype = _device_dtype(device, dtype, default=torch.float32)
    net = CLIPModel.from_pretrained(model, **kwargs)
    return HFImageEmbedder(net, slow_image_processor(model, **kwargs), name, model, "image_features", device, dtype,
                           reader=_to_pil_dreambench)


def _load_dreambench_dino(name: str, model: str, device, dtype, **kwargs) -> HFImageEmbedder:
    """DreamBench++'s DINO scorer: a ViT's CLS token after the final LayerNorm (no pooler), DreamBench++'s own
    resize 256 / crop 224 transform (the checkpoint's image processor is not used), fp32."""
    from transformers import ViTModel

    device, dtype = _device_dtype(device, dtype, default=torch.float32)
    net = ViTModel.from_pretrained(model, add_pooling_layer=False, **kwargs)
    return HFImageEmbedder(net, ResizeCenterCrop(), name, model, "cls", device, dtype, reader=_to_pil_dreambench)


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
        BaselineSpec("dino-vits8", DINO_V1_MODEL, "DreamBench++ DINO: DINO v1 ViT-S/8 CLS, resize 256 / crop 224",
                     _load_dreambench_dino),
        BaselineSpec("clip-vit-b32", CLIP_B32_MODEL, "DreamBench++ CLIP-I: CLIP ViT-B/32 get_image_features",
                     _load_dreambench_clip),
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
        dtype: default fp16 on CUDA, bf16 on CPUs with bf16 matrix units, fp32 otherwise; the DreamBench++
            scorers (``dino-vits8``, ``clip-vit-b32``) default to fp32, as DreamBench++ ran them.
        **kwargs: passed to ``from_pretrained`` (``revision``, ``cache_dir``, ``local_files_only``).
    """
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose one of {sorted(BASELINES)}")
    spec = BASELINES[name]
    model = str(model) if model is not None else spec.default_model
    logger.info("Loading %s from %s", name, model)
    return spec.loader(name, model, device, dtype, **kwargs)
