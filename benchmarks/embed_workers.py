"""`NearIDScorer.embed_files` with 0 vs N decoding workers, at the real so400m size (random weights), in one
interleaved run.

Files are photo-sized JPEGs (default 3000x4000, like a phone camera), so decoding and resizing cost something next
to the model. Prints images/s per worker count (median) and the ratio to 0 workers (min and median over repeats).

    python benchmarks/embed_workers.py [--images 16] [--workers 0 1 2] [--repeats 2] [--dtype bf16]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from embed_throughput import random_so400m  # benchmarks/ is on sys.path when a script here runs
from nearid_core import NearIDScorer


def write_photos(directory: Path, n: int, size: tuple[int, int]) -> list[Path]:
    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32) / 200.0
    paths = []
    for i in range(n):
        base = np.stack([np.sin(xx * rng.uniform(0.5, 2) + c) * np.cos(yy * rng.uniform(0.5, 2)) for c in range(3)], -1)
        paths.append(directory / f"photo{i:03d}.jpg")
        Image.fromarray(((base * 0.4 + 0.5) * 255).astype(np.uint8)).save(paths[-1], quality=90)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[3000, 4000], metavar=("W", "H"))
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    args = parser.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt, photos = Path(tmp) / "model", Path(tmp) / "photos"
        ckpt.mkdir(), photos.mkdir()
        random_so400m(str(ckpt))
        paths = write_photos(photos, args.images, tuple(args.size))
        scorer = NearIDScorer.from_pretrained(ckpt, device="cpu", dtype=dtype)
        print(f"{args.images} JPEGs {args.size[0]}x{args.size[1]}, batch {args.batch_size}, {args.dtype}, "
              f"{torch.get_num_threads()} threads")
        scorer.embed_files(paths[: args.batch_size], batch_size=args.batch_size)  # warm-up
        times = {w: [] for w in args.workers}
        for _ in range(args.repeats):  # interleaved
            for w in args.workers:
                start = time.perf_counter()
                scorer.embed_files(paths, batch_size=args.batch_size, num_workers=w, progress=False)
                times[w].append(time.perf_counter() - start)
        base = times[args.workers[0]]
        for w in args.workers:
            ratios = [b / t for b, t in zip(base, times[w])]
            print(f"workers {w}: {args.images / statistics.median(times[w]):6.3f} images/s | x {args.workers[0]} "
                  f"workers: min {min(ratios):.2f} median {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
