"""Model families the reward trainer supports, found by the pipeline class in `model_index.json`.

Adding a family = adding one module with a `ModelFamily` subclass and listing it in `FAMILIES`.
"""

from __future__ import annotations

import importlib

from .base import Conditioning, ModelFamily, RewardSampler, size_info

__all__ = ["FAMILIES", "Conditioning", "ModelFamily", "RewardSampler", "UnsupportedPipelineError", "detect_family",
           "family_class", "size_info"]

# --model_type -> (module, class, the pipeline classes it trains); the modules are imported on first use
FAMILIES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "sd15": ("stable_diffusion", "StableDiffusionFamily", ("StableDiffusionPipeline",)),
    "sdxl": ("stable_diffusion", "StableDiffusionXLFamily", ("StableDiffusionXLPipeline",)),
    "flux": ("flux", "FluxFamily", ("FluxPipeline",)),
    "sd3": ("sd3", "StableDiffusion3Family", ("StableDiffusion3Pipeline",)),
}


class UnsupportedPipelineError(ValueError):
    """The pipeline's class is not one the trainer supports."""


def supported_pipelines() -> str:
    return ", ".join(f"{cls} (--model_type {name})" for name, (_, _, classes) in FAMILIES.items() for cls in classes)


def family_class(name: str) -> type[ModelFamily]:
    """The `ModelFamily` subclass of a `--model_type` value."""
    if name not in FAMILIES:
        raise UnsupportedPipelineError(f"Unknown model family {name!r}; supported: {supported_pipelines()}.")
    module, cls, _ = FAMILIES[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def detect_family(pipeline_class: str, source: str = "model_index.json") -> str:
    """`--model_type` of a pipeline class name (`_class_name` in model_index.json).

    Raises:
        UnsupportedPipelineError: naming the class, where it came from, and the supported pipelines.
    """
    for name, (_, _, classes) in FAMILIES.items():
        if pipeline_class in classes:
            return name
    raise UnsupportedPipelineError(
        f"{source} names the pipeline class {pipeline_class or '(none)'!r}, which the reward trainer does not "
        f"support. Supported: {supported_pipelines()}."
    )
