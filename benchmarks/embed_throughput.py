"""Embedding throughput: NearIDScorer's default mode vs the plain transformers path, measured in one run.

Real SigLIP2 so400m/14@384 architecture with random weights (speed does not depend on the weights):

* plain:  slow `AutoImageProcessor` (PIL) + `SiglipVisionModel` in fp32, pooler_output normalised;
* ours:   `NearIDScorer.from_pretrained(dir)` with its defaults (bf16 on CPUs with AMX bf16 matrix units, fp32 on
          other CPUs, fp16 on CUDA); on a CPU without AMX, bf16 is timed too, for reference.

Prints images/s of each (median over repeats, A/B interleaved), the ratio, and the minimum cosine between the two
embeddings of the same images. On CUDA it also prints fp16 and bf16 throughput and the fraction of the GPU's bf16
peak (pass --peak-tflops for your card; default 989 = H100 SXM dense bf16).

    python benchmarks/embed_throughput.py [--batch-size 8] [--repeats 3] [--device cpu|cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoImageProcessor, SiglipVisionConfig, SiglipVisionModel

from nearid_core import NearIDScorer, PreprocessConfig
from nearid_core.checkpoint import no_init_weights
from nearid_core.configuration_nearid import SO400M_VISION_CONFIG
from nearid_core.scorer import cpu_has_bf16_matmul

from _random_weights import randomise  # benchmarks/ is on sys.path when a script here runs


def random_so400m(directory: str) -> None:
    """Write a random-weight so400m SiglipVisionModel checkpoint + preprocessor config (fast init)."""
    with no_init_weights():
        model = randomise(SiglipVisionModel(SiglipVisionConfig(**SO400M_VISION_CONFIG)))
    model.save_pretrained(directory)
    with open(f"{directory}/preprocessor_config.json", "w") as f:
        json.dump(PreprocessConfig(size=(384, 384), resample="bilinear").to_dict(), f)


def photo_like_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(n):
        h, w = 480, 640
        yy, xx = np.mgrid[0:h, 0:w] / 40.0
        base = np.stack([np.sin(xx * rng.uniform(0.5, 2) + c) * np.cos(yy * rng.uniform(0.5, 2)) for c in range(3)], -1)
        pix = (base * 0.35 + 0.5 + rng.normal(0, 0.05, (h, w, 3))).clip(0, 1)
        images.append(Image.fromarray((pix * 255).astype(np.uint8)))
    return images


def flops_per_image(cfg: dict) -> float:
    """Multiply-adds x2 of the so400m tower + MAP head at its native resolution."""
    n = (cfg["image_size"] // cfg["patch_size"]) ** 2
    d, m, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    per_layer = 2 * n * (4 * d * d + 2 * d * m) + 2 * 2 * n * n * d
    patch = 2 * n * d * 3 * cfg["patch_size"] ** 2
    head = 2 * (2 * n * d * d + n * d + 2 * d * d + 2 * d * m)
    return layers * per_layer + patch + head


def timed(fn, repeats: int) -> tuple[list[float], torch.Tensor]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for the utilisation line")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = photo_like_images(args.batch_size)

    with tempfile.TemporaryDirectory() as ckpt:
        random_so400m(ckpt)
        processor = AutoImageProcessor.from_pretrained(ckpt, backend="pil")
        plain = SiglipVisionModel.from_pretrained(ckpt, dtype=torch.float32).to(device).eval()
        scorer = NearIDScorer.from_pretrained(ckpt, device=device)

        def run_plain() -> torch.Tensor:
            with torch.inference_mode():
                pixels = processor(images=images, return_tensors="pt")["pixel_values"].to(device)
                return F.normalize(plain(pixels).pooler_output.float(), dim=-1)

        def run_ours() -> torch.Tensor:
            with torch.inference_mode():
                return scorer.embed(images, batch_size=args.batch_size)

        modes = [("default", scorer.dtype)]
        if device.type == "cpu" and scorer.dtype != torch.bfloat16:
            modes.append(("bf16", torch.bfloat16))  # shown for reference: the default skips it without AMX
        print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} repeats={args.repeats} "
              f"cpu_capability={torch.backends.cpu.get_cpu_capability()} amx={cpu_has_bf16_matmul()}")
        for label, dtype in modes:
            scorer.to(dtype=dtype)
            run_plain(), run_ours()  # warm-up
            plain_times, ours_times = [], []
            for _ in range(args.repeats):  # interleave so machine drift hits both
                t, e_plain = timed(run_plain, 1)
                plain_times += t
                t, e_ours = timed(run_ours, 1)
                ours_times += t
            cos = (e_plain * e_ours).sum(-1)
            plain_ips = args.batch_size / statistics.median(plain_times)
            ours_ips = args.batch_size / statistics.median(ours_times)
            name = str(dtype).removeprefix("torch.")
            print(f"[{label}] plain transformers (slow processor + fp32): {plain_ips:7.3f} images/s | "
                  f"NearIDScorer {name}: {ours_ips:7.3f} images/s | ratio {ours_ips / plain_ips:.2f}x | "
                  f"min cosine {cos.min().item():.5f}")

        if device.type == "cuda":
            flops = flops_per_image(SO400M_VISION_CONFIG)
            for dtype in (torch.float16, torch.bfloat16):
                scorer.to(dtype=dtype)
                pixels = scorer.pixel_values(images * 8)
                with torch.inference_mode():
                    scorer.model.get_image_features(pixels)
                    times, _ = timed(lambda: scorer.model.get_image_features(pixels), args.repeats)
                ips = pixels.shape[0] / statistics.median(times)
                print(f"cuda {str(dtype).removeprefix('torch.')} model only, batch {pixels.shape[0]}: {ips:8.1f} images/s "
                      f"= {ips * flops / 1e12:.1f} TFLOP/s = {100 * ips * flops / 1e12 / args.peak_tflops:.1f}% of "
                      f"{args.peak_tflops:.0f} TFLOP/s bf16 peak")


if __name__ == "__main__":
    main()
