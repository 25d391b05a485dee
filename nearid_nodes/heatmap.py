"""NearIDAttentionHeatmap: where the NearID MAP head reads identity from, as a MASK and as a coloured overlay."""

from __future__ import annotations

import torch

from . import comfy_env, trunk_cache
from .loader import NearIDModelHandle
from .scoring import _require_finite

# Colour stops, evenly spaced over 0..1 (RGB in 0..1).
COLORMAPS: dict[str, tuple[tuple[float, float, float], ...]] = {
    "inferno": ((0.001, 0.000, 0.014), (0.159, 0.044, 0.329), (0.397, 0.083, 0.433), (0.623, 0.165, 0.388),
                (0.831, 0.283, 0.259), (0.962, 0.490, 0.083), (0.981, 0.756, 0.153), (0.988, 0.998, 0.645)),
    "jet": ((0.0, 0.0, 0.5), (0.0, 0.0, 1.0), (0.0, 0.5, 1.0), (0.0, 1.0, 1.0), (0.5, 1.0, 0.5), (1.0, 1.0, 0.0),
            (1.0, 0.5, 0.0), (1.0, 0.0, 0.0), (0.5, 0.0, 0.0)),
    "gray": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
}


def colorize(maps: torch.Tensor, name: str) -> torch.Tensor:
    """[N, H, W] values in 0..1 -> [N, H, W, 3] colours, piecewise-linear over the stops of `COLORMAPS[name]`."""
    stops = torch.tensor(COLORMAPS[name], dtype=torch.float32, device=maps.device)
    pos = maps.float().clamp(0, 1) * (len(stops) - 1)
    low = pos.floor().long().clamp(max=len(stops) - 2)
    frac = (pos - low).unsqueeze(-1)
    return stops[low] * (1 - frac) + stops[low + 1] * frac


class NearIDAttentionHeatmap:
    """Visualise the MAP head's attention over the image."""

    DESCRIPTION = (
        "The NearID MAP head's attention over the image patches (averaged over heads, upsampled to the image, scaled "
        "to 0..1 per image): the regions the identity embedding is read from. Output as a MASK and as a coloured "
        "overlay on the image. This explains an embedding; it is not a score."
    )
    CATEGORY = "NearID/visualize"
    FUNCTION = "heatmap"
    RETURN_TYPES = ("MASK", "IMAGE")
    RETURN_NAMES = ("attention", "overlay")
    OUTPUT_TOOLTIPS = (
        "Attention maps [B, H, W] in 0..1 (1 = most attended), at the image size.",
        "The images blended with the coloured attention map [B, H, W, 3].",
    )

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "nearid_model": ("NEARID_MODEL", {"tooltip": "From NearID Model Loader."}),
                "images": ("IMAGE", {"tooltip": "Images to explain."}),
                "opacity": ("FLOAT", {"default": 0.5, "min": 0.0, "max": 1.0, "step": 0.05,
                                      "tooltip": "Weight of the heatmap colours in the overlay (0 = image only)."}),
                "colormap": (list(COLORMAPS), {"default": "inferno", "tooltip": "Colours of the overlay."}),
            },
        }

    @torch.inference_mode()
    def heatmap(self, nearid_model: NearIDModelHandle, images: torch.Tensor, opacity: float = 0.5,
                colormap: str = "inferno") -> tuple[torch.Tensor, torch.Tensor]:
        if colormap not in COLORMAPS:
            raise ValueError(f"NearID: colormap must be one of {tuple(COLORMAPS)}, got {colormap!r}.")
        _require_finite(images, "images")
        n, h, w = (int(s) for s in images.shape[:3])
        _, grids = trunk_cache.encode(nearid_model, images, comfy_env.progress_bar(n))  # shared with the scoring nodes
        maps = nearid_model.scorer.attention_to_maps(grids, [(h, w)] * n)
        attention = maps.float().cpu() if n else torch.zeros((0, h, w))
        rgb = images[..., :3] if images.shape[-1] >= 3 else images[..., :1].expand(-1, -1, -1, 3)
        colors = colorize(attention, colormap).to(images.device)
        overlay = (rgb.float() * (1 - float(opacity)) + colors * float(opacity)).clamp(0, 1)
        return attention.to(images.device), overlay
