"""NearIDModelLoader: pick a checkpoint from `models/nearid/` (or a hub id) and return a managed scorer handle."""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from nearid_core import DEFAULT_MODEL, CheckpointNotFoundError, NearIDScorer

from . import comfy_env
from .trunk_cache import TrunkCache

logger = logging.getLogger(__name__)

HUB_PREFIX = "hub:"
DEFAULT_CHOICE = HUB_PREFIX + DEFAULT_MODEL
DEVICES = ("auto", "cpu")
DTYPES = {"auto": None, "float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
EXPECTED_FILES = (
    "an HF-format directory (config.json + model.safetensors + preprocessor_config.json, as downloaded from "
    f"{DEFAULT_MODEL}) or a NearID head-only .safetensors file"
)


def short_name(source: str) -> str:
    """A short name for the UI: an absolute path as its last component, a hub id or dropdown entry as it is; without
    a `.safetensors` suffix."""
    text = str(source).rstrip("/\\") or str(source)
    if os.path.isabs(os.path.expanduser(text)):
        text = os.path.basename(text) or text
    return text[: -len(".safetensors")] if text.lower().endswith(".safetensors") else text


@dataclass(eq=False)
class NearIDModelHandle:
    """What flows through a NEARID_MODEL socket: the core scorer, plus ComfyUI's handle on its weights.

    Attributes:
        scorer: the `nearid_core.NearIDScorer`; call `ready()` before using it.
        name: where the weights came from (hub id or absolute path), for logs.
        batch_size: images per forward pass.
        patcher: ComfyUI ModelPatcher managing the weights (None outside ComfyUI or on device "cpu").
        fingerprint: content identity of the weights and preprocessing (`NearIDScorer.fingerprint`, computed when not
            given); embeddings remember it, so the same weights reached by another path or a symlink still match.
        display_name: short name for the UI (default: from `name`).
        cache: per-image trunk results shared by every node this handle feeds (`trunk_cache`).
    """

    scorer: NearIDScorer
    name: str
    batch_size: int = 16
    patcher: Any = None
    fingerprint: str = ""
    display_name: str = ""
    cache: TrunkCache = field(default_factory=TrunkCache, repr=False)

    def __post_init__(self) -> None:
        if not self.fingerprint:
            with torch.inference_mode():
                self.fingerprint = self.scorer.fingerprint()
        if not self.display_name:
            self.display_name = short_name(self.name)

    @property
    def label(self) -> str:
        """`display name [fingerprint prefix]`, as the UI shows the model."""
        return f"{self.display_name} [{self.fingerprint[:8]}]"

    def ready(self) -> NearIDScorer:
        """Load the weights onto the compute device through ComfyUI (which may evict other models, or this one
        later when memory is needed) and point the scorer's inputs at wherever the weights now are."""
        device = comfy_env.load_to_device(self.patcher, self.scorer.model)
        return self.scorer.to(device)

    def __repr__(self) -> str:
        return f"NearIDModelHandle({self.label!r}, {self.scorer!r})"


# --------------------------------------------------------------------------------------------------------------------
# The model dropdown
# --------------------------------------------------------------------------------------------------------------------


class ModelPathError(ValueError):
    """A model path the loader refuses: outside the NearID model folders (without the owner's opt-in), or malformed."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")


def is_hub_id(text: str) -> bool:
    """`owner/name` as the Hugging Face hub spells repository ids; `../x`, `/etc`, `a/../../b`, `~/x` are paths."""
    return len(text) <= 96 and _HUB_ID.fullmatch(text) is not None and ".." not in text


def _parents(relpath: str) -> list[str]:
    parts = relpath.replace("\\", "/").split("/")[:-1]
    return [os.path.join(*parts[: i + 1]) for i in range(len(parts))]


def model_choices() -> list[str]:
    """Dropdown entries: the default hub id, HF-format directories (holding config.json) and head-only
    `.safetensors` files under every registered `nearid` folder (files inside HF directories are not listed).
    Each real file appears once, however many symlinks lead to it."""
    files = comfy_env.model_files()
    hf_dirs = sorted({os.path.dirname(f) for f in files if os.path.basename(f) == "config.json" and os.path.dirname(f)})
    inside = set(hf_dirs)
    heads = [
        f for f in files
        if f.lower().endswith(".safetensors") and not any(p in inside for p in _parents(f))
    ]
    return [DEFAULT_CHOICE, *hf_dirs, *sorted(heads)]


def default_choice(choices: list[str]) -> str:
    """The dropdown's default: the first local model when there is one (so an offline user's new loader works at
    once), else the hub id."""
    return choices[1] if len(choices) > 1 else DEFAULT_CHOICE


def _searched() -> str:
    return "\n".join(f"  - {folder}" for folder in comfy_env.model_folders())


def _available(limit: int = 20) -> str:
    """The local dropdown entries (model files inside the model folders only), for error messages."""
    local = model_choices()[1:]
    if not local:
        return "  (none)"
    more = f"\n  ... and {len(local) - limit} more" if len(local) > limit else ""
    return "\n".join(f"  - {entry}" for entry in local[:limit]) + more


def _refuse(target: str, why: str) -> ModelPathError:
    return ModelPathError(
        f"NearID model path {target!r} {why}. The loader only reads models inside the NearID model folders:\n"
        f"{_searched()}\nPut the model in one of them and pick it in the dropdown (or give its path relative to the "
        f"folder), or give a hub id 'owner/name'. Server owners can allow any path with "
        f"{comfy_env.ALLOW_ANY_PATH_ENV}=1 in ComfyUI's environment."
    )


def _local_path(target: str) -> str | None:
    """`target` as an existing path in the model folders (absolute, or relative to one of them); None if none exists.

    Raises:
        ModelPathError: the path (symlinks resolved) leaves the model folders and the owner did not opt in.
    """
    path = os.path.expanduser(target)
    candidates = [path] if os.path.isabs(path) else [os.path.join(f, path) for f in comfy_env.model_folders()]
    confined = not comfy_env.allow_any_model_path()
    outside = False
    for candidate in candidates:
        if confined and not comfy_env.inside_model_folders(candidate):
            outside = True  # whether it exists is not checked, so errors tell nothing about files elsewhere
        elif os.path.exists(candidate):
            return os.path.abspath(candidate)
    if outside:
        raise _refuse(target, "is outside the NearID model folders (symlinks resolved)")
    return None


def _hub(hub_id: str) -> str:
    """A hub id, checked because nearid_core first tries a local path of that name, relative to ComfyUI's working
    directory: such a path is used only inside the model folders (or with the owner's opt-in)."""
    if not os.path.exists(hub_id) or comfy_env.allow_any_model_path():
        return hub_id
    if comfy_env.inside_model_folders(hub_id):
        return os.path.abspath(hub_id)
    raise _refuse(hub_id, "names a path in ComfyUI's working directory, which would be read instead of the hub")


def resolve_model(choice: str, hub_id: str = "") -> str:
    """Dropdown entry (or the `hub_id` override) -> a hub id or an absolute local path for `from_pretrained`.

    Paths must lie in the NearID model folders (symlinks resolved) unless the owner set NEARID_ALLOW_ANY_MODEL_PATH=1.

    Raises:
        ModelPathError: a path outside the model folders, or text that is neither a hub id nor a path.
        FileNotFoundError: naming every folder searched and the model entries available there.
    """
    override = str(hub_id or "").strip()
    if not override and choice.startswith(HUB_PREFIX):
        name = choice[len(HUB_PREFIX):]
        if not is_hub_id(name):
            raise ModelPathError(f"{choice!r} does not name a hub id of the form 'owner/name'.")
        return _hub(name)
    target = override or choice
    if not target or "\0" in target:
        raise ModelPathError(f"{target!r} is not a model name or path.")
    local = _local_path(target)
    if local is not None:
        return local
    if override and is_hub_id(override):
        return _hub(override)  # not a local entry: a hub id, resolved (and explained if missing) by nearid_core
    raise FileNotFoundError(
        f"NearID model {target!r} was not found{' (and it is not a hub id owner/name)' if override else ''}. "
        f"Folders searched:\n{_searched()}\nModels available there:\n{_available()}\n"
        f"Put {EXPECTED_FILES} in one of them (then refresh the node list), or choose {DEFAULT_CHOICE!r}."
    )


# --------------------------------------------------------------------------------------------------------------------
# The node
# --------------------------------------------------------------------------------------------------------------------


class NearIDModelLoader:
    """Load a NearID identity model (SigLIP2 trunk + NearID MAP head) for the other NearID nodes."""

    DESCRIPTION = (
        "Loads a NearID identity model from models/nearid/ (HF-format directories and head-only .safetensors files) "
        f"or from the Hugging Face hub (default {DEFAULT_MODEL}, downloaded to the HF cache on first use). "
        "Paths outside the NearID model folders are refused unless the server owner allows them. "
        "The weights are handed to ComfyUI's model management: moved to the GPU when a NearID node runs and "
        "offloaded when other models need the memory."
    )
    CATEGORY = "NearID/loaders"
    FUNCTION = "load"
    RETURN_TYPES = ("NEARID_MODEL",)
    RETURN_NAMES = ("nearid_model",)
    OUTPUT_TOOLTIPS = ("NearID scorer for the Embed / Score / Best-of-N / Threshold / Heatmap nodes.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        choices = model_choices()
        return {
            "required": {
                "model": (choices, {
                    "default": default_choice(choices),
                    "tooltip": "Entries under models/nearid/ (directories with config.json, head-only .safetensors "
                               f"files) or '{DEFAULT_CHOICE}' (downloaded from the hub on first use). The default is "
                               "the first local model when there is one.",
                }),
                "device": (list(DEVICES), {
                    "default": "auto",
                    "tooltip": "auto: ComfyUI's GPU, with automatic offloading when idle; cpu: always run on the CPU.",
                }),
                "dtype": (list(DTYPES), {
                    "default": "auto",
                    "tooltip": "auto: fp16/bf16 on GPUs as ComfyUI picks for the device; bf16 on CPUs with bf16 "
                               "matrix units, else fp32. Scores differ by about 1e-3 between precisions.",
                }),
                "batch_size": ("INT", {
                    "default": 16, "min": 1, "max": 256,
                    "tooltip": "Images per forward pass (lower it if the GPU runs out of memory).",
                }),
            },
            "optional": {
                "hub_id": ("STRING", {
                    "default": "",
                    "tooltip": "Overrides the dropdown when not empty: a hub id 'owner/name', or a path relative to "
                               "models/nearid/ (paths outside the NearID model folders only if the server owner "
                               f"set {comfy_env.ALLOW_ANY_PATH_ENV}=1).",
                }),
            },
        }

    @classmethod
    def VALIDATE_INPUTS(cls, hub_id: str | None = "") -> bool | str:
        """Refuse a bad `hub_id` when the prompt is queued, with the reason instead of a traceback (None: the input
        is linked, so it is checked when the node runs). `model` is left to ComfyUI's dropdown check."""
        if not isinstance(hub_id, str) or not hub_id.strip():
            return True
        try:
            resolve_model(DEFAULT_CHOICE, hub_id)
        except (ModelPathError, FileNotFoundError) as err:
            return str(err)
        return True

    def load(self, model: str, device: str, dtype: str, batch_size: int, hub_id: str = "") -> tuple[NearIDModelHandle]:
        if device not in DEVICES:
            raise ValueError(f"device must be one of {DEVICES}, got {device!r}.")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}.")
        source = resolve_model(model, hub_id)
        load = comfy_env.load_device() if device == "auto" else torch.device("cpu")
        offload = comfy_env.offload_device() if device == "auto" else torch.device("cpu")
        torch_dtype = DTYPES[dtype] or comfy_env.auto_dtype(load)
        # A head-only file names its trunk: that path must lie in the model folders too (unless the owner opted in).
        roots = None if comfy_env.allow_any_model_path() else comfy_env.model_folders()
        try:
            with torch.inference_mode():
                scorer = NearIDScorer.from_pretrained(source, device=offload, dtype=torch_dtype, allowed_roots=roots)
        except CheckpointNotFoundError as err:
            raise CheckpointNotFoundError(
                f"{err}\nLocal NearID folders searched:\n{_searched()}\nLocal models there (pick one in the "
                f"dropdown to work offline):\n{_available()}"
            ) from err
        patcher = comfy_env.make_patcher(scorer.model, load, offload) if device == "auto" else None
        shown = str(hub_id or "").strip() or (model[len(HUB_PREFIX):] if model.startswith(HUB_PREFIX) else model)
        handle = NearIDModelHandle(scorer=scorer, name=str(source), batch_size=int(batch_size), patcher=patcher,
                                   display_name=short_name(shown))
        logger.info("NearID: loaded %s as %s (dtype %s, compute device %s)", source, handle.label, scorer.dtype, load)
        return (handle,)
