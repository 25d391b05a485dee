"""Embeddings on disk: `nearid embed`'s outputs (one file, or a folder of resumable shards) and their loader.

A shard folder (``nearid embed ... --shard-size N -o FOLDER``) holds::

    manifest.json                 model fingerprint, shard size, number of inputs, a digest of the ordered sources,
                                  and, once every shard is written, "complete": true with the rows of each shard
    shard-00000.safetensors ...   "embeddings" [rows, D] float32 of inputs k*N .. (k+1)*N - 1; the metadata lists
                                  the source of each row ("files"), as the single-file output does

Shards are written atomically, so a killed run never leaves a partial shard; a rerun of the same command computes
only the missing ones. Under ``accelerate launch`` shard k is written by process k % num_processes
(`shards_for_process`) and the main process writes the manifest once every process is done.

A streamed dataset (``--dataset NAME --streaming``, `StreamedImages`) has no length until it ends: it is read in order
and embedded `STREAM_CHUNK` rows at a time, its shards written one after another by one process. A rerun continues
after the last of the consecutive shards 0, 1, ... on disk, re-reading (not decoding) the rows before it, so it is
exact only if the stream yields the same rows in the same order (the same data files or hub revision, no shuffle);
the manifest can check the name, split and column, not the content.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import torch

from .cli import UsageError, sidecar_path, write_atomic
from .feature_cache import HubImage

MANIFEST = "manifest.json"
FORMAT = "nearid-embedding-shards"
#: Manifest fields that must match for a rerun to continue a folder.
IDENTITY_FIELDS = ("fingerprint", "shard_size", "inputs", "sources_sha256")
#: Rows of a streamed dataset held (undecoded) and embedded at a time: bounds the memory a large --shard-size needs.
STREAM_CHUNK = 1024


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-00000.safetensors, ..."""
    return f"shard-{index:05d}.safetensors"


def shard_count(n_inputs: int, shard_size: int) -> int:
    """How many shards `n_inputs` inputs make with `shard_size` inputs per shard."""
    return -(-n_inputs // shard_size)


def shards_for_process(n_shards: int, process_index: int, num_processes: int) -> list[int]:
    """The shards process `process_index` of `num_processes` writes: k with k % num_processes == process_index."""
    if num_processes < 1 or not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes}); got {process_index}")
    return list(range(process_index, n_shards, num_processes))


def sources_digest(sources: Sequence[str]) -> str:
    """SHA-256 of the ordered source list (one per line), so a manifest names its inputs without listing them."""
    digest = hashlib.sha256()
    for source in sources:
        digest.update(source.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Writing


def save_safetensors(path: Path, embeddings: torch.Tensor, sources: Sequence[str], **metadata: str) -> None:
    """Write [N, D] `embeddings` atomically to a .safetensors file whose metadata names each row's source
    (``files``, a JSON list) plus `metadata`."""
    from safetensors.torch import save_file

    meta = {"files": json.dumps([str(s) for s in sources]), **metadata}
    write_atomic(path, lambda tmp: save_file({"embeddings": embeddings.contiguous()}, str(tmp), metadata=meta))


@dataclass
class Processes:
    """This process's place among the processes of a run (one, unless started with ``accelerate launch``)."""

    index: int = 0
    count: int = 1
    wait: Callable[[], None] = field(default=lambda: None)
    device: Any = None

    @property
    def is_main(self) -> bool:
        return self.index == 0


def current_processes() -> Processes:
    """The accelerate process group when launched with several processes (WORLD_SIZE > 1), else one process."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    return Processes(state.process_index, state.num_processes, state.wait_for_everyone, state.device)


def read_manifest(folder: Path) -> dict | None:
    """The manifest of a shard folder, or None when it has none."""
    path = folder / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UsageError(f"{path} is not a readable shard manifest ({err}); remove it or choose another --output") \
            from err


def check_folder(folder: Path, identity: dict) -> None:
    """Refuse a folder that holds shards of other inputs, another model or another shard size.

    Raises:
        UsageError: naming what differs and the fix.
    """
    manifest = read_manifest(folder)
    if manifest is None:
        if any(folder.glob("shard-*.safetensors")):
            raise UsageError(f"--output {folder} holds shard files but no {MANIFEST}; remove them or choose another "
                             "--output folder")
        return
    differs = [k for k in IDENTITY_FIELDS if manifest.get(k) != identity[k]]
    if differs:
        what = {"fingerprint": "model", "shard_size": "--shard-size", "inputs": "number of inputs",
                "sources_sha256": "inputs"}
        named = list(dict.fromkeys(what[k] for k in differs))
        verb = "differs" if len(named) == 1 else "differ"
        raise UsageError(f"--output {folder} holds shards of a different run ({', '.join(named)} {verb}: "
                         + "; ".join(f"{k} {manifest.get(k)!r} there, {identity[k]!r} now" for k in differs
                                     if k != "sources_sha256")
                         + "). Rerun with the same inputs, model and --shard-size to continue it, or choose another "
                           "--output folder (or delete this one) to start afresh")


def write_shards(
    folder: Path,
    items: Sequence[Any],
    identity: dict,
    embed: Callable[[Sequence[Any]], tuple[torch.Tensor, list, list]],
    processes: Processes,
    model: str,
) -> dict:
    """Embed the missing shards of `folder` that are this process's, then (main process) write the final manifest.

    Args:
        items: what `embed` reads (paths or `DatasetImage` cells), in order; str(item) is its row's source.
        identity: fingerprint, shard_size, inputs, sources_sha256 (see `check_folder`, called first).
        embed: items -> (embeddings, items embedded, [(item, reason)] skipped), e.g. `NearIDScorer.embed_files`.

    Returns:
        {"written": shards this process wrote, "kept": shards it found complete, "skipped": [(source, reason)],
         "manifest": the final manifest (main process) or None}.
    """
    size = identity["shard_size"]
    n_shards = shard_count(len(items), size)
    check_folder(folder, identity)
    processes.wait()
    if processes.is_main and read_manifest(folder) is None:
        _write_manifest(folder, {**identity, "complete": False}, model, n_shards)
    processes.wait()
    written, kept, skipped = [], [], []
    for k in shards_for_process(n_shards, processes.index, processes.count):
        path = folder / shard_name(k)
        if path.is_file():
            kept.append(k)
            continue
        part = items[k * size:(k + 1) * size]
        embeddings, done, missed = embed(part)
        skipped += [(str(item), reason) for item, reason in missed]
        save_safetensors(path, embeddings.cpu(), [str(item) for item in done], model=model,
                         fingerprint=identity["fingerprint"], shard=str(k))
        written.append(k)
    processes.wait()
    manifest = None
    if processes.is_main:
        rows = [_shard_rows(folder / shard_name(k)) for k in range(n_shards)]
        manifest = _write_manifest(folder, {**identity, "complete": True, "rows": sum(rows), "shard_rows": rows},
                                   model, n_shards)
    return {"written": written, "kept": kept, "skipped": skipped, "manifest": manifest}


def write_stream_shards(
    folder: Path,
    images: "StreamedImages",
    identity: dict,
    embed: Callable[[Sequence[Any]], tuple[torch.Tensor, list, list]],
    model: str,
) -> dict:
    """Embed a streamed dataset into the shards of `folder` in order (one process), continuing after the consecutive
    shards already there, then write the final manifest. Arguments and result as `write_shards`."""
    size = identity["shard_size"]
    check_folder(folder, identity)
    manifest = read_manifest(folder)
    if manifest is not None and manifest.get("complete"):
        return {"written": [], "kept": list(range(manifest["shards"])), "skipped": [], "manifest": manifest}
    if manifest is None:
        _write_manifest(folder, {**identity, "complete": False}, model, None)
    kept = 0
    while (folder / shard_name(kept)).is_file():
        kept += 1
    rows = images.rows(start=kept * size)
    written, skipped, k = [], [], kept
    while True:
        embeddings, done, missed = embed_stream(embed, islice(rows, size))
        if not done and not missed:
            break
        skipped += [(str(item), reason) for item, reason in missed]
        save_safetensors(folder / shard_name(k), embeddings.cpu(), [str(item) for item in done], model=model,
                         fingerprint=identity["fingerprint"], shard=str(k))
        written.append(k)
        k += 1
        if len(done) + len(missed) < size:  # the stream has ended
            break
    shard_rows = [_shard_rows(folder / shard_name(i)) for i in range(k)]
    manifest = _write_manifest(folder, {**identity, "complete": True, "rows": sum(shard_rows),
                                        "shard_rows": shard_rows}, model, k)
    return {"written": written, "kept": list(range(kept)), "skipped": skipped, "manifest": manifest}


def embed_stream(embed: Callable[[Sequence[Any]], tuple[torch.Tensor, list, list]],
                 rows: Iterator[Any]) -> tuple[torch.Tensor, list, list]:
    """`embed` over `rows` `STREAM_CHUNK` at a time (each chunk decoded by `embed`'s workers), results joined:
    (embeddings, items embedded, [(item, reason)] skipped)."""
    parts, done, missed = [], [], []
    while chunk := list(islice(rows, STREAM_CHUNK)):
        embeddings, kept, skipped = embed(chunk)
        parts.append(embeddings.cpu())
        done += kept
        missed += skipped
    return (torch.cat(parts) if parts else torch.empty(0, 0)), done, missed


def _write_manifest(folder: Path, fields: dict, model: str, n_shards: int | None) -> dict:
    manifest = {"format": FORMAT, "version": 1, "model": model, **fields, "shards": n_shards}
    write_atomic(folder / MANIFEST, lambda tmp: tmp.write_text(json.dumps(manifest, indent=2)))
    return manifest


def _shard_rows(path: Path) -> int:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return int(f.get_slice("embeddings").get_shape()[0])


# --------------------------------------------------------------------------------------------------------------------
# Reading


def load_embeddings(path: str | os.PathLike) -> tuple[torch.Tensor, list[str]]:
    """Load what `nearid embed` wrote: (embeddings [N, D] float32, the source of each row).

    `path` is a .safetensors file, a .npy file (sources from its ``<file>.json`` sidecar) or a shard folder (written
    with ``--shard-size``; its shards concatenated in order).

    Raises:
        FileNotFoundError: `path` (or a shard, or a sidecar) does not exist.
        ValueError: a shard folder whose run has not finished, or a file without row sources.
    """
    path = Path(path)
    if path.is_dir():
        manifest = read_manifest(path)
        if manifest is None:
            raise FileNotFoundError(f"{path} is a folder without {MANIFEST}: not a `nearid embed --shard-size` output")
        if not manifest.get("complete"):
            raise ValueError(f"{path}: the run that writes these shards has not finished; rerun the same "
                             "`nearid embed` command to complete it")
        parts = [_read_safetensors(path / shard_name(k)) for k in range(manifest["shards"])]
        embeddings = torch.cat([e for e, _ in parts]) if parts else torch.empty(0, 0)
        return embeddings, [s for _, sources in parts for s in sources]
    if path.suffix.lower() == ".npy":
        import numpy as np

        sources = json.loads(sidecar_path(path).read_text())["files"]
        return torch.from_numpy(np.load(path)), sources
    return _read_safetensors(path)


def _read_safetensors(path: Path) -> tuple[torch.Tensor, list[str]]:
    from safetensors import safe_open

    if not path.is_file():
        raise FileNotFoundError(f"embeddings file not found: {path}")
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        if "files" not in metadata:
            raise ValueError(f"{path} has no row sources (metadata 'files'): not written by `nearid embed`")
        return f.get_tensor("embeddings"), json.loads(metadata["files"])


# --------------------------------------------------------------------------------------------------------------------
# Hugging Face datasets as input


@dataclass(frozen=True, repr=False)
class DatasetImage(HubImage):
    """One image cell of a ``datasets.Dataset``, read only when embedded; str() is its row's source, NAME:SPLIT:ROW."""

    prefix: str = ""

    def __str__(self) -> str:
        return f"{self.prefix}:{self.row}"


class DatasetImages(Sequence[DatasetImage]):
    """The cells of one image column of a dataset as a lazy sequence: nothing is decoded until embedded (the Arrow
    table is memory-mapped), so a dataset larger than memory is embedded shard by shard."""

    def __init__(self, dataset: Any, column: str, prefix: str) -> None:
        import datasets

        self.dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column, self.prefix = column, prefix
        self.fingerprint = str(getattr(dataset, "_fingerprint", "") or "")

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k):  # type: ignore[override]
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(k)
        return DatasetImage(self.dataset, self.fingerprint, k % len(self), self.column, self.prefix)

    def digest(self) -> str:
        """Stands for the ordered source list in a manifest: name, split, column, rows and the dataset's fingerprint."""
        return sources_digest([json.dumps({"dataset": self.prefix, "column": self.column, "rows": len(self),
                                           "fingerprint": self.fingerprint})])


@dataclass(frozen=True, repr=False)
class StreamedImage(DatasetImage):
    """One image cell of a streamed dataset, its raw cell (bytes or path) held until it is embedded."""

    cell: Any = None

    def value(self) -> Any:
        return self.cell


class StreamedImages:
    """The cells of one image column of a streamed ``datasets.IterableDataset``, read in order as they are embedded
    (nothing is downloaded ahead); row k's source is NAME:SPLIT:k, as for `DatasetImages`."""

    def __init__(self, dataset: Any, column: str, prefix: str) -> None:
        import datasets

        self.dataset = dataset.select_columns([column]).cast_column(column, datasets.Image(decode=False))
        self.column, self.prefix = column, prefix

    def rows(self, start: int = 0) -> Iterator[StreamedImage]:
        """The cells from row `start` on; the rows before it are read and dropped, not decoded."""
        stream = self.dataset.skip(start) if start else self.dataset
        for row, example in enumerate(stream, start=start):
            yield StreamedImage(None, "", row, self.column, self.prefix, cell=example[self.column])

    def digest(self) -> str:
        """Stands for the sources in a manifest: name, split, column, and that they were streamed."""
        return sources_digest([json.dumps({"dataset": self.prefix, "column": self.column, "streaming": True})])


def load_image_dataset(name: str, split: str, column: str,
                       streaming: bool = False) -> DatasetImages | StreamedImages:
    """The `column` images of a dataset: a folder saved with ``save_to_disk`` (``datasets.load_from_disk``), else
    anything ``datasets.load_dataset`` reads (a hub name, a local data folder); with `streaming`, the latter read as
    a stream (``load_dataset(..., streaming=True)``).

    Raises:
        UsageError: `datasets` missing, a dataset that cannot be loaded (offline hub name), a missing split or column,
            `streaming` for a ``save_to_disk`` folder.
    """
    try:
        import datasets
    except ImportError as err:
        raise UsageError("--dataset needs the `datasets` library: pip install 'nearid-toolkit[eval]'") from err
    local = Path(name)
    saved = local.is_dir() and ((local / "state.json").is_file() or (local / "dataset_dict.json").is_file())
    if streaming and saved:
        raise UsageError(f"--dataset {name} is a save_to_disk folder, read memory-mapped without downloading: drop "
                         "--streaming (it is for hub names and data folders)")
    try:
        if streaming:
            dataset = datasets.load_dataset(name, split=split, streaming=True)
        elif saved:
            dataset = datasets.load_from_disk(str(local))
            if isinstance(dataset, datasets.DatasetDict):
                if split not in dataset:
                    raise UsageError(f"--dataset {name} has no split {split!r}; its splits: {', '.join(dataset)}")
                dataset = dataset[split]
        else:
            dataset = datasets.load_dataset(name, split=split)
    except UsageError:
        raise
    except Exception as err:  # offline, unknown name, gated, a missing split ... all mean the same here
        raise UsageError(
            f"cannot load --dataset {name} (split {split!r}): {err}. A hub dataset needs the network or the "
            "datasets cache (HF_HUB_OFFLINE=1 reads only the cache, without retries); offline, download it elsewhere "
            "and pass the folder written by `save_to_disk`") from err
    if dataset.features is not None:  # a stream may not know its features before it is read
        if column not in dataset.features:
            raise UsageError(f"--dataset {name} has no column {column!r}; its columns: {', '.join(dataset.features)} "
                             "(choose one with --image-column)")
        if not isinstance(dataset.features[column], datasets.Image):
            raise UsageError(f"column {column!r} of --dataset {name} holds {dataset.features[column]}, not images")
    return (StreamedImages if streaming else DatasetImages)(dataset, column, f"{name}:{split}")
