"""Frozen-feature cache: backbone patch tokens computed once per image, stored in memory-mapped shards.

NearID trains only the MAP head on a frozen trunk, and the paper recipe uses no augmentation, so the trunk's output
tokens of every training image are constant for the whole run. :class:`FeatureCache` stores them once and training
then runs only ``model.pool`` (the head) on cached tokens -- the frozen SO400M forward (about 99.9 % of the reference
step's FLOPs) disappears from the training loop.

Keys. A cache entry is keyed by the **content** of the image, not by its name: ``sha256(namespace, sha256(image))``
where the image digest is the SHA-256 of the encoded file bytes (paths, hub images) or of the decoded pixels (PIL
images, arrays, tensors), and the namespace fingerprints everything else the tokens depend on: the preprocessing
(:class:`~nearid_core.preprocessing.PreprocessConfig`), the trunk weights (:func:`backbone_fingerprint`, weights *and*
compute dtype), the token shape and the storage dtype. Entries of different namespaces live in different
sub-folders of one cache root, so one root can serve several backbones.

On disk (``<root>/<namespace[:16]>/``)::

    namespace.json                    what the namespace fingerprints (human readable)
    <writer>/shard-00000.npy ...      [shard_size, N, C] tokens (numpy .npy, memory-mapped; bf16 stored as uint16)
    <writer>/index.tsv                one "key <TAB> shard <TAB> row <TAB> crc32 <TAB> ." line per entry, appended
                                      after the rows are flushed, so a crash never indexes a half-written row; lines
                                      that are not complete (cut by a crash, or being appended by another process) are
                                      ignored
    <root>/digests/<writer>.tsv       memo "reference id <TAB> image digest" (file path + size + mtime, or hub
                                      dataset fingerprint + row + column) so a resumed run does not re-read images

Each process writes only its own ``<writer>`` folder (``r0``, ``r1``, ... under ``accelerate launch``), so several
processes can fill one cache without locks; readers merge every writer's index. Filling is resumable: re-running it
encodes only the keys that are missing. The cache is never pruned; delete a namespace folder to drop it.

Integrity. Shards are not trusted blindly: opening one checks that it is a readable ``.npy`` file of the expected
dtype and token shape that holds every indexed row (a truncated or overwritten file), and every row is checked once
per process against the CRC-32 of its bytes recorded in its index line, when it is first read (the bytes are read
anyway, so this costs no I/O, only about 0.5 ms of CPU per 1.7 MB image). A damaged shard raises
:class:`FeatureCacheError` naming the file and the fix (delete its writer folder; the next fill re-encodes what it
held). Checksums are per row, not per shard, because a shard is filled row by row over many ``put`` calls; index
lines written before checksums existed (four fields) get the file checks only.

Size: ``N * C * 2`` bytes per image in fp16/bf16, i.e. 729 x 1152 x 2 = 1.68 MB for SO400M at 384 px (see
``benchmarks/train_step.py``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .preprocessing import PreprocessConfig, open_image, pil_to_tensor, preprocess_images, to_rgb

logger = logging.getLogger(__name__)

__all__ = [
    "CACHE_DTYPES",
    "FeatureCache",
    "FeatureCacheError",
    "HubImage",
    "backbone_fingerprint",
    "content_digest",
    "open_ref",
    "ref_id",
    "token_encoder",
]

#: Storage dtypes: name -> (torch dtype of returned tokens, numpy dtype on disk).
CACHE_DTYPES: dict[str, tuple[torch.dtype, Any]] = {
    "float16": (torch.float16, np.float16),
    "bfloat16": (torch.bfloat16, np.uint16),  # numpy has no bf16: raw bits, reinterpreted on read
    "float32": (torch.float32, np.float32),
}
_DTYPE_ALIASES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}
_INDEX = "index.tsv"
_KEY_LEN = 40  # hex characters of a cache key
_DIGEST_LEN = 65  # kind prefix + 64 hex characters of a content digest
_SHARD = "shard-{:05d}.npy"
_NPY_MAGIC = b"\x93NUMPY"


# --------------------------------------------------------------------------------------------------------------------
# Image references: what a record slot may hold, how to open it, how to fingerprint its content
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HubImage:
    """A lazy reference to one image cell of a Hugging Face ``datasets.Dataset`` loaded with ``Image(decode=False)``.

    Nothing is read until :meth:`load` (or a content digest) needs the bytes, so building training records over
    19k rows x 30 images costs nothing. ``fingerprint`` is the dataset's ``_fingerprint``: together with ``row`` and
    ``column`` it identifies the cell for the digest memo.
    """

    dataset: Any
    fingerprint: str
    row: int
    column: str

    def value(self) -> Any:
        """The raw cell: ``{"bytes": ..., "path": ...}`` (or None for an empty cell)."""
        return self.dataset[self.row][self.column]

    def load(self) -> Image.Image:
        value = self.value()
        if value is None:
            raise FileNotFoundError(f"hub image {self.column} of row {self.row} is empty")
        return open_ref(value)

    def __repr__(self) -> str:
        return f"HubImage({self.fingerprint[:8]}, row={self.row}, column={self.column!r})"


def open_ref(ref: Any) -> Image.Image:
    """Open any image reference as an RGB PIL image, as the scorer reads it (EXIF orientation, 16-bit scaling).

    Accepted: a file path, a PIL image, a :class:`HubImage`, a ``datasets`` raw image cell ``{"bytes", "path"}``,
    or an [H, W, 3] uint8 array.
    """
    if isinstance(ref, HubImage):
        return ref.load()
    if isinstance(ref, Image.Image):
        return to_rgb(ref)
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            return to_rgb(open_image(io.BytesIO(ref["bytes"])))
        if ref.get("path"):
            return open_ref(ref["path"])
        raise ValueError(f"image cell has neither bytes nor path: {sorted(ref)}")
    if isinstance(ref, (str, os.PathLike)):
        return to_rgb(open_image(ref))
    if isinstance(ref, np.ndarray):
        return to_rgb(Image.fromarray(ref))
    raise TypeError(f"unsupported image reference {type(ref).__name__}")


def ref_id(ref: Any) -> str | None:
    """A cheap identifier of a reference whose content cannot change unnoticed (for the digest memo), or None.

    Files: real path + size + modification time (ns). Hub cells: dataset fingerprint + row + column. In-memory images
    have no id and are hashed every time.
    """
    if isinstance(ref, HubImage):
        return f"hub:{ref.fingerprint}:{ref.row}:{ref.column}"
    if isinstance(ref, (str, os.PathLike)):
        path = os.path.realpath(ref)
        st = os.stat(path)
        return f"file:{path}:{st.st_size}:{st.st_mtime_ns}"
    return None


def _sha256(*parts: bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.hexdigest()


def content_digest(ref: Any) -> str:
    """SHA-256 of an image's content.

    Encoded images (files, hub cells) hash their bytes; decoded images hash mode, size and pixels (PIL) or dtype,
    shape and values (numpy / torch). The same file therefore has one digest wherever it lives, while a re-encoded
    copy of it gets another one (its decoded pixels may differ).
    """
    if isinstance(ref, HubImage):
        value = ref.value()
        if value is None:
            raise FileNotFoundError(f"{ref!r} is empty")
        return content_digest(value)
    if isinstance(ref, Mapping):
        if ref.get("bytes") is not None:
            return "b" + _sha256(ref["bytes"])
        return content_digest(ref["path"])
    if isinstance(ref, (str, os.PathLike)):
        return "b" + _sha256(Path(ref).read_bytes())
    if isinstance(ref, Image.Image):
        return "p" + _sha256(ref.mode.encode(), repr(ref.size).encode(), ref.tobytes())
    if isinstance(ref, (np.ndarray, torch.Tensor)):
        arr = ref.detach().cpu().numpy() if isinstance(ref, torch.Tensor) else ref
        arr = np.ascontiguousarray(arr)
        return "a" + _sha256(str(arr.dtype).encode(), repr(arr.shape).encode(), arr.tobytes())
    raise TypeError(f"unsupported image reference {type(ref).__name__}")


def backbone_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 over the frozen trunk of a NearID model: tower config, and every trunk tensor's name, dtype, shape and
    values (the MAP head is excluded: it is what training changes). About 1 s per GB of weights."""
    tower = model._tower if hasattr(model, "_tower") else model
    h = hashlib.sha256()
    config = getattr(getattr(model, "config", None), "vision_config", None)
    if config is not None:
        h.update(json.dumps(config.to_dict(), sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        if name.startswith("head."):
            continue
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def token_encoder(
    model: torch.nn.Module, preprocess_config: PreprocessConfig, device: torch.device | str | None = None
) -> Callable[[Sequence[Any]], torch.Tensor]:
    """``encode(refs) -> [B, N, C]`` trunk tokens: open, preprocess (the checkpoint's transform), run
    ``model.encode_tokens`` under inference mode in the model's dtype."""
    tower = model._tower if hasattr(model, "_tower") else model
    param = tower.embeddings.patch_embedding.weight  # the trunk's dtype (the head may be fp32 master weights)
    device = torch.device(device) if device is not None else param.device

    @torch.inference_mode()
    def encode(refs: Sequence[Any]) -> torch.Tensor:
        images = [pil_to_tensor(open_ref(r)) for r in refs]
        pixels = preprocess_images(images, preprocess_config).to(device=device, dtype=param.dtype)
        return model.encode_tokens(pixels)

    return encode


# --------------------------------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------------------------------


class FeatureCacheError(ValueError):
    """A feature-cache shard is missing, truncated, of the wrong shape, or holds rows whose bytes do not match the
    checksums recorded when they were written. The message names the file and the fix."""


def _dtype_name(dtype: str | torch.dtype) -> str:
    if isinstance(dtype, torch.dtype):
        for name, (td, _) in CACHE_DTYPES.items():
            if td == dtype:
                return name
        raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)}, got {dtype}")
    name = _DTYPE_ALIASES.get(dtype, dtype)
    if name not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {sorted(CACHE_DTYPES)} (or fp16/bf16/fp32), got {dtype!r}")
    return name


class FeatureCache:
    """Content-keyed store of trunk tokens [N, C] in memory-mapped shard files (see the module docstring).

    Args:
        root: cache root folder (created).
        namespace: JSON-able description of everything the tokens depend on besides the image (preprocessing,
            backbone fingerprint, ...); :meth:`for_model` builds it.
        token_shape: (N, C) tokens per image.
        dtype: storage dtype, ``float16`` (default), ``bfloat16`` or ``float32``.
        shard_size: entries per shard file.
        writer: this process's writer folder name (one per concurrently writing process).
    """

    def __init__(
        self,
        root: str | os.PathLike,
        namespace: Mapping[str, Any],
        token_shape: tuple[int, int],
        dtype: str | torch.dtype = "float16",
        shard_size: int = 1024,
        writer: str = "r0",
    ) -> None:
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.root = Path(root)
        self.dtype_name = _dtype_name(dtype)
        self.torch_dtype, self._np_dtype = CACHE_DTYPES[self.dtype_name]
        self.token_shape = (int(token_shape[0]), int(token_shape[1]))
        self.shard_size = int(shard_size)
        self.writer = str(writer)
        full = {**dict(namespace), "token_shape": list(self.token_shape), "dtype": self.dtype_name}
        self.namespace = full
        self.fingerprint = _sha256(json.dumps(full, sort_keys=True, default=str).encode())
        self.directory = self.root / self.fingerprint[:16]
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = self.directory / "namespace.json"
        if not meta.exists():
            tmp = meta.with_name(f"namespace.json.tmp{os.getpid()}")
            tmp.write_text(json.dumps(full, indent=2, sort_keys=True, default=str))
            os.replace(tmp, meta)
        self._entries: dict[str, tuple[str, int, int]] = {}
        self._crc: dict[str, int] = {}  # key -> CRC-32 of its row bytes, as written (absent for old index lines)
        self._verified: set[str] = set()  # keys whose row this process has checked against its CRC (or written)
        self._extent: dict[tuple[str, int], int] = {}  # (writer, shard) -> 1 + the highest indexed row in it
        self._warned_unchecked = False
        self._own_rows = 0
        self._maps: dict[tuple[str, int], np.memmap] = {}
        self._adopt_shard_size()
        self._digests: dict[str, str] = {}
        self._digest_file = self.root / "digests" / f"{self.writer}.tsv"
        self.refresh()

    @classmethod
    def for_model(
        cls,
        root: str | os.PathLike,
        model: torch.nn.Module,
        preprocess_config: PreprocessConfig,
        dtype: str | torch.dtype = "float16",
        backbone_id: str | None = None,
        **kwargs: Any,
    ) -> "FeatureCache":
        """A cache for a NearID model's trunk and preprocessing.

        Args:
            backbone_id: precomputed :func:`backbone_fingerprint` (computed here when None).
            **kwargs: ``shard_size``, ``writer``.
        """
        vision = model.config.vision_config
        n_tokens = (vision.image_size // vision.patch_size) ** 2
        namespace = {
            "backbone": backbone_id or backbone_fingerprint(model),
            "preprocess": preprocess_config.to_dict(),
            "format": "nearid-feature-cache/1",
        }
        return cls(root, namespace, (n_tokens, vision.hidden_size), dtype, **kwargs)

    # ---------------------------------------------------------------- state, pickling (DataLoader workers)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state

    def _adopt_shard_size(self) -> None:
        """Keep the row count of this writer's existing shards: rows are addressed by ``shard * shard_size + row``,
        so a resumed fill with another ``shard_size`` would run past the end of the old shards."""
        first = self.directory / self.writer / _SHARD.format(0)
        try:
            rows = int(np.load(first, mmap_mode="r").shape[0])
        except (OSError, ValueError, EOFError, IndexError):
            return  # no shard yet, or a damaged one: reported when it is read
        if rows != self.shard_size:
            logger.info("feature cache %s: keeping the existing shard size %d (not %d)", first.parent, rows,
                        self.shard_size)
            self.shard_size = rows

    def refresh(self) -> None:
        """Re-read every writer's index (entries written by other processes become visible) and the digest memo."""
        entries: dict[str, tuple[str, int, int]] = {}
        crc: dict[str, int] = {}
        extent: dict[tuple[str, int], int] = {}
        own = 0
        for index in sorted(self.directory.glob(f"*/{_INDEX}")):
            writer = index.parent.name
            for line in index.read_text().split("\n")[:-1]:  # the text after the last newline may be incomplete
                parts = line.split("\t")
                if len(parts) not in (4, 5) or parts[-1] != "." or len(parts[0]) != _KEY_LEN:
                    continue  # a line cut by a crash
                try:
                    key, shard, row = parts[0], int(parts[1]), int(parts[2])
                    checksum = int(parts[3], 16) if len(parts) == 5 else None
                except ValueError:
                    continue
                if writer == self.writer:  # every own line counts, also one whose key another writer also has
                    own = max(own, shard * self.shard_size + row + 1)
                if key in entries:
                    continue
                entries[key] = (writer, shard, row)
                extent[(writer, shard)] = max(extent.get((writer, shard), 0), row + 1)
                if checksum is not None:
                    crc[key] = checksum
        self._entries, self._crc, self._extent, self._own_rows = entries, crc, extent, own
        unchecked = len(entries) - len(crc)
        if unchecked and not self._warned_unchecked:
            self._warned_unchecked = True
            logger.warning("feature cache %s: %d entries were written without checksums (by an older version), so "
                           "only their shard files are checked, not their bytes; delete the folder to rebuild it "
                           "with checksums", self.directory, unchecked)
        digests_dir = self.root / "digests"
        if digests_dir.is_dir():
            for memo in sorted(digests_dir.glob("*.tsv")):
                for line in memo.read_text().split("\n")[:-1]:
                    parts = line.split("\t")
                    if len(parts) == 2 and len(parts[1]) == _DIGEST_LEN:
                        self._digests.setdefault(parts[0], parts[1])

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    @property
    def bytes_per_entry(self) -> int:
        """Bytes of one image's tokens on disk (the index adds ~60 bytes)."""
        return self.token_shape[0] * self.token_shape[1] * np.dtype(self._np_dtype).itemsize

    # ---------------------------------------------------------------- keys

    def digest(self, ref: Any) -> str:
        """Content digest of a reference, through the persistent memo when the reference has an id."""
        rid = ref_id(ref)
        if rid is not None and rid in self._digests:
            return self._digests[rid]
        digest = content_digest(ref)
        if rid is not None:
            self._digests[rid] = digest
            self._digest_file.parent.mkdir(parents=True, exist_ok=True)
            with open(self._digest_file, "a") as f:
                f.write(f"{rid}\t{digest}\n")
        return digest

    def key_of_digest(self, digest: str) -> str:
        return _sha256(self.fingerprint.encode(), b":", digest.encode())[:_KEY_LEN]

    def key(self, ref: Any) -> str:
        """Cache key of an image reference: sha256(namespace fingerprint, content digest), 40 hex characters."""
        return self.key_of_digest(self.digest(ref))

    def missing(self, keys: Iterable[str]) -> list[str]:
        """The distinct keys (in first-seen order) that have no entry yet."""
        seen: set[str] = set()
        out = []
        for k in keys:
            if k not in self._entries and k not in seen:
                seen.add(k)
                out.append(k)
        return out

    # ---------------------------------------------------------------- read

    def _shard(self, writer: str, shard: int, writable: bool = False) -> np.memmap:
        """The memory map of one shard, opened (and checked: readable, dtype, token shape, every indexed row
        present) on first use."""
        handle = self._maps.get((writer, shard))
        if handle is None or (writable and not handle.flags.writeable):
            path = self.directory / writer / _SHARD.format(shard)
            if writable and not path.exists():
                path.parent.mkdir(parents=True, exist_ok=True)
                handle = np.lib.format.open_memmap(
                    path, mode="w+", dtype=self._np_dtype, shape=(self.shard_size, *self.token_shape)
                )
            else:
                handle = self._open_shard(path, writer, shard, writable)
            self._maps[(writer, shard)] = handle
        return handle

    def _open_shard(self, path: Path, writer: str, shard: int, writable: bool) -> np.memmap:
        needed = self._extent.get((writer, shard), 0)
        try:
            with open(path, "rb") as f:
                magic = f.read(len(_NPY_MAGIC))
        except FileNotFoundError:
            raise self._damaged(path, "is missing, but the index lists entries in it") from None
        if magic != _NPY_MAGIC:
            raise self._damaged(path, "has no .npy header (the file was overwritten)")
        try:
            handle = np.load(path, mmap_mode="r+" if writable else "r")
        except (OSError, ValueError, EOFError) as err:
            raise self._damaged(path, f"is truncated ({path.stat().st_size} bytes; a shard of {self.shard_size} rows "
                                      f"has more than {self.shard_size * self.bytes_per_entry}): {err}") from None
        if handle.dtype != self._np_dtype or tuple(handle.shape[1:]) != self.token_shape or handle.ndim != 3:
            raise self._damaged(path, f"holds {handle.dtype} {list(handle.shape)}, expected {self._np_dtype.__name__} "
                                      f"[rows, {self.token_shape[0]}, {self.token_shape[1]}]")
        if needed > handle.shape[0]:
            raise self._damaged(path, f"has {handle.shape[0]} rows, but its index lists row {needed - 1}")
        return handle

    def _damaged(self, path: Path, problem: str) -> FeatureCacheError:
        writer = path.parent
        n = sum(w == writer.name for w, _, _ in self._entries.values())
        return FeatureCacheError(
            f"feature cache shard {path} {problem}. Delete its writer folder {writer} (the next fill or training run "
            f"re-encodes the {n} images it held), or the whole cache folder {self.directory}, and run again.")

    def _verify(self, keys: Sequence[str], out: np.ndarray) -> None:
        """Check each row read (``out[i]`` = row of ``keys[i]``) against its recorded CRC, once per key and process."""
        for i, key in enumerate(keys):
            expected = self._crc.get(key)
            if expected is None or key in self._verified:
                continue
            if zlib.crc32(out[i]) != expected:
                writer, shard, _ = self._entries[key]
                raise self._bad_rows(writer, shard)
            self._verified.add(key)

    def _bad_rows(self, writer: str, shard: int) -> FeatureCacheError:
        """The error for a shard with rows that fail their checksum (all its rows are checked, to report how many)."""
        data = self._shard(writer, shard)
        checked = [(r, self._crc[k]) for k, (w, s, r) in self._entries.items() if w == writer and s == shard
                   and k in self._crc]
        bad = sorted(r for r, crc in checked if zlib.crc32(np.ascontiguousarray(data[r])) != crc)
        shown = ", ".join(map(str, bad[:5])) + (", ..." if len(bad) > 5 else "")
        return self._damaged(self.directory / writer / _SHARD.format(shard),
                             f"is damaged: {len(bad)} of its {len(checked)} indexed rows (row {shown}) differ from the "
                             "checksums recorded when they were written (the file was overwritten or corrupted)")

    def tokens(self, keys: Sequence[str]) -> torch.Tensor:
        """Tokens of ``keys`` as one [len(keys), N, C] tensor in the storage dtype (CPU; duplicates allowed).

        Raises:
            KeyError: naming the first missing key and how many are missing.
            FeatureCacheError: a shard is missing, truncated or overwritten, or a row fails its checksum.
        """
        out = np.empty((len(keys), *self.token_shape), dtype=self._np_dtype)
        groups: dict[tuple[str, int], tuple[list[int], list[int]]] = {}
        for i, key in enumerate(keys):
            entry = self._entries.get(key)
            if entry is None:
                n_missing = sum(k not in self._entries for k in keys)
                raise KeyError(f"{n_missing} key(s) not in the feature cache {self.directory}, e.g. {key!r}; "
                               "fill it first (FeatureCache.fill)")
            dest, rows = groups.setdefault(entry[:2], ([], []))
            dest.append(i)
            rows.append(entry[2])
        for (writer, shard), (dest, rows) in groups.items():
            data = self._shard(writer, shard)
            order = np.argsort(rows, kind="stable")  # ascending rows read the memmap sequentially
            out[np.asarray(dest)[order]] = data[np.asarray(rows)[order]]
        self._verify(keys, out)
        tensor = torch.from_numpy(out)
        return tensor.view(torch.bfloat16) if self.dtype_name == "bfloat16" else tensor

    # ---------------------------------------------------------------- write

    def put(self, keys: Sequence[str], tokens: torch.Tensor) -> int:
        """Store [len(keys), N, C] tokens under ``keys`` (keys already present are skipped). Returns entries added."""
        if tokens.shape[0] != len(keys) or tuple(tokens.shape[1:]) != self.token_shape:
            raise ValueError(f"expected tokens [{len(keys)}, {self.token_shape[0]}, {self.token_shape[1]}], "
                             f"got {tuple(tokens.shape)}")
        fresh: list[tuple[str, int]] = []
        seen: set[str] = set()
        for i, key in enumerate(keys):
            if key not in self._entries and key not in seen:  # first occurrence of duplicate keys
                seen.add(key)
                fresh.append((key, i))
        if not fresh:
            return 0
        data = tokens.detach().to("cpu", self.torch_dtype)
        if self.dtype_name == "bfloat16":
            array = data.view(torch.int16).numpy().view(np.uint16)
        else:
            array = data.numpy()
        lines, touched = [], set()
        for key, i in fresh:
            shard, row = divmod(self._own_rows, self.shard_size)
            handle = self._shard(self.writer, shard, writable=True)
            handle[row] = array[i]
            touched.add(shard)
            checksum = zlib.crc32(np.ascontiguousarray(array[i]))
            lines.append(f"{key}\t{shard}\t{row}\t{checksum:08x}\t.\n")
            self._entries[key] = (self.writer, shard, row)
            self._crc[key] = checksum
            self._verified.add(key)
            self._extent[(self.writer, shard)] = max(self._extent.get((self.writer, shard), 0), row + 1)
            self._own_rows += 1
        for shard in touched:
            self._maps[(self.writer, shard)].flush()
        index = self.directory / self.writer / _INDEX
        with open(index, "a+b") as f:
            f.seek(0, os.SEEK_END)
            if f.tell():
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":  # a line cut by a crash: terminate it so it stays a single bad line
                    lines.insert(0, "\n")
            f.write("".join(lines).encode())
            f.flush()
            os.fsync(f.fileno())
        return len(fresh)

    def fill(
        self,
        refs: Iterable[Any],
        encode: Callable[[Sequence[Any]], torch.Tensor],
        batch_size: int = 32,
        progress: bool = False,
        keys: Sequence[str] | None = None,
    ) -> int:
        """Encode and store every reference whose key is missing (resumable: present keys are skipped).

        Args:
            refs: image references (None entries are ignored).
            encode: ``encode(refs) -> [B, N, C]``, e.g. :func:`token_encoder`.
            batch_size: images per ``encode`` call.
            progress: show a progress bar.
            keys: precomputed keys of ``refs`` (same order), to skip hashing.

        Returns:
            Number of entries added.
        """
        from tqdm.auto import tqdm

        refs = list(refs)
        if keys is None:
            keys = [None if r is None else self.key(r) for r in refs]
        todo: dict[str, Any] = {}
        for ref, key in zip(refs, keys):
            if ref is not None and key not in self._entries and key not in todo:
                todo[key] = ref
        items = list(todo.items())
        added = 0
        with tqdm(total=len(items), desc="feature cache", unit="img", disable=not progress) as bar:
            for start in range(0, len(items), batch_size):
                chunk = items[start : start + batch_size]
                tokens = encode([r for _, r in chunk])
                added += self.put([k for k, _ in chunk], tokens)
                bar.update(len(chunk))
        return added
