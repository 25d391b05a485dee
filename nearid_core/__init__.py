"""NearID identity embeddings: load a checkpoint, embed images, score and rank candidates by subject identity.

The public names below are imported on first use (PEP 562), so ``import nearid_core`` and the command lines start
without loading torch or transformers until they need them. Using the model API (``NearIDModel``, ``NearIDScorer``,
``load_model``, ...) registers model type ``nearid`` with transformers' ``AutoConfig`` / ``AutoModel``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "checkpoint",
    "CheckpointNotFoundError": "checkpoint",
    "load_model": "checkpoint",
    "save_head_only": "checkpoint",
    "save_release": "checkpoint",
    "load_embeddings": "embed_shards",
    "IdentityGuidance": "guidance",
    "NearIDConfig": "configuration_nearid",
    "NearIDModel": "modeling_nearid",
    "NearIDModelOutput": "modeling_nearid",
    "ImageInputError": "preprocessing",
    "PreprocessConfig": "preprocessing",
    "preprocess": "preprocessing",
    "DEFAULT_MODEL": "scorer",
    "DeviceError": "scorer",
    "NearIDScorer": "scorer",
    "to_percent": "scorer",
}
__all__ = [*_EXPORTS, "__version__"]

if TYPE_CHECKING:
    from .checkpoint import CheckpointError, CheckpointNotFoundError, load_model, save_head_only, save_release
    from .configuration_nearid import NearIDConfig
    from .embed_shards import load_embeddings
    from .guidance import IdentityGuidance
    from .modeling_nearid import NearIDModel, NearIDModelOutput
    from .preprocessing import ImageInputError, PreprocessConfig, preprocess
    from .scorer import DEFAULT_MODEL, DeviceError, NearIDScorer, to_percent


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'nearid_core' has no attribute {name!r}")
    if module == "configuration_nearid":
        module = "modeling_nearid"  # the config comes with the model, so that it is registered with the Auto classes
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
