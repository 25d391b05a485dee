"""Time of one identity-guidance step at real size: the SD1.5 VAE decoder (random weights: speed does not depend on
them) decodes the x0 estimate of a 512 px image, NearID at the so400m size scores it, and the gradient flows back to
the latents (`nearid_core.guidance.IdentityGuidance.guide`, the cheap form). Reported per `--decode-scale`, next to
the same decode + embedding without gradients (what scoring one finished sample costs, e.g. in Best-of-N).

    python benchmarks/guidance_step.py [--resolution 512] [--batch 1] [--decode-scales 1,0.5] [--repeats 1]
        [--device cpu|cuda] [--vae-dtype float32|bfloat16] [--scorer-size so400m|tiny]

Time: median of `--repeats` steps after one warm-up step; one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from types import SimpleNamespace

import torch
from _random_weights import randomise  # benchmarks/ is on sys.path when a script here runs
from reward_step import SD15_VAE, TINY_VISION

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build(device: torch.device, vae_dtype: torch.dtype, scorer_size: str):
    """(random SD1.5 VAE, random NearID scorer with default dtype, random reference embeddings)."""
    from diffusers import AutoencoderKL

    from nearid_core import NearIDConfig, NearIDModel, NearIDScorer, PreprocessConfig
    from nearid_core.checkpoint import no_init_weights
    from nearid_core.configuration_nearid import SO400M_VISION_CONFIG

    with torch.device("meta"):
        vae = AutoencoderKL(**SD15_VAE)
    vae = randomise(vae, 1).requires_grad_(False).to(device, vae_dtype).eval()
    vision = SO400M_VISION_CONFIG if scorer_size == "so400m" else TINY_VISION
    with no_init_weights():
        nearid = randomise(NearIDModel(NearIDConfig(vision_config=dict(vision))), 2)
    size = vision["image_size"]
    scorer = NearIDScorer(nearid.requires_grad_(False), PreprocessConfig(size=(size, size)), device=device)
    refs = torch.randn(3, scorer.embed_dim, generator=torch.Generator().manual_seed(3))
    return vae, scorer, refs


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--decode-scales", default="1,0.5")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--vae-dtype", choices=DTYPES, default="float32")
    parser.add_argument("--scorer-size", choices=("so400m", "tiny"), default="so400m")
    args = parser.parse_args()

    from nearid_core.guidance import IdentityGuidance
    from nearid_core.guidance_diffusers import pipeline_decoder

    device = torch.device(args.device)
    vae, scorer, refs = build(device, DTYPES[args.vae_dtype], args.scorer_size)
    decode = pipeline_decoder(SimpleNamespace(vae=vae))
    side = args.resolution // 8
    x0 = torch.randn(args.batch, 4, side, side, generator=torch.Generator().manual_seed(0)).to(device)
    for scale in (float(s) for s in args.decode_scales.split(",")):
        guidance = IdentityGuidance.from_scorer(scorer, refs, decode, decode_scale=scale)
        step = timed(lambda: guidance.guide(x0, 0.5), args.repeats)
        small = torch.nn.functional.interpolate(x0, scale_factor=scale, mode="bilinear", antialias=True) \
            if scale != 1 else x0

        def score_only() -> None:
            with torch.no_grad():
                scorer.embed_pixels(decode(small), input_range="-1,1")

        plain = timed(score_only, args.repeats)
        print(json.dumps({"resolution": args.resolution, "batch": args.batch, "decode_scale": scale,
                          "guided_step_s": round(step, 2), "decode_and_score_no_grad_s": round(plain, 2),
                          "vae_dtype": args.vae_dtype, "scorer_dtype": str(scorer.dtype).replace("torch.", ""),
                          "scorer": args.scorer_size, "device": str(device), "threads": torch.get_num_threads(),
                          "cpu": platform.processor() or platform.machine()}), flush=True)


if __name__ == "__main__":
    main()
