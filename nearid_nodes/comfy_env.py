"""The one module that talks to ComfyUI (`folder_paths`, `comfy.*`); everything else in the pack goes through it.

Outside ComfyUI (plain Python, tests) every function falls back to something sensible: models are looked up in
`$NEARID_MODELS_DIR` or `./models/nearid`, models run on the CPU, progress is not reported and nothing is interrupted.
ComfyUI modules are looked up at call time, so tests can inject stand-ins through `sys.modules`.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

FOLDER_NAME = "nearid"
MODEL_EXTENSIONS = {".safetensors", ".json"}  # head-only files, and config.json marking HF-format directories


def _module(name: str) -> ModuleType | None:
    """A ComfyUI module, or None outside ComfyUI."""
    module = sys.modules.get(name)
    if module is not None:
        return module
    try:
        return importlib.import_module(name)
    except ImportError:
        return None


def in_comfyui() -> bool:
    """True when ComfyUI's model management is importable (i.e. the pack runs inside ComfyUI)."""
    return _module("comfy.model_management") is not None


# --------------------------------------------------------------------------------------------------------------------
# Model folders
# --------------------------------------------------------------------------------------------------------------------


def fallback_models_dir() -> str:
    """Where models are looked up outside ComfyUI: `$NEARID_MODELS_DIR`, else `./models/nearid`."""
    return os.path.abspath(os.environ.get("NEARID_MODELS_DIR", os.path.join("models", FOLDER_NAME)))


def register_model_folder() -> None:
    """Register `models/nearid` with ComfyUI's folder_paths (idempotent; keeps paths from extra_model_paths.yaml)."""
    fp = _module("folder_paths")
    if fp is None:
        return
    fp.add_model_folder_path(FOLDER_NAME, os.path.join(fp.models_dir, FOLDER_NAME))
    paths, extensions = fp.folder_names_and_paths[FOLDER_NAME]
    fp.folder_names_and_paths[FOLDER_NAME] = (paths, set(extensions) | MODEL_EXTENSIONS)


def model_folders() -> list[str]:
    """Every folder searched for NearID models, in priority order."""
    fp = _module("folder_paths")
    if fp is None:
        return [fallback_models_dir()]
    register_model_folder()
    return list(fp.get_folder_paths(FOLDER_NAME))


def _walk_files(folder: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder, followlinks=True):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        rel = os.path.relpath(root, folder)
        wanted = [f for f in files if os.path.splitext(f)[1].lower() in MODEL_EXTENSIONS]
        found += [f if rel == "." else os.path.join(rel, f) for f in wanted]
    return found


def model_files() -> list[str]:
    """Relative paths of `.safetensors` / `.json` files under the NearID folders (ComfyUI's cached listing)."""
    fp = _module("folder_paths")
    if fp is None:
        folder = fallback_models_dir()
        return sorted(_walk_files(folder)) if os.path.isdir(folder) else []
    register_model_folder()
    return list(fp.get_filename_list(FOLDER_NAME))


# --------------------------------------------------------------------------------------------------------------------
# Devices and ComfyUI model management
# --------------------------------------------------------------------------------------------------------------------


def load_device() -> torch.device:
    """ComfyUI's compute device (CPU under `--cpu`); the CPU outside ComfyUI."""
    mm = _module("comfy.model_management")
    return torch.device(mm.get_torch_device()) if mm is not None else torch.device("cpu")


def offload_device() -> torch.device:
    """Where an idle model waits: ComfyUI's offload device (CPU unless `--highvram`); the CPU outside ComfyUI."""
    mm = _module("comfy.model_management")
    return torch.device(mm.unet_offload_device()) if mm is not None else torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype | None:
    """fp16/bf16/fp32 on accelerators as ComfyUI decides for that device; None (= the core's default) otherwise."""
    mm = _module("comfy.model_management")
    if mm is None or device.type == "cpu":
        return None
    if mm.should_use_fp16(device):
        return torch.float16
    if mm.should_use_bf16(device):
        return torch.bfloat16
    return torch.float32


class _ModuleHolder(torch.nn.Module):
    """Plain container for the scorer's network: ModelPatcher writes bookkeeping attributes (`device`, ...) on the
    module it manages, and transformers models expose `device` as a read-only property."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner


def make_patcher(module: torch.nn.Module, load: torch.device, offload: torch.device):
    """Wrap `module` in a ComfyUI ModelPatcher so ComfyUI moves and evicts it with its other models; None outside."""
    mp = _module("comfy.model_patcher")
    if mp is None:
        return None
    return mp.ModelPatcher(_ModuleHolder(module), load_device=load, offload_device=offload)


def load_to_device(patcher, module: torch.nn.Module) -> torch.device:
    """Ask ComfyUI to place the model (freeing memory from other models if needed); return where its weights are.

    The model is loaded whole (`force_full_load`): it is not built from comfy.ops layers, so it cannot be split
    across devices. Under `--novram` ComfyUI keeps it on the offload device, hence the device is read back.
    """
    mm = _module("comfy.model_management")
    if patcher is not None and mm is not None:
        mm.load_models_gpu([patcher], force_full_load=True)
    param = next(module.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def intermediate_device() -> torch.device:
    """Where node outputs live (ComfyUI: CPU unless `--gpu-only`)."""
    mm = _module("comfy.model_management")
    return torch.device(mm.intermediate_device()) if mm is not None else torch.device("cpu")


def skip_downstream(fallback):
    """An output value that makes ComfyUI silently skip the nodes using it (`ExecutionBlocker(None)`), e.g. so that a
    Save Image on an empty branch does not fail; outside ComfyUI there is nothing downstream: `fallback`."""
    graph_utils = _module("comfy_execution.graph_utils")
    blocker = getattr(graph_utils, "ExecutionBlocker", None) if graph_utils is not None else None
    return blocker(None) if blocker is not None else fallback


# --------------------------------------------------------------------------------------------------------------------
# Progress and interruption
# --------------------------------------------------------------------------------------------------------------------


class _NoProgress:
    def update(self, value: int) -> None:
        pass


def progress_bar(total: int):
    """`comfy.utils.ProgressBar(total)` (shown on the node, also checks Cancel); a no-op outside ComfyUI."""
    utils = _module("comfy.utils")
    if utils is None or total <= 0:
        return _NoProgress()
    return utils.ProgressBar(total)


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel; a no-op outside ComfyUI."""
    mm = _module("comfy.model_management")
    if mm is not None:
        mm.throw_exception_if_processing_interrupted()
