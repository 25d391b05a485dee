"""Training-side data: the paper's sample assembly (reference section 3.4-3.6), a resumable sampler, batch collation
from cached tokens or pixels, augmentation, lazy hub records and the train/test overlap check.

Records come from :mod:`nearid_core.data`: the local folder layout, MTG folders, or the hub through the same reader
the benchmarks use (:class:`~nearid_core.data.HubNearIDRecords`, re-exported here). :func:`load_hub_nearid_training`
/ :func:`load_hub_mtg_training` ask it to keep every image **undecoded and unread**
(:class:`~nearid_core.feature_cache.HubImage`) until it is needed: the feature cache keys images by their encoded
bytes, and a training epoch over cached tokens never decodes an image. A record slot holds an image
reference, or -- once :func:`keyed_records` has run -- the image's feature-cache key; the assembly below does not
care which.

One training sample = 6 slots ``[pos0, pos1, pos2, neg0, neg1, neg2]``:

* the valid positive views are permuted with an RNG seeded by ``(seed, epoch, kind, row)``; new slot 0 is the
  **anchor**, slots 1-2 the positives; missing views stay at the end (``pos_mask`` false);
* for every original view slot ``j`` one training distractor source is drawn with an RNG seeded by
  ``(seed, epoch, kind, row, j)`` (always source 0 when there is one); the negative of new slot ``k`` is that source's
  distractor of original slot ``perm[k]``, so **negative k sits in positive k's background**. A missing distractor is
  not replaced (``neg_mask`` false);
* MTG rows: pos = (image 1, image 2, -), neg = (image 1 edited, image 2 edited, -), both permuted alike.

Everything is a pure function of ``(seed, epoch, row)``, so a run is reproducible, resumable at any step
(:class:`EpochSampler` state = epoch + batch position), and identical across ``num_workers`` settings.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .data import (
    MAX_VIEWS,
    MTG_REPO,
    NEARID_REPO,
    DatasetLayoutError,
    HubMTGRecords,
    HubNearIDRecords,
    MTGRecord,
    NearIDRecord,
    load_hf_mtg,
    load_hf_nearid,
)
from .feature_cache import FeatureCache, open_ref
from .preprocessing import PreprocessConfig, pil_to_tensor, preprocess_images

logger = logging.getLogger(__name__)

__all__ = [
    "AugmentConfig",
    "EpochSampler",
    "HubMTGRecords",
    "HubNearIDRecords",
    "JointTrainSet",
    "MTGTrainSet",
    "NearIDTrainSet",
    "PixelCollate",
    "SplitOverlapError",
    "TokenCollate",
    "TrainSample",
    "augment_image",
    "check_disjoint",
    "keyed_records",
    "load_hub_mtg_training",
    "load_hub_nearid_training",
]

SLOTS = MAX_VIEWS  # 3 positive + 3 negative slots per sample
_KIND_CODES = {"nearid": 0, "mtg": 1}
_ORDER_STREAM = 0x5EED  # RNG stream of the epoch order, distinct from the sample streams


class SplitOverlapError(ValueError):
    """The training split shares identities (or rows) with a validation or test split."""


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


# --------------------------------------------------------------------------------------------------------------------
# Sample assembly
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSample:
    """One assembled training sample.

    Attributes:
        items: 6 slot entries ``[pos0, pos1, pos2, neg0, neg1, neg2]`` (image references or cache keys; None = empty).
        pos_mask: [3] valid positive slots (slot 0 = anchor).
        neg_mask: [3] valid hard negatives (negative k is in positive k's background).
        perm: original view slot of each new positive slot (``perm[new] = orig``), valid slots only.
        neg_sources: per **original** view slot, the distractor source drawn for it (None for a missing view).
        sample_id: identity id / MTG sample id.
        kind: ``"nearid"`` or ``"mtg"``.
        row: the row used to seed the sample RNG (dataset row position).
        epoch: the epoch it was assembled for.
    """

    items: list[Any]
    pos_mask: list[bool]
    neg_mask: list[bool]
    perm: list[int]
    neg_sources: list[str | None]
    sample_id: str
    kind: str
    row: int
    epoch: int


class NearIDTrainSet:
    """NearID identities -> :class:`TrainSample` (reference ``NearIDDataset``, aligned per-slot negatives).

    Args:
        records: identities (any indexable sequence of :class:`~nearid_core.data.NearIDRecord`).
        sources: training distractor sources, in a fixed order (the per-slot draw indexes this list).
        seed: base seed of the sample RNGs.
        shuffle_anchor: permute the valid views every epoch (the recipe does); False keeps view order.
    """

    kind = "nearid"

    def __init__(self, records: Sequence[NearIDRecord], sources: Sequence[str], seed: int = 0,
                 shuffle_anchor: bool = True) -> None:
        if not sources:
            raise ValueError("NearIDTrainSet needs at least one distractor source")
        if len(set(sources)) != len(sources):
            raise ValueError(f"duplicate distractor sources: {list(sources)}")
        self.records, self.sources, self.seed, self.shuffle_anchor = records, list(sources), int(seed), shuffle_anchor

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, epoch: int) -> TrainSample:
        rec = self.records[index]
        valid = [j for j in range(SLOTS) if j < len(rec.views) and rec.views[j] is not None]
        if len(valid) < 2:
            raise DatasetLayoutError(
                f"identity {rec.identity_id} has {len(valid)} view(s); a training sample needs at least 2 "
                "(remove it from the training split)"
            )
        row = rec.index if rec.index is not None else index
        code = _KIND_CODES[self.kind]
        perm = list(valid)
        if self.shuffle_anchor:
            perm = [valid[k] for k in _rng(self.seed, epoch, code, row).permutation(len(valid))]
        neg_sources: list[str | None] = [None] * SLOTS
        for j in valid:
            if len(self.sources) == 1:
                neg_sources[j] = self.sources[0]
            else:
                neg_sources[j] = self.sources[int(_rng(self.seed, epoch, code, row, 1 + j).integers(len(self.sources)))]
        positives = [rec.views[j] for j in perm] + [None] * (SLOTS - len(perm))
        negatives: list[Any] = []
        for j in perm:
            slots = rec.distractors.get(neg_sources[j])
            if slots is None:
                raise DatasetLayoutError(f"identity {rec.identity_id} has no distractor source {neg_sources[j]!r}")
            negatives.append(slots[j] if j < len(slots) else None)
        negatives += [None] * (SLOTS - len(perm))
        return TrainSample(
            items=positives + negatives,
            pos_mask=[p is not None for p in positives],
            neg_mask=[n is not None for n in negatives],
            perm=perm,
            neg_sources=neg_sources,
            sample_id=str(rec.identity_id),
            kind=self.kind,
            row=int(row),
            epoch=int(epoch),
        )


class MTGTrainSet:
    """Mind-the-Glitch rows -> :class:`TrainSample` (reference ``MTGTrainDataset``).

    pos = (image 1, image 2, empty), neg = (image 1 part-edited, image 2 part-edited, empty); the anchor permutation
    of the two views is applied to both, so negative 0 is always the edited version of the anchor view.
    """

    kind = "mtg"

    def __init__(self, records: Sequence[MTGRecord], seed: int = 0, shuffle_anchor: bool = True) -> None:
        self.records, self.seed, self.shuffle_anchor = records, int(seed), shuffle_anchor

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, index: int, epoch: int) -> TrainSample:
        rec = self.records[index]
        valid = [j for j in range(2) if rec.originals[j] is not None]
        if len(valid) < 2:
            raise DatasetLayoutError(f"MTG sample {rec.sample_id} lacks one of its two original views")
        perm = list(valid)
        if self.shuffle_anchor:
            perm = [valid[k] for k in _rng(self.seed, epoch, _KIND_CODES[self.kind], index).permutation(2)]
        positives = [rec.originals[j] for j in perm] + [None]
        negatives = [rec.inpainted[j] for j in perm] + [None]
        return TrainSample(
            items=positives + negatives,
            pos_mask=[p is not None for p in positives],
            neg_mask=[n is not None for n in negatives],
            perm=perm,
            neg_sources=["mtg", "mtg", None],
            sample_id=str(rec.sample_id),
            kind=self.kind,
            row=int(index),
            epoch=int(epoch),
        )


class JointTrainSet:
    """NearID samples followed by ``mtg_repeat`` copies of the MTG samples (reference
    ``ConcatDataset([NearID, MTG x repeat])``). Copies of one MTG row are identical within an epoch."""

    def __init__(self, nearid: NearIDTrainSet, mtg: MTGTrainSet | None = None, mtg_repeat: int = 4) -> None:
        if mtg is not None and mtg_repeat < 1:
            raise ValueError(f"mtg_repeat must be >= 1 when MTG data is given, got {mtg_repeat}")
        self.nearid, self.mtg = nearid, mtg
        self.mtg_repeat = mtg_repeat if mtg is not None else 0
        self.n_nearid = len(nearid)
        self.n_mtg = len(mtg) if mtg is not None else 0

    def __len__(self) -> int:
        return self.n_nearid + self.mtg_repeat * self.n_mtg

    def locate(self, index: int) -> tuple[str, int]:
        """(``"nearid"`` | ``"mtg"``, row within that part) of a joint index."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample index {index} outside 0..{len(self) - 1}")
        if index < self.n_nearid:
            return "nearid", index
        return "mtg", (index - self.n_nearid) % self.n_mtg

    def sample(self, index: int, epoch: int) -> TrainSample:
        kind, row = self.locate(index)
        return (self.nearid if kind == "nearid" else self.mtg).sample(row, epoch)  # type: ignore[union-attr]

    def __getitem__(self, key: tuple[int, int]) -> TrainSample:
        """``dataset[(epoch, index)]``: the form :class:`EpochSampler` batches take through a DataLoader."""
        epoch, index = key
        return self.sample(index, epoch)


# --------------------------------------------------------------------------------------------------------------------
# Sampler: the data order is (seed, epoch) -> permutation, so its whole state is a position
# --------------------------------------------------------------------------------------------------------------------


class EpochSampler:
    """Batch sampler over ``n`` samples whose state is a position ``(epoch, batch)``.

    Epoch ``e`` visits ``permutation(seed, e)`` in global batches of ``batch_size * num_replicas`` samples; process
    ``rank`` takes its contiguous ``batch_size`` slice of each. The last partial batch is kept on one process (as the
    reference) and dropped with several processes (the distributed loss needs equal batch sizes).

    Iterating yields, from the current position to the end of ``epochs``, lists of ``(epoch, index)`` pairs (feed it
    to ``DataLoader(batch_sampler=...)`` over a :class:`JointTrainSet`). The position only moves with
    :meth:`advance`, called by the trainer after each optimizer step, so DataLoader prefetching never corrupts the
    checkpointed state.
    """

    def __init__(self, n: int, batch_size: int, epochs: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 drop_last: bool | None = None, shuffle: bool = True) -> None:
        if n < 1 or batch_size < 1 or epochs < 1:
            raise ValueError(f"EpochSampler needs n, batch_size, epochs >= 1 (got {n}, {batch_size}, {epochs})")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")
        self.n, self.batch_size, self.epochs, self.seed = n, batch_size, epochs, int(seed)
        self.num_replicas, self.rank, self.shuffle = num_replicas, rank, shuffle
        self.drop_last = num_replicas > 1 if drop_last is None else (drop_last or num_replicas > 1)
        global_batch = batch_size * num_replicas
        self.steps_per_epoch = n // global_batch if self.drop_last else math.ceil(n / global_batch)
        if self.steps_per_epoch == 0:
            fix = (f"lower the batch size to {n // num_replicas} or less" if n >= num_replicas else
                   f"use {n} processes or fewer")
            raise ValueError(f"{n} training samples are fewer than one global batch ({batch_size} x {num_replicas} "
                             f"processes): {fix}, or add data")
        self.epoch, self.batch = 0, 0

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def global_step(self) -> int:
        return self.epoch * self.steps_per_epoch + self.batch

    def order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.n)
        return _rng(self.seed, epoch, _ORDER_STREAM).permutation(self.n)

    def indices(self, epoch: int, batch: int) -> list[int]:
        """This process's sample indices of batch ``batch`` of ``epoch``."""
        g = self.batch_size * self.num_replicas
        chunk = self.order(epoch)[batch * g : (batch + 1) * g]
        return [int(i) for i in chunk[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, batch = self.epoch, self.batch
        while epoch < self.epochs:
            yield [(epoch, i) for i in self.indices(epoch, batch)]
            batch += 1
            if batch == self.steps_per_epoch:
                epoch, batch = epoch + 1, 0

    def __len__(self) -> int:
        return self.total_steps - self.global_step

    def advance(self) -> None:
        self.batch += 1
        if self.batch == self.steps_per_epoch:
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "n": self.n,
                "batch_size": self.batch_size, "num_replicas": self.num_replicas}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        for name in ("seed", "n", "batch_size", "num_replicas"):
            if name in state and int(state[name]) != getattr(self, name):
                raise ValueError(
                    f"cannot resume: the checkpoint's data order used {name}={state[name]} but this run has "
                    f"{getattr(self, name)} (pass the same --seed / --batch-size / data / number of processes)"
                )
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


# --------------------------------------------------------------------------------------------------------------------
# Augmentation (off in the paper recipe; on-the-fly encoding only)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AugmentConfig:
    """Per-image augmentation of the reference dataset class (all off in the paper recipe).

    Attributes:
        flip_p: horizontal flip probability.
        jitter_p: probability of colour jitter (brightness, contrast, saturation factors in 1 +- value; hue shift
            in +- hue turns).
        affine_p: probability of a random translate (+- translate of the size) + scale (black fill).
    """

    flip_p: float = 0.5
    jitter_p: float = 0.5
    brightness: float = 0.2
    contrast: float = 0.2
    saturation: float = 0.2
    hue: float = 0.05
    affine_p: float = 0.5
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)


def _hue_shift(x: torch.Tensor, turns: float) -> torch.Tensor:
    """Rotate the chroma of [3, H, W] RGB in YIQ space by ``turns`` of a full circle."""
    to_yiq = x.new_tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
    c, s = math.cos(2 * math.pi * turns), math.sin(2 * math.pi * turns)
    rot = x.new_tensor([[1, 0, 0], [0, c, -s], [0, s, c]])
    m = torch.linalg.inv(to_yiq) @ rot @ to_yiq
    return torch.einsum("ij,jhw->ihw", m, x)


def augment_image(x: torch.Tensor, rng: np.random.Generator, config: AugmentConfig) -> torch.Tensor:
    """Augment one [3, H, W] image in 0..1 with draws from ``rng`` (deterministic given the generator state)."""
    draws = rng.random(12)
    if draws[0] < config.flip_p:
        x = x.flip(-1)
    if draws[1] < config.jitter_p:
        b = 1 + config.brightness * (2 * draws[2] - 1)
        c = 1 + config.contrast * (2 * draws[3] - 1)
        s = 1 + config.saturation * (2 * draws[4] - 1)
        x = x * b
        mean = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).mean()
        x = (x - mean) * c + mean
        gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2])[None]
        x = (x - gray) * s + gray
        if config.hue:
            x = _hue_shift(x.clamp(0, 1), config.hue * (2 * draws[5] - 1))
        x = x.clamp(0, 1)
    if draws[6] < config.affine_p:
        lo, hi = config.scale
        scale = lo + (hi - lo) * draws[7]
        tx, ty = (config.translate * 2 * (2 * draws[8] - 1), config.translate * 2 * (2 * draws[9] - 1))
        theta = x.new_tensor([[1 / scale, 0, -tx / scale], [0, 1 / scale, -ty / scale]])[None]
        grid = F.affine_grid(theta, [1, *x.shape], align_corners=False)
        x = F.grid_sample(x[None], grid, align_corners=False, padding_mode="zeros")[0]
    return x


# --------------------------------------------------------------------------------------------------------------------
# Collation: samples -> tensors
# --------------------------------------------------------------------------------------------------------------------


def _masks(samples: Sequence[TrainSample]) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.tensor([s.pos_mask for s in samples], dtype=torch.bool),
            torch.tensor([s.neg_mask for s in samples], dtype=torch.bool))


class TokenCollate:
    """Samples whose slots hold feature-cache keys -> ``{"tokens": [6B, N, C], "pos_mask": [B, 3], "neg_mask":
    [B, 3]}``; empty slots get ``pad_tokens`` (the trunk's tokens of an all-zero input, as the reference, which
    encodes a zero tensor for every padded slot)."""

    def __init__(self, cache: FeatureCache, pad_tokens: torch.Tensor) -> None:
        self.cache, self.pad_tokens = cache, pad_tokens.to("cpu", cache.torch_dtype)

    def __call__(self, samples: Sequence[TrainSample]) -> dict[str, Any]:
        items = [it for s in samples for it in s.items]
        present = [i for i, it in enumerate(items) if it is not None]
        tokens = self.pad_tokens.expand(len(items), *self.pad_tokens.shape).clone()
        if present:
            tokens[present] = self.cache.tokens([items[i] for i in present])
        pos, neg = _masks(samples)
        return {"tokens": tokens, "pos_mask": pos, "neg_mask": neg, "samples": list(samples)}


class PixelCollate:
    """Samples whose slots hold image references -> ``{"pixels": [M, 3, h, w], "present": [6B] bool, ...}`` for the
    M non-empty slots, opened, optionally augmented (RNG seeded by ``(seed, epoch, kind, row, slot)``) and
    preprocessed. The trainer encodes the pixels and puts the pad tokens in the empty slots."""

    def __init__(self, preprocess_config: PreprocessConfig, augment: AugmentConfig | None = None,
                 seed: int = 0) -> None:
        self.preprocess_config, self.augment, self.seed = preprocess_config, augment, int(seed)

    def __call__(self, samples: Sequence[TrainSample]) -> dict[str, Any]:
        images, present = [], []
        for s in samples:
            for slot, item in enumerate(s.items):
                present.append(item is not None)
                if item is None:
                    continue
                x = pil_to_tensor(open_ref(item))
                if self.augment is not None:
                    x = augment_image(x, _rng(self.seed, s.epoch, 7 + _KIND_CODES[s.kind], s.row, slot), self.augment)
                images.append(x)
        pixels = preprocess_images(images, self.preprocess_config) if images else torch.empty(0)
        pos, neg = _masks(samples)
        return {"pixels": pixels, "present": torch.tensor(present, dtype=torch.bool), "pos_mask": pos,
                "neg_mask": neg, "samples": list(samples)}


# --------------------------------------------------------------------------------------------------------------------
# Keys: records of references -> records of feature-cache keys
# --------------------------------------------------------------------------------------------------------------------


def keyed_records(records: Sequence[Any], cache: FeatureCache, progress: bool = False) -> list[Any]:
    """Copies of NearID / MTG records with every image reference replaced by its feature-cache key.

    Hashing reads each image once; the cache's digest memo (file path + size + mtime, hub dataset fingerprint + row +
    column) makes later runs over the same data skip the reads.
    """
    from tqdm.auto import tqdm

    def key(ref: Any) -> str | None:
        return None if ref is None else cache.key(ref)

    out = []
    for rec in tqdm(records, total=len(records), desc="hashing images", unit="row", disable=not progress):
        if isinstance(rec, NearIDRecord):
            out.append(replace(
                rec,
                views=[key(v) for v in rec.views],
                masks=[None] * len(rec.masks),
                distractors={s: [key(v) for v in slots] for s, slots in rec.distractors.items()},
            ))
        elif isinstance(rec, MTGRecord):
            out.append(replace(
                rec,
                originals=tuple(key(v) for v in rec.originals),
                inpainted=tuple(key(v) for v in rec.inpainted),
                object_masks=(None, None),
                part_masks=(None, None),
            ))
        else:
            raise TypeError(f"keyed_records: unsupported record {type(rec).__name__}")
    return out


def record_refs(records: Sequence[Any]) -> Iterator[Any]:
    """Every image reference of NearID / MTG records (views, distractors, MTG originals and edits; not masks)."""
    for rec in records:
        if isinstance(rec, NearIDRecord):
            yield from (v for v in rec.views if v is not None)
            for slots in rec.distractors.values():
                yield from (v for v in slots if v is not None)
        else:
            yield from (v for v in (*rec.originals, *rec.inpainted) if v is not None)


# --------------------------------------------------------------------------------------------------------------------
# Splits
# --------------------------------------------------------------------------------------------------------------------


def check_disjoint(train: Sequence[Any], others: Mapping[str, Sequence[Any]], what: str = "identities") -> None:
    """Refuse to train when the training split shares entries with an evaluation split.

    Args:
        train: identity ids or row positions of the training split.
        others: split name -> its ids / rows.
        what: the kind of entry, for the message.

    Raises:
        SplitOverlapError: naming the split, the number of shared entries and a few of them.
    """
    train_set = set(train)
    for name, entries in others.items():
        shared = sorted(train_set.intersection(entries), key=str)
        if shared:
            raise SplitOverlapError(
                f"the training split shares {len(shared)} {what} with the {name} split (e.g. {shared[:5]}): "
                f"training on them would leak the {name} set. Pass a training split disjoint from it "
                "(e.g. --train-indices splits/train.json from the reference repository, or splits/train.json of a "
                "local dataset)."
            )


# --------------------------------------------------------------------------------------------------------------------
# Hub datasets, lazily and undecoded (through the one hub reader of nearid_core.data)
# --------------------------------------------------------------------------------------------------------------------


def load_hub_nearid_training(
    sources: Sequence[str],
    indices: str | os.PathLike | Sequence[int] | None,
    repo: str = NEARID_REPO,
    hf_split: str = "train",
    cache_dir: str | None = None,
) -> HubNearIDRecords:
    """NearID training records from the hub: ``Aleksandar/NearID`` + ``Aleksandar/NearID-<Source>`` per source, with
    unread :class:`~nearid_core.feature_cache.HubImage` cells and no masks.

    Args:
        sources: distractor sources as tags (``flux``), suffixes (``Flux``) or dataset ids.
        indices: the training rows: a JSON file (``splits/train.json`` of the reference repository) or a list; None
            = every row (only sensible when no evaluation split is carved out of the same rows).
        repo, hf_split, cache_dir: where the positives live.
    """
    return load_hf_nearid(sources, split=None, indices=indices, repo=repo, hf_split=hf_split, cache_dir=cache_dir,
                          with_masks=False, decode=False)


def load_hub_mtg_training(split: str = "train", repo: str = MTG_REPO, cache_dir: str | None = None) -> HubMTGRecords:
    """MTG training records from the hub (split ``train``; ``test`` is the 100-sample benchmark), cells unread."""
    return load_hf_mtg(split, repo, cache_dir, decode=False)
