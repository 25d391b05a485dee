"""NearID and MTG dataset records, from the local folder layout or the Hugging Face hub, plus the ``fg`` mask cleaning.

Shared by the benchmarks (``nearid_core.eval``) and the training code. Images are held as *references*: a file path
(opened lazily) or a PIL image (decoded by ``datasets``). Use :func:`open_image` to get an RGB PIL image from either.

A :class:`NearIDRecord` is one identity: up to :data:`MAX_VIEWS` positive views in fixed **slots** (slot ``j`` = view
``j + 1``; ``None`` = missing), their foreground masks in the same slots, and per distractor source a list of
distractors in the same slots -- ``distractors[source][j]`` is a different-but-similar object inpainted into exactly
the background of ``views[j]``.

LOCAL FOLDER LAYOUT (the documented layout; :func:`nearid_core.synthetic.write_dataset` writes it)::

    <root>/
      identities/<identity_id>/view1.png view2.png [view3.png]   RGB views of one object, each in its own background
      identities/<identity_id>/mask1.png ...                      optional foreground masks (L, >0 = object)
      distractors/<source>/<identity_id>/view1.png ...            look-alike object in EXACTLY view j's background;
                                                                   any (source, view) may be missing
      splits/<name>.json                                           optional: JSON list of identity ids (strings) or of
                                                                   0-based positions in sorted identity order, or
                                                                   {"indices": [...]}; duplicates are rejected
      metadata.json                                                optional {identity_id: {"category": ...}}

    <mtg_root>/<sample_id>/image_1_original.png image_2_original.png      two views of one object
                           image_1_inpainted.png image_2_inpainted.png    each view with one part edited in place
                           image_{1,2}_object_mask.png image_{1,2}_part_mask.png   (masks optional)

Images may be ``.png``, ``.jpg``, ``.jpeg`` or ``.webp``. Only views 1-3 are read. Identities are sorted by id.

HUB DATASETS: ``Aleksandar/NearID`` (split ``train``, 19,386 rows; columns ``id``, ``category``, ``images1..3``,
``masks1..3``, ``n_images``) joined row by row with the distractor datasets ``Aleksandar/NearID-<Source>`` (same rows,
same order; columns ``nimg1..3``). :class:`HubNearIDRecords` and :class:`HubMTGRecords` are the one reader of these
schemas, for the benchmarks (decoded PIL cells) and training (unread :class:`~nearid_core.feature_cache.HubImage`
cells) alike. As in the reference ``sim_test.py``, every present image is used: ``n_images`` is kept on the record
(:attr:`NearIDRecord.n_images`) and a row whose ``n_images`` disagrees with its present views is warned about, never
trimmed. Benchmark splits are 0-based **row positions** into that ``train`` split
(``splits/test.json`` of the reference repository: a list or ``{"indices": [...]}``), applied unchanged to every
distractor dataset. MTG: ``abdo-eldesokey/mtg-dataset`` (split ``test`` = 100 samples).

``datasets`` is imported inside the hub functions only, so this module imports without it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import numpy as np
from PIL import Image

from . import preprocessing
from .feature_cache import HubImage
from .preprocessing import IMAGE_SUFFIXES

logger = logging.getLogger(__name__)

ImageRef = Union[str, os.PathLike, Image.Image]

MAX_VIEWS = 3
NEARID_REPO = "Aleksandar/NearID"
MTG_REPO = "abdo-eldesokey/mtg-dataset"

#: Method tag (used as the source name in results) -> suffix of the hub distractor dataset ``Aleksandar/NearID-<x>``.
HF_SOURCES: dict[str, str] = {
    "flux": "Flux",
    "flux_1024": "Flux_1024",
    "fluxc": "FluxC",
    "fluxc_1024": "FluxC_1024",
    "powerpaint": "PowerPaint",
    "qwen": "Qwen",
    "qwen_1328": "Qwen_1328",
    "sdxl": "SDXL",
    "sdxl_1024": "SDXL_1024",
}

#: The seven distractor sources of the paper's NearID-Bench (FluxC variants excluded).
EVAL_SOURCES: tuple[str, ...] = ("flux", "flux_1024", "qwen", "qwen_1328", "powerpaint", "sdxl", "sdxl_1024")

_MTG_IMAGES = ("image_1_original", "image_2_original", "image_1_inpainted", "image_2_inpainted")
_MTG_MASKS = ("image_1_object_mask", "image_2_object_mask", "image_1_part_mask", "image_2_part_mask")


class DatasetLayoutError(ValueError):
    """A dataset folder, split file or hub dataset does not have the expected layout."""


# --------------------------------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class NearIDRecord:
    """One identity with its views, masks and slot-aligned distractors.

    Attributes:
        identity_id: identity id (local folder name, or the hub ``id`` column as a string).
        category: coarse category, or None when unknown.
        views: [MAX_VIEWS] view images (path or PIL); None = missing slot.
        masks: [MAX_VIEWS] foreground masks aligned with ``views``; None = missing.
        distractors: source name -> [MAX_VIEWS] distractors, ``distractors[s][j]`` in the background of ``views[j]``.
        index: row position of the identity in its full dataset (sorted identity order for local data).
        n_images: the view count the dataset declares (hub column ``n_images``), None when it declares none. It does
            not hide views: every present view is used, as the reference does.
    """

    identity_id: str
    category: str | None
    views: list[ImageRef | None]
    masks: list[ImageRef | None] = field(default_factory=lambda: [None] * MAX_VIEWS)
    distractors: dict[str, list[ImageRef | None]] = field(default_factory=dict)
    index: int | None = None
    n_images: int | None = None

    @property
    def n_views(self) -> int:
        """Number of present views."""
        return sum(v is not None for v in self.views)

    @property
    def n_images_disagrees(self) -> bool:
        """The declared ``n_images`` is not the number of present views (the present views are used)."""
        return self.n_images is not None and self.n_images != self.n_views


@dataclass
class MTGRecord:
    """One Mind-the-Glitch sample: two views of an object and each view with one part edited.

    Attributes:
        sample_id: sample id (local folder name or hub row position).
        originals: (image 1, image 2), the two original views.
        inpainted: (image 1 edited, image 2 edited); an entry may be None.
        object_masks: (object mask 1, object mask 2); entries may be None.
        part_masks: (part mask 1, part mask 2), the edited regions; entries may be None.
    """

    sample_id: str
    originals: tuple[ImageRef | None, ImageRef | None]
    inpainted: tuple[ImageRef | None, ImageRef | None]
    object_masks: tuple[ImageRef | None, ImageRef | None] = (None, None)
    part_masks: tuple[ImageRef | None, ImageRef | None] = (None, None)


def open_image(ref: ImageRef, mode: str = "RGB") -> Image.Image:
    """Open an image reference (path or PIL image) as displayed, converted to ``mode`` (RGB as the scorer reads it:
    16-bit images scaled, not clipped; see `nearid_core.preprocessing.to_rgb`)."""
    img = ref if isinstance(ref, Image.Image) else preprocessing.open_image(ref)
    return preprocessing.to_rgb(img) if mode == "RGB" else preprocessing.upright(img).convert(mode)


def mask_array(ref: ImageRef | None) -> np.ndarray | None:
    """A mask reference as a [H, W] uint8 array (grayscale), or None."""
    return None if ref is None else np.asarray(open_image(ref, "L"))


# --------------------------------------------------------------------------------------------------------------------
# Split index lists
# --------------------------------------------------------------------------------------------------------------------


def _split_entries(data: Any, where: str) -> list:
    if isinstance(data, Mapping):
        if "indices" not in data:
            raise DatasetLayoutError(f"{where}: a JSON object must hold the list under 'indices'; keys: {list(data)}")
        data = data["indices"]
    if not isinstance(data, list):
        raise DatasetLayoutError(f"{where}: expected a JSON list or {{'indices': [...]}}, got {type(data).__name__}")
    seen: set = set()
    dupes = []
    for x in data:
        if not isinstance(x, (int, str)):
            raise DatasetLayoutError(f"{where}: entries must be integers or strings, got {x!r}")
        if x in seen:
            dupes.append(x)
        seen.add(x)
    if dupes:
        raise DatasetLayoutError(f"{where}: duplicate entries {dupes[:5]}{' ...' if len(dupes) > 5 else ''}")
    return data


def load_split_indices(path: str | os.PathLike) -> list[int]:
    """Read a 0-based row-position list: ``[..]`` or ``{"indices": [..]}``; duplicates and non-integers are rejected."""
    data = json.loads(Path(path).read_text())
    entries = _split_entries(data, str(path))
    bad = [x for x in entries if isinstance(x, bool) or not isinstance(x, int) or x < 0]
    if bad:
        raise DatasetLayoutError(f"{path}: row positions must be non-negative integers, got {bad[:5]}")
    return list(entries)


def _check_positions(indices: Sequence[int], n_rows: int, where: str) -> list[int]:
    out = [int(i) for i in indices]
    if len(set(out)) != len(out):
        raise DatasetLayoutError(f"{where}: duplicate row positions")
    bad = [i for i in out if not 0 <= i < n_rows]
    if bad:
        raise DatasetLayoutError(f"{where}: row positions {bad[:5]} are outside 0..{n_rows - 1}")
    return out


# --------------------------------------------------------------------------------------------------------------------
# Local folder layout
# --------------------------------------------------------------------------------------------------------------------


def _find_image(directory: Path, stem: str) -> Path | None:
    for suffix in IMAGE_SUFFIXES:
        path = directory / f"{stem}{suffix}"
        if path.is_file():
            return path
    return None


def local_identities(root: str | os.PathLike) -> list[str]:
    """Sorted identity ids of a local dataset (folders under ``identities/``)."""
    ident_dir = Path(root) / "identities"
    if not ident_dir.is_dir():
        raise DatasetLayoutError(
            f"{root} is not a NearID dataset folder: {ident_dir} does not exist (see nearid_core.data for the layout)"
        )
    return sorted(p.name for p in ident_dir.iterdir() if p.is_dir())


def local_sources(root: str | os.PathLike) -> list[str]:
    """Sorted distractor source names of a local dataset (folders under ``distractors/``)."""
    d = Path(root) / "distractors"
    return sorted(p.name for p in d.iterdir() if p.is_dir()) if d.is_dir() else []


def local_split(root: str | os.PathLike, split: str | os.PathLike | None) -> list[str]:
    """Identity ids of a local split, in sorted identity order.

    Args:
        root: dataset folder.
        split: None or ``"all"`` = every identity; a name = ``<root>/splits/<name>.json``; or a path to a JSON file.
            Entries are identity ids (strings) or 0-based positions in sorted identity order (integers).
    """
    ids = local_identities(root)
    if split is None or split == "all":
        return ids
    path = Path(split)
    if not (path.suffix == ".json" and path.is_file()):
        path = Path(root) / "splits" / f"{split}.json"
    if not path.is_file():
        available = sorted(p.stem for p in (Path(root) / "splits").glob("*.json"))
        raise DatasetLayoutError(
            f"split {split!r}: {path} does not exist (available: {available or 'none'}); use split 'all' for every "
            "identity or pass a JSON file"
        )
    entries = _split_entries(json.loads(path.read_text()), str(path))
    known = set(ids)
    chosen: set[str] = set()
    for entry in entries:
        if isinstance(entry, bool) or not isinstance(entry, (int, str)):
            raise DatasetLayoutError(f"{path}: entries must be identity ids or row positions, got {entry!r}")
        if isinstance(entry, int):
            if not 0 <= entry < len(ids):
                raise DatasetLayoutError(f"{path}: row position {entry} outside 0..{len(ids) - 1}")
            entry = ids[entry]
        if entry not in known:
            raise DatasetLayoutError(f"{path}: identity {entry!r} is not in {Path(root) / 'identities'}")
        if entry in chosen:
            raise DatasetLayoutError(f"{path}: identity {entry!r} is listed twice")
        chosen.add(entry)
    return [i for i in ids if i in chosen]


def load_local_nearid(
    root: str | os.PathLike,
    sources: Sequence[str] | None = None,
    split: str | os.PathLike | None = None,
) -> list[NearIDRecord]:
    """Records of a dataset in the LOCAL FOLDER LAYOUT (paths only; nothing is decoded).

    Args:
        root: dataset folder.
        sources: distractor sources to attach (default: every folder under ``distractors/``).
        split: see :func:`local_split` (None = all identities).

    Raises:
        DatasetLayoutError: missing folders, an unknown source or split entry.
    """
    root = Path(root)
    all_ids = local_identities(root)
    available = local_sources(root)
    sources = list(available if sources is None else sources)
    unknown = [s for s in sources if s not in available]
    if unknown:
        raise DatasetLayoutError(
            f"unknown distractor source(s) {unknown} in {root / 'distractors'}; available: {available}"
        )
    meta_path = root / "metadata.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    position = {iid: k for k, iid in enumerate(all_ids)}
    records = []
    for iid in local_split(root, split):
        d = root / "identities" / iid
        views = [_find_image(d, f"view{j + 1}") for j in range(MAX_VIEWS)]
        masks = [_find_image(d, f"mask{j + 1}") for j in range(MAX_VIEWS)]
        distractors = {
            s: [_find_image(root / "distractors" / s / iid, f"view{j + 1}") for j in range(MAX_VIEWS)] for s in sources
        }
        category = meta.get(iid, {}).get("category") if isinstance(meta.get(iid), Mapping) else None
        records.append(NearIDRecord(iid, category, views, masks, distractors, position[iid]))
    return records


def load_local_mtg(root: str | os.PathLike) -> list[MTGRecord]:
    """MTG records from ``<root>/<sample_id>/image_*.png`` (sorted by sample id).

    Raises:
        DatasetLayoutError: no sample folder, or a sample lacks one of the two original views.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetLayoutError(f"MTG folder {root} does not exist")
    records = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = {name: _find_image(d, name) for name in _MTG_IMAGES + _MTG_MASKS}
        if files["image_1_original"] is None and files["image_2_original"] is None:
            continue
        if files["image_1_original"] is None or files["image_2_original"] is None:
            raise DatasetLayoutError(f"MTG sample {d} needs image_1_original and image_2_original")
        records.append(MTGRecord(
            d.name,
            (files["image_1_original"], files["image_2_original"]),
            (files["image_1_inpainted"], files["image_2_inpainted"]),
            (files["image_1_object_mask"], files["image_2_object_mask"]),
            (files["image_1_part_mask"], files["image_2_part_mask"]),
        ))
    if not records:
        raise DatasetLayoutError(f"no MTG sample folders (with image_1_original.png) under {root}")
    return records


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face hub datasets
# --------------------------------------------------------------------------------------------------------------------


def source_tag(name: str) -> str:
    """Method tag of a distractor source: ``"Aleksandar/NearID-Flux_1024"`` / ``"Flux_1024"`` -> ``"flux_1024"``."""
    tag = name.rstrip("/").split("/")[-1].lower()
    tag = re.sub(r"^nearid-", "", tag)
    return tag.replace("-", "_")


def hf_source_repo(name: str) -> tuple[str, str]:
    """(tag, hub dataset id) of a distractor source given as a tag, a suffix (``Flux_1024``) or a full dataset id."""
    tag = source_tag(name)
    if "/" in name:
        return tag, name
    if tag not in HF_SOURCES:
        raise DatasetLayoutError(f"unknown NearID distractor source {name!r}; known: {sorted(HF_SOURCES)}")
    return tag, f"{NEARID_REPO}-{HF_SOURCES[tag]}"


def _columns(ds: Any) -> list[str]:
    return list(ds.column_names)


def _column(ds: Any, name: str) -> list | None:
    """The values of a non-image column, or None when the dataset lacks it."""
    return list(ds.select_columns([name])[name]) if name in _columns(ds) else None


def _present(ds: Any, column: str) -> np.ndarray:
    """[len(ds)] bool: which cells of an image column are non-empty, from the Arrow validity bitmap (no image read)."""
    if getattr(ds, "_indices", None) is None:
        try:
            return ~np.asarray(ds.data.column(column).is_null().to_numpy(zero_copy_only=False), dtype=bool)
        except Exception:  # pragma: no cover - exotic table types
            pass
    column_ds = ds.select_columns([column])
    return np.array([column_ds[i][column] is not None for i in range(len(ds))], dtype=bool)


def _undecoded(ds: Any, columns: Sequence[str]) -> Any:
    import datasets

    for c in columns:
        if c in ds.column_names and isinstance(ds.features[c], datasets.Image):
            ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds


class _ImageColumns:
    """Image columns of one hub dataset, read one cell at a time.

    A cell is a PIL image decoded by ``datasets`` (``decode=True``) or a lazy, unread
    :class:`~nearid_core.feature_cache.HubImage` (``decode=False``); an empty cell is None either way (known from the
    Arrow validity bitmap, without reading the image).
    """

    def __init__(self, ds: Any, columns: Sequence[str], decode: bool) -> None:
        raw = _undecoded(ds, columns)
        self.fingerprint = str(getattr(raw, "_fingerprint", None) or f"id{id(raw)}")
        self.columns = [c for c in columns if c in _columns(ds)]
        self._cells = {c: (ds if decode else raw).select_columns([c]) for c in self.columns}
        self._present = {c: _present(raw, c) for c in self.columns}
        self._decode = decode

    def cell(self, column: str, row: int) -> Any:
        if column not in self._cells or not self._present[column][row]:
            return None
        if self._decode:
            return self._cells[column][row][column]
        return HubImage(self._cells[column], self.fingerprint, int(row), column)


class HubNearIDRecords(Sequence[NearIDRecord]):
    """NearID records over a positives dataset joined row by row with distractor datasets: the one reader of the hub
    schema, shared by the benchmarks and training.

    Lazy: ``records[k]`` reads only row ``k``. Every present view is used; a row whose declared ``n_images`` disagrees
    is kept as it is (:attr:`NearIDRecord.n_images_disagrees`) and the first such row is logged.
    """

    def __init__(
        self,
        positives: Any,
        distractors: Mapping[str, Any],
        indices: Sequence[int] | None = None,
        with_masks: bool = True,
        decode: bool = True,
    ) -> None:
        """
        Args:
            positives: a ``datasets.Dataset`` with ``images1..3`` (and ``masks1..3``, ``id``, ``category``,
                ``n_images`` when available).
            distractors: source tag -> ``datasets.Dataset`` with ``nimg1..3``, same rows in the same order.
            indices: 0-based row positions to keep (None = all rows).
            with_masks: also read ``masks1..3`` (needed for ``fg`` masking).
            decode: cells as PIL images (what the benchmarks read) or as unread
                :class:`~nearid_core.feature_cache.HubImage` references (what the training feature cache keys).

        Raises:
            DatasetLayoutError: missing columns, datasets of different lengths, or ``id`` columns that disagree.
        """
        n_rows = len(positives)
        cols = _columns(positives)
        image_cols = [f"images{j + 1}" for j in range(MAX_VIEWS)]
        if not any(c in cols for c in image_cols):
            raise DatasetLayoutError(f"positives dataset has none of the columns {image_cols}; columns: {cols}")
        mask_cols = [f"masks{j + 1}" for j in range(MAX_VIEWS)] if with_masks else []
        self.indices = list(range(n_rows)) if indices is None else _check_positions(indices, n_rows, "indices")
        self._ids = _column(positives, "id")
        self._categories = _column(positives, "category")
        self._n_images = _column(positives, "n_images")
        self._pos = _ImageColumns(positives, image_cols + mask_cols, decode)
        self._neg: dict[str, _ImageColumns] = {}
        for name, ds in distractors.items():
            ncols = [c for c in (f"nimg{j + 1}" for j in range(MAX_VIEWS)) if c in _columns(ds)]
            if not ncols:
                raise DatasetLayoutError(f"distractor dataset {name!r} has no nimg1..3 column; columns: {_columns(ds)}")
            if len(ds) != n_rows:
                raise DatasetLayoutError(
                    f"distractor dataset {name!r} has {len(ds)} rows but the positives have {n_rows}; they must be "
                    "row-aligned (same rows, same order)"
                )
            neg_ids = _column(ds, "id") if self._ids is not None else None
            wrong = next((i for i in self.indices if neg_ids[i] != self._ids[i]), None) if neg_ids else None
            if wrong is not None:
                raise DatasetLayoutError(
                    f"distractor dataset {name!r} is not row-aligned with the positives: row {wrong} has id "
                    f"{neg_ids[wrong]!r} there but {self._ids[wrong]!r} in the positives"
                )
            self._neg[name] = _ImageColumns(ds, ncols, decode)
        self._warned_n_images = False

    @property
    def sources(self) -> list[str]:
        return list(self._neg)

    def identity_ids(self) -> list[str]:
        """Identity ids of the kept rows (the ``id`` column, else the row position)."""
        return [str(self._ids[i] if self._ids is not None else i) for i in self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        row = self.indices[k]
        views = [self._pos.cell(f"images{j + 1}", row) for j in range(MAX_VIEWS)]
        masks = [self._pos.cell(f"masks{j + 1}", row) for j in range(MAX_VIEWS)]
        distractors = {s: [cols.cell(f"nimg{j + 1}", row) for j in range(MAX_VIEWS)] for s, cols in self._neg.items()}
        identity = self._ids[row] if self._ids is not None else row
        category = self._categories[row] if self._categories is not None else None
        n_images = self._n_images[row] if self._n_images is not None else None
        declared = int(n_images) if isinstance(n_images, (int, np.integer)) else None
        record = NearIDRecord(str(identity), category, views, masks, distractors, row, declared)
        if record.n_images_disagrees and not self._warned_n_images:
            self._warned_n_images = True
            logger.warning("row %d (id %s) declares n_images=%d but has %d views; every present view is used, as the "
                           "reference does (further rows are not logged; the benchmark's data report counts them)",
                           row, identity, declared, record.n_views)
        return record

    def __iter__(self) -> Iterator[NearIDRecord]:
        for k in range(len(self)):
            yield self[k]


#: The eval name of :class:`HubNearIDRecords`.
HFNearIDRecords = HubNearIDRecords


def load_hub_dataset(repo: str, split: str, cache_dir: str | None) -> Any:
    """`datasets.load_dataset(repo, split=split)`, importing `datasets` only when a hub dataset is asked for."""
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Loading hub datasets needs `datasets`: pip install 'nearid-toolkit[eval]' (or '[train]' for training)"
        ) from err
    logger.info("Loading dataset %s (split %s)", repo, split)
    return datasets.load_dataset(repo, split=split, cache_dir=cache_dir)


def load_hf_nearid(
    sources: Sequence[str] = EVAL_SOURCES,
    split: str | None = "test",
    indices: str | os.PathLike | Sequence[int] | None = None,
    repo: str = NEARID_REPO,
    hf_split: str = "train",
    cache_dir: str | None = None,
    with_masks: bool = True,
    decode: bool = True,
) -> HubNearIDRecords:
    """NearID-Bench records from the hub: ``Aleksandar/NearID`` joined with ``Aleksandar/NearID-<Source>``.

    Args:
        sources: distractor sources as tags (``flux_1024``), suffixes (``Flux_1024``) or dataset ids.
        split: benchmark split name; used when ``indices`` is None, through the positives' ``split`` column.
            None or ``"all"`` = every row.
        indices: row positions to keep: a JSON file (``splits/test.json``) or a list. Takes precedence over ``split``.
        repo: positives dataset id.
        hf_split: the hub split holding all rows (``train``).
        cache_dir: ``datasets`` cache folder.
        with_masks: also read ``masks1..3``.
        decode: see :class:`HubNearIDRecords`.

    Raises:
        DatasetLayoutError: no way to select ``split`` (no ``indices`` and no ``split`` column), misaligned datasets.
    """
    positives = load_hub_dataset(repo, hf_split, cache_dir)
    if indices is not None:
        rows = load_split_indices(indices) if isinstance(indices, (str, os.PathLike)) else list(indices)
    elif split is None or split == "all":
        rows = None
    elif "split" in _columns(positives):
        labels = _column(positives, "split")
        rows = [i for i, s in enumerate(labels) if s == split]
        if not rows:
            raise DatasetLayoutError(f"no row of {repo} has split == {split!r}; values: {sorted(set(labels))}")
    else:
        raise DatasetLayoutError(
            f"{repo} has no 'split' column: pass the row-position list of the {split!r} split (indices / --indices "
            f"splits/{split}.json from the reference repository), or split 'all'"
        )
    negatives = {}
    for name in sources:
        tag, dataset_id = hf_source_repo(name)
        negatives[tag] = load_hub_dataset(dataset_id, hf_split, cache_dir)
    return HubNearIDRecords(positives, negatives, rows, with_masks=with_masks, decode=decode)


class HubMTGRecords(Sequence[MTGRecord]):
    """Lazy MTG records over a ``datasets.Dataset`` with the MTG columns (see module docstring); ``decode`` as in
    :class:`HubNearIDRecords`."""

    def __init__(self, dataset: Any, decode: bool = True) -> None:
        missing = [c for c in _MTG_IMAGES[:2] if c not in _columns(dataset)]
        if missing:
            raise DatasetLayoutError(f"MTG dataset lacks columns {missing}; columns: {_columns(dataset)}")
        self._n = len(dataset)
        self._cols = _ImageColumns(dataset, _MTG_IMAGES + _MTG_MASKS, decode)
        self._ids = _column(dataset, "id") or _column(dataset, "sample_id")

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        row = range(self._n)[k]
        c = self._cols.cell
        return MTGRecord(
            str(self._ids[row] if self._ids is not None else row),
            (c("image_1_original", row), c("image_2_original", row)),
            (c("image_1_inpainted", row), c("image_2_inpainted", row)),
            (c("image_1_object_mask", row), c("image_2_object_mask", row)),
            (c("image_1_part_mask", row), c("image_2_part_mask", row)),
        )

    def __iter__(self) -> Iterator[MTGRecord]:
        for k in range(len(self)):
            yield self[k]


#: The eval name of :class:`HubMTGRecords`.
HFMTGRecords = HubMTGRecords


def load_hf_mtg(split: str = "test", repo: str = MTG_REPO, cache_dir: str | None = None,
                decode: bool = True) -> HubMTGRecords:
    """MTG records from the hub dataset (default the 100-sample ``test`` split; ``train`` for training)."""
    return HubMTGRecords(load_hub_dataset(repo, split, cache_dir), decode=decode)


# --------------------------------------------------------------------------------------------------------------------
# Foreground masks (spec section 2.3, "fg")
# --------------------------------------------------------------------------------------------------------------------

_GAUSS5 = np.array([1, 4, 6, 4, 1], dtype=np.int64)  # OpenCV's 5-tap Gaussian for sigma = 0 (auto)


def _blur5(a: np.ndarray) -> np.ndarray:
    """5x5 Gaussian blur of a uint8 image with OpenCV's kernel and BORDER_REFLECT_101 (numpy 'reflect')."""
    p = np.pad(a.astype(np.int64), 2, mode="reflect")
    h, w = a.shape
    rows = sum(k * p[:, i : i + w] for i, k in enumerate(_GAUSS5))
    out = sum(k * rows[i : i + h, :] for i, k in enumerate(_GAUSS5))
    return ((out + 128) >> 8).astype(np.uint8)


def _dilate5(m: np.ndarray) -> np.ndarray:
    """Binary dilation with a 5x5 square (outside the image counts as background)."""
    h, w = m.shape
    p = np.pad(m, 2, constant_values=False)
    rows = np.logical_or.reduce([p[:, i : i + w] for i in range(5)])
    return np.logical_or.reduce([rows[i : i + h, :] for i in range(5)])


def _erode5(m: np.ndarray) -> np.ndarray:
    """Binary erosion with a 5x5 square (outside the image counts as foreground, as OpenCV's default border)."""
    h, w = m.shape
    p = np.pad(m, 2, constant_values=True)
    rows = np.logical_and.reduce([p[:, i : i + w] for i in range(5)])
    return np.logical_and.reduce([rows[i : i + h, :] for i in range(5)])


def _label_runs(m: np.ndarray, eight: bool) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a boolean image by run-length union-find.

    Returns:
        runs [K, 3] int (row, start, end exclusive) and labels [K] (component root per run).
    """
    runs: list[tuple[int, int, int]] = []
    row_spans: list[tuple[int, int]] = []
    for r in range(m.shape[0]):
        d = np.diff(np.concatenate(([0], m[r].astype(np.int8), [0])))
        starts, ends = np.flatnonzero(d == 1), np.flatnonzero(d == -1)
        row_spans.append((len(runs), len(runs) + len(starts)))
        runs.extend((r, int(s), int(e)) for s, e in zip(starts, ends))
    parent = list(range(len(runs)))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    adj = 1 if eight else 0
    for r in range(1, m.shape[0]):
        p0, p1 = row_spans[r - 1]
        c0, c1 = row_spans[r]
        i = p0
        for c in range(c0, c1):
            s, e = runs[c][1], runs[c][2]
            while i < p1 and runs[i][2] + adj <= s:
                i += 1
            j = i
            while j < p1 and runs[j][1] < e + adj:
                a, b = find(c), find(j)
                if a != b:
                    parent[a] = b
                j += 1
    labels = np.array([find(k) for k in range(len(runs))], dtype=np.int64)
    return np.array(runs, dtype=np.int64).reshape(-1, 3), labels


def _paint(runs: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    out = np.zeros(shape, dtype=bool)
    for r, s, e in runs:
        out[r, s:e] = True
    return out


def _fill_holes(m: np.ndarray) -> np.ndarray:
    """Fill the background regions (4-connected) of ``m`` that do not reach the image border."""
    bg_runs, bg_labels = _label_runs(~m, eight=False)
    h, w = m.shape
    outside = {int(lab) for (r, s, e), lab in zip(bg_runs, bg_labels) if r in (0, h - 1) or s == 0 or e == w}
    holes = np.array([int(lab) not in outside for lab in bg_labels], dtype=bool)
    return m | _paint(bg_runs[holes], m.shape) if holes.any() else m


def _contour_area(filled: np.ndarray) -> float:
    """Area of the polygon through the centres of the boundary pixels of a filled region (Pick's theorem:
    pixels - boundary / 2 - 1), which is what OpenCV's ``contourArea`` measures on its external contour."""
    p = np.pad(filled, 1)
    interior = p[1:-1, 1:-1] & p[:-2, 1:-1] & p[2:, 1:-1] & p[1:-1, :-2] & p[1:-1, 2:]
    n = int(filled.sum())
    return max(0.0, n - (n - int(interior.sum())) / 2 - 1)


def _largest_component_filled(m: np.ndarray) -> np.ndarray:
    """The 8-connected foreground component with the largest external-contour area, holes filled (= that contour
    drawn filled). Components are visited by decreasing bounding-box area and the search stops once no remaining box
    can hold a larger region."""
    runs, labels = _label_runs(m, eight=True)
    out = np.zeros_like(m, dtype=bool)
    if len(runs) == 0:
        return out
    boxes = []
    for lab in np.unique(labels):
        rr = runs[labels == lab]  # runs are in raster order, so rr[0] is the component's first pixel
        r0, r1, c0, c1 = int(rr[:, 0].min()), int(rr[:, 0].max()) + 1, int(rr[:, 1].min()), int(rr[:, 2].max())
        boxes.append(((r1 - r0) * (c1 - c0), (int(rr[0, 0]), int(rr[0, 1])), r0, r1, c0, c1, rr))
    boxes.sort(key=lambda b: -b[0])
    best_key: tuple = (-1.0,)
    best = None
    for box_area, first, r0, r1, c0, c1, rr in boxes:
        if box_area <= best_key[0]:  # a contour's area is strictly below its bounding box's
            break
        crop = np.zeros((r1 - r0 + 2, c1 - c0 + 2), dtype=bool)  # 1 px margin keeps the outside connected
        for r, s, e in rr:
            crop[r - r0 + 1, s - c0 + 1 : e - c0 + 1] = True
        filled = _fill_holes(crop)
        key = (_contour_area(filled), *first)  # ties: OpenCV lists (and max() keeps) the last-starting contour first
        if key > best_key:
            best_key, best = key, (r0, r1, c0, c1, filled[1:-1, 1:-1])
    r0, r1, c0, c1, filled = best
    out[r0:r1, c0:c1] = filled
    return out


def clean_mask(mask: ImageRef | np.ndarray) -> Image.Image:
    """Clean a foreground mask as the reference ``fg`` evaluation does (spec section 2.3).

    Gaussian blur 5x5 (OpenCV kernel [1 4 6 4 1]/16, reflect-101 border) -> threshold > 10 -> morphological close then
    open with a 5x5 square -> keep the largest external contour (by polygon area), filled. Implemented with numpy only
    (no OpenCV dependency).

    Args:
        mask: path, PIL image (any mode; converted to L) or [H, W] array.

    Returns:
        Binary mask, PIL mode L with values 0 / 255, same size as the input (all 0 if nothing survives).
    """
    a = np.asarray(mask) if isinstance(mask, np.ndarray) else np.asarray(open_image(mask, "L"))
    if a.ndim == 3:
        a = a[..., :3].mean(-1)
    a = np.clip(a, 0, 255).astype(np.uint8)
    m = _blur5(a) > 10
    m = _erode5(_dilate5(m))  # close
    m = _dilate5(_erode5(m))  # open
    m = _largest_component_filled(m)
    return Image.fromarray(np.where(m, 255, 0).astype(np.uint8), "L")


def apply_mask(image: ImageRef, mask: ImageRef | np.ndarray) -> Image.Image:
    """Keep the foreground (mask > 0) of ``image`` and fill the background black.

    The mask is resized to the image with nearest-neighbour when sizes differ. For NearID-Bench ``fg`` the mask of
    positive view ``j`` is applied to view ``j`` and to every distractor of slot ``j`` (same background).
    """
    img = open_image(image, "RGB")
    m = Image.fromarray(np.asarray(mask).astype(np.uint8)) if isinstance(mask, np.ndarray) else open_image(mask, "L")
    if m.size != img.size:
        m = m.resize(img.size, Image.NEAREST)
    keep = np.asarray(m) > 0
    out = np.asarray(img).copy()
    out[~keep] = 0
    return Image.fromarray(out, "RGB")
