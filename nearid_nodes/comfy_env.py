"""The one module that talks to ComfyUI (`folder_paths`, `comfy.*`); everything else in the pack goes through it.

Outside ComfyUI (plain Python, tests) every function falls back to something sensible: models are looked up in
`$NEARID_MODELS_DIR` or `./models/nearid`, models run on the CPU, progress is not reported and nothing is interrupted.
ComfyUI modules are looked up at call time, so tests can inject stand-ins through `sys.modules`.

Model paths are confined to the registered `nearid` folders (symlinks resolved) unless the server owner sets
`NEARID_ALLOW_ANY_MODEL_PATH=1`: prompts on a shared server must not read files elsewhere on the machine.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from collections import deque
from types import ModuleType

import torch

logger = logging.getLogger(__name__)

FOLDER_NAME = "nearid"
MODEL_EXTENSIONS = {".safetensors", ".json"}  # head-only files, and config.json marking HF-format directories
ALLOW_ANY_PATH_ENV = "NEARID_ALLOW_ANY_MODEL_PATH"
_TRUE = {"1", "true", "yes", "on"}


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


def allow_any_model_path() -> bool:
    """True when the server owner opted in (`NEARID_ALLOW_ANY_MODEL_PATH=1`) to model paths outside the folders."""
    return os.environ.get(ALLOW_ANY_PATH_ENV, "").strip().lower() in _TRUE


def _within(path: str, folder: str) -> bool:
    path, folder = os.path.normcase(path), os.path.normcase(folder)
    return path == folder or path.startswith(os.path.join(folder, ""))


def _real_folders() -> list[str]:
    return [os.path.realpath(folder) for folder in model_folders()]


def inside_model_folders(path: str, real_folders: list[str] | None = None) -> bool:
    """Whether `path`, symlinks resolved, lies in one of the NearID model folders (their own symlinks resolved too;
    `real_folders` caches them). The path need not exist."""
    real = os.path.realpath(path)
    return any(_within(real, folder) for folder in (real_folders or _real_folders()))


def _walk_files(folder: str, seen: set[str], real_folders: list[str] | None) -> list[str]:
    """Relative paths of model files under `folder`, breadth first (so the shortest name of a file wins).

    Follows symlinks, but visits each real directory and lists each real file once (`seen` holds real paths, shared
    across folders), so a symlink loop ends at once. Skips hidden entries, unreadable directories and anything whose
    real path leaves `real_folders` (None: anywhere is allowed).
    """
    def allowed(real: str) -> bool:
        return real not in seen and (real_folders is None or any(_within(real, f) for f in real_folders))

    found = []
    queue = deque([("", folder)])
    while queue:
        rel, path = queue.popleft()
        real = os.path.realpath(path)
        if not allowed(real):
            continue
        seen.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda e: e.name)
        except OSError:
            continue
        for entry in entries:
            if entry.name.startswith("."):
                continue
            child = os.path.join(rel, entry.name) if rel else entry.name
            try:
                is_dir = entry.is_dir()
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue
            if is_dir:
                queue.append((child, entry.path))
            elif is_file and os.path.splitext(entry.name)[1].lower() in MODEL_EXTENSIONS:
                file_real = os.path.realpath(entry.path)
                if allowed(file_real):
                    seen.add(file_real)
                    found.append(child)
    return found


def model_files() -> list[str]:
    """Relative paths of `.safetensors` / `.json` files under the NearID folders, each real file once (the first
    folder, then the shortest path, wins). Symlink loops are cut and, unless the owner opted in, links leaving the
    folders are skipped.

    ComfyUI's own `get_filename_list` is not used: it follows a symlink loop ~40 levels deep (one duplicate entry
    per level) and walks wherever a link points.
    """
    real_folders = None if allow_any_model_path() else _real_folders()
    seen: set[str] = set()
    files: list[str] = []
    for folder in model_folders():
        files += [f for f in _walk_files(folder, seen, real_folders) if f not in files]
    return files


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


def oom_exception() -> type[BaseException]:
    """The out-of-memory exception to catch: ComfyUI's `OOM_EXCEPTION`, torch's outside ComfyUI."""
    mm = _module("comfy.model_management")
    return getattr(mm, "OOM_EXCEPTION", torch.OutOfMemoryError) if mm is not None else torch.OutOfMemoryError


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
