"""Embedding throughput: NearIDScorer's variants vs the plain transformers path, measured in one interleaved run.

Real SigLIP2 so400m/14@384 architecture with random weights (speed does not depend on the weights):

* plain:            slow `AutoImageProcessor` (PIL) + `SiglipVisionModel` in fp32, pooler_output normalised;
* fp32:             NearIDScorer in fp32;
* bf16, bf16 head:  the whole model in bf16 (what the scorer did before the head ran in fp32);
* bf16, SDPA:       bf16 trunk with transformers' SDPA attention, fp32 MAP head (the scorer's bf16 mode before
                    `nearid_core.attention`);
* bf16:             bf16 trunk, fp32 MAP head, the scorer's CPU attention (the scorer's bf16 mode);
* default:          NearIDScorer's own choice here (`nearid_core.precision`: flags, then a timed probe).
* int8:             opt-in ``quantize="int8"`` (torchao int8 dynamic-activation/int8-weight linears in the trunk, fp32
                    elsewhere, fp32 head, each layer under torch.compile); "int8, eager" without compile; "int8, bf16
                    eager" with bf16 around the linears (torch 2.13's inductor cannot compile that one). Skipped without
                    torchao.

Prints, per variant, the speed ratio to plain (min and median over the interleaved repeats), the minimum cosine to
plain, the probe's decision, and the MAP head's time per image in bf16 vs fp32; int8 also as ratios to the default and
its rank agreement with fp32 on a ranking task (`rank_agreement`). On CUDA it also prints fp16 and bf16
throughput (fp16 also under torch.compile) and the fraction of the GPU's bf16 peak (pass --peak-tflops for your card;
default 989 = H100 SXM).

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
from nearid_core.quantization import compile_trunk
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


def ratio_line(label: str, plain: list[float], variant: list[float], cos: float,
               default: list[float] | None = None) -> str:
    """Speed ratios per interleaved repeat (plain time / variant time): min and median; also x `default` if given."""
    ratios = [p / v for p, v in zip(plain, variant)]
    line = (f"{label:<18} x plain: min {min(ratios):5.2f}  median {statistics.median(ratios):5.2f}   "
            f"min cosine vs plain {cos:.5f}")
    if default is not None:
        to_default = [d / v for d, v in zip(default, variant)]
        line += f"   x default: min {min(to_default):4.2f}  median {statistics.median(to_default):4.2f}"
    return line


def ranking_images(subjects: int = 8, views: int = 3, seed: int = 1) -> list[Image.Image]:
    """`views` crops / flips / brightness changes of each of `subjects` photo-like images, subject by subject."""
    rng = np.random.default_rng(seed)
    out = []
    for base in photo_like_images(subjects, seed):
        for _ in range(views):
            x, y = int(rng.integers(0, 120)), int(rng.integers(0, 90))
            view = base.crop((x, y, x + 520, y + 390))
            view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else view
            out.append(Image.eval(view, lambda v, g=rng.uniform(0.85, 1.15): min(255, int(v * g))))
    return out


def _ranks(x: torch.Tensor) -> torch.Tensor:
    return x.argsort(dim=-1).argsort(dim=-1).float()


def rank_agreement(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """Each image as the reference, all others as candidates: how well `other`'s embeddings rank the candidates as
    `reference`'s do. Spearman and Kendall rank correlations of the candidate scores (mean and min over references)
    and the fraction of references whose top-1 candidate agrees."""
    n = reference.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)
    a, b = (reference @ reference.T)[off].view(n, n - 1), (other @ other.T)[off].view(n, n - 1)
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(-1, keepdim=True), rb - rb.mean(-1, keepdim=True)
    spearman = (ra * rb).sum(-1) / (ra.norm(dim=-1) * rb.norm(dim=-1))
    sign = lambda s: torch.sign(s[:, :, None] - s[:, None, :])  # noqa: E731
    kendall = (sign(a) * sign(b)).sum((1, 2)) / ((n - 1) * (n - 2))
    return {"spearman_mean": float(spearman.mean()), "spearman_min": float(spearman.min()),
            "kendall_mean": float(kendall.mean()), "kendall_min": float(kendall.min()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).float().mean())}


def int8_scorers(ckpt: str) -> dict[str, NearIDScorer]:
    """The int8 variants (see the module docstring), or none without torchao."""
    import importlib.util

    if importlib.util.find_spec("torchao") is None:
        print("int8: skipped (torchao is not installed: pip install 'nearid-toolkit[int8]')")
        return {}
    return {"int8": NearIDScorer.from_pretrained(ckpt, quantize="int8"),
            "int8, eager": NearIDScorer.from_pretrained(ckpt, quantize="int8", compile=False),
            "int8, bf16 eager": NearIDScorer.from_pretrained(ckpt, quantize="int8", dtype=torch.bfloat16)}


def head_ms_per_image(scorer: NearIDScorer, tokens: torch.Tensor, head: torch.dtype, repeats: int) -> float:
    """The MAP head's time per image with the trunk's tokens in bf16 and the head in `head`."""
    scorer.model.head.to(head)
    with torch.inference_mode():
        scorer.model.pool(tokens)
        times, _ = timed(lambda: scorer.model.pool(tokens), repeats)
    return 1000 * min(times) / tokens.shape[0]


def cpu_report(args, images, processor, plain, scorer, int8: dict[str, NearIDScorer]) -> None:
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

    def run_scorer(model: NearIDScorer = scorer) -> torch.Tensor:
        with torch.inference_mode():
            return model.embed(images, batch_size=args.batch_size)

    def select(name: str) -> NearIDScorer:
        if name in int8:
            return int8[name]
        set_mode(*variants[name])
        return scorer

    names = [*variants, *int8]
    run_plain()
    for name in names:  # warm-up (and torch.compile's compilation)
        run_scorer(select(name))
    plain_times, times, cos = [], {k: [] for k in names}, {k: 1.0 for k in names}
    for _ in range(args.repeats):  # interleaved, so machine drift hits every variant alike
        t, e_plain = timed(run_plain, 1)
        plain_times += t
        for name in names:
            model = select(name)
            t, e = timed(lambda: run_scorer(model), 1)
            times[name] += t
            cos[name] = min(cos[name], float((e_plain * e).sum(-1).min()))
    print(f"plain: {args.batch_size / statistics.median(plain_times):.3f} images/s (median)")
    for name in names:
        print(ratio_line(name, plain_times, times[name], cos[name], times["default"] if name in int8 else None))
    if int8:
        ranked = ranking_images()
        with torch.inference_mode():
            reference = select("fp32").embed(ranked, batch_size=args.batch_size, progress=False)
            for name in ["default", *int8]:
                embedded = select(name).embed(ranked, batch_size=args.batch_size, progress=False)
                agree = rank_agreement(reference, embedded)
                print(f"rank agreement vs fp32, {name:<16} ({len(ranked)} images, each the reference of the rest): "
                      f"Spearman mean {agree['spearman_mean']:.4f} min {agree['spearman_min']:.4f} | Kendall mean "
                      f"{agree['kendall_mean']:.4f} min {agree['kendall_min']:.4f} | top-1 agree {agree['top1']:.3f}")

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
    """Model-only throughput on CUDA as the scorer runs it (`_features`: fp16 under the paper's autocast, bf16 plain),
    then fp16 with each trunk layer under torch.compile (the scorer's ``compile=True``)."""
    flops = flops_per_image(SO400M_VISION_CONFIG)
    for dtype, compiled in ((torch.float16, False), (torch.bfloat16, False), (torch.float16, True)):
        scorer.to(dtype=dtype)
        if compiled:
            compile_trunk(scorer.model)
        pixels = scorer.pixel_values(images * 8)
        with torch.inference_mode():
            scorer._features(pixels, "map")  # warm-up (and compilation)
            times, _ = timed(lambda: scorer._features(pixels, "map"), args.repeats)
        ips = pixels.shape[0] / statistics.median(times)
        name = str(dtype).removeprefix("torch.") + (" + torch.compile" if compiled else "")
        print(f"cuda {name} model only, batch {pixels.shape[0]}: {ips:8.1f} images/s "
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
        cpu_report(args, images, processor, plain, scorer, int8_scorers(ckpt))
    attention_report(args.batch_size, args.repeats, device)


if __name__ == "__main__":
    main()
