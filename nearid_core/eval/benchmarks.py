"""The paper's benchmarks end to end: records -> unique-image embeddings -> per-sample similarity tables -> metrics.

* :func:`run_nearid_bench` / :func:`nearid_bench_from_sims`: NearID-Bench SSR and PA per distractor source and
  micro-pooled over sources (spec sections 6.1-6.3).
* :func:`run_mtg` / :func:`mtg_from_sims`: MTG M-O, M-Opair, SSR and PA (section 6.5).
* :func:`run_dreambench`: DreamBench++ M-H from a ratings folder (section 6.6); :func:`score_dreambench` writes a
  ``data_<name>_rating/`` folder (100 * cosine per generated image) for any embedder.

Every unique image is embedded exactly once per run (:class:`EmbeddingCache`; keys are content hashes, so a file, a
PIL image and a copy of the same file all share one embedding), e.g. the positives of NearID-Bench are embedded once
and compared with the distractors of every source. With several processes (``accelerate launch``) the unique images
of each chunk are split across processes and the embeddings gathered.

Per-sample similarity CSVs (reference column schema, empty cell = missing) are written by the model runs and read
back by the ``--sims`` modes, so any third-party metric can be benchmarked:

* NearID-Bench, one file per distractor source (source name = file stem): ``sim_01, sim_02, sim_12`` (positive view
  i vs view j) and ``cross_pn`` (positive view p vs the distractor in view n's background), plus informational
  ``sample_id, category, n_pos, n_neg``. By default (``indexing="compact"``) the numbering is the reference
  ``sim_test.py``'s, which gives Table 1: index i is the i-th *present* view or distractor, so a missing middle view or
  distractor shifts which background ``cross_ii`` compares against, and samples with < 2 views or no distractor are
  left out (counted). ``indexing="aligned"`` keeps **slot alignment** instead (``cross_11`` is always view 2 vs the
  distractor in view 2's background, empty if either is missing), like the reference's training-time evaluator.
* MTG: ``sim_12, sim_1_1p, sim_1_2p, sim_2_2p, sim_2_1p, oracle_1, oracle_2`` (+ ``sample_id``); ``--sims`` also
  reads the reference's names for them (``mtg_sim_1_2`` ... ``mtg_oracle_2``).

Every table read back is checked (:func:`read_sims_csv`): the columns the metric needs, numbers only, similarities
within the declared range (cosines: [-1, 1]), unique ``sample_id``. What is missing is counted, never silently
dropped: the results carry :class:`TableReport` (rows, directed terms missing) and, for dataset runs, the gaps of the
dataset (:class:`BenchDataGaps`, :class:`MTGDataGaps`); both go into the JSON and the notes under the printed table.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ..preprocessing import IMAGE_SUFFIXES
from ..data import MAX_VIEWS, MTGRecord, NearIDRecord, apply_mask, clean_mask, mask_array
from .metrics import (
    BENCH_COLUMNS,
    DIRECTED_TERMS,
    M_H_CATEGORIES,
    BenchMetrics,
    MTGMetrics,
    align_ratings,
    fisher_z_mean,
    human_agreement,
    key_category,
    m_h_per_method,
    mtg_metrics,
    mtg_oracle,
    natural_sort_key,
    nearid_bench_margins,
    nearid_bench_metrics,
)
from .names import INDEXING_MODES, MASK_MODES, RATING_NAME_PATTERN, SIM_RANGE

logger = logging.getLogger(__name__)

POOLED = "all"
SIM_PAIRS = ((0, 1), (0, 2), (1, 2))
BENCH_INFO_COLUMNS = ("sample_id", "category", "n_pos", "n_neg")
MTG_COLUMNS = ("sim_12", "sim_1_1p", "sim_1_2p", "sim_2_2p", "sim_2_1p", "oracle_1", "oracle_2")
MTG_SIMS = MTG_COLUMNS[:5]
#: Columns every NearID-Bench table needs (2-view samples), and the group a third view adds (all or none).
BENCH_REQUIRED = ("sim_01", "cross_00", "cross_11")
BENCH_THIRD_VIEW = ("sim_02", "sim_12", "cross_22")
_M_H_CLIP = 0.9999

# DreamBench++ sample run-folder prefix -> method name of the rating files (generated folders spell out vit_huge etc.)
DREAMBENCH_RUN_PREFIXES: dict[str, str] = {
    "blip_diffusion": "blip_diffusion",
    "dreambooth_lora_sdxl": "dreambooth_lora_sdxl",
    "dreambooth_sd": "dreambooth_sd",
    "emu2": "emu2",
    "ip_adapter_plus_vit_huge_sdxl": "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_plus_vit_h_sdxl": "ip_adapter_plus_vit_h_sdxl",
    "ip_adapter_vit_giant_sdxl": "ip_adapter_vit_g_sdxl",
    "ip_adapter_vit_g_sdxl": "ip_adapter_vit_g_sdxl",
    "textual_inversion_sd": "textual_inversion_sd",
}


# ====================================================================================================================
# Embedding: unique-image cache, optional multi-process sharding
# ====================================================================================================================


@dataclass
class Distributed:
    """Process group view used to shard embedding work (see :func:`distributed_context`)."""

    rank: int
    world: int
    device: torch.device
    gather: Callable[[list], list]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_context() -> Distributed | None:
    """The accelerate process group when launched with several processes (``accelerate launch``), else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return None
    from accelerate import PartialState
    from accelerate.utils import gather_object

    state = PartialState(cpu=not torch.cuda.is_available())  # CPU-only hosts: gloo process group
    if state.num_processes <= 1:
        logger.warning("WORLD_SIZE=%s but accelerate set up no process group: every process embeds everything",
                       os.environ.get("WORLD_SIZE"))
        return None
    return Distributed(state.process_index, state.num_processes, state.device, gather_object)


def _show(progress: bool, dist: Distributed | None) -> bool:
    """Progress bars on the main process only."""
    return progress and (dist is None or dist.is_main)


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for p in parts:
        h.update(p)
    return h.hexdigest()


class EmbeddingCache:
    """Embeds each unique image once; images are queued with :meth:`add` and embedded in chunks by :meth:`flush`.

    Keys are content hashes: file bytes for paths, mode/size/pixels for PIL images, dtype/shape/bytes for arrays and
    tensors. Derived images (masked versions) get a caller-made key and a loader that runs only if the key is new.

    Args:
        embedder: anything with ``embed(images, batch_size, progress) -> [N, D]``.
        batch_size: images per forward pass.
        dist: process group to shard each flush over (None = this process embeds everything).
    """

    def __init__(self, embedder, batch_size: int = 32, dist: Distributed | None = None) -> None:
        self.embedder, self.batch_size, self.dist = embedder, batch_size, dist
        self._store: dict[str, np.ndarray] = {}
        self._pending: dict[str, Any] = {}
        self._path_keys: dict[str, str] = {}
        self._object_keys: dict[int, tuple[Any, str]] = {}  # id -> (object kept alive until flush, key)
        self.n_embedded = 0

    def __len__(self) -> int:
        return len(self._store)

    @property
    def n_pending(self) -> int:
        return len(self._pending)

    def key(self, image: Any) -> str:
        """Content key of an image reference (path, PIL image, numpy array or tensor)."""
        if isinstance(image, (str, os.PathLike)):
            path = os.path.realpath(image)
            if path not in self._path_keys:
                try:
                    data = Path(path).read_bytes()
                except OSError as err:
                    raise FileNotFoundError(f"cannot read image file {image}: {err}") from err
                self._path_keys[path] = "f" + _digest(data)
            return self._path_keys[path]
        memo = self._object_keys.get(id(image))
        if memo is not None and memo[0] is image:
            return memo[1]
        if isinstance(image, Image.Image):
            k = "p" + _digest(image.mode.encode(), repr(image.size).encode(), image.tobytes())
        elif isinstance(image, (np.ndarray, torch.Tensor)):
            arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image
            arr = np.ascontiguousarray(arr)
            k = "a" + _digest(str(arr.dtype).encode(), repr(arr.shape).encode(), arr.tobytes())
        else:
            raise TypeError(f"unsupported image reference {type(image).__name__}")
        self._object_keys[id(image)] = (image, k)
        return k

    def add(self, image: Any, key: str | None = None, loader: Callable[[], Any] | None = None) -> str:
        """Queue an image unless its key is known; returns the key.

        Args:
            image: image reference (ignored when ``loader`` is given).
            key: precomputed key (default :meth:`key` of ``image``).
            loader: called at flush time to produce the image, for derived images keyed by ``key``.
        """
        key = key if key is not None else self.key(image)
        if key not in self._store and key not in self._pending:
            self._pending[key] = loader if loader is not None else image
        return key

    def _embed(self, items: list) -> np.ndarray:
        out = []
        for start in range(0, len(items), self.batch_size):
            batch = [it() if callable(it) else it for it in items[start : start + self.batch_size]]
            out.append(self.embedder.embed(batch, batch_size=self.batch_size, progress=False).float().cpu().numpy())
        return np.concatenate(out) if out else np.empty((0, 0), np.float32)

    def flush(self) -> None:
        """Embed every queued image (this process's share of them when distributed) and store the embeddings."""
        if not self._pending:
            self._object_keys.clear()
            return
        keys, items = list(self._pending), list(self._pending.values())
        if self.dist is None:
            vectors = self._embed(items)
            self.n_embedded += len(items)
        else:
            mine = list(range(self.dist.rank, len(items), self.dist.world))
            local = self._embed([items[i] for i in mine])
            self.n_embedded += len(mine)
            gathered = self.dist.gather([(i, local[k]) for k, i in enumerate(mine)])
            vectors = np.stack([v for _, v in sorted(gathered, key=lambda t: t[0])])
        for k, v in zip(keys, vectors):
            self._store[k] = v.astype(np.float32, copy=False)
        self._pending.clear()
        self._object_keys.clear()

    def __getitem__(self, key: str) -> np.ndarray:
        return self._store[key]


def _cos(a: np.ndarray | None, b: np.ndarray | None) -> float:
    if a is None or b is None:
        return math.nan
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)))


# ====================================================================================================================
# Per-sample similarity CSVs
# ====================================================================================================================


def _fmt_cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "" if math.isnan(v) else repr(v)
    return str(v)


def write_sims_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    """Write per-sample rows; NaN / None become empty cells, floats are written exactly (``repr``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_fmt_cell(row.get(c)) for c in columns])
    return path


class SimsTableError(ValueError):
    """A per-sample table or rating file that cannot give a right answer; the message names the file, the place in
    it and the fix."""


class ValueRange(NamedTuple):
    """Allowed values of a table column, inclusive, with ``slack`` for rounding; ``fix`` is shown when a cell is
    outside them."""

    lo: float
    hi: float
    fix: str
    slack: float = 0.0
    integer: bool = False


_MISSING_CELLS = ("", "nan", "-nan", "na", "n/a", "none", "null")


def _similarity_ranges(columns: Iterable[str], sim_range: tuple[float, float] = SIM_RANGE) -> dict[str, ValueRange]:
    """A :class:`ValueRange` for each similarity column: ``sim_range`` with 0.25 % of its width as rounding slack
    (fp16 embeddings give cosines a little above 1)."""
    lo, hi = map(float, sim_range)
    if not lo < hi:
        raise ValueError(f"a similarity range needs low < high, got {sim_range}")
    if (lo, hi) == SIM_RANGE:
        fix = ("similarities are cosines in [-1, 1]; a scorer on another scale (e.g. 100 x cosine, a 0-10 judge) must "
               "declare it with --sim-range LO HI")
    else:
        fix = f"the declared scale of the similarities is [{lo:g}, {hi:g}] (--sim-range)"
    return {c: ValueRange(lo, hi, fix, slack=0.0025 * (hi - lo)) for c in columns}


def _parse_cell(text: str, path: Path, line: int, column: str, limits: ValueRange | None) -> float:
    """One cell: empty / ``nan`` -> NaN, else a finite number inside ``limits``."""
    text = text.strip()
    if text.lower() in _MISSING_CELLS:
        return math.nan
    where = f"{path}, line {line}, column {column!r}"
    if "_" in text:  # float() would read "0.9_1" as 0.91
        raise SimsTableError(f"{where}: {text!r} is not a number (write it without the '_' digit separators)")
    try:
        value = float(text)
    except ValueError:
        raise SimsTableError(f"{where}: {text!r} is not a number (leave a missing value empty)") from None
    if math.isnan(value):
        return math.nan
    if not math.isfinite(value):
        raise SimsTableError(f"{where}: {text!r} is not a finite number (leave a missing value empty)")
    if limits is not None:
        if limits.integer and value != int(value):
            raise SimsTableError(f"{where}: {text!r} is not a whole number; {limits.fix}")
        if not limits.lo - limits.slack <= value <= limits.hi + limits.slack:
            raise SimsTableError(f"{where}: {text} is outside [{limits.lo:g}, {limits.hi:g}]; {limits.fix}")
    return value


def _check_unique_ids(path: Path, rows: Sequence[tuple[int, list[str]]], index: int, column: str) -> None:
    seen: dict[str, int] = {}
    for line, row in rows:
        key = row[index].strip()
        if key and key in seen:
            raise SimsTableError(f"{path}: {column} {key!r} is on lines {seen[key]} and {line}; each sample needs "
                                 "exactly one row (remove or rename the duplicate)")
        seen.setdefault(key, line)


def read_sims_csv(
    path: str | os.PathLike,
    known: Sequence[str],
    required: Sequence[str] = (),
    together: Sequence[Sequence[str]] = (),
    ranges: Mapping[str, ValueRange] | None = None,
    id_column: str = "sample_id",
    hint: str = "",
) -> dict[str, np.ndarray]:
    """Read and check the numeric columns named in ``known`` of a per-sample CSV (empty cell -> NaN).

    Checked: the file reads as a UTF-8 CSV with a header and at least one row; no column named twice; every
    ``required`` column present, and each group in ``together`` complete or absent; each row as long as the header;
    each cell empty / ``nan`` or a finite number within its column's ``ranges`` entry; ``id_column`` values (when the
    column exists) unique. Other columns are ignored.

    Args:
        path: CSV file.
        known: columns to read when present.
        required: columns that must be present.
        together: groups of columns that are all present or all absent.
        ranges: column -> allowed values.
        id_column: column of sample ids that must be unique.
        hint: the table format in words, appended to column errors.

    Returns:
        column -> [N] float64 array, for the columns of ``known`` that are present.

    Raises:
        SimsTableError: the message names the file, the line and column where it applies, and the fix.
    """
    path = Path(path)
    ranges = ranges or {}
    hint = f" {hint}" if hint else ""
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            lines = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise SimsTableError(f"cannot read {path} as a UTF-8 CSV file: {err}") from None
    if not lines or not any(cell.strip() for cell in lines[0][1]):
        raise SimsTableError(f"{path} is empty or starts with a blank line; expected a header row naming the "
                             f"columns.{hint}")
    header = [h.strip() for h in lines[0][1]]
    twice = sorted({h for h in header if h and header.count(h) > 1})
    if twice:
        raise SimsTableError(f"{path}: the header names {twice} more than once; keep one column of each")
    missing = [c for c in required if c not in header]
    if missing:
        raise SimsTableError(f"{path} lacks the column(s) {missing}; header: {header}.{hint}")
    for group in together:
        have, lack = [c for c in group if c in header], [c for c in group if c not in header]
        if have and lack:
            raise SimsTableError(f"{path} has the column(s) {have} but lacks {lack}: give all of {list(group)} (a "
                                 f"column may be empty) or none of them.{hint}")
    rows = [(line, row) for line, row in lines[1:] if len(row) > 1 or (row and row[0].strip())]  # not blank lines
    if not rows:
        raise SimsTableError(f"{path} has a header but no data rows")
    for line, row in rows:
        if len(row) != len(header):
            raise SimsTableError(f"{path}, line {line}: {len(row)} cells but the header has {len(header)} columns; "
                                 "every row needs one cell per column (leave missing values empty, quote cells "
                                 "that contain commas)")
    if id_column in header:
        _check_unique_ids(path, rows, header.index(id_column), id_column)
    return {
        c: np.array([_parse_cell(row[header.index(c)], path, line, c, ranges.get(c)) for line, row in rows],
                    dtype=np.float64)
        for c in known if c in header
    }


@dataclass(frozen=True)
class TableReport:
    """What a per-sample table holds beyond the metrics: how many rows, and how many terms are missing.

    Attributes:
        rows: samples (rows) in the table.
        expected_terms: terms the rows should give: a NearID-Bench row with ``n_pos`` views gives n_pos (n_pos - 1)
            directed terms (without ``n_pos``: every term the table's columns allow); an MTG row gives 2 margins.
        missing_terms: expected terms that are not there (an empty or NaN cell: a missing image or similarity).
        evaluated: rows with at least one term (the metrics' ``n``).
        blank_cells: column -> empty / NaN cells (MTG only: there every cell is expected).
    """

    rows: int
    expected_terms: int
    missing_terms: int
    evaluated: int
    blank_cells: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rows": self.rows, "missing_terms": self.missing_terms}
        return out | ({"blank_cells": dict(self.blank_cells)} if self.blank_cells else {})

    def note(self, name: str, term: str = "directed terms") -> str | None:
        """One line on what is missing, or None when nothing is."""
        parts = []
        if self.missing_terms:
            parts.append(f"{self.missing_terms} of {self.expected_terms} {term} missing (empty or NaN cells)")
        if self.evaluated < self.rows:
            parts.append(f"{self.rows - self.evaluated} of {self.rows} rows have no term and are not counted")
        if self.blank_cells:
            parts.append("empty cells: " + ", ".join(f"{c} {k}" for c, k in self.blank_cells.items()))
        return f"{name}: " + "; ".join(parts) if parts else None


def _pool_reports(reports: Iterable[TableReport]) -> TableReport:
    """Sum several tables' reports (the pooled row)."""
    reports = list(reports)
    blank: dict[str, int] = {}
    for r in reports:
        for c, k in r.blank_cells.items():
            blank[c] = blank.get(c, 0) + k
    return TableReport(sum(r.rows for r in reports), sum(r.expected_terms for r in reports),
                       sum(r.missing_terms for r in reports), sum(r.evaluated for r in reports), blank)


# ====================================================================================================================
# NearID-Bench
# ====================================================================================================================


def bench_columns() -> list[str]:
    """Column order of a NearID-Bench per-sample CSV."""
    return list(BENCH_INFO_COLUMNS) + list(BENCH_COLUMNS)


#: The first note under a NearID-Bench table: which numbering of the cross terms produced the numbers.
INDEXING_NOTES: dict[str | None, str] = {
    "compact": "indexing: compact (as the paper's sim_test.py and Table 1: cross_ij = i-th present view vs j-th "
               "present distractor)",
    "aligned": "indexing: aligned (cross_aa = view a+1 vs the distractor in its own background; differs from Table 1 "
               "when views or distractors are missing)",
    None: "indexing: as numbered in the CSVs",
}

_BENCH_HINT = ("A NearID-Bench table needs sim_01, cross_00 and cross_11, plus sim_02, sim_12 and cross_22 when "
               "samples have a third view; leave missing values empty.")


@dataclass(frozen=True)
class BenchDataGaps:
    """Gaps of a NearID-Bench dataset: they cost directed terms or whole samples, so the results report them.

    Attributes:
        samples: identities read.
        missing_views: empty view slots a sample needs (views 1 and 2, and every slot before its last present view).
        missing_distractors: source -> present views without a distractor in their background in that source.
        dropped_samples: source -> samples left out of that source's table: with ``compact`` indexing, as the
            reference ``sim_test.py``, a sample needs 2 present views and 1 distractor.
        n_images_disagree: samples whose declared ``n_images`` differs from their present views (all are used).
        unmasked_views: ``fg`` only (else None): present views without a mask, dropped with their distractors as the
            reference drops them.
        unmasked_distractors: ``fg`` only: source -> distractors dropped because their view slot has no mask.
    """

    samples: int
    missing_views: int
    missing_distractors: dict[str, int]
    dropped_samples: dict[str, int] = field(default_factory=dict)
    n_images_disagree: int = 0
    unmasked_views: int | None = None
    unmasked_distractors: dict[str, int] | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"samples": self.samples, "missing_views": self.missing_views,
                               "missing_distractors": dict(self.missing_distractors),
                               "dropped_samples": dict(self.dropped_samples),
                               "n_images_disagree": self.n_images_disagree}
        if self.unmasked_views is not None:
            out |= {"unmasked_views": self.unmasked_views,
                    "unmasked_distractors": dict(self.unmasked_distractors or {})}
        return out

    def note(self) -> str | None:
        """One line on the gaps, or None when there are none."""
        n_dist = sum(self.missing_distractors.values())
        parts = []
        if self.missing_views or n_dist:
            parts.append(f"{self.missing_views} missing positive views, {n_dist} missing distractors"
                         f"{_per_source(self.missing_distractors)}; their terms are not counted")
        if self.unmasked_views:
            parts.append(f"fg: {self.unmasked_views} views without a mask dropped with their "
                         f"{sum((self.unmasked_distractors or {}).values())} distractors, as the reference does")
        if any(self.dropped_samples.values()):
            parts.append(f"{sum(self.dropped_samples.values())} samples left out of a source's table (fewer than 2 "
                         f"views or no distractor, as sim_test.py){_per_source(self.dropped_samples)}")
        if self.n_images_disagree:
            parts.append(f"{self.n_images_disagree} samples declare an n_images other than their present views "
                         "(every present view is used, as the reference does)")
        return f"data: {self.samples} samples, " + "; ".join(parts) if parts else None


def _per_source(counts: Mapping[str, int]) -> str:
    """`` (a 2, b 1)`` for the sources with a non-zero count, else an empty string."""
    text = ", ".join(f"{s} {k}" for s, k in counts.items() if k)
    return f" ({text})" if text else ""


def _drop_unmasked(rec: NearIDRecord, sources: Sequence[str]) -> tuple[NearIDRecord, int, dict[str, int]]:
    """``fg`` masks as the reference applies them: a view slot without a mask loses its view and every distractor
    in its background. Returns the trimmed record, the views dropped and, per source, the distractors dropped."""
    bare = [j for j in range(MAX_VIEWS) if rec.masks[j] is None]
    if not bare:
        return rec, 0, {s: 0 for s in sources}
    views = [None if j in bare else v for j, v in enumerate(rec.views)]
    distractors = {s: [None if j in bare else x for j, x in enumerate(slots)] for s, slots in rec.distractors.items()}
    n_views = sum(rec.views[j] is not None for j in bare)
    n_dist = {s: sum(x is not None for j, x in enumerate(rec.distractors.get(s) or []) if j in bare) for s in sources}
    return dataclasses.replace(rec, views=views, distractors=distractors), n_views, n_dist


def _record_gaps(rec: NearIDRecord, sources: Sequence[str]) -> tuple[int, dict[str, int]]:
    """(missing view slots, source -> views without their distractor) of one identity; see :class:`BenchDataGaps`."""
    present = [v is not None for v in rec.views[:MAX_VIEWS]]
    last = max((j for j, p in enumerate(present) if p), default=-1)
    views = sum(not p for p in present[: max(last, 1) + 1])
    dist = {}
    for s in sources:
        slots = rec.distractors.get(s) or []
        dist[s] = sum(p and (j >= len(slots) or slots[j] is None) for j, p in enumerate(present))
    return views, dist


@dataclass
class NearIDBenchResult:
    """NearID-Bench outcome.

    Attributes:
        metrics: source -> metrics, then :data:`POOLED` -> micro-pooled metrics.
        rows: source -> per-sample rows (CSV columns :func:`bench_columns`); empty for summaries of CSVs.
        n_embedded: images embedded by this process.
        reports: source -> rows and missing terms of its table.
        gaps: gaps of the dataset (model runs only).
        indexing: how the cross terms were numbered (:data:`INDEXING_MODES`); None for summaries of CSVs, whose
            producer numbered them.
    """

    metrics: dict[str, BenchMetrics]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    n_embedded: int = 0
    reports: dict[str, TableReport] = field(default_factory=dict)
    gaps: BenchDataGaps | None = None
    indexing: str | None = None

    @property
    def sources(self) -> list[str]:
        return [k for k in self.metrics if k != POOLED]

    def to_json(self) -> dict[str, Any]:
        """``SSR, PA, PA_terms, SSR_mean`` (percent), ``n``, ``rows`` and ``missing_terms`` micro-pooled, the same
        per source with counts, ``indexing`` (None for CSV summaries) and (model runs) ``data``: the dataset's
        gaps."""
        pooled = self.metrics[POOLED]
        out: dict[str, Any] = {
            "SSR": pooled.ssr,
            "PA": pooled.pa,
            "PA_terms": pooled.pa_terms,
            "SSR_mean": pooled.ssr_mean,
            "n": pooled.n,
            "indexing": self.indexing,
        }
        if self.reports:
            out |= _pool_reports(self.reports.values()).to_json()
        out["per_source"] = {s: _bench_entry(self.metrics[s]) | (self.reports[s].to_json() if s in self.reports
                                                                    else {}) for s in self.sources}
        if self.gaps is not None:
            out["data"] = self.gaps.to_json()
        return out

    def notes(self) -> list[str]:
        """The indexing that produced the numbers, then lines on missing terms and dataset gaps."""
        lines = [INDEXING_NOTES.get(self.indexing, INDEXING_NOTES[None])]
        lines += [r.note(s) for s, r in self.reports.items()] + [self.gaps.note() if self.gaps else None]
        return [line for line in lines if line]

    def write_sims(self, directory: str | os.PathLike) -> list[Path]:
        """Write one ``<source>.csv`` per source (re-summarise with ``nearid-bench --sims <dir>/*.csv``)."""
        return [write_sims_csv(Path(directory) / f"{s}.csv", self.rows[s], bench_columns()) for s in self.rows]

    def table(self, title: str = "NearID-Bench") -> "Table":
        rows = [[s, m.n, m.ssr, m.pa, m.pa_terms, m.ssr_mean] for s, m in self.metrics.items()]
        return Table(title, ["source", "n", "SSR", "PA", "PA_terms", "SSR_mean"], rows, digits=2, rule_before=POOLED,
                     notes=self.notes())


def _bench_entry(m: BenchMetrics) -> dict[str, Any]:
    c = m.counts
    return {"SSR": m.ssr, "PA": m.pa, "PA_terms": m.pa_terms, "SSR_mean": m.ssr_mean, "n": m.n,
            "ssr_wins": c.ssr_wins, "term_wins": c.term_wins, "term_trials": c.term_trials, "mean_wins": c.mean_wins}


def _columns_of(rows: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, np.ndarray]:
    return {c: np.array([r.get(c, math.nan) for r in rows], dtype=np.float64) for c in names}


def _bench_table_report(columns: Mapping[str, np.ndarray]) -> TableReport:
    """Rows and missing directed terms of one NearID-Bench table (its ``n_pos`` column, when given, says how many
    terms each row should have; see :class:`TableReport`)."""
    margins = nearid_bench_margins(columns)
    valid = np.isfinite(margins).sum(axis=1)
    allowed = sum(s in columns and c in columns for s, c in DIRECTED_TERMS)
    n_pos = np.asarray(columns["n_pos"], dtype=np.float64) if "n_pos" in columns else np.full(len(valid), np.nan)
    expected = np.maximum(np.where(np.isnan(n_pos), allowed, n_pos * (n_pos - 1)), valid).astype(int)
    return TableReport(len(valid), int(expected.sum()), int((expected - valid).sum()), int((valid > 0).sum()))


def _summarize_bench(tables: Mapping[str, Mapping[str, np.ndarray]]) -> dict[str, BenchMetrics]:
    if POOLED in tables:
        raise ValueError(f"a distractor source may not be called {POOLED!r} (reserved for the pooled row)")
    return nearid_bench_metrics(tables, pooled_name=POOLED)


def _bench_ranges(sim_range: tuple[float, float] = SIM_RANGE) -> dict[str, ValueRange]:
    """Allowed values of the NearID-Bench CSV columns: similarities within ``sim_range``, ``n_pos`` 0 to 3."""
    ranges = _similarity_ranges(BENCH_COLUMNS, sim_range)
    ranges["n_pos"] = ValueRange(0, MAX_VIEWS, f"n_pos counts the sample's positive views (0 to {MAX_VIEWS})",
                                 integer=True)
    return ranges


def nearid_bench_from_sims(
    paths: Sequence[str | os.PathLike], sim_range: tuple[float, float] = SIM_RANGE
) -> NearIDBenchResult:
    """NearID-Bench metrics from per-sample CSVs, one per distractor source (source name = file stem).

    Each file is checked by :func:`read_sims_csv`: ``sim_01, cross_00, cross_11`` present, ``sim_02, sim_12,
    cross_22`` all or none, similarities in ``sim_range``, ``n_pos`` (optional) 0-3, unique ``sample_id``.
    Missing terms are counted in the result's reports.

    Raises:
        SimsTableError: a malformed file (named, with the line, column and fix).
        ValueError: no file, or two files with the same stem.
    """
    if not paths:
        raise ValueError("no similarity CSV given")
    tables: dict[str, dict[str, np.ndarray]] = {}
    origin: dict[str, Path] = {}
    ranges = _bench_ranges(sim_range)
    for p in map(Path, paths):
        name = p.stem
        if name in tables:
            raise ValueError(f"two CSVs give source {name!r}: {origin[name]} and {p}; source names are file stems")
        tables[name] = read_sims_csv(p, BENCH_COLUMNS + ("n_pos",), required=BENCH_REQUIRED,
                                     together=[BENCH_THIRD_VIEW], ranges=ranges, hint=_BENCH_HINT)
        origin[name] = p
    return NearIDBenchResult(_summarize_bench(tables), reports={s: _bench_table_report(t) for s, t in tables.items()})


def _warn_once(flag: dict, key: str, message: str, *args) -> None:
    if not flag.get(key):
        flag[key] = True
        logger.warning(message, *args)


def _queue_nearid(
    rec: NearIDRecord, sources: Sequence[str], masks: str, cache: EmbeddingCache
) -> tuple[list[str | None], dict[str, list[str | None]]]:
    """Queue a record's images in the cache; returns the keys of the positive slots and of every source's slots.

    With ``fg`` masks every present image must have its slot's mask (:func:`_drop_unmasked` removes the others).
    """
    cleaned: dict[int, Image.Image] = {}

    def queue(image: Any, j: int) -> str | None:
        if image is None:
            return None
        if masks == "full":
            return cache.add(image)

        def load(image=image, j=j) -> Image.Image:
            if j not in cleaned:
                cleaned[j] = clean_mask(rec.masks[j])
            return apply_mask(image, cleaned[j])

        return cache.add(None, key=f"fg:{cache.key(image)}:{cache.key(rec.masks[j])}", loader=load)

    pos = [queue(rec.views[j], j) for j in range(MAX_VIEWS)]
    neg = {}
    for s in sources:
        slots = rec.distractors.get(s)
        if slots is None:
            raise ValueError(f"identity {rec.identity_id} has no distractor entry for source {s!r}")
        neg[s] = [queue(slots[j] if j < len(slots) else None, j) for j in range(MAX_VIEWS)]
    return pos, neg


def _bench_row(rec: NearIDRecord, pos: list[np.ndarray | None], neg: list[np.ndarray | None],
               indexing: str) -> dict[str, Any] | None:
    if indexing == "compact":
        pos = [e for e in pos if e is not None]
        neg = [e for e in neg if e is not None]
        if len(pos) < 2 or len(neg) < 1:
            return None
        pos = pos + [None] * (MAX_VIEWS - len(pos))
        neg = neg + [None] * (MAX_VIEWS - len(neg))
    row: dict[str, Any] = {
        "sample_id": rec.identity_id,
        "category": rec.category,
        "n_pos": sum(e is not None for e in pos),
        "n_neg": sum(e is not None for e in neg),
    }
    for i, j in SIM_PAIRS:
        row[f"sim_{i}{j}"] = _cos(pos[i], pos[j])
    for p in range(MAX_VIEWS):
        for n in range(MAX_VIEWS):
            row[f"cross_{p}{n}"] = _cos(pos[p], neg[n])
    return row


def run_nearid_bench(
    records: Iterable[NearIDRecord],
    embedder,
    sources: Sequence[str] | None = None,
    masks: str = "full",
    indexing: str = "compact",
    batch_size: int = 32,
    dist: Distributed | None = None,
    progress: bool = True,
    flush_every: int | None = None,
) -> NearIDBenchResult:
    """Embed a NearID-Bench split and compute SSR / PA per source and micro-pooled.

    Views missing from a sample and views without their distractor cost terms: they are counted in the result's
    ``gaps`` (and logged), the terms they cost in its ``reports``. Every present view is used, whatever ``n_images``
    a record declares (disagreements are counted), as the reference does.

    Args:
        records: identities (local or hub records); read once, in order.
        embedder: see :class:`~nearid_core.eval.baselines.Embedder`.
        sources: distractor sources to evaluate (default: those of the first record).
        masks: ``"full"`` raw images (Table 1) or ``"fg"``: view j's cleaned mask applied to view j and to every
            distractor of slot j, background black; a slot without a mask loses its view and distractors, as in
            the reference (counted in ``gaps``).
        indexing: ``"compact"`` (default; the reference ``sim_test.py`` and Table 1: index i is the i-th *present*
            view or distractor, and a sample needs 2 views and 1 distractor) or ``"aligned"`` (slot-aligned cross
            terms: ``cross_aa`` is always view a+1 against the distractor in its own background).
        batch_size: images per forward pass.
        dist: process group for multi-GPU embedding.
        progress: show a progress bar over identities.
        flush_every: embed once this many unique images are queued (default max(256, 8 * batch_size)).
    """
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    if indexing not in INDEXING_MODES:
        raise ValueError(f"indexing must be one of {INDEXING_MODES}, got {indexing!r}")
    if sources is not None and not list(sources):
        raise ValueError("no distractor source to evaluate")
    cache = EmbeddingCache(embedder, batch_size, dist)
    flush_every = flush_every or max(256, 8 * batch_size)
    total = len(records) if hasattr(records, "__len__") else None  # type: ignore[arg-type]
    rows: dict[str, list[dict[str, Any]]] = {}
    pending: list[tuple[NearIDRecord, list, dict]] = []
    n_samples = missing_views = n_images_disagree = present_views = unmasked_views = 0
    missing_distractors: dict[str, int] = {}
    unmasked_distractors: dict[str, int] = {}
    dropped: dict[str, int] = {}

    def drain() -> None:
        cache.flush()
        for rec, pos_keys, neg_keys in pending:
            pos = [cache[k] if k else None for k in pos_keys]
            for s, keys in neg_keys.items():
                row = _bench_row(rec, pos, [cache[k] if k else None for k in keys], indexing)
                if row is None:
                    dropped[s] += 1
                else:
                    rows[s].append(row)
        pending.clear()

    for rec in tqdm(records, total=total, desc="nearid-bench", unit="id", disable=not _show(progress, dist)):
        if sources is None:
            sources = list(rec.distractors)
            if not sources:
                raise ValueError(f"identity {rec.identity_id} has no distractor source to evaluate")
        if not rows:
            rows = {s: [] for s in sources}
            missing_distractors = {s: 0 for s in sources}
            unmasked_distractors = {s: 0 for s in sources}
            dropped = {s: 0 for s in sources}
        n_views, n_dist = _record_gaps(rec, sources)
        n_samples, missing_views = n_samples + 1, missing_views + n_views
        n_images_disagree += rec.n_images_disagrees
        for s, k in n_dist.items():
            missing_distractors[s] += k
        if masks == "fg":
            present_views += rec.n_views
            rec, k_views, k_dist = _drop_unmasked(rec, sources)
            if k_views and not unmasked_views:
                logger.warning("fg masks: identity %s has a view without a mask; that view and its distractors are "
                               "dropped, as the reference does (all cases are counted in the data report)",
                               rec.identity_id)
            unmasked_views += k_views
            for s, k in k_dist.items():
                unmasked_distractors[s] += k
        pos_keys, neg_keys = _queue_nearid(rec, sources, masks, cache)
        pending.append((rec, pos_keys, neg_keys))
        if cache.n_pending >= flush_every:
            drain()
    drain()
    if not rows:
        raise ValueError("no identities to evaluate (empty split?)")
    if masks == "fg" and present_views and unmasked_views == present_views:
        raise ValueError("--masks fg: no view has a foreground mask (hub column masks1..3, or mask{j}.png next to "
                         "view{j}.png); use --masks full")
    tables = {s: _columns_of(r, BENCH_COLUMNS + ("n_pos",)) for s, r in rows.items()}
    logger.info("nearid-bench: %d unique images embedded by this process", cache.n_embedded)
    fg = masks == "fg"
    gaps = BenchDataGaps(n_samples, missing_views, missing_distractors, dropped, n_images_disagree,
                         unmasked_views if fg else None, unmasked_distractors if fg else None)
    if gaps.note():
        logger.warning("nearid-bench %s", gaps.note())
    return NearIDBenchResult(_summarize_bench(tables), rows, cache.n_embedded,
                             {s: _bench_table_report(t) for s, t in tables.items()}, gaps, indexing)


# ====================================================================================================================
# MTG
# ====================================================================================================================


_MTG_HINT = ("An MTG table needs sim_12, sim_1_1p, sim_1_2p, sim_2_2p, sim_2_1p, oracle_1 and oracle_2 (or the "
             "reference sim_test.py's names mtg_sim_1_2, mtg_sim_1_1p, mtg_sim_1_2p, mtg_sim_2_2p, mtg_sim_2_1p, "
             "mtg_oracle_1 and mtg_oracle_2); leave missing values empty.")

#: Our MTG column -> the reference ``sim_test.py --mode mtg`` column holding the same value.
MTG_REFERENCE_COLUMNS: dict[str, str] = {
    "sim_12": "mtg_sim_1_2",
    "sim_1_1p": "mtg_sim_1_1p",
    "sim_1_2p": "mtg_sim_1_2p",
    "sim_2_2p": "mtg_sim_2_2p",
    "sim_2_1p": "mtg_sim_2_1p",
    "oracle_1": "mtg_oracle_1",
    "oracle_2": "mtg_oracle_2",
}


@dataclass(frozen=True)
class MTGDataGaps:
    """Gaps of an MTG dataset.

    Attributes:
        samples: samples read.
        missing_edits: part-edited images missing (their similarities are empty, so margins are lost).
        missing_masks: views whose object or part mask is missing (their oracle is 0, as in the reference).
    """

    samples: int
    missing_edits: int
    missing_masks: int

    def to_json(self) -> dict[str, Any]:
        return {"samples": self.samples, "missing_edits": self.missing_edits, "missing_masks": self.missing_masks}

    def note(self) -> str | None:
        """One line on the gaps, or None when there are none."""
        if not self.missing_edits and not self.missing_masks:
            return None
        return (f"data: {self.samples} samples, {self.missing_edits} missing edited images (their terms are not "
                f"counted), {self.missing_masks} views without object or part mask (oracle 0)")


@dataclass
class MTGResult:
    """MTG outcome: metrics and (for model runs) the per-sample rows with columns ``sample_id`` + MTG_COLUMNS, the
    table's report and (model runs) the dataset's gaps."""

    metrics: MTGMetrics
    rows: list[dict[str, Any]] = field(default_factory=list)
    n_embedded: int = 0
    report: TableReport | None = None
    gaps: MTGDataGaps | None = None

    def to_json(self) -> dict[str, Any]:
        """``MO, MOpair`` (correlations), ``SSR, PA`` (percent), ``n``, ``rows``, ``missing_terms`` (margins),
        ``blank_cells`` (when any) and (model runs) ``data``: the dataset's gaps."""
        m = self.metrics
        out = {"MO": m.m_o, "MOpair": m.m_opair, "SSR": m.ssr, "PA": m.pa, "n": m.n}
        out |= self.report.to_json() if self.report else {}
        return out | ({"data": self.gaps.to_json()} if self.gaps else {})

    def notes(self) -> list[str]:
        """Lines on missing margins, empty cells and dataset gaps (empty when nothing is missing)."""
        lines = [self.report.note("mtg", "margins") if self.report else None, self.gaps.note() if self.gaps else None]
        return [line for line in lines if line]

    def columns(self) -> dict[str, np.ndarray]:
        return _columns_of(self.rows, MTG_COLUMNS)

    def write_sims(self, path: str | os.PathLike) -> Path:
        return write_sims_csv(path, self.rows, ("sample_id",) + MTG_COLUMNS)

    def table(self, title: str = "MTG") -> "Table":
        m = self.metrics
        c = m.correlations
        return Table(title, ["n", "M-O", "M-Opair", "SSR", "PA", "SSR_mean", "r(s11p,o1)", "r(s22p,o2)",
                             "r(s12p,o2)", "r(s21p,o1)"],
                     [[m.n, m.m_o, m.m_opair, m.ssr, m.pa, m.ssr_mean, c["s11p_o1"], c["s22p_o2"], c["s12p_o2"],
                       c["s21p_o1"]]],
                     digits={"M-O": 3, "M-Opair": 3, "SSR": 1, "PA": 1, "SSR_mean": 1, "r(s11p,o1)": 3,
                             "r(s22p,o2)": 3, "r(s12p,o2)": 3, "r(s21p,o1)": 3},
                     notes=self.notes())


def _mtg_summary(columns: Mapping[str, np.ndarray]) -> tuple[MTGMetrics, TableReport]:
    """Metrics and report of an MTG table: every row should give 2 margins and fill every column."""
    metrics = mtg_metrics(*(columns[c] for c in MTG_COLUMNS))
    rows = len(columns[MTG_COLUMNS[0]])
    blank = {c: int(np.isnan(columns[c]).sum()) for c in MTG_COLUMNS}
    report = TableReport(rows, 2 * rows, 2 * rows - metrics.trials, metrics.n, {c: k for c, k in blank.items() if k})
    return metrics, report


def _mtg_ranges(sim_range: tuple[float, float] = SIM_RANGE) -> dict[str, ValueRange]:
    """Allowed values of the MTG CSV columns: similarities within ``sim_range``, oracles at most 1 (1 - a ratio of
    areas; negative when the part is larger than the object)."""
    oracle = ValueRange(-math.inf, 1.0, "oracle = 1 - part area / object area is at most 1")
    return _similarity_ranges(MTG_SIMS, sim_range) | {"oracle_1": oracle, "oracle_2": oracle}


def _csv_header(path: str | os.PathLike) -> list[str]:
    """The stripped header cells of a CSV file (empty when unreadable: :func:`read_sims_csv` then names the fault)."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


def mtg_from_sims(path: str | os.PathLike, sim_range: tuple[float, float] = SIM_RANGE) -> MTGResult:
    """MTG metrics from a per-sample CSV with the columns :data:`MTG_COLUMNS` (empty cells allowed and counted), or
    with the reference ``sim_test.py``'s names for them (:data:`MTG_REFERENCE_COLUMNS`), so its CSVs can be
    re-summarised. A file with none of our names but some reference name is read with the reference names.

    Raises:
        SimsTableError: a malformed file (see :func:`read_sims_csv`; similarities in ``sim_range``, oracles <= 1).
    """
    header = set(_csv_header(path))
    reference = not header & set(MTG_COLUMNS) and bool(header & set(MTG_REFERENCE_COLUMNS.values()))
    names = {c: MTG_REFERENCE_COLUMNS[c] if reference else c for c in MTG_COLUMNS}
    ranges = {names[c]: r for c, r in _mtg_ranges(sim_range).items()}
    read = read_sims_csv(path, list(names.values()), required=list(names.values()), ranges=ranges, hint=_MTG_HINT)
    columns = {c: read[names[c]] for c in MTG_COLUMNS}
    n = len(columns[MTG_COLUMNS[0]])
    rows = [{c: float(columns[c][i]) for c in MTG_COLUMNS} for i in range(n)]
    metrics, report = _mtg_summary(columns)
    return MTGResult(metrics, rows, report=report)


def run_mtg(
    records: Iterable[MTGRecord],
    embedder,
    masks: str = "full",
    batch_size: int = 32,
    dist: Distributed | None = None,
    progress: bool = True,
    flush_every: int | None = None,
) -> MTGResult:
    """Embed MTG samples and compute M-O, M-Opair, SSR and PA; missing edited images and masks are counted in the
    result's ``gaps`` (and logged).

    Args:
        masks: ``"full"``, or ``"fg"``: object mask v applied (uncleaned) to image v and its edited version.
        Other arguments as in :func:`run_nearid_bench`.
    """
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    cache = EmbeddingCache(embedder, batch_size, dist)
    flush_every = flush_every or max(256, 8 * batch_size)
    total = len(records) if hasattr(records, "__len__") else None  # type: ignore[arg-type]
    rows: list[dict[str, Any]] = []
    pending: list[tuple[MTGRecord, list, tuple[float, float]]] = []
    warned: dict = {}
    missing_edits = missing_masks = 0

    def queue(image: Any, mask: Any) -> str | None:
        if image is None:
            return None
        if masks == "full":
            return cache.add(image)
        if mask is None:
            _warn_once(warned, "mask", "fg masks: an MTG sample has no object mask; using the full image")
            return cache.add(image)
        return cache.add(None, key=f"obj:{cache.key(image)}:{cache.key(mask)}",
                         loader=lambda image=image, mask=mask: apply_mask(image, mask))

    def drain() -> None:
        cache.flush()
        for rec, keys, (o1, o2) in pending:
            e1, e2, e1p, e2p = (cache[k] if k else None for k in keys)
            rows.append({"sample_id": rec.sample_id, "sim_12": _cos(e1, e2), "sim_1_1p": _cos(e1, e1p),
                         "sim_1_2p": _cos(e1, e2p), "sim_2_2p": _cos(e2, e2p), "sim_2_1p": _cos(e2, e1p),
                         "oracle_1": o1, "oracle_2": o2})
        pending.clear()

    for rec in tqdm(records, total=total, desc="mtg", unit="sample", disable=not _show(progress, dist)):
        om = rec.object_masks
        keys = [queue(rec.originals[0], om[0]), queue(rec.originals[1], om[1]),
                queue(rec.inpainted[0], om[0]), queue(rec.inpainted[1], om[1])]
        oracles = tuple(mtg_oracle(mask_array(rec.object_masks[v]), mask_array(rec.part_masks[v])) for v in (0, 1))
        missing_edits += sum(x is None for x in rec.inpainted)
        missing_masks += sum(rec.object_masks[v] is None or rec.part_masks[v] is None for v in (0, 1))
        pending.append((rec, keys, oracles))
        if cache.n_pending >= flush_every:
            drain()
    drain()
    if not rows:
        raise ValueError("no MTG samples to evaluate")
    metrics, report = _mtg_summary(_columns_of(rows, MTG_COLUMNS))
    gaps = MTGDataGaps(len(rows), missing_edits, missing_masks)
    logger.info("mtg: %d unique images embedded by this process", cache.n_embedded)
    if gaps.note():
        logger.warning("mtg %s", gaps.note())
    return MTGResult(metrics, rows, cache.n_embedded, report, gaps)


# ====================================================================================================================
# DreamBench++
# ====================================================================================================================

_HUMAN_DIR = Path("data_human_rating") / "merged_data"
_RATING_DIR = re.compile(r"^data_(.+)_rating$")


@dataclass
class DreamBenchRatings:
    """Rating files of a DreamBench++-layout folder; every dict is {key: score} in file order.

    Attributes:
        human_1, human_2: method -> ratings of annotator group 1 / 2.
        scorers: scorer name (the ``<scorer>`` of ``data_<scorer>_rating``) -> method -> ratings.
        paths: (group or scorer, method) -> file, for messages.
        missing: group or scorer -> method -> ratings that are null / NaN (left out of that file's correlations);
            only files with some.
        skipped: scorer folder -> the human-rated methods it lacks; such a folder is left out (as the reference
            does) unless loading is strict.
    """

    human_1: dict[str, dict[str, float]]
    human_2: dict[str, dict[str, float]]
    scorers: dict[str, dict[str, dict[str, float]]]
    paths: dict[tuple[str, str], Path] = field(default_factory=dict)
    missing: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, list[str]] = field(default_factory=dict)

    @property
    def methods(self) -> list[str]:
        return list(self.human_1)


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json`` object hook that refuses a key given twice (plain ``json`` keeps the last one silently)."""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise SimsTableError(f"{path}: the key {key!r} is given twice; each image needs exactly one rating "
                                     "(remove the duplicate)")
            out[key] = value
        return out

    return hook


def _read_rating(path: Path) -> dict[str, float]:
    """A ``{image key: score}`` rating file; scores are finite numbers, or null / NaN for a missing rating (-> NaN)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_unique_keys(path))
    except (OSError, UnicodeDecodeError) as err:
        raise SimsTableError(f"cannot read {path}: {err}") from None
    except ValueError as err:  # invalid JSON, or an integer too long for Python to read
        raise SimsTableError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or not data:
        raise SimsTableError(f"{path} must hold a non-empty JSON object {{image key: score}}")
    out = {}
    for key, value in data.items():
        if value is None:
            value = math.nan
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SimsTableError(f"{path}, key {key!r}: the score {value!r} is not a number (use null for a missing "
                                 "rating)")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond the float range
            raise SimsTableError(f"{path}, key {key!r}: the score is a {len(str(value))}-digit integer, too large to "
                                 "be a rating (use null for a missing rating)") from None
        if math.isinf(number):
            raise SimsTableError(f"{path}, key {key!r}: the score {value!r} is not finite (use null for a missing "
                                 "rating)")
        out[key] = number
    return out


def _scorer_folder(d: Path) -> Path:
    sub = d / "concept_preservation_full"
    return sub if sub.is_dir() else d


def load_dreambench_ratings(root: str | os.PathLike, strict: bool = False) -> DreamBenchRatings:
    """Read a DreamBench++ ratings folder.

    Layout: ``data_human_rating/merged_data/group{1,2}/<method>-cp.json``, and for every scorer
    ``data_<scorer>_rating/<method>.json`` (or ``data_<scorer>_rating/concept_preservation_full/<method>.json``, as
    ``data_gpt_rating``). Methods are those of group 1. A ``data_*_rating`` folder without any method file is skipped;
    one that lacks some of the methods is skipped with a warning naming it (as the reference skips it), or is an
    error when ``strict``.

    Raises:
        ValueError: missing human files, a scorer folder that lacks some methods (``strict`` only), or rating files
            whose keys do not pair up (items are paired by key, never by position; ``rubik's_cube`` = ``magic_cube``,
            and a trailing ``_<n>`` image index may be left out; see :func:`~nearid_core.eval.metrics.align_ratings`).
    """
    root = Path(root)
    g1, g2 = root / _HUMAN_DIR / "group1", root / _HUMAN_DIR / "group2"
    if not g1.is_dir() or not g2.is_dir():
        raise ValueError(f"{root} is not a DreamBench++ ratings folder: expected {g1} and {g2}")
    methods = sorted(p.name[: -len("-cp.json")] for p in g1.glob("*-cp.json"))
    if not methods:
        raise ValueError(f"no <method>-cp.json files in {g1}")
    missing = [m for m in methods if not (g2 / f"{m}-cp.json").is_file()]
    extra = sorted(set(p.name[: -len("-cp.json")] for p in g2.glob("*-cp.json")) - set(methods))
    if missing or extra:
        raise ValueError(f"human groups cover different methods: group2 lacks {missing}, has extra {extra}")
    paths: dict[tuple[str, str], Path] = {}
    human_1, human_2 = {}, {}
    for m in methods:
        paths[("human_1", m)], paths[("human_2", m)] = g1 / f"{m}-cp.json", g2 / f"{m}-cp.json"
        human_1[m], human_2[m] = _read_rating(g1 / f"{m}-cp.json"), _read_rating(g2 / f"{m}-cp.json")
    scorers: dict[str, dict[str, dict[str, float]]] = {}
    skipped: dict[str, list[str]] = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        match = _RATING_DIR.match(d.name)
        if not match or d.name == "data_human_rating":
            continue
        folder = _scorer_folder(d)
        present = [m for m in methods if (folder / f"{m}.json").is_file()]
        if not present:
            logger.info("skipping %s: no <method>.json for the methods %s", folder, methods)
            continue
        absent = [m for m in methods if m not in present]
        if absent and strict:
            raise ValueError(f"{folder} lacks ratings for method(s) {absent}; every scorer needs all {len(methods)} "
                             "(without --strict the folder is skipped with a warning)")
        if absent:
            logger.warning("skipping scorer folder %s: it lacks ratings for method(s) %s of the %d human-rated "
                           "methods (--strict makes this an error)", folder, absent, len(methods))
            skipped[str(folder)] = absent
            continue
        name = match.group(1)
        scorers[name] = {}
        for m in methods:
            paths[(name, m)] = folder / f"{m}.json"
            scorers[name][m] = _read_rating(folder / f"{m}.json")
    missing: dict[str, dict[str, int]] = {}
    for name, per_method in [("human_1", human_1), ("human_2", human_2)] + list(scorers.items()):
        counts = {m: sum(math.isnan(v) for v in r.values()) for m, r in per_method.items()}
        if any(counts.values()):
            missing[name] = {m: k for m, k in counts.items() if k}
    if missing:
        logger.warning("DreamBench++ ratings: null / NaN ratings left out of the correlations: %s", missing)
    ratings = DreamBenchRatings(human_1, human_2, scorers, paths, missing, skipped)
    for m in methods:
        names = ["human_1", "human_2"] + list(scorers)
        dicts = [human_1[m], human_2[m]] + [scorers[s][m] for s in scorers]
        align_ratings(dicts, [str(paths[(n, m)]) for n in names])
    return ratings


@dataclass
class DreamBenchResult:
    """M-H per scorer and category, the human-human ceiling and per-method values.

    Attributes:
        mh: scorer -> category -> M-H (Fisher-z over methods).
        human_human: category -> ceiling.
        per_method: scorer -> category -> method -> (r1 + r2) / 2.
        categories: categories evaluated.
        single: the caller asked for one category (JSON then drops the category level).
        missing_ratings: group or scorer -> method -> null / NaN ratings left out (see
            :attr:`DreamBenchRatings.missing`).
        skipped_scorers: scorer folder -> methods it lacks (see :attr:`DreamBenchRatings.skipped`).
    """

    mh: dict[str, dict[str, float]]
    human_human: dict[str, float]
    per_method: dict[str, dict[str, dict[str, float]]]
    categories: list[str]
    single: bool = False
    missing_ratings: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped_scorers: dict[str, list[str]] = field(default_factory=dict)

    def fisher_z_over_categories(self, values: Mapping[str, float]) -> float:
        return fisher_z_mean([values[c] for c in self.categories], _M_H_CLIP)

    def to_json(self) -> dict[str, Any]:
        """``mh``: scorer -> value (one category) or -> {category: value, "all_fisher_z": value};
        ``human_human`` likewise; ``per_method``: scorer -> method -> value (or -> category -> method -> value);
        ``missing_ratings``: group or scorer -> method -> null / NaN ratings (empty when none);
        ``skipped_scorers``: scorer folder -> methods it lacks (empty when none)."""
        missing = {k: dict(v) for k, v in self.missing_ratings.items()}
        extra = {"missing_ratings": missing, "skipped_scorers": {k: list(v) for k, v in self.skipped_scorers.items()}}
        if self.single:
            c = self.categories[0]
            return {"mh": {s: v[c] for s, v in self.mh.items()}, "human_human": self.human_human[c],
                    "per_method": {s: v[c] for s, v in self.per_method.items()}} | extra

        def with_all(values: Mapping[str, float]) -> dict[str, float]:
            return {**values, "all_fisher_z": self.fisher_z_over_categories(values)}

        return {"mh": {s: with_all(v) for s, v in self.mh.items()}, "human_human": with_all(self.human_human),
                "per_method": self.per_method} | extra

    def notes(self) -> list[str]:
        """One line per rating folder with null / NaN ratings and per skipped scorer folder (empty when none)."""
        lines = [f"{name}: missing ratings left out of the correlations: "
                 + ", ".join(f"{method} {k}" for method, k in counts.items())
                 for name, counts in self.missing_ratings.items()]
        return lines + [f"skipped {folder}: it lacks method(s) {', '.join(methods)} (--strict: an error)"
                        for folder, methods in self.skipped_scorers.items()]

    def table(self, title: str = "DreamBench++ M-H") -> "Table":
        cols = list(self.categories) + ([] if self.single else ["all_fisher_z"])
        rows = []
        for name, values in [("human-human", self.human_human)] + list(self.mh.items()):
            row = [values[c] for c in self.categories]
            rows.append([name] + row + ([] if self.single else [self.fisher_z_over_categories(values)]))
        return Table(title, ["scorer"] + cols, rows, digits=3, notes=self.notes())

    def method_tables(self) -> list["Table"]:
        out = []
        for c in self.categories:
            methods = list(next(iter(self.per_method.values()))[c]) if self.per_method else []
            rows = [[s] + [v[c][m] for m in methods] for s, v in self.per_method.items()]
            out.append(Table(f"per method ({c})", ["scorer"] + methods, rows, digits=3))
        return out


def run_dreambench(
    ratings: str | os.PathLike | DreamBenchRatings, categories: Sequence[str] | None = None, strict: bool = False
) -> DreamBenchResult:
    """DreamBench++ M-H for every scorer of a ratings folder.

    Args:
        ratings: folder (see :func:`load_dreambench_ratings`) or loaded ratings.
        categories: subset of :data:`M_H_CATEGORIES`; None = all four, skipping categories the human files lack.
        strict: when reading a folder, a scorer folder lacking some method is an error instead of being skipped
            with a warning.

    Raises:
        ValueError: an unknown or empty requested category, no scorer, or misaligned rating files.
    """
    data = ratings if isinstance(ratings, DreamBenchRatings) else load_dreambench_ratings(ratings, strict)
    if not data.scorers:
        skipped = f"; skipped for lacking methods: {sorted(data.skipped)}" if data.skipped else ""
        raise ValueError(f"no data_<scorer>_rating folder with ratings for all the human-rated methods {data.methods}"
                         f"{skipped}")
    single = categories is not None and len(categories) == 1
    if categories is None:
        first = data.human_1[data.methods[0]]
        found = {key_category(k) for k in first}
        categories = [c for c in M_H_CATEGORIES if c in found]
        skipped = [c for c in M_H_CATEGORIES if c not in found]
        if skipped:
            logger.warning("DreamBench++ ratings have no item in categories %s; skipped", skipped)
        if not categories:
            raise ValueError(f"no rating key starts with one of {M_H_CATEGORIES}")
    bad = [c for c in categories if c not in M_H_CATEGORIES]
    if bad:
        raise ValueError(f"unknown categories {bad}; choose from {M_H_CATEGORIES}")
    mh: dict[str, dict[str, float]] = {s: {} for s in data.scorers}
    per_method: dict[str, dict[str, dict[str, float]]] = {s: {} for s in data.scorers}
    human_human = {}
    for c in categories:
        human_human[c] = human_agreement(data.human_1, data.human_2, category=c)
        for s, metric in data.scorers.items():
            per_method[s][c] = m_h_per_method(data.human_1, data.human_2, metric, category=c)
            mh[s][c] = fisher_z_mean(list(per_method[s][c].values()), _M_H_CLIP)
    return DreamBenchResult(mh, human_human, per_method, list(categories), single, data.missing, data.skipped)


def _list_images(root: Path) -> dict[str, Path]:
    """Relative path without extension (``/``-separated) -> file, for every image under ``root``."""
    out: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
            rel = p.relative_to(root).with_suffix("").as_posix()
            if rel in out:
                raise ValueError(f"{root}: two images share the name {rel!r} ({out[rel].name}, {p.name})")
            out[rel] = p
    return out


def dreambench_method(run_name: str) -> str:
    """Rating-file method name of a DreamBench++ sample run folder (by known prefix; otherwise the folder name)."""
    for prefix in sorted(DREAMBENCH_RUN_PREFIXES, key=len, reverse=True):
        if run_name.startswith(prefix):
            return DREAMBENCH_RUN_PREFIXES[prefix]
    logger.warning("run folder %r matches no known DreamBench++ method prefix; using it as the method name", run_name)
    return run_name


def score_dreambench(
    samples: str | os.PathLike,
    embedder,
    ratings_root: str | os.PathLike,
    name: str,
    batch_size: int = 32,
    dist: Distributed | None = None,
    progress: bool = True,
) -> Path:
    """Score DreamBench++ generated images: writes ``<ratings_root>/data_<name>_rating/<method>.json``.

    ``samples`` holds one folder per run (or is itself a run folder) with ``src_image/`` (reference) and
    ``tgt_image/`` (generated) sub-folders whose files match by relative path. Each generated image gets
    ``100 * cosine(reference, generated)``, keyed by its relative path without extension with ``/`` -> ``-``,
    keys sorted with their numbers by value (``cup-2_0`` before ``cup-10_0``). Identical reference copies are
    embedded once.

    Returns:
        The written ``data_<name>_rating`` folder.

    Raises:
        ValueError: a bad ``name``, no run folder, or src/tgt files that do not pair up.
    """
    if not re.fullmatch(RATING_NAME_PATTERN, name):
        raise ValueError(f"rating name {name!r} must be a simple identifier (letters, digits, _ . -)")
    samples = Path(samples)
    runs = [samples] if (samples / "src_image").is_dir() else sorted(
        d for d in samples.iterdir() if d.is_dir() and (d / "src_image").is_dir())
    if not runs:
        raise ValueError(f"no run folder with src_image/ and tgt_image/ under {samples}")
    out_dir = Path(ratings_root) / f"data_{name}_rating"
    cache = EmbeddingCache(embedder, batch_size, dist)
    written: dict[str, Path] = {}
    for run in tqdm(runs, desc="dreambench-score", unit="run", disable=not _show(progress, dist)):
        src, tgt = _list_images(run / "src_image"), _list_images(run / "tgt_image")
        if set(src) != set(tgt):
            only_src, only_tgt = sorted(set(src) - set(tgt)), sorted(set(tgt) - set(src))
            raise ValueError(f"{run}: src_image and tgt_image do not pair up; only in src: {only_src[:3]}, only in "
                             f"tgt: {only_tgt[:3]}")
        method = dreambench_method(run.name)
        if method in written:
            raise ValueError(f"two run folders map to method {method!r}: {written[method]} and {run}")
        pairs = [(rel, cache.add(src[rel]), cache.add(tgt[rel])) for rel in sorted(src)]
        cache.flush()
        scores = {rel.replace("/", "-"): 100.0 * _cos(cache[a], cache[b]) for rel, a, b in pairs}
        if dist is None or dist.is_main:
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / f"{method}.json").write_text(json.dumps(dict(sorted(scores.items(), key=lambda kv: natural_sort_key(kv[0]))), indent=4) + "\n")
        written[method] = run
        logger.info("%s: %d images scored (%d unique embedded so far)", method, len(scores), cache.n_embedded)
    return out_dir


# ====================================================================================================================
# Tables, JSON, plots
# ====================================================================================================================


@dataclass
class Table:
    """A small result table printable as text, CSV or LaTeX.

    Attributes:
        title: caption.
        columns: header names; the first column is the row label.
        rows: cells (str, int, float; NaN / None print as ``--``).
        digits: decimals for floats, one for all columns or per column name.
        rule_before: a row label before which a horizontal rule is drawn (the pooled row).
        notes: lines printed under the table (text) or as comments (LaTeX): what the inputs lacked.
    """

    title: str
    columns: list[str]
    rows: list[list[Any]]
    digits: int | dict[str, int] = 2
    rule_before: str | None = None
    notes: list[str] = field(default_factory=list)

    def _cell(self, column: str, v: Any) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return "--"
        if isinstance(v, float):
            d = self.digits if isinstance(self.digits, int) else self.digits.get(column, 3)
            return f"{v:.{d}f}"
        return str(v)

    def _cells(self) -> list[list[str]]:
        return [[self._cell(c, v) for c, v in zip(self.columns, row)] for row in self.rows]

    def to_text(self) -> str:
        cells = self._cells()
        widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(self.columns)]

        def line(values: Sequence[str]) -> str:
            return "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(values, widths)))

        out = [self.title, line(self.columns), "-" * len(line(self.columns))]
        for row, raw in zip(cells, self.rows):
            if self.rule_before is not None and raw[0] == self.rule_before:
                out.append("-" * len(line(self.columns)))
            out.append(line(row))
        out += [f"note: {n}" for n in self.notes]
        return "\n".join(out)

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Full-precision values (empty cell for NaN)."""
        return write_sims_csv(path, [dict(zip(self.columns, r)) for r in self.rows], self.columns)

    def to_latex(self) -> str:
        def esc(text: str) -> str:
            return re.sub(r"([_%&#$])", r"\\\1", text)

        lines = [f"% {self.title}", "\\begin{tabular}{l" + "r" * (len(self.columns) - 1) + "}", "\\toprule",
                 " & ".join(esc(c) for c in self.columns) + " \\\\", "\\midrule"]
        for row, raw in zip(self._cells(), self.rows):
            if self.rule_before is not None and raw[0] == self.rule_before:
                lines.append("\\midrule")
            lines.append(" & ".join(esc(c) for c in row) + " \\\\")
        lines += ["\\bottomrule", "\\end{tabular}"] + [f"% note: {n}" for n in self.notes]
        return "\n".join(lines) + "\n"


def json_safe(obj: Any) -> Any:
    """NaN / inf -> None, numpy scalars -> Python numbers, recursively (strict JSON)."""
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(json_safe(obj), indent=2, allow_nan=False) + "\n")
    return path


def _figure(width: float = 6.0, height: float = 4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.~-]+", "_", text).strip("_") or "model"


def plot_mtg_ecdf(result: MTGResult, label: str, out_dir: str | os.PathLike) -> Path:
    """ECDF of the five MTG similarities of one model -> ``<out_dir>/mtg_ecdf_<label>.png``."""
    cols = result.columns()
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    names = {"sim_12": "s(1,2) same object", "sim_1_1p": "s(1,1p) own edit", "sim_2_2p": "s(2,2p) own edit",
             "sim_1_2p": "s(1,2p)", "sim_2_1p": "s(2,1p)"}
    for c, text in names.items():
        v = np.sort(cols[c][np.isfinite(cols[c])])
        if len(v):
            ax.step(np.r_[v[0], v], np.r_[0.0, np.arange(1, len(v) + 1) / len(v)], where="post", label=text)
    ax.set_xlabel("cosine similarity")
    ax.set_ylabel("fraction of samples")
    ax.set_title(f"MTG similarity ECDF: {label}")
    ax.legend(fontsize=8)
    path = Path(out_dir) / f"mtg_ecdf_{_safe_name(label)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_dreambench_bars(result: DreamBenchResult, out_dir: str | os.PathLike) -> Path:
    """Per-category M-H bars, one bar per scorer, human-human ceiling as a marker -> ``dreambench_mh.png``."""
    fig = _figure(max(6.0, 1.8 * len(result.categories)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    scorers = list(result.mh)
    width = 0.8 / max(len(scorers), 1)
    x = np.arange(len(result.categories))
    for k, s in enumerate(scorers):
        ax.bar(x - 0.4 + width * (k + 0.5), [result.mh[s][c] for c in result.categories], width, label=s)
    ax.scatter(x, [result.human_human[c] for c in result.categories], marker="_", s=900, c="k", label="human-human")
    ax.set_xticks(x)
    ax.set_xticklabels(result.categories, fontsize=8)
    ax.set_ylabel("M-H (Pearson, Fisher-z over methods)")
    ax.set_title("DreamBench++ metric-human agreement")
    ax.legend(fontsize=7, ncol=2)
    path = Path(out_dir) / "dreambench_mh.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path


def plot_nearid_bench(result: NearIDBenchResult, label: str, out_dir: str | os.PathLike) -> Path:
    """SSR and PA per source and pooled -> ``<out_dir>/nearid_bench_<label>.png``."""
    names = list(result.metrics)
    fig = _figure(max(6.0, 0.9 * len(names)), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    ax.bar(x - 0.2, [result.metrics[n].ssr for n in names], 0.4, label="SSR")
    ax.bar(x + 0.2, [result.metrics[n].pa for n in names], 0.4, label="PA")
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=8, rotation=30)
    ax.set_ylim(0, 100)
    ax.set_ylabel("%")
    ax.set_title(f"NearID-Bench: {label}")
    ax.legend(fontsize=8)
    path = Path(out_dir) / f"nearid_bench_{_safe_name(label)}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, bbox_inches="tight")
    return path
