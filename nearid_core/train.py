"""Train the NearID MAP head on a frozen SigLIP trunk with near-identity distractors (the paper's recipe, section 5).

Usage::

    # hub data (reference split files), paper recipe: AdamW 1e-4 / wd 1e-4, 100 warmup steps + cosine, clip 1.0,
    # batch 128, 11 epochs, fp16 on CUDA, MTG x4, checkpoints every 100 steps
    python -m nearid_core.train --hf --train-indices splits/train.json --val-indices splits/val.json \\
        --test-indices splits/test.json --neg-sources flux qwen powerpaint sdxl --mtg-hf --output-dir runs/nearid

    # a local dataset in the LOCAL FOLDER LAYOUT (nearid_core.data), e.g. one written by nearid_core.synthetic
    python -m nearid_core.train --data-dir DATA --neg-sources src_a src_b --mtg-dir MTG --model BACKBONE_DIR \\
        --output-dir runs/local

    python -m nearid_core.train ... --resume latest          # continue exactly where the last checkpoint left off
    accelerate launch -m nearid_core.train ...              # several GPUs (data parallel over the head)

Only the MAP head trains (``--model`` is a SigLIP / SigLIP2 checkpoint whose own head is the starting point, or a
NearID checkpoint to continue from). Because the trunk is frozen and the recipe uses no augmentation, its tokens are
computed **once** into a content-keyed feature cache (:mod:`nearid_core.feature_cache`, ``--cache-dir``, default
``OUTPUT/feature_cache``) and every step runs only the head on cached tokens; ``--augment`` (or ``--no-cache``)
encodes every image on the fly instead, like the reference.

Outputs in ``--output-dir``: ``checkpoint-<step>/`` (head, optimizer, scheduler, grad scaler, RNG and data-order
state; written atomically, ``--checkpoints-total-limit`` newest kept), ``train_log.csv`` (one row per step),
``val_log.csv`` (SSR/PA per validation source and pooled, at step 0, every ``--eval-steps`` and at the end),
``export/release/`` (published release layout) and ``export/nearid_head.safetensors`` (head-only), both loadable
with :func:`nearid_core.load_model`, and ``train_summary.json``. Metrics also go to accelerate trackers
(``--report-to``: tensorboard / wandb when installed). On start, the temporary folders of saves that a kill
interrupted are deleted (:func:`nearid_core.runs.clean_stale_checkpoints`).

A mistake in the flags, paths, data, checkpoint or feature cache (a damaged shard is detected by its checksums) ends
the command with one message and exit status 2, never a traceback (:func:`cli`). Data too small to fill a batch, or
without a validation split, trains with a warning.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import random
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .checkpoint import load_model, load_preprocess_config, save_head_only, save_release
from .configuration_nearid import DEFAULT_BACKBONE
from .data import EVAL_SOURCES, load_local_mtg, load_local_nearid, local_identities, local_sources, local_split
from .feature_cache import FeatureCache, token_encoder
from .losses import InfoNCEExtOutput, infonce_ext
from .preprocessing import PreprocessConfig
from .runs import (
    CHECKPOINT_MARKER,
    CsvLog,
    available_trackers,
    begin_checkpoint,
    clean_stale_checkpoints,
    commit_checkpoint,
    prune_checkpoints,
    resolve_resume,
)
from .train_data import (
    AugmentConfig,
    EpochSampler,
    JointTrainSet,
    MTGTrainSet,
    NearIDTrainSet,
    PixelCollate,
    TokenCollate,
    check_disjoint,
    keyed_records,
    load_hub_mtg_training,
    load_hub_nearid_training,
    record_refs,
)

logger = logging.getLogger("nearid_core.train")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
REPORT_TO = ("auto", "none", "tensorboard", "wandb", "all")
EXPORTS = ("both", "release", "head", "none")
TRAIN_LOG_FIELDS = ("step", "epoch", "loss", "tier1", "tier2", "top1_acc", "tier_acc", "lr", "grad_norm", "elapsed_s")
VAL_LOG_FIELDS = ("step", "source", "SSR", "PA", "PA_terms", "n")
_NONE_WORDS = ("none", "off")
_PROG = "python -m nearid_core.train"


# ====================================================================================================================
# Command line
# ====================================================================================================================


def _build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=_PROG,
        description="Train the NearID MAP head on a frozen SigLIP trunk with near-identity distractors.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default=DEFAULT_BACKBONE,
                   help="trunk + starting head: a SigLIP/SigLIP2 checkpoint (hub id or dir; its own MAP head is the "
                        "paper's initialisation) or a NearID checkpoint to continue from")
    p.add_argument("--output-dir", required=True, help="checkpoints, logs and exports go here")

    d = p.add_argument_group("data (one of --data-dir / --hf)")
    d.add_argument("--data-dir", help="dataset in the local folder layout (see nearid_core.data)")
    d.add_argument("--hf", action="store_true", help="Aleksandar/NearID + Aleksandar/NearID-<Source> from the hub")
    d.add_argument("--neg-sources", nargs="+",
                   help="training distractor sources (local: folder names under distractors/, default all; hub: "
                        "tags such as flux qwen powerpaint sdxl, required)")
    d.add_argument("--val-sources", nargs="+",
                   help=f"validation distractor sources (default: local all, hub {' '.join(EVAL_SOURCES)})")
    d.add_argument("--train-split", help="local: split name or JSON file of the training identities (default train)")
    d.add_argument("--val-split", help="local: validation split (default val if splits/val.json exists; none = off)")
    d.add_argument("--test-split", help="local: split checked for overlap with training (default test if present)")
    d.add_argument("--train-indices", help="hub: JSON row positions of the training split (splits/train.json), "
                                           "or 'all' to knowingly train on every row")
    d.add_argument("--val-indices", help="hub: JSON row positions of the validation split (splits/val.json)")
    d.add_argument("--test-indices", help="hub: JSON row positions of the test split, checked for overlap")
    d.add_argument("--hf-repo", default="Aleksandar/NearID", help="hub: positives dataset")
    d.add_argument("--hf-cache-dir", help="hub: datasets cache folder")
    d.add_argument("--mtg-dir", help="MTG training samples in the local MTG layout")
    d.add_argument("--mtg-hf", action="store_true", help="MTG training split of abdo-eldesokey/mtg-dataset")
    d.add_argument("--mtg-repeat", type=int, default=None, help="copies of the MTG samples per epoch (default 4)")
    d.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes")

    t = p.add_argument_group("optimisation (defaults = paper recipe)")
    t.add_argument("--epochs", type=int, default=11)
    t.add_argument("--max-steps", type=int, help="total optimizer steps (overrides --epochs for the schedule)")
    t.add_argument("--stop-after-steps", type=int,
                   help="stop (checkpoint, no export) after this global step as if interrupted, keeping the full "
                        "run's schedule; continue later with --resume latest (time-sliced jobs)")
    t.add_argument("--batch-size", type=int, default=128, help="samples (x6 images) per process and step")
    t.add_argument("--lr", type=float, default=1e-4)
    t.add_argument("--weight-decay", type=float, default=1e-4)
    t.add_argument("--warmup-steps", type=int, default=100)
    t.add_argument("--max-grad-norm", type=float, default=1.0)
    t.add_argument("--temperature", type=float, default=0.07)
    t.add_argument("--alpha", type=float, default=0.5, help="weight of the tier-2 ranking term")
    t.add_argument("--seed", type=int, default=42, help="seeds the data order, sample assembly and torch")
    t.add_argument("--mixed-precision", choices=("auto", "no", "fp16", "bf16"), default="auto",
                   help="accelerate mixed precision; auto = fp16 on CUDA (paper), no on CPU")
    t.add_argument("--backbone-dtype", choices=("auto", *DTYPES), default="auto",
                   help="dtype of the frozen trunk; auto = fp16 on CUDA (paper), bf16 with --mixed-precision bf16, "
                        "else fp32")
    t.add_argument("--cpu", action="store_true", help="train on CPU even if CUDA is available")

    c = p.add_argument_group("frozen-feature cache")
    c.add_argument("--cache-dir", help="token cache root (default OUTPUT/feature_cache); shareable between runs")
    c.add_argument("--no-cache", action="store_true", help="encode every image every step (reference behaviour)")
    c.add_argument("--cache-dtype", choices=("auto", *DTYPES), default="auto",
                   help="token storage dtype; auto = bf16 for a bf16 trunk, else fp16")
    c.add_argument("--cache-shard-size", type=int, default=1024, help="images per shard file")
    c.add_argument("--encode-batch-size", type=int, default=64, help="images per trunk forward when filling")
    c.add_argument("--augment", action="store_true",
                   help="flip / colour jitter / translate+scale per slot (deterministic per seed, epoch, row, slot); "
                        "implies on-the-fly encoding")

    k = p.add_argument_group("checkpoints and export")
    k.add_argument("--checkpointing-steps", type=int, default=100, help="save every N steps (0 = only at the end)")
    k.add_argument("--checkpoints-total-limit", type=int, help="keep only the newest N checkpoints")
    k.add_argument("--resume", help="'latest' (newest checkpoint in --output-dir, fresh start if none) or a "
                                    "checkpoint directory")
    k.add_argument("--export", choices=EXPORTS, default="both",
                   help="after training write export/release/ (published layout) and/or export/nearid_head.safetensors")
    k.add_argument("--export-dtype", choices=tuple(DTYPES), default="fp16", help="dtype of the exported weights")
    k.add_argument("--export-only", action="store_true",
                   help="no training: load the --resume checkpoint's head and write the exports")

    g = p.add_argument_group("logging and validation")
    g.add_argument("--log-every", type=int, default=10, help="tracker logging interval (the CSV logs every step)")
    g.add_argument("--eval-steps", type=int, help="validate every N steps (default --checkpointing-steps)")
    g.add_argument("--eval-batch-size", type=int, default=32)
    g.add_argument("--report-to", choices=REPORT_TO, default="auto",
                   help="accelerate trackers; auto = tensorboard and/or wandb if installed")
    g.add_argument("--project-name", default="nearid", help="tracker project / run name")
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the command line (nothing is loaded here)."""
    args = _build_parser().parse_args(argv)
    validate_args(args)
    return args


def validate_args(args: argparse.Namespace) -> None:
    """Reject conflicting or meaningless flag combinations, bad values and missing input paths; the messages name the
    flags (nothing is created or loaded here)."""
    if not args.output_dir.strip():
        raise ValueError("--output-dir is empty; pass the folder for checkpoints, logs and exports")
    if bool(args.data_dir) == bool(args.hf):
        raise ValueError("pass exactly one of --data-dir DIR (local folder layout) or --hf (hub datasets)")
    if args.hf:
        local_only = [f for f in ("train_split", "val_split", "test_split") if getattr(args, f)]
        if local_only:
            raise ValueError(f"--{local_only[0].replace('_', '-')} is for --data-dir; with --hf pass "
                             "--train-indices / --val-indices / --test-indices")
        if not args.train_indices and not args.export_only:
            raise ValueError("--hf needs --train-indices splits/train.json (training on every row leaks the val/test "
                             "identities, a known pitfall of the reference); pass --train-indices all to do it "
                             "knowingly")
        if not args.neg_sources and not args.export_only:
            raise ValueError("--hf needs --neg-sources (the reference does not record which sources it trained on; "
                             f"choose from {', '.join(EVAL_SOURCES)}, e.g. --neg-sources flux qwen powerpaint sdxl)")
        if args.train_indices == "all" and (args.val_indices or args.test_indices):
            raise ValueError("--train-indices all overlaps every --val-indices / --test-indices split")
    else:
        hub_only = [f for f in ("train_indices", "val_indices", "test_indices") if getattr(args, f)]
        if hub_only:
            raise ValueError(f"--{hub_only[0].replace('_', '-')} is for --hf; with --data-dir use --train-split / "
                             "--val-split / --test-split")
    if args.mtg_dir and args.mtg_hf:
        raise ValueError("pass at most one of --mtg-dir and --mtg-hf")
    if args.mtg_repeat is not None:
        if not (args.mtg_dir or args.mtg_hf):
            raise ValueError("--mtg-repeat needs MTG data (--mtg-dir or --mtg-hf)")
        if args.mtg_repeat < 1:
            raise ValueError(f"--mtg-repeat must be >= 1, got {args.mtg_repeat}")
    positive = {"epochs": args.epochs, "batch_size": args.batch_size, "cache_shard_size": args.cache_shard_size,
                "encode_batch_size": args.encode_batch_size, "eval_batch_size": args.eval_batch_size,
                "log_every": args.log_every}
    for name, value in positive.items():
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("max_steps", "stop_after_steps", "eval_steps", "checkpoints_total_limit"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name in ("warmup_steps", "checkpointing_steps", "num_workers"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name, strict in (("lr", True), ("temperature", True), ("max_grad_norm", True), ("weight_decay", False),
                         ("alpha", False)):
        value = getattr(args, name)
        if not math.isfinite(value) or value < 0 or (strict and value == 0):
            raise ValueError(f"--{name.replace('_', '-')} must be a finite number {'>' if strict else '>='} 0, "
                             f"got {value}")
    if args.stop_after_steps is not None and args.max_steps is not None and args.stop_after_steps >= args.max_steps:
        raise ValueError(f"--stop-after-steps {args.stop_after_steps} must be below --max-steps {args.max_steps}")
    cuda = torch.cuda.is_available() and not args.cpu
    if args.mixed_precision == "fp16" and not cuda:
        raise ValueError("--mixed-precision fp16 needs a CUDA device; use --mixed-precision bf16 or no on CPU")
    if args.augment and (args.cache_dir or args.cache_dtype != "auto"):
        raise ValueError("--augment encodes every image on the fly, so --cache-dir / --cache-dtype would be ignored")
    if args.no_cache and (args.cache_dir or args.cache_dtype != "auto"):
        raise ValueError("--no-cache conflicts with --cache-dir / --cache-dtype")
    if args.export_only:
        if not args.resume:
            raise ValueError("--export-only needs --resume (the checkpoint to export)")
        if args.export == "none":
            raise ValueError("--export-only with --export none has nothing to do")
    if args.eval_steps is not None and args.data_dir is None and not args.val_indices:
        raise ValueError("--eval-steps needs a validation split (--val-indices with --hf)")
    if args.val_split in _NONE_WORDS and args.eval_steps is not None:
        raise ValueError("--eval-steps conflicts with --val-split none")
    if args.val_sources and (args.val_split in _NONE_WORDS or (args.hf and not args.val_indices)):
        raise ValueError("--val-sources needs a validation split (--val-indices with --hf; not --val-split none)")
    args.trackers = available_trackers(args.report_to, flag="--report-to")
    _check_input_paths(args)


def _check_input_paths(args: argparse.Namespace) -> None:
    """The folders and files the flags name exist (the output folders are checked when training starts)."""
    if args.resume and args.resume != "latest" and not (
            Path(args.resume).is_dir() or (Path(args.output_dir) / Path(args.resume).name).is_dir()):
        raise ValueError(f"--resume {args.resume}: not a checkpoint directory (or pass 'latest')")
    if args.data_dir and not Path(args.data_dir).is_dir():
        what = "is a file, not a folder" if Path(args.data_dir).exists() else "does not exist"
        raise ValueError(f"--data-dir {args.data_dir} {what}; pass a dataset folder in the local layout "
                         "(identities/, distractors/<source>/, splits/; see nearid_core.data)")
    if args.mtg_dir and not Path(args.mtg_dir).is_dir():
        raise ValueError(f"--mtg-dir {args.mtg_dir} is not a folder; pass MTG samples in the local MTG layout")
    for flag in ("train_indices", "val_indices", "test_indices"):
        value = getattr(args, flag)
        if value and value != "all" and not Path(value).is_file():
            raise ValueError(f"--{flag.replace('_', '-')} {value}: no such file (a JSON list of row positions, "
                             f"e.g. splits/{flag.split('_')[0]}.json)")
    for flag in ("cache_dir", "output_dir"):
        value = getattr(args, flag)
        if value and Path(value).exists() and not Path(value).is_dir():
            raise ValueError(f"--{flag.replace('_', '-')} {value} is a file; pass a folder")


# ====================================================================================================================
# Checkpoints: checkpoint-<step>/ written to a temporary folder and renamed into place
# ====================================================================================================================


def rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU + CUDA) RNG states, as JSON + tensors."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{i}"] = s
    meta = {
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    return {"tensors": tensors, "meta": meta}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    np_state = meta["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    py = meta["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = [tensors[k] for k in sorted(tensors) if k.startswith("torch_cuda_")]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    head_state: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    trainer_state: dict[str, Any],
    scaler: Any | None = None,
    total_limit: int | None = None,
) -> Path:
    """Write ``checkpoint-<step>/`` atomically: everything goes to a hidden temporary folder that is renamed into place
    once complete, so a crash leaves either the previous checkpoint set or the new one, never a partial folder.

    Files: ``head.safetensors`` (fp32 MAP head), ``optimizer.pt``, ``scheduler.pt``, ``scaler.pt`` (fp16 only),
    ``rng.safetensors`` + RNG/data-order/config in ``trainer_state.json`` (written last). Torch files hold only
    tensors and plain containers and load with ``weights_only=True``.

    Returns:
        The checkpoint folder.
    """
    tmp = begin_checkpoint(output_dir, step)
    save_file({k: v.detach().float().contiguous().cpu() for k, v in head_state.items()}, str(tmp / "head.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    if scaler is not None:
        torch.save(scaler.state_dict(), tmp / "scaler.pt")
    rng = rng_state()
    save_file({k: v.contiguous() for k, v in rng["tensors"].items()}, str(tmp / "rng.safetensors"))
    state = {**trainer_state, "global_step": step, "rng": rng["meta"]}
    (tmp / CHECKPOINT_MARKER).write_text(json.dumps(state, indent=1, default=str))
    final = commit_checkpoint(tmp)
    prune_checkpoints(output_dir, total_limit)
    return final


def load_checkpoint(
    path: str | os.PathLike,
    *,
    head: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote into live objects; returns the trainer state (``global_step``,
    ``sampler``, ``data``, ``args``, ...).

    Raises:
        ValueError: a damaged file (named), or a head that does not fit ``head`` (another ``--model``).
    """
    path = Path(path)
    try:
        state = json.loads((path / CHECKPOINT_MARKER).read_text())
        head_tensors = load_file(str(path / "head.safetensors"))
    except (ValueError, SafetensorError) as err:
        raise ValueError(f"{path} is damaged ({err}); resume from another checkpoint-<step> folder") from None
    own = head.state_dict()
    missing = sorted(set(own) - set(head_tensors))
    if missing:
        raise ValueError(f"{path}: head checkpoint lacks {missing}")
    try:
        head.load_state_dict({k: v.to(own[k].dtype) for k, v in head_tensors.items()})
    except RuntimeError as err:
        raise ValueError(f"{path}: its head does not fit this model ({' '.join(str(err).split())}); pass the --model "
                         "it was trained with") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    if scheduler is not None:
        scheduler.load_state_dict(torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True))
    if scaler is not None and (path / "scaler.pt").exists():
        scaler.load_state_dict(torch.load(path / "scaler.pt", map_location="cpu", weights_only=True))
    if restore_rng:
        set_rng_state(load_file(str(path / "rng.safetensors")), state["rng"])
    return state


# ====================================================================================================================
# Model pieces
# ====================================================================================================================


class HeadModule(nn.Module):
    """The trainable part as its own module: cached / encoded tokens [B, N, C] -> pooled [B, D] (``model.pool``).

    Wrapping only the head lets accelerate/DDP synchronise exactly the trainable parameters while the frozen trunk
    stays outside the wrapper.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.head = model.head
        self._pool = model.pool  # bound method; the model itself is not registered as a submodule

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._pool(tokens.to(self.head.probe.dtype))[0]


def batch_loss(head: nn.Module, tokens: torch.Tensor, pos_mask: torch.Tensor, neg_mask: torch.Tensor,
               temperature: float = 0.07, alpha: float = 0.5) -> InfoNCEExtOutput:
    """infonce_ext of one batch of tokens [6B, N, C] in slot order (pos0..2, neg0..2 per sample).

    Anchor = slot 0, positives = slots 1-2 (``pos_mask[:, 1:3]``), hard negatives = slots 3-5 (``neg_mask``).
    """
    b = pos_mask.shape[0]
    emb = head(tokens).float().view(b, 6, -1)
    return infonce_ext(emb[:, 0], emb[:, 1:3], emb[:, 3:6], pos_mask[:, 1:3], neg_mask, temperature, alpha)


class TrainEmbedder:
    """The model being trained as an :class:`~nearid_core.eval.baselines.Embedder` for the eval module: images are
    looked up in the feature cache by content (and encoded when missing), then pooled by the current head."""

    name = "nearid-train"

    def __init__(self, model: nn.Module, encode, cache: FeatureCache | None, device: torch.device,
                 autocast=None, model_id: str = "training") -> None:
        self.model, self.encode, self.cache, self.device = model, encode, cache, device
        self.autocast, self.model_id = autocast, model_id

    def _tokens(self, images: Sequence[Any]) -> torch.Tensor:
        if self.cache is None:
            return self.encode(images)
        keys = [self.cache.key(im) for im in images]
        have = [i for i, k in enumerate(keys) if k in self.cache]
        need = [i for i, k in enumerate(keys) if k not in self.cache]
        parts: dict[int, torch.Tensor] = {}
        if have:
            for i, t in zip(have, self.cache.tokens([keys[i] for i in have])):
                parts[i] = t
        if need:
            for i, t in zip(need, self.encode([images[i] for i in need]).to("cpu", self.cache.torch_dtype)):
                parts[i] = t
        return torch.stack([parts[i] for i in range(len(images))])

    @torch.no_grad()
    def embed(self, images: Sequence[Any], batch_size: int = 32, progress: bool | None = None) -> torch.Tensor:
        out = []
        images = list(images)
        for start in range(0, len(images), batch_size):
            tokens = self._tokens(images[start : start + batch_size]).to(self.device)
            with self.autocast() if self.autocast is not None else contextlib.nullcontext():
                pooled = self.model.pool(tokens.to(self.model.head.probe.dtype))[0]
            out.append(F.normalize(pooled.float(), dim=-1).cpu())
        return torch.cat(out) if out else torch.empty(0, self.model.config.vision_config.hidden_size)


def validate(embedder: TrainEmbedder, records: Sequence[Any], sources: Sequence[str], batch_size: int = 32):
    """NearID-Bench SSR / PA (slot-aligned) of the current head on validation records, per source and pooled."""
    from .eval.benchmarks import run_nearid_bench

    was_training = embedder.model.head.training
    embedder.model.head.eval()
    try:
        return run_nearid_bench(records, embedder, sources=list(sources), batch_size=batch_size, progress=False,
                                indexing="aligned")  # the reference trainer's evaluator keeps slots aligned
    finally:
        embedder.model.head.train(was_training)


# ====================================================================================================================
# Data setup
# ====================================================================================================================


@dataclass
class TrainingData:
    """Records of one run (image references, not yet keyed)."""

    nearid: Sequence[Any]
    sources: list[str]
    mtg: Sequence[Any] | None = None
    val: Sequence[Any] | None = None
    val_sources: list[str] = field(default_factory=list)


def _local_data(args: argparse.Namespace) -> TrainingData:
    root = Path(args.data_dir)
    local_identities(root)  # a folder that is not a dataset is named as such, before its sources are listed
    available = local_sources(root)
    sources = list(args.neg_sources or available)
    if not sources:
        raise ValueError(f"{root} has no distractors/<source>/ folder to train on")
    splits_dir = root / "splits"
    train_split = args.train_split or "train"
    if train_split != "all" and not (Path(train_split).is_file() or (splits_dir / f"{train_split}.json").is_file()):
        raise ValueError(f"--train-split {train_split}: {splits_dir / (train_split + '.json')} does not exist; pass "
                         "a split name, a JSON file, or --train-split all")
    train_ids = local_split(root, train_split)
    others: dict[str, list[str]] = {}
    val_split = args.val_split
    if val_split is None and (splits_dir / "val.json").is_file():
        val_split = "val"
    if val_split is None:
        if args.eval_steps is not None:
            raise ValueError(f"--eval-steps needs a validation split, but {splits_dir / 'val.json'} does not exist; "
                             "pass --val-split NAME or drop --eval-steps")
        logger.warning("%s does not exist: training runs without validation (SSR / PA are never measured). Write a "
                       "val split there, pass --val-split NAME, or --val-split none to silence this.",
                       splits_dir / "val.json")
    if val_split in _NONE_WORDS:
        val_split = None
    if val_split:
        others["validation"] = local_split(root, val_split)
    test_split = args.test_split or ("test" if (splits_dir / "test.json").is_file() else None)
    if test_split and test_split not in _NONE_WORDS:
        others["test"] = local_split(root, test_split)
    check_disjoint(train_ids, others, "identities")
    nearid = load_local_nearid(root, sources, train_split)
    val_sources = list(args.val_sources or available)
    val = load_local_nearid(root, val_sources, val_split) if val_split else None
    mtg = load_local_mtg(args.mtg_dir) if args.mtg_dir else None
    return TrainingData(nearid, sources, mtg, val, val_sources)


def _read_indices(path: str, flag: str) -> list[int]:
    """A split file of row positions; a file that is not JSON is named with the flag."""
    from .data import load_split_indices

    try:
        return load_split_indices(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:  # their messages do not name the file
        raise ValueError(f"{flag} {path} is not a JSON list of row positions ({err})") from None


def _hub_data(args: argparse.Namespace) -> TrainingData:
    from .data import load_hf_nearid

    # the split files are read and checked for overlap before anything is downloaded
    rows = None if args.train_indices == "all" else _read_indices(args.train_indices, "--train-indices")
    others = {}
    if args.val_indices:
        others["validation"] = _read_indices(args.val_indices, "--val-indices")
    if args.test_indices:
        others["test"] = _read_indices(args.test_indices, "--test-indices")
    if rows is not None:
        check_disjoint(rows, others, "rows")
    nearid = load_hub_nearid_training(args.neg_sources, rows, repo=args.hf_repo, cache_dir=args.hf_cache_dir)
    val_sources = list(args.val_sources or EVAL_SOURCES)
    val = None
    if args.val_indices:
        val = load_hf_nearid(val_sources, split=None, indices=others["validation"], repo=args.hf_repo,
                             cache_dir=args.hf_cache_dir, with_masks=False)
    else:
        logger.warning("no --val-indices: training runs without validation (SSR / PA are never measured); pass "
                       "--val-indices splits/val.json")
    mtg = load_hub_mtg_training("train", cache_dir=args.hf_cache_dir) if args.mtg_hf else None
    return TrainingData(nearid, nearid.sources, mtg, val, val_sources)


def build_data(args: argparse.Namespace) -> TrainingData:
    """Training / validation records for the flags, after refusing overlapping splits."""
    data = _hub_data(args) if args.hf else _local_data(args)
    if args.hf:
        train_where, val_where, no_val = (f"--train-indices {args.train_indices}", f"--val-indices {args.val_indices}",
                                          "drop --val-indices")
    else:
        train_where = f"--train-split {args.train_split or 'train'} of {args.data_dir}"
        val_where, no_val = f"--val-split {args.val_split or 'val'} of {args.data_dir}", "pass --val-split none"
    if len(data.nearid) == 0:
        raise ValueError(f"the training split is empty ({train_where} lists no identity)")
    if data.val is not None and len(data.val) == 0:
        raise ValueError(f"the validation split is empty ({val_where} lists no identity); give it identities or "
                         f"{no_val}")
    logger.info("training data: %d identities x sources %s%s", len(data.nearid), data.sources,
                f", {len(data.mtg)} MTG samples x {args.mtg_repeat or 4}" if data.mtg is not None else "")
    return data


def _train_set(data: TrainingData, nearid: Sequence[Any], mtg: Sequence[Any] | None, args) -> JointTrainSet:
    repeat = args.mtg_repeat or 4
    return JointTrainSet(
        NearIDTrainSet(nearid, data.sources, seed=args.seed),
        MTGTrainSet(mtg, seed=args.seed) if mtg is not None else None,
        mtg_repeat=repeat,
    )


# ====================================================================================================================
# Export
# ====================================================================================================================


def export_model(model: nn.Module, output_dir: str | os.PathLike, formats: str, dtype: torch.dtype,
                 preprocess_config: PreprocessConfig) -> dict[str, str]:
    """Write ``export/release/`` (published layout) and/or ``export/nearid_head.safetensors`` (head-only, names its
    trunk through ``config.backbone_name_or_path``). Returns {format: path}."""
    out: dict[str, str] = {}
    root = Path(output_dir) / "export"
    if formats in ("both", "release"):
        out["release"] = str(save_release(model, root / "release", dtype=dtype,
                                          preprocessor_config=preprocess_config.to_dict()))
    if formats in ("both", "head"):
        root.mkdir(parents=True, exist_ok=True)
        out["head"] = str(save_head_only(model, root / "nearid_head.safetensors", dtype=dtype))
    return out


# ====================================================================================================================
# main
# ====================================================================================================================


def _resolve_dtypes(args: argparse.Namespace, cuda: bool) -> tuple[str, torch.dtype, str]:
    mixed = args.mixed_precision if args.mixed_precision != "auto" else ("fp16" if cuda else "no")
    if args.backbone_dtype != "auto":
        backbone = DTYPES[args.backbone_dtype]
    else:
        backbone = torch.float16 if cuda else (torch.bfloat16 if mixed == "bf16" else torch.float32)
    if args.cache_dtype != "auto":
        cache = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}[args.cache_dtype]
    else:
        cache = "bfloat16" if backbone == torch.bfloat16 else "float16"
    return mixed, backbone, cache


def _model_id(name: str) -> str:
    path = Path(name).expanduser()
    return str(path.resolve()) if path.exists() else name


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def _fill_cache(cache: FeatureCache, refs_by_key: dict[str, Any], encode, accelerator, batch_size: int) -> int:
    """Fill the missing training keys, split over the processes (each writes its own writer folder)."""
    missing = cache.missing(refs_by_key)
    accelerator.wait_for_everyone()  # every process lists the missing keys before any process writes
    share = missing[accelerator.process_index :: accelerator.num_processes]
    if missing:
        logger.info("feature cache: %d of %d images missing; this process encodes %d", len(missing),
                    len(refs_by_key), len(share))
    added = cache.fill([refs_by_key[k] for k in share], encode, batch_size=batch_size,
                       progress=accelerator.is_local_main_process, keys=share)
    accelerator.wait_for_everyone()
    cache.refresh()
    left = cache.missing(refs_by_key)
    if left:  # only if another run changed the cache meanwhile: fill the rest here
        logger.warning("feature cache: %d keys still missing after the shared fill; encoding them here", len(left))
        added += cache.fill([refs_by_key[k] for k in left], encode, batch_size=batch_size, keys=left)
    return added


def _fill_streaming(cache: FeatureCache, refs, encode, batch_size: int) -> int:
    """Fill the cache from a stream of references without holding them all (hub validation images are decoded)."""
    pending: dict[str, Any] = {}
    added = 0
    for ref in refs:
        key = cache.key(ref)
        if key not in cache and key not in pending:
            pending[key] = ref
        if len(pending) >= batch_size:
            added += cache.fill(list(pending.values()), encode, batch_size, keys=list(pending))
            pending.clear()
    if pending:
        added += cache.fill(list(pending.values()), encode, batch_size, keys=list(pending))
    return added


def _keyed(records: Sequence[Any], cache: FeatureCache, refs_by_key: dict[str, Any], progress: bool) -> list[Any]:
    keyed = keyed_records(records, cache, progress=progress)
    for ref, key in zip(record_refs(records), record_refs(keyed)):
        refs_by_key.setdefault(key, ref)
    return keyed


def _val_log(csv_log: CsvLog | None, accelerator, result, step: int) -> dict[str, float]:
    pooled = result.metrics["all"]
    flat = {"val/SSR": pooled.ssr, "val/PA": pooled.pa}
    for source, m in result.metrics.items():
        if csv_log is not None:
            csv_log.write({"step": step, "source": source, "SSR": m.ssr, "PA": m.pa, "PA_terms": m.pa_terms, "n": m.n})
        if source != "all":
            flat[f"val/{source}/SSR"], flat[f"val/{source}/PA"] = m.ssr, m.pa
    accelerator.log(flat, step=step)
    logger.info("step %d validation: SSR %.2f PA %.2f (n=%d)", step, pooled.ssr, pooled.pa, pooled.n)
    return {"step": step, "SSR": pooled.ssr, "PA": pooled.pa, "n": pooled.n,
            "per_source": {s: {"SSR": m.ssr, "PA": m.pa} for s, m in result.metrics.items() if s != "all"}}


def _tracker_config(args: argparse.Namespace) -> dict[str, Any]:
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}


def _writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` if needed and check that files can be written in it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as err:
        raise ValueError(f"{flag} {path} cannot be written ({err.strerror or err}); pass a folder you can write "
                         "to") from None


def _warn_if_small(train_set: JointTrainSet, batch_size: int) -> None:
    """Warn when the training samples cannot fill one batch (several processes: the sampler refuses it)."""
    n = len(train_set)
    if n < batch_size:
        mtg = f" + {train_set.n_mtg} MTG samples x {train_set.mtg_repeat}" if train_set.n_mtg else ""
        logger.warning("the training data cannot fill one batch: %d samples (%d identities%s) for --batch-size %d, "
                       "so every step trains on all %d samples, with fewer in-batch negatives than asked for. Lower "
                       "--batch-size to %d or less, or add identities.", n, train_set.n_nearid, mtg, batch_size, n, n)


def _one_line(err: BaseException) -> str:
    """The message of an error; for one re-raised from a DataLoader worker, the worker's own last line."""
    text = str(err).strip() or type(err).__name__
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return " ".join(text.split())


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: :func:`main`, with every mistake in the flags, paths, data, checkpoint or feature cache
    reported as one message and exit status 2, never a traceback (it is logged at DEBUG level)."""
    try:
        return main(argv)
    except SystemExit as exit_:  # argparse: usage errors (2) and --help (0), already printed
        return exit_.code if isinstance(exit_.code, int) else 2
    except (ValueError, OSError, ImportError) as err:
        logger.debug("training failed", exc_info=True)
        print(f"{_PROG}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{_PROG}: interrupted; continue with --resume latest", file=sys.stderr)
        return 130


@dataclass
class TrainRun:
    """Everything the steps of :func:`main` share; each step fills in its part."""

    args: argparse.Namespace
    output_dir: Path
    accelerator: Any
    cuda: bool
    backbone_dtype: torch.dtype
    cache_dtype: str
    resume_path: Path | None
    data: TrainingData | None = None
    model: nn.Module | None = None
    preprocess: PreprocessConfig | None = None
    encode: Any = None
    pad_tokens: torch.Tensor | None = None
    cache: FeatureCache | None = None
    train_set: JointTrainSet | None = None
    collate: Any = None
    sampler: EpochSampler | None = None
    total_steps: int = 0
    head: nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    data_signature: dict[str, Any] = field(default_factory=dict)
    global_step: int = 0
    train_log: CsvLog | None = None
    val_log: CsvLog | None = None
    embedder: TrainEmbedder | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    started: float = 0.0
    last_loss: float = float("nan")
    saved_at: int = -1

    @property
    def main_process(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def start_run(args: argparse.Namespace) -> TrainRun:
    """Writable output folders, the accelerator, the seed, stale save folders removed, the checkpoint to resume."""
    output_dir = Path(args.output_dir)
    _writable_dir(output_dir, "--output-dir")
    if args.cache_dir and not (args.augment or args.no_cache or args.export_only):
        _writable_dir(Path(args.cache_dir), "--cache-dir")
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    cuda = torch.cuda.is_available() and not args.cpu
    mixed, backbone_dtype, cache_dtype = _resolve_dtypes(args, cuda)
    accelerator = Accelerator(mixed_precision=mixed, cpu=args.cpu, log_with=args.trackers or None,
                              project_dir=str(output_dir))
    set_seed(args.seed)
    if accelerator.is_main_process:
        clean_stale_checkpoints(output_dir)  # temporary folders of saves that a kill interrupted
    resume_path = resolve_resume(output_dir, args.resume)
    if args.export_only and resume_path is None:
        raise ValueError(f"--export-only: there is no checkpoint in {output_dir} to export; pass --resume "
                         "CHECKPOINT_DIR")
    return TrainRun(args, output_dir, accelerator, cuda, backbone_dtype, cache_dtype, resume_path)


def load_trunk(run: TrainRun) -> None:
    """The model: frozen trunk in the backbone dtype on the device, fp32 master weights for the head."""
    model, model_dir = load_model(run.args.model, dtype=run.backbone_dtype)
    model.config.backbone_name_or_path = _model_id(run.args.model)
    model.to(run.device)
    model.freeze_backbone()
    model.head.float()
    run.model = model
    run.preprocess = load_preprocess_config(model_dir, image_size=model.config.vision_config.image_size)


def export_checkpoint(run: TrainRun) -> None:
    """``--export-only``: load the resumed checkpoint's head and write the exports."""
    load_checkpoint(run.resume_path, head=run.model.head, restore_rng=False)
    if run.main_process:
        exports = export_model(run.model, run.output_dir, run.args.export, DTYPES[run.args.export_dtype],
                               run.preprocess)
        logger.info("exported %s from %s", exports, run.resume_path)


def prepare_inputs(run: TrainRun) -> None:
    """The training samples and their collation: tokens from the filled feature cache, or pixels encoded on the fly
    (``--augment`` / ``--no-cache``)."""
    args, data, model = run.args, run.data, run.model
    run.encode = token_encoder(model, run.preprocess, run.device)
    with torch.no_grad():
        zeros = torch.zeros(1, 3, *run.preprocess.size, device=run.device, dtype=run.backbone_dtype)
        run.pad_tokens = model.encode_tokens(zeros)[0]
    if args.augment or args.no_cache:
        run.train_set = _train_set(data, data.nearid, data.mtg, args)
        run.collate = PixelCollate(run.preprocess, AugmentConfig() if args.augment else None, seed=args.seed)
        return
    accelerator = run.accelerator
    cache = FeatureCache.for_model(args.cache_dir or run.output_dir / "feature_cache", model, run.preprocess,
                                   dtype=run.cache_dtype, shard_size=args.cache_shard_size,
                                   writer=f"r{accelerator.process_index}")
    refs_by_key: dict[str, Any] = {}
    progress = accelerator.is_local_main_process
    nearid_keyed = _keyed(data.nearid, cache, refs_by_key, progress)
    mtg_keyed = _keyed(data.mtg, cache, refs_by_key, progress) if data.mtg is not None else None
    t0 = time.perf_counter()
    added = _fill_cache(cache, refs_by_key, run.encode, accelerator, args.encode_batch_size)
    if data.val is not None and run.main_process:  # validation runs on the main process only
        added += _fill_streaming(cache, record_refs(data.val), run.encode, args.encode_batch_size)
    logger.info("feature cache %s: %d entries (%d new, %.1f s), %.2f MB per image", cache.directory, len(cache),
                added, time.perf_counter() - t0, cache.bytes_per_entry / 1e6)
    run.cache = cache
    run.train_set = _train_set(data, nearid_keyed, mtg_keyed, args)
    run.collate = TokenCollate(cache, run.pad_tokens)


def prepare_optimisation(run: TrainRun) -> None:
    """Data order, AdamW, warmup + cosine schedule, and the signature a resumed run must match."""
    from transformers import get_cosine_schedule_with_warmup

    args, accelerator, train_set = run.args, run.accelerator, run.train_set
    sampler = EpochSampler(len(train_set), args.batch_size, args.epochs, seed=args.seed,
                           num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    run.total_steps = args.max_steps or sampler.total_steps
    sampler.epochs = max(sampler.epochs, math.ceil(run.total_steps / sampler.steps_per_epoch))
    run.sampler = sampler
    _warn_if_small(train_set, args.batch_size)
    head = HeadModule(run.model)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    run.scheduler = get_cosine_schedule_with_warmup(optimizer, args.warmup_steps, run.total_steps)
    run.head, run.optimizer = accelerator.prepare(head, optimizer)
    run.data_signature = {"n_samples": len(train_set), "n_nearid": train_set.n_nearid, "n_mtg": train_set.n_mtg,
                          "mtg_repeat": train_set.mtg_repeat, "sources": run.data.sources,
                          "total_steps": run.total_steps}


def resume_training(run: TrainRun) -> None:
    """Restore head, optimizer, schedule, scaler, RNG and data position from ``--resume`` (if any), refusing a
    checkpoint whose data or schedule differ."""
    if run.resume_path is None:
        return
    state = load_checkpoint(run.resume_path, head=run.model.head, optimizer=run.optimizer, scheduler=run.scheduler,
                            scaler=run.accelerator.scaler)
    changed = {k: (state["data"].get(k), v) for k, v in run.data_signature.items() if state["data"].get(k) != v}
    if changed:
        raise ValueError(f"cannot resume from {run.resume_path}: the data / schedule differ from the checkpoint's "
                         f"(checkpoint, now): {changed}")
    run.sampler.load_state_dict(state["sampler"])
    run.global_step = int(state["global_step"])
    logger.info("resumed from %s at step %d (epoch %d, batch %d)", run.resume_path, run.global_step,
                run.sampler.epoch, run.sampler.batch)


def open_logs(run: TrainRun) -> None:
    """CSV logs (kept up to the resumed step), the validation embedder and the trackers."""
    args = run.args
    if run.main_process:
        run.train_log = CsvLog(run.output_dir / "train_log.csv", TRAIN_LOG_FIELDS, keep_until_step=run.global_step)
        if run.data.val is not None:
            run.val_log = CsvLog(run.output_dir / "val_log.csv", VAL_LOG_FIELDS, keep_until_step=run.global_step)
    run.embedder = TrainEmbedder(run.model, run.encode, run.cache, run.device, run.accelerator.autocast,
                                 _model_id(args.model))
    if args.trackers:
        run.accelerator.init_trackers(args.project_name, config=_tracker_config(args))


def _validate_now(run: TrainRun, step: int) -> None:
    if run.data.val is not None and run.main_process:
        result = validate(run.embedder, run.data.val, run.data.val_sources, run.args.eval_batch_size)
        run.history.append(_val_log(run.val_log, run.accelerator, result, step))
    run.accelerator.wait_for_everyone()


def _checkpoint_now(run: TrainRun) -> None:
    if run.main_process:
        path = save_checkpoint(
            run.output_dir, run.global_step, head_state=run.model.head.state_dict(), optimizer=run.optimizer,
            scheduler=run.scheduler, scaler=run.accelerator.scaler, total_limit=run.args.checkpoints_total_limit,
            trainer_state={"sampler": run.sampler.state_dict(), "data": run.data_signature,
                           "args": _tracker_config(run.args)},
        )
        logger.info("saved %s", path)
    run.accelerator.wait_for_everyone()
    run.saved_at = run.global_step


def training_step(run: TrainRun, batch: dict[str, Any]) -> dict[str, Any]:
    """One optimizer step on one batch (cached tokens, or pixels encoded here); returns its train-log row."""
    args, accelerator, device = run.args, run.accelerator, run.device
    epoch = run.sampler.epoch
    pos_mask, neg_mask = batch["pos_mask"].to(device), batch["neg_mask"].to(device)
    if "tokens" in batch:
        tokens = batch["tokens"].to(device, non_blocking=True)
    else:
        tokens = run.pad_tokens.expand(batch["present"].shape[0], *run.pad_tokens.shape).clone()
        if batch["pixels"].numel():
            with torch.no_grad():
                tokens[batch["present"].to(device)] = run.model.encode_tokens(
                    batch["pixels"].to(device, run.backbone_dtype, non_blocking=True))
    out = batch_loss(run.head, tokens, pos_mask, neg_mask, args.temperature, args.alpha)
    accelerator.backward(out.loss)
    grad_norm = accelerator.clip_grad_norm_([p for p in run.head.parameters() if p.requires_grad],
                                            args.max_grad_norm)
    run.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:
        run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    run.sampler.advance()
    run.global_step += 1
    run.last_loss = accelerator.reduce(out.loss.detach(), reduction="mean").item()
    return {"step": run.global_step, "epoch": epoch, "loss": run.last_loss, "tier1": out.metrics["tier1"],
            "tier2": out.metrics["tier2"], "top1_acc": out.metrics["top1_acc"], "tier_acc": out.metrics["tier_acc"],
            "lr": run.scheduler.get_last_lr()[0], "grad_norm": float(grad_norm),
            "elapsed_s": round(time.perf_counter() - run.started, 3)}


def log_step(run: TrainRun, row: dict[str, Any]) -> None:
    """The step's row to ``train_log.csv``, and every ``--log-every`` steps to the trackers and the log."""
    if run.train_log is not None:
        run.train_log.write(row)
    if run.global_step % run.args.log_every == 0 or run.global_step == run.total_steps:
        run.accelerator.log({f"train/{k}": v for k, v in row.items() if k not in ("step", "elapsed_s")},
                            step=run.global_step)
        logger.info("step %d/%d loss %.4f lr %.2e", run.global_step, run.total_steps, row["loss"], row["lr"])


def train_loop(run: TrainRun) -> bool:
    """Validate a fresh run at step 0, then train to the last step (or ``--stop-after-steps``), checkpointing and
    validating on schedule; a Ctrl-C saves a checkpoint first. Returns whether the run reached its last step."""
    from torch.utils.data import DataLoader

    args = run.args
    stop_at = args.stop_after_steps
    eval_steps = args.eval_steps or args.checkpointing_steps
    if run.global_step == 0:
        _validate_now(run, 0)
    loader = DataLoader(run.train_set, batch_sampler=run.sampler, collate_fn=run.collate,
                        num_workers=args.num_workers, pin_memory=run.cuda, persistent_workers=False)
    run.head.train()
    run.started = time.perf_counter()
    interrupted = False
    try:
        for batch in loader:
            if run.global_step >= run.total_steps:
                break
            if stop_at is not None and run.global_step >= stop_at:
                interrupted = True  # resumed at or past the stop step: nothing to do in this slice
                break
            log_step(run, training_step(run, batch))
            step = run.global_step
            if args.checkpointing_steps and step % args.checkpointing_steps == 0:
                _checkpoint_now(run)
            if run.data.val is not None and step % eval_steps == 0 and step != run.total_steps:
                _validate_now(run, step)
            if stop_at is not None and step >= stop_at:
                interrupted = True
                break
    except KeyboardInterrupt:
        logger.warning("interrupted at step %d: saving a checkpoint", run.global_step)
        if run.global_step > 0 and run.saved_at != run.global_step:
            _checkpoint_now(run)
        raise
    if run.saved_at != run.global_step and run.global_step > 0:
        _checkpoint_now(run)
    return run.global_step >= run.total_steps and not interrupted


def finish(run: TrainRun, finished: bool) -> None:
    """A finished run: final validation and exports. Every run: ``train_summary.json`` and the trackers closed."""
    exports: dict[str, str] = {}
    if finished:
        _validate_now(run, run.global_step)
        if run.main_process and run.args.export != "none":
            exports = export_model(run.model, run.output_dir, run.args.export, DTYPES[run.args.export_dtype],
                                   run.preprocess)
            logger.info("exported %s", exports)
    elapsed = time.perf_counter() - run.started
    if run.main_process:
        cache = run.cache
        summary = {
            "global_step": run.global_step, "total_steps": run.total_steps, "finished": finished,
            "last_loss": run.last_loss, "train_seconds": elapsed, "feature_cache": None if cache is None else {
                "directory": str(cache.directory), "entries": len(cache), "bytes_per_image": cache.bytes_per_entry},
            "validation": run.history, "exports": exports, "data": run.data_signature,
        }
        (run.output_dir / "train_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    run.accelerator.end_training()


def main(argv: Sequence[str] | None = None) -> int:
    """Train (or, with ``--export-only``, export) the NearID head; returns a process exit code (0). Errors are raised
    (:func:`cli` turns them into messages)."""
    args = parse_args(argv)
    _setup_logging()
    run = start_run(args)
    if args.export_only:
        load_trunk(run)
        export_checkpoint(run)
        return 0
    run.data = build_data(args)  # data first: a bad split is refused before anything heavy is loaded
    load_trunk(run)
    prepare_inputs(run)
    prepare_optimisation(run)
    resume_training(run)
    open_logs(run)
    finished = train_loop(run)
    finish(run, finished)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(cli())
