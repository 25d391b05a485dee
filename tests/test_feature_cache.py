"""Feature-cache integrity: damaged shards are refused with an error naming the file and the fix, never read."""

from __future__ import annotations

import pickle
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import nearid_core.feature_cache as feature_cache
from nearid_core.feature_cache import FeatureCache, FeatureCacheError

NS = {"backbone": "b", "preprocess": {"size": 56}}
SHAPE = (4, 8)
ROW_BYTES = SHAPE[0] * SHAPE[1] * 2  # float16


def _keys(n: int, start: int = 0) -> list[str]:
    return [f"{i:040x}" for i in range(start, start + n)]


@pytest.fixture
def filled(tmp_path) -> tuple[Path, torch.Tensor]:
    """A cache root with 5 fp16 entries in shards of 3 rows (shard 0 full, shard 1 with 2 rows)."""
    tokens = torch.randn(5, *SHAPE, generator=torch.Generator().manual_seed(0))
    FeatureCache(tmp_path, NS, SHAPE, shard_size=3).put(_keys(5), tokens)
    return tmp_path, tokens.half()


def _shard(root: Path, index: int = 0) -> Path:
    return next(root.glob(f"*/r0/shard-{index:05d}.npy"))


def _read(root: Path, keys: list[str] | None = None) -> torch.Tensor:
    return FeatureCache(root, NS, SHAPE, shard_size=3).tokens(keys or _keys(5))


def test_intact_cache_reads_back_and_index_lines_carry_checksums(filled):
    root, tokens = filled
    assert torch.equal(_read(root), tokens)
    lines = next(root.glob("*/r0/index.tsv")).read_text().splitlines()
    key, shard, row, crc, end = lines[1].split("\t")
    assert (shard, row, end) == ("0", "1", ".")
    assert int(crc, 16) == zlib.crc32(tokens[1].numpy().tobytes())


def _zero_rows(path: Path) -> None:
    data = path.read_bytes()
    header = len(data) - 3 * ROW_BYTES
    path.write_bytes(data[:header] + bytes(3 * ROW_BYTES))


def _zero_file(path: Path) -> None:
    path.write_bytes(bytes(path.stat().st_size))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) - 2 * ROW_BYTES + 7] ^= 0x40  # row 1 of 3
    path.write_bytes(bytes(data))


def _delete(path: Path) -> None:
    path.unlink()


@pytest.mark.parametrize("damage, problem", [
    (_zero_rows, r"3 of its 3 indexed rows \(row 0, 1, 2\) differ from the checksums"),
    (_zero_file, "has no .npy header"),
    (_truncate, r"is truncated \(\d+ bytes"),
    (_flip_byte, r"1 of its 3 indexed rows \(row 1\) differ from the checksums"),
    (_delete, "is missing, but the index lists entries in it"),
])
def test_damaged_shard_is_refused_naming_the_file_and_the_fix(filled, damage, problem):
    root, tokens = filled
    shard = _shard(root)
    damage(shard)
    with pytest.raises(FeatureCacheError, match=problem) as err:
        _read(root)
    message = str(err.value)
    assert str(shard) in message and f"Delete its writer folder {shard.parent}" in message
    assert "re-encodes the 5 images" in message
    assert torch.equal(_read(root, _keys(2, 3)), tokens[3:])  # the intact shard still reads
    # the fix works: without the writer folder the entries are missing and a fill writes them again
    shutil.rmtree(shard.parent)
    cache = FeatureCache(root, NS, SHAPE, shard_size=3)
    assert cache.missing(_keys(5)) == _keys(5)
    cache.put(_keys(5), tokens.float())
    assert torch.equal(_read(root), tokens)


def test_wrong_shape_and_short_shard_are_refused(filled):
    root, _ = filled
    shard = _shard(root, 1)
    np.save(shard, np.zeros((3, 4, 9), np.float16))
    with pytest.raises(FeatureCacheError, match=r"holds float16 \[3, 4, 9\], expected float16 \[rows, 4, 8\]"):
        _read(root)
    np.save(shard, np.zeros((1, 4, 8), np.float16))
    with pytest.raises(FeatureCacheError, match="has 1 rows, but its index lists row 1"):
        _read(root)


def test_each_row_is_checked_once_per_process(filled, monkeypatch):
    root, tokens = filled
    calls = []
    real = zlib.crc32
    monkeypatch.setattr(feature_cache.zlib, "crc32", lambda data: calls.append(1) or real(data))
    cache = FeatureCache(root, NS, SHAPE, shard_size=3)
    cache.tokens(_keys(5))
    assert len(calls) == 5
    cache.tokens(_keys(5)[::-1] + _keys(2))
    assert len(calls) == 5  # already verified: no second pass over the bytes
    worker = pickle.loads(pickle.dumps(cache))  # a DataLoader worker inherits what is verified
    assert torch.equal(worker.tokens(_keys(5)), tokens) and len(calls) == 5
    cache.refresh()
    cache.tokens(_keys(5))
    assert len(calls) == 5


def test_index_lines_without_checksums_still_read(filled, caplog):
    root, tokens = filled
    index = next(root.glob("*/r0/index.tsv"))
    old_lines = []
    for line in index.read_text().splitlines():
        key, shard, row, _crc, end = line.split("\t")
        old_lines.append(f"{key}\t{shard}\t{row}\t{end}\n")  # the format before checksums
    index.write_text("".join(old_lines))
    assert torch.equal(_read(root), tokens)  # written by an older version: file checks only, and a warning
    assert "5 entries were written without checksums" in caplog.text and "delete the folder" in caplog.text
    _truncate(_shard(root))
    with pytest.raises(FeatureCacheError, match="is truncated"):
        _read(root)


def test_resumed_fill_keeps_the_existing_shard_size(filled):
    root, tokens = filled
    cache = FeatureCache(root, NS, SHAPE, shard_size=8)
    assert cache.shard_size == 3
    more = torch.randn(4, *SHAPE)
    cache.put(_keys(4, 5), more)
    assert torch.equal(FeatureCache(root, NS, SHAPE).tokens(_keys(9)), torch.cat([tokens, more.half()]))
