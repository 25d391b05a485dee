"""Embedding throughput: NearIDScorer's variants vs the plain transformers path, measured in one interleaved run.

Real SigLIP2 so400m/14@384 architecture with random weights (speed does not depend on the weights):

* plain:            slow `AutoImageProcessor` (PIL) + `SiglipVisionModel` in fp32, pooler_output normalised;
* fp32:             NearIDScorer in fp32;
* bf16, bf16 head:  the whole model in bf16 (what the scorer did before the head ran in fp32);
* bf16, SDPA:       bf16 trunk with transformers' SDPA attention, fp32 MAP head (the scorer's bf16 mode before
                    `nearid_core.attention`);
* bf16:             bf16 trunk, fp32 MAP head, the scorer's CPU attention (the scorer's bf16 mode);
* default:          NearIDScorer's own choice here (`nearid_core.precision`: flags, then a timed probe).

Prints, per variant, the speed ratio to plain (min and median over the interleaved repeats), the minimum cosine to
plain, the probe's decision, and the MAP head's time per image in bf16 vs fp32. On CUDA it also prints fp16 and bf16
throughput and the fraction of the GPU's bf16 peak (pass --peak-tflops for your card; default 989 = H100 SXM).

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

from nearid_core import NearIDScorer, PreprocessConfig, precision
from nearid_core.attention import cpu_bmm_attention
from nearid_core.checkpoint import no_init_weights
from nearid_core.configuration_nearid import SO400M_VISION_CONFIG

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


def ratio_line(label: str, plain: list[float], variant: list[float], cos: float) -> str:
    """Speed ratios per interleaved repeat (plain time / variant time): min and median."""
    ratios = [p / v for p, v in zip(plain, variant)]
    return (f"{label:<18} x plain: min {min(ratios):5.2f}  median {statistics.median(ratios):5.2f}   "
            f"min cosine vs plain {cos:.5f}")


def head_ms_per_image(scorer: NearIDScorer, tokens: torch.Tensor, head: torch.dtype, repeats: int) -> float:
    """The MAP head's time per image with the trunk's tokens in bf16 and the head in `head`."""
    scorer.model.head.to(head)
    with torch.inference_mode():
        scorer.model.pool(tokens)
        times, _ = timed(lambda: scorer.model.pool(tokens), repeats)
    return 1000 * min(times) / tokens.shape[0]


def cpu_report(args, images, processor, plain, scorer) -> None:
    speedup, cached = precision.measured_bf16_speedup()
    default = precision.cpu_default_dtype()
    print(f"probe: bf16 F.linear {precision.PROBE_SHAPE} = {speedup:.2f}x fp32 ({'cached' if cached else 'probed'}; "
          f"bf16 needs >= {precision.PROBE_MIN_SPEEDUP}x; flags: {precision.cpu_bf16_support()}) -> default "
          f"{str(default).removeprefix('torch.')}")

    def set_mode(dtype: torch.dtype, head: torch.dtype, attention: str | None = None) -> None:
        scorer.to(dtype=dtype)  # the scorer's own attention choice (CPU_BMM_ATTENTION) unless `attention` is given
        scorer.model.head.to(head)
        if attention is not None:
            scorer.model.set_attn_implementation(attention)

    variants = {"fp32": (torch.float32, torch.float32), "bf16, bf16 head": (torch.bfloat16, torch.bfloat16),
                "bf16, SDPA": (torch.bfloat16, torch.float32, "sdpa"),
                "bf16": (torch.bfloat16, torch.float32),
                "default": (default, precision.head_dtype(torch.device("cpu"), default))}

    def run_plain() -> torch.Tensor:
        with torch.inference_mode():
            pixels = processor(images=images, return_tensors="pt")["pixel_values"]
            return F.normalize(plain(pixels).pooler_output.float(), dim=-1)

    def run_scorer() -> torch.Tensor:
        with torch.inference_mode():
            return scorer.embed(images, batch_size=args.batch_size)

    run_plain()
    for mode in variants.values():  # warm-up
        set_mode(*mode)
        run_scorer()
    plain_times, times, cos = [], {k: [] for k in variants}, {k: 1.0 for k in variants}
    for _ in range(args.repeats):  # interleaved, so machine drift hits every variant alike
        t, e_plain = timed(run_plain, 1)
        plain_times += t
        for name, mode in variants.items():
            set_mode(*mode)
            t, e = timed(run_scorer, 1)
            times[name] += t
            cos[name] = min(cos[name], float((e_plain * e).sum(-1).min()))
    print(f"plain: {args.batch_size / statistics.median(plain_times):.3f} images/s (median)")
    for name in variants:
        print(ratio_line(name, plain_times, times[name], cos[name]))

    scorer.to(dtype=torch.bfloat16)
    with torch.inference_mode():
        tokens = scorer.model.encode_tokens(scorer.pixel_values(images))
    bf16_head = head_ms_per_image(scorer, tokens, torch.bfloat16, args.repeats)
    fp32_head = head_ms_per_image(scorer, tokens, torch.float32, args.repeats)
    print(f"MAP head on bf16 tokens: bf16 head {bf16_head:.1f} ms/img, fp32 head {fp32_head:.1f} ms/img")


def attention_report(batch: int, repeats: int, device: torch.device) -> None:
    """The so400m attention core (729 tokens, 16 heads of 72): SDPA (transformers' default implementation), the eager
    batched-matmul path, and the scorer's CPU attention (`nearid_core.attention`: bmm over 2 heads at a time in
    bf16; SDPA in fp32), in fp32 and bf16."""
    heads, tokens, dim = 16, (384 // 14) ** 2, 72
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, tokens, dim, generator=gen).to(device) for _ in range(3))
    reference = F.scaled_dot_product_attention(q, k, v)

    def nearid_bmm(q, k, v):  # the scorer's CPU attention; it returns [B, L, H, D]
        return cpu_bmm_attention(None, q, k, v, None, is_causal=False)[0].transpose(1, 2)

    def eager(q, k, v):
        weights = torch.softmax(q @ k.transpose(-1, -2) * dim ** -0.5, dim=-1, dtype=torch.float32).to(q.dtype)
        return weights @ v

    flops = 4 * batch * heads * tokens * tokens * dim
    for dtype in (torch.float32, torch.bfloat16):
        args = [t.to(dtype) for t in (q, k, v)]
        line = []
        for name, fn in (("sdpa", F.scaled_dot_product_attention), ("eager", eager), ("nearid bmm", nearid_bmm)):
            fn(*args)
            times, out = timed(lambda: fn(*args), repeats)
            cos = F.cosine_similarity(out.float().flatten(2), reference.flatten(2), dim=-1).min().item()
            line.append(f"{name} {1000 * min(times):6.1f} ms = {flops / min(times) / 1e9:5.0f} GFLOP/s (cos {cos:.5f})")
        print(f"attention core {str(dtype).removeprefix('torch.'):>8}, batch {batch}: " + " | ".join(line))


def cuda_report(args, images, scorer) -> None:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU dense bf16 peak, for the utilisation line")
    args = parser.parse_args()
    device = torch.device(args.device)
    images = photo_like_images(args.batch_size)
    print(f"device={device} threads={torch.get_num_threads()} batch={args.batch_size} repeats={args.repeats} "
          f"cpu={precision.probe_key()}")
    with tempfile.TemporaryDirectory() as ckpt:
        random_so400m(ckpt)
        scorer = NearIDScorer.from_pretrained(ckpt, device=device, dtype=torch.float32)
        if device.type == "cuda":
            cuda_report(args, images, scorer)
            return
        processor = AutoImageProcessor.from_pretrained(ckpt, backend="pil")
        plain = SiglipVisionModel.from_pretrained(ckpt, dtype=torch.float32).eval()
        cpu_report(args, images, processor, plain, scorer)
    attention_report(args.batch_size, args.repeats, device)


if __name__ == "__main__":
    main()
