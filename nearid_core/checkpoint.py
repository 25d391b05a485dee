"""Find, load and save NearID checkpoints; the one place that knows every weight layout.

Supported sources (a hub id or a local path):

* **NearID release** (`Aleksandar/nearid-siglip2`): `config.json` with `model_type: nearid`, `model.safetensors`
  with transformers-4.x keys `backbone.vision_model.*` (5.x keys `backbone.*` load too).
* **Plain SigLIP / SigLIP2** (`google/siglip2-so400m-patch14-384`): a full `SiglipModel` (text tower ignored) or a
  vision-only `SiglipVisionModel` checkpoint. The NearID head starts as that checkpoint's own MAP head, i.e. the
  frozen baseline.
* **Head-only** NearID checkpoint: one `.safetensors` file (~15M parameters) whose metadata holds the NearID config
  and names the trunk to load (`backbone_name_or_path`), or a directory holding such a file.
* **Reference training checkpoint** (`encoder_wrapper.model.vision_model.*` + `head.map_pooler.*`).

Weights are only ever read with safetensors; nothing is unpickled, and no code shipped with a checkpoint runs here
(`auto_map` is ignored; hub downloads fetch only `*.json` / `*.safetensors`). `save_release` writes exports that the
paper's own loaders read as well (`auto_map` + this package's two model modules, see its docstring).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file

from .configuration_nearid import NearIDConfig
from .modeling_nearid import NearIDModel
from .preprocessing import PreprocessConfig

try:  # transformers >= 5
    from transformers.initialization import no_init_weights
except ImportError:  # transformers 4.x
    from transformers.modeling_utils import no_init_weights

logger = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
HEAD_WEIGHTS_NAME = "nearid_head.safetensors"
CONFIG_NAME = "config.json"
PREPROCESSOR_NAME = "preprocessor_config.json"
_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors"]
_HEAD_FORMAT = "nearid-head"
_MAX_HEAD_CHAIN = 8  # head-only files naming head-only trunks: more links than this is a mistake


class CheckpointNotFoundError(FileNotFoundError):
    """A hub id could not be downloaded / found in the cache, or a local path does not exist."""


class CheckpointError(ValueError):
    """A checkpoint exists but its files or tensors are not what the layout requires."""


# --------------------------------------------------------------------------------------------------------------------
# Locating files
# --------------------------------------------------------------------------------------------------------------------


def _hub_cache_dir(cache_dir: str | os.PathLike | None) -> str:
    if cache_dir is not None:
        return str(cache_dir)
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def resolve_checkpoint(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Path:
    """Return a local directory (or head-only file) for a hub id or local path, downloading on first use.

    Raises:
        CheckpointNotFoundError: naming the id, the cache directory, and how to pass a local directory instead.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    name = str(name_or_path)
    if not _looks_like_hub_id(name):
        raise CheckpointNotFoundError(
            f"Checkpoint path {name!r} does not exist ({path.absolute()}) and is not a hub id of the form 'owner/name'."
        )
    not_local = (f"  No local path {path.absolute()} exists either, so {name!r} was read as a hub id; if you meant "
                 "a local directory, check the path (relative paths start from the current directory).\n")
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                name,
                revision=revision,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                allow_patterns=_DOWNLOAD_PATTERNS,
            )
        )
    except Exception as err:  # network errors, offline mode, missing repo, gated repo ... all mean the same here
        raise CheckpointNotFoundError(
            f"Could not download or find the model {name!r} ({type(err).__name__}: {err}).\n"
            f"{not_local}"
            f"  Hub cache searched: {_hub_cache_dir(cache_dir)}\n"
            f"  If this machine is offline, download it elsewhere (`hf download {name} "
            f"--local-dir DIR`), copy DIR here and pass the directory instead of the id, "
            f"e.g. from_pretrained('DIR') or `--model DIR`; or set HF_HUB_OFFLINE=1 to use the cache only."
        ) from err


def _looks_like_hub_id(name: str) -> bool:
    """`owner/name`, as hub repository ids are spelled (no leading dot, no `..`)."""
    return re.fullmatch(r"[\w.\-]+/[\w.\-]+", name) is not None and not name.startswith(".") and ".." not in name


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); restore the file from the checkpoint's source.") from err
    except OSError as err:  # a directory, unreadable permissions ...
        raise CheckpointError(f"{path} cannot be read as a file ({err.strerror or err}).") from err
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object, not {type(data).__name__}.")
    return data


def load_preprocess_config(directory: str | os.PathLike, image_size: int | None = None) -> PreprocessConfig:
    """The checkpoint's `preprocessor_config.json` as a `PreprocessConfig` (SigLIP defaults at `image_size`, with a
    warning, when there is none).

    Raises:
        CheckpointError: the file is not valid JSON or holds fields SigLIP preprocessing cannot use; names the file.
    """
    path = Path(directory) / PREPROCESSOR_NAME
    if not path.exists():
        return PreprocessConfig.from_pretrained(directory, image_size)
    try:
        return PreprocessConfig.from_dict(_read_json(path), image_size)
    except (ValueError, TypeError, KeyError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{path} is not a usable SigLIP preprocessor config: {err}") from err


def _weight_files(directory: Path) -> list[Path]:
    index = directory / WEIGHTS_INDEX_NAME
    if index.exists():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index} has no 'weight_map' of tensor names to shard files.")
        shards = sorted(set(map(str, weight_map.values())))
        files = [directory / s for s in shards]
    elif (directory / WEIGHTS_NAME).exists():
        files = [directory / WEIGHTS_NAME]
    else:
        model_like = (".json", ".safetensors", ".bin", ".pt", ".pth", ".ckpt")  # never list unrelated files
        found = sorted(p.name for p in directory.iterdir() if p.name.endswith(model_like))
        bins = [f for f in found if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        hint = f" Found pickle-format weights {bins}: convert them to safetensors first." if bins else ""
        raise CheckpointError(f"No {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {directory}; model files: {found}.{hint}")
    missing = [str(f) for f in files if not f.exists()]
    if missing:
        raise CheckpointError(f"Weight shards listed in {index} are missing: {missing}")
    return files


# --------------------------------------------------------------------------------------------------------------------
# Key remapping: every known layout -> keys of a transformers-5.x SiglipVisionModel (embeddings./encoder./
# post_layernorm./head.). `None` means: not part of the vision tower, skip.
# --------------------------------------------------------------------------------------------------------------------

_VISION_ROOTS = ("embeddings.", "encoder.", "post_layernorm.", "head.")
_HEAD_KEYS_RE = re.compile(r"^(probe|attention\.|layernorm\.|mlp\.)")
_PREFIX_RULES: tuple[tuple[str, str | None], ...] = (
    ("encoder_wrapper.model.vision_model.head.", None),  # reference training: untrained original head
    ("encoder_wrapper.model.vision_model.", ""),  # reference training: trunk
    ("encoder_wrapper.post_ln.", None),  # reference training: unused extra LayerNorm
    ("head.map_pooler.", "head."),  # reference training: the trained head
    ("backbone.vision_model.", ""),  # NearID release (transformers 4.x names)
    ("backbone.", ""),  # NearID saved by transformers 5.x
    ("vision_model.", ""),  # SiglipModel / SiglipVisionModel (4.x names)
    ("text_model.", None),  # SiglipModel text tower
)
_DROP_KEYS = {"logit_scale", "logit_bias"}


def vision_key(key: str) -> str | None:
    """Map one checkpoint key of any supported layout to its SiglipVisionModel (5.x) key, or None to skip it."""
    if key in _DROP_KEYS:
        return None
    for prefix, replacement in _PREFIX_RULES:
        if key.startswith(prefix):
            return None if replacement is None else replacement + key[len(prefix) :]
    if key.startswith(_VISION_ROOTS):
        return key
    if _HEAD_KEYS_RE.match(key):  # bare head-only keys
        return "head." + key
    return key  # unknown: reported as unexpected by load_vision_state_dict


def _read_tensors(files: Iterable[Path], dtype: torch.dtype | None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read the vision-tower tensors (remapped with `vision_key`) from safetensors files; skip the rest unread."""
    tensors: dict[str, torch.Tensor] = {}
    metadata: dict = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt")
        except Exception as err:
            raise CheckpointError(f"Cannot read {file} as safetensors ({err}); the file is truncated or corrupt.") from err
        non_finite = []
        with handle as f:
            metadata.update(f.metadata() or {})
            for key in f.keys():
                target = vision_key(key)
                if target is None:
                    continue
                if target in tensors:
                    raise CheckpointError(f"{file}: two tensors map to {target!r} (second: {key!r}).")
                tensor = f.get_tensor(key)
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    non_finite.append(key)
                tensors[target] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        if non_finite:
            raise CheckpointError(
                f"{file} holds NaN or infinite weights in {len(non_finite)} tensor(s): {_shorten(non_finite)}; "
                "the checkpoint is broken (e.g. saved after training diverged): restore or re-export it."
            )
    return tensors, metadata


def load_vision_state_dict(
    module: torch.nn.Module, tensors: Mapping[str, torch.Tensor], *, source: str, only_head: bool = False
) -> None:
    """Copy remapped tensors into a SiglipVisionModel (4.x or 5.x naming), failing loudly on any mismatch.

    Args:
        module: the `SiglipVisionModel` (e.g. `NearIDModel.backbone`).
        tensors: keys as returned by `vision_key`.
        source: file or id named in error messages.
        only_head: expect just the 11 MAP-head tensors (head-only checkpoints).
    """
    own = module.state_dict()
    nested = next(iter(own)).startswith("vision_model.")
    to_own = (lambda k: "vision_model." + k) if nested else (lambda k: k)
    expected = {k[len("vision_model.") :] if nested else k for k in own}
    if only_head:
        expected = {k for k in expected if k.startswith("head.")}
    missing = sorted(expected - tensors.keys())
    unexpected = sorted(tensors.keys() - expected)
    mismatched = [
        f"{k}: checkpoint {tuple(tensors[k].shape)} vs model {tuple(own[to_own(k)].shape)}"
        for k in sorted(expected & tensors.keys())
        if tensors[k].shape != own[to_own(k)].shape
    ]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {_shorten(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {_shorten(unexpected)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): {_shorten(mismatched)}")
    if problems:
        raise CheckpointError(
            f"Checkpoint {source} does not match the model built from its config:\n  " + "\n  ".join(problems)
        )
    module.load_state_dict({to_own(k): v for k, v in tensors.items()}, strict=not only_head)


def _shorten(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


# --------------------------------------------------------------------------------------------------------------------
# Building models
# --------------------------------------------------------------------------------------------------------------------


def _build(config: NearIDConfig, dtype: torch.dtype | None) -> NearIDModel:
    previous = torch.get_default_dtype()
    try:
        if dtype is not None and dtype.is_floating_point:
            torch.set_default_dtype(dtype)
        with no_init_weights():
            model = NearIDModel(config)
    finally:
        torch.set_default_dtype(previous)
    return model


def _nearid_config_from(raw: dict, source: str, file: Path | None = None) -> NearIDConfig:
    """A `NearIDConfig` from a checkpoint's config.json; inconsistent or malformed fields raise CheckpointError."""
    try:
        return _config_from_fields(raw, source)
    except CheckpointError:
        raise
    except Exception as err:  # transformers / huggingface_hub config validation raise several unrelated types
        raise CheckpointError(f"{file or source} holds an inconsistent or malformed config: {err}") from err


def _config_from_fields(raw: dict, source: str) -> NearIDConfig:
    model_type = raw.get("model_type")
    if model_type == "nearid":
        fields = {k: v for k, v in raw.items() if k not in ("auto_map", "model_type", "transformers_version")}
        return NearIDConfig(**fields)
    if model_type == "siglip":
        vision = raw.get("vision_config") or {}
        if not isinstance(vision, dict):
            raise CheckpointError(f"{source}: config.json's vision_config must be an object.")
    elif model_type == "siglip_vision_model":
        vision = raw
    else:
        raise CheckpointError(
            f"{source}: config.json has model_type {model_type!r}; expected 'nearid', 'siglip' or "
            f"'siglip_vision_model' (SigLIP2 NaFlex `siglip2` checkpoints are not supported: use the fixed-resolution "
            f"ones such as google/siglip2-so400m-patch14-384)."
        )
    keep = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels",
            "image_size", "patch_size", "hidden_act", "layer_norm_eps", "attention_dropout", "vision_use_head")
    vision = {k: vision[k] for k in keep if k in vision}
    if not vision.get("vision_use_head", True):
        raise CheckpointError(f"{source}: this SigLIP checkpoint has no MAP head (vision_use_head=false).")
    return NearIDConfig(vision_config=vision, backbone_name_or_path=source)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    allowed_roots: Sequence[str | os.PathLike] | None = None,
) -> tuple[NearIDModel, Path]:
    """Load a NearID model from any supported layout (see the module docstring).

    Args:
        allowed_roots: when given, every local path followed (the checkpoint itself and each trunk a head-only file
            names) must lie, symlinks resolved, inside one of these folders; hub ids `owner/name` stay allowed.
            A head-only file's relative trunk path is read from the head file's folder.

    Returns:
        (model in eval mode with every parameter frozen, the local directory holding the preprocessing config).

    Raises:
        CheckpointError: a broken checkpoint (naming the file), or a path outside `allowed_roots`.
    """
    roots = None if allowed_roots is None else tuple(os.path.realpath(os.path.expanduser(r)) for r in allowed_roots)
    return _load(name_or_path, dtype=dtype, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only,
                 chain=(), roots=roots)


def _inside(path: Path, roots: tuple[str, ...]) -> bool:
    real = os.path.normcase(os.path.realpath(path))
    return any(real == os.path.normcase(r) or real.startswith(os.path.join(os.path.normcase(r), "")) for r in roots)


def _shown(file: Path, roots: tuple[str, ...]) -> str:
    """`file` relative to the allowed folder holding it (its bare name if none does), for error messages."""
    real = os.path.realpath(file)
    for root in roots:
        if _inside(file, (root,)):
            return os.path.relpath(real, root)
    return file.name


def _confine(name_or_path: str | os.PathLike, roots: tuple[str, ...] | None, named_by: Path | None) -> None:
    """Refuse a local path outside `roots` (existing or not, so the error tells nothing about files elsewhere)."""
    if roots is None:
        return
    path = Path(name_or_path).expanduser()
    if not path.exists() and _looks_like_hub_id(str(name_or_path)):
        return  # a hub id
    if _inside(path, roots):
        return
    if named_by is None:
        raise CheckpointError(f"Checkpoint {str(name_or_path)!r} is outside the allowed model folders "
                              "(symlinks resolved); put it inside them or give a hub id 'owner/name'.")
    raise CheckpointError(
        f"The trunk named by {_shown(named_by, roots)} (its backbone_name_or_path) is outside the allowed model "
        "folders (symlinks resolved); put the trunk inside them (a relative path is read from the head file's "
        "folder) or name a hub id 'owner/name'."
    )


def _load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype | None,
    revision: str | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
    chain: tuple[Path, ...],
    roots: tuple[str, ...] | None,
    named_by: Path | None = None,
) -> tuple[NearIDModel, Path]:
    """`load_model`, remembering the head-only files already followed (`chain`, the last one `named_by` this
    checkpoint) to refuse loops."""
    _confine(name_or_path, roots, named_by)
    location = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir, local_files_only=local_files_only)
    head_file = _head_only_file(location)
    if head_file is not None:
        if location != head_file:  # a directory's nearid_head.safetensors may be a symlink
            _confine(head_file, roots if Path(name_or_path).expanduser().exists() else None, named_by)
        real = head_file.resolve()
        if real in chain or len(chain) >= _MAX_HEAD_CHAIN:
            steps = " -> ".join(str(p) for p in (*chain, real))
            problem = "loops back on itself" if real in chain else f"is longer than {_MAX_HEAD_CHAIN} links"
            raise CheckpointError(
                f"The head-only checkpoint chain {problem}: {steps}. A head-only file's backbone_name_or_path must "
                "name a full SigLIP or NearID checkpoint (for example google/siglip2-so400m-patch14-384)."
            )
        return _load_head_only(head_file, dtype=dtype, cache_dir=cache_dir, local_files_only=local_files_only,
                               chain=(*chain, real), roots=roots)

    config_file = location / CONFIG_NAME
    if not config_file.exists():
        raise CheckpointError(f"No {CONFIG_NAME} in {location}: not a NearID, SigLIP or head-only checkpoint.")
    config = _nearid_config_from(_read_json(config_file), str(name_or_path), config_file)
    tensors, _ = _read_tensors(_weight_files(location), dtype)
    try:
        model = _build(config, dtype)
    except Exception as err:  # e.g. hidden_size not divisible by num_attention_heads, negative sizes
        raise CheckpointError(f"{config_file}: the model cannot be built from this config ({err}).") from err
    load_vision_state_dict(model.backbone, tensors, source=str(location))
    model.requires_grad_(False)
    return model.eval(), location


def _head_only_file(location: Path) -> Path | None:
    if location.is_file():
        if location.suffix != ".safetensors":
            raise CheckpointError(f"{location}: a single-file checkpoint must be a .safetensors head-only file.")
        return location
    candidate = location / HEAD_WEIGHTS_NAME
    return candidate if candidate.exists() and not (location / WEIGHTS_NAME).exists() else None


def _trunk_source(trunk: str, file: Path, roots: tuple[str, ...] | None) -> str:
    """The trunk a head-only `file` names: a path (relative ones from the file's folder) or a hub id."""
    path = Path(trunk).expanduser()
    local = path if path.is_absolute() else file.parent / path
    if not local.exists() and _looks_like_hub_id(trunk):
        return trunk
    _confine(local, roots, file)
    if not local.exists():
        raise CheckpointError(
            f"{file}: its trunk {trunk!r} (backbone_name_or_path) does not exist (looked for {local}; a relative path "
            "is read from the head file's folder) and is not a hub id 'owner/name'."
        )
    return str(local)


def _load_head_only(
    file: Path, *, dtype: torch.dtype | None, cache_dir: str | os.PathLike | None, local_files_only: bool,
    chain: tuple[Path, ...], roots: tuple[str, ...] | None,
) -> tuple[NearIDModel, Path]:
    tensors, metadata = _read_tensors([file], dtype)
    if metadata.get("format") != _HEAD_FORMAT or "config" not in metadata:
        raise CheckpointError(
            f"{file} is not a NearID head-only checkpoint (metadata 'format' must be {_HEAD_FORMAT!r} with a 'config'); "
            f"save one with nearid_core.save_head_only()."
        )
    try:
        head_config = NearIDConfig(**json.loads(metadata["config"]))
    except Exception as err:  # malformed JSON or a config field transformers refuses
        raise CheckpointError(f"{file}: the config in its metadata is malformed or inconsistent: {err}") from err
    trunk = head_config.backbone_name_or_path
    if not trunk:
        raise CheckpointError(f"{file}: the head-only checkpoint does not name its trunk (backbone_name_or_path).")
    model, trunk_dir = _load(_trunk_source(str(trunk), file, roots), dtype=dtype, revision=None, cache_dir=cache_dir,
                             local_files_only=local_files_only, chain=chain, roots=roots, named_by=file)
    if model.config.vision_config.hidden_size != head_config.vision_config.hidden_size:
        raise CheckpointError(
            f"{file}: head width {head_config.vision_config.hidden_size} does not match trunk {trunk!r} "
            f"(hidden_size {model.config.vision_config.hidden_size})."
        )
    load_vision_state_dict(model.backbone, tensors, source=str(file), only_head=True)
    model.config.normalize_embeddings = head_config.normalize_embeddings
    return model, trunk_dir


def save_head_only(model: NearIDModel, path: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Write the MAP head (~15M parameters) as one safetensors file that names its trunk.

    Args:
        model: a NearID model whose `config.backbone_name_or_path` names the trunk it was trained on.
        path: a `.safetensors` file, or a directory (then `nearid_head.safetensors` inside it).
        dtype: optional storage dtype (e.g. torch.float16).
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path / HEAD_WEIGHTS_NAME
    path.parent.mkdir(parents=True, exist_ok=True)
    if not model.config.backbone_name_or_path:
        raise ValueError("model.config.backbone_name_or_path is empty: a head-only checkpoint must name its trunk.")
    tensors = {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in model.head_state_dict().items()}
    config = model.config.to_dict()
    for k in ("architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "_name_or_path"):
        config.pop(k, None)
    _atomic_save(tensors, path, metadata={"format": _HEAD_FORMAT, "config": json.dumps(config)})
    return path


#: The modules `auto_map` names; `save_release` copies this package's own two files under these names.
REMOTE_CODE_FILES = ("configuration_nearid.py", "modeling_nearid.py")
AUTO_MAP = {"AutoConfig": "configuration_nearid.NearIDConfig", "AutoModel": "modeling_nearid.NearIDModel"}
#: The `vision_config` fields the reference `NearIDModel` passes to `SiglipVisionConfig(**vision_config)`; a field
#: left out would silently fall back to SiglipVisionConfig's default (e.g. hidden_size 768) there.
RELEASE_VISION_FIELDS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
                         "patch_size", "num_channels", "hidden_act", "layer_norm_eps", "attention_dropout")


def release_config(config: NearIDConfig, dtype: torch.dtype, *, remote_code: bool = True) -> dict:
    """The `config.json` of a release export: readable by this package and by the reference `NearIDConfig`.

    Carries `model_type`, `architectures`, `embed_dim`, `normalize_embeddings` and a plain-dict `vision_config` with
    every `RELEASE_VISION_FIELDS` entry, plus `auto_map` (when `remote_code`) and `backbone_name_or_path`.
    """
    out = config.to_dict()
    for key in ("dtype", "torch_dtype", "_name_or_path", "auto_map", "transformers_version"):
        out.pop(key, None)
    vision = config.vision_config
    out["vision_config"] = {k: getattr(vision, k) for k in RELEASE_VISION_FIELDS}
    out["model_type"] = "nearid"
    out["architectures"] = ["NearIDModel"]
    if remote_code:
        out["auto_map"] = dict(AUTO_MAP)
    out["torch_dtype"] = str(dtype).removeprefix("torch.")
    out["transformers_version"] = transformers.__version__
    return out


def save_release(model: NearIDModel, directory: str | os.PathLike, *, dtype: torch.dtype = torch.float16,
                 preprocessor_config: Mapping | None = None, remote_code: bool = True) -> Path:
    """Write the published release layout, loadable here, by the paper's code and by plain transformers.

    Files: `config.json` (see `release_config`), `model.safetensors` (`dtype`, transformers-4.x key names
    `backbone.vision_model.*`; loads in 4.x and 5.x), `preprocessor_config.json` when `preprocessor_config` is given
    (the paper's `AutoProcessor` / `AutoImageProcessor` calls need it), and with `remote_code` the two modules
    `auto_map` names: copies of this package's own `configuration_nearid.py` / `modeling_nearid.py` (torch and
    transformers only), so the paper's `AutoModel.from_pretrained(dir, trust_remote_code=True)` works offline.

    This package never runs those files: `load_model` / `NearIDScorer` read config.json and the weights and ignore
    `auto_map`. `remote_code=False` writes neither the files nor `auto_map`; the export then loads here, or in
    transformers once `nearid_core` (or the paper's `nearid` package) is imported.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    own = model.backbone.state_dict()
    tensors = {
        "backbone.vision_model." + k.removeprefix("vision_model."): v.to(dtype).detach().contiguous().cpu()
        for k, v in own.items()
    }
    _atomic_save(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    config = release_config(model.config, dtype, remote_code=remote_code)
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True))
    if preprocessor_config is not None:
        (directory / PREPROCESSOR_NAME).write_text(json.dumps(dict(preprocessor_config), indent=2))
    package = Path(__file__).parent
    for name in REMOTE_CODE_FILES:
        target = directory / name
        if remote_code:
            shutil.copyfile(package / name, target)
        elif target.exists():  # a stale copy next to an auto_map-less config would mislead
            target.unlink()
    return directory


def _atomic_save(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
