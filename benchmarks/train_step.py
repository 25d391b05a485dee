"""One NearID head training step from the frozen-feature cache vs a reference-style step, measured in one run.

Real SigLIP2 so400m/14@384 architecture with random weights (speed does not depend on the weights), the same batch
of ``--samples`` training samples x 6 images (PNG files on disk) for both:

* reference-style (``python -m nearid_core.train --no-cache``, what the paper code does every step): decode +
  preprocess the 6B images, run the frozen trunk on all of them, then head + infonce_ext + backward + AdamW step;
* cached (the trainer's default): read the 6B token sets from the memory-mapped feature cache, then the same head +
  loss + backward + AdamW step.

Prints seconds per step of each (median over ``--repeats``, interleaved), their ratio, the one-time cost of filling
the cache for these images, the cache's bytes per image (on disk), and the loss difference of the two steps (fp16
tokens vs fresh ones). The default batch is small (2 samples x 6 images) so that it finishes on a laptop CPU; the
paper's step is 128 samples x 6 images.

    python benchmarks/train_step.py [--samples 2] [--repeats 2] [--device cpu|cuda] [--dtype fp32|fp16|bf16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _random_weights import randomise  # benchmarks/ is on sys.path when a script here runs
from PIL import Image

from nearid_core import NearIDConfig, NearIDModel, PreprocessConfig
from nearid_core.checkpoint import no_init_weights
from nearid_core.feature_cache import FeatureCache, token_encoder
from nearid_core.train import HeadModule, batch_loss
from nearid_core.train_data import PixelCollate, TokenCollate, TrainSample

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def random_so400m(dtype: torch.dtype) -> NearIDModel:
    """The real so400m NearID architecture with random weights (normal 0.02, unit LayerNorms), fast init."""
    with no_init_weights():
        model = randomise(NearIDModel(NearIDConfig()))
    model = model.to(dtype)
    model.freeze_backbone()
    model.head.float()
    return model


def photo_like(n: int, directory: Path, seed: int = 0) -> list[Path]:
    """``n`` 512x512 smooth RGB PNGs (decode + resize cost similar to the dataset's 512 px images)."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        yy, xx = np.mgrid[0:512, 0:512] / 40.0
        base = np.stack([np.sin(xx * rng.uniform(0.5, 2) + c) * np.cos(yy * rng.uniform(0.5, 2)) for c in range(3)], -1)
        pix = (base * 0.35 + 0.5 + rng.normal(0, 0.05, base.shape)).clip(0, 1)
        paths.append(directory / f"img{i}.png")
        Image.fromarray((pix * 255).astype(np.uint8)).save(paths[-1])
    return paths


def samples_of(items: list, n_samples: int) -> list[TrainSample]:
    """``n_samples`` samples, each 3 views + 3 distractors, all slots valid."""
    out = []
    for s in range(n_samples):
        chunk = items[6 * s : 6 * s + 6]
        out.append(TrainSample(chunk, [True] * 3, [True] * 3, [0, 1, 2], ["src"] * 3, f"id{s}", "nearid", s, 0))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=2, help="training samples per step (x6 images)")
    p.add_argument("--repeats", type=int, default=2, help="timed steps of each kind (median reported)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="trunk dtype (default fp16 on CUDA, fp32 on CPU)")
    p.add_argument("--cache-dtype", choices=("fp16", "bf16", "fp32"), default="fp16")
    p.add_argument("--threads", type=int, help="torch CPU threads")
    args = p.parse_args(argv)
    if args.samples < 1 or args.repeats < 1:
        raise ValueError("--samples and --repeats must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    model = random_so400m(dtype).to(device)
    preprocess = PreprocessConfig(size=(384, 384), resample="bilinear")
    head = HeadModule(model)
    optimizer = torch.optim.AdamW(head.parameters(), lr=1e-4, weight_decay=1e-4)
    n_images = 6 * args.samples

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        paths = photo_like(n_images, tmp)
        cache = FeatureCache.for_model(tmp / "cache", model, preprocess, dtype=args.cache_dtype,
                                       shard_size=n_images)
        encode = token_encoder(model, preprocess, device)
        keys = [cache.key(p) for p in paths]
        sync()
        t = time.perf_counter()
        cache.fill(paths, encode, batch_size=n_images, keys=keys)
        sync()
        fill_s = time.perf_counter() - t
        with torch.no_grad():
            pad = model.encode_tokens(torch.zeros(1, 3, 384, 384, device=device, dtype=dtype))[0]
        token_collate, pixel_collate = TokenCollate(cache, pad), PixelCollate(preprocess)
        cached_samples, ref_samples = samples_of(keys, args.samples), samples_of(paths, args.samples)

        def step(tokens, batch) -> float:
            out = batch_loss(head, tokens, batch["pos_mask"].to(device), batch["neg_mask"].to(device))
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return out.loss.item()

        def cached_step() -> float:
            batch = token_collate(cached_samples)
            return step(batch["tokens"].to(device), batch)

        def reference_step() -> float:
            batch = pixel_collate(ref_samples)
            with torch.no_grad():
                tokens = model.encode_tokens(batch["pixels"].to(device, dtype))
            return step(tokens, batch)

        # the two losses on the same head state (no update in between): fp16 cached tokens vs fresh tokens
        saved = {k: v.clone() for k, v in model.head.state_dict().items()}
        with torch.no_grad():
            loss_cached = batch_loss(head, token_collate(cached_samples)["tokens"].to(device),
                                     *(token_collate(cached_samples)[k].to(device) for k in ("pos_mask", "neg_mask")))
            batch = pixel_collate(ref_samples)
            loss_ref = batch_loss(head, model.encode_tokens(batch["pixels"].to(device, dtype)),
                                  batch["pos_mask"].to(device), batch["neg_mask"].to(device))
        times: dict[str, list[float]] = {"cached": [], "reference": []}
        cached_step()  # warm-up (allocator, kernels); the reference step's warm-up is the fill above
        for _ in range(args.repeats):
            for name, fn in (("reference", reference_step), ("cached", cached_step)):
                sync()
                t = time.perf_counter()
                fn()
                sync()
                times[name].append(time.perf_counter() - t)
        model.head.load_state_dict(saved)
        shard_bytes = sum(f.stat().st_size for f in cache.directory.glob("*/shard-*.npy"))

    ref, cached = statistics.median(times["reference"]), statistics.median(times["cached"])
    result = {
        "device": str(device),
        "trunk_dtype": str(dtype).removeprefix("torch."),
        "cache_dtype": cache.dtype_name,
        "threads": torch.get_num_threads(),
        "batch": f"{args.samples} samples x 6 images = {n_images} images",
        "reference_step_s": round(ref, 4),
        "cached_step_s": round(cached, 4),
        "speedup": round(ref / cached, 1),
        "cache_fill_s_for_these_images": round(fill_s, 3),
        "cache_bytes_per_image": cache.bytes_per_entry,
        "cache_bytes_per_image_on_disk": shard_bytes // n_images,
        "loss_cached": float(loss_cached.loss),
        "loss_reference": float(loss_ref.loss),
        "all_times_s": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=1))
    print(f"\nhead step from the cache: {cached:.3f} s vs reference-style step: {ref:.3f} s -> {ref / cached:.1f}x "
          f"faster; cache: {cache.bytes_per_entry / 1e6:.2f} MB per image ({cache.dtype_name})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
