"""Time and peak memory of one identity-reward step per reward mode, with and without gradient checkpointing.

The step is the trainer's reward path at SD1.5 size through the SD family and the trainer's samplers (random weights:
speed and memory do not depend on them): `--steps` DDIM steps of an SD1.5 UNet (860M, rank-4 LoRA on the attention
projections), SD VAE decode, NearID reward (`NearIDReward`, preprocessing included), backward into the LoRA.
Modes: `refl` (the last step predicts x0 with gradients), `draft-1` (the last step with gradients), `draft_lv`
(n = 2 re-noised copies, one batched gradient step). "checkpointing" switches on activation checkpointing in the
UNet, the VAE decoder and the NearID backbone together (`--gradient_checkpointing` of the trainer).

Each configuration runs in its own process. Memory: on CUDA `torch.cuda.max_memory_allocated` during the step minus
the memory allocated before it; on CPU the peak resident set during the step (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident set before it (after `malloc_trim`), i.e. the activations and gradients on
top of the loaded weights. Time: median of `--repeats` steps after one
warm-up step.

    python benchmarks/reward_step.py [--modes refl,draft-1,draft_lv] [--steps 4] [--resolution 256]
        [--scorer-size so400m|tiny] [--device cpu|cuda] [--repeats 2]
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from _random_weights import randomise  # benchmarks/ is on sys.path when a script here runs

SD15_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
                scaling_factor=0.18215)
SD15_UNET = dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64)  # the other defaults are SD1.5's
TINY_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=56,
                   patch_size=14)


def build(scorer_size: str, device: torch.device, dtype: torch.dtype, checkpointing: bool, steps: int):
    """The SD1.5 family at real size with random weights, a rank-4 LoRA, a NearID reward and a DDIM reward sampler."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from nearid_core import NearIDConfig, NearIDModel, NearIDScorer, PreprocessConfig
    from nearid_core.checkpoint import no_init_weights
    from nearid_core.configuration_nearid import SO400M_VISION_CONFIG
    from reward_finetune.families.stable_diffusion import StableDiffusionFamily
    from reward_finetune.reward import NearIDReward

    with torch.device("meta"):  # the diffusers models have no buffers, so meta + to_empty is safe
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    vision = SO400M_VISION_CONFIG if scorer_size == "so400m" else TINY_VISION
    with no_init_weights():  # SigLIP has buffers (position ids): build on CPU, skip the slow init
        nearid = NearIDModel(NearIDConfig(vision_config=dict(vision)))
    unet, vae, nearid = randomise(unet, 0), randomise(vae, 1), randomise(nearid, 2)
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              steps_offset=1)
    family = StableDiffusionFamily([], [], vae, unet, scheduler)
    family.place(device, dtype)
    family.add_lora(rank=4, alpha=4.0, dropout=0.0)  # LoRA in fp32, as the trainer keeps it
    size = vision["image_size"]
    scorer = NearIDScorer(nearid.requires_grad_(False), PreprocessConfig(size=(size, size)), device=device, dtype=dtype)
    refs = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    reward = NearIDReward(scorer, refs, gradient_checkpointing=checkpointing)
    if checkpointing:
        family.enable_gradient_checkpointing()
    unet.train()
    return family, reward, family.reward_sampler(steps, device, dtype)


def reward_step(family, reward, sampler, mode: str, resolution: int, device, dtype) -> float:
    """One reward gradient step of `mode` (the trainer's samplers): sample, decode, NearID loss, backward; the loss."""
    from reward_finetune.families import Conditioning
    from reward_finetune.sampling import draft_lv_sample, draft_sample, refl_sample

    gen = torch.Generator().manual_seed(0)
    latents = sampler.initial_latents(1, resolution, gen)
    cond = Conditioning({"encoder_hidden_states": torch.randn(1, 77, 768, generator=gen).to(device, dtype)})
    denoise = family.denoiser_fn(family.denoiser, cond)
    last = len(sampler.timesteps) - 1
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        if mode == "refl":
            x = refl_sample(sampler, denoise, latents, last)
        elif mode == "draft-1":
            x = draft_sample(sampler, denoise, latents, 1)
        else:  # draft_lv n=2
            copies = family.denoiser_fn(family.denoiser, cond.repeat(2))
            x = draft_lv_sample(sampler, denoise, latents, 2, generator=gen, denoise_copies=copies)
        loss = reward(family.decode_latents(x)).mean()
    loss.backward()
    family.denoiser.zero_grad(set_to_none=True)
    return float(loss)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def _hwm_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(args) -> dict:
    """Child process: build, warm up, then time `repeats` steps and measure the peak memory of one."""
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    family, reward, sampler = build(args.scorer_size, device, dtype, args.checkpointing, args.steps)
    build_s = time.perf_counter() - start
    reward_step(family, reward, sampler, args.mode, args.resolution, device, dtype)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        gc.collect()
        _malloc_trim()  # hand the warm-up step's freed heap back, so the baseline is the live weights
        before = _rss_kib() * 1024
        if not _reset_hwm():
            print("warning: cannot reset VmHWM; the CPU peak includes model building", file=sys.stderr)
    times, loss = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        loss = reward_step(family, reward, sampler, args.mode, args.resolution, device, dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - before
        total = torch.cuda.max_memory_allocated()
    else:
        total = _hwm_kib() * 1024
        peak = total - before
    return {"mode": args.mode, "checkpointing": args.checkpointing, "step_s": statistics.median(times), "times": times,
            "peak_extra_gib": peak / 2**30, "peak_total_gib": total / 2**30, "weights_gib": before / 2**30,
            "loss": loss, "build_s": build_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256, help="generated image size (latents are 1/8)")
    parser.add_argument("--scorer-size", choices=("so400m", "tiny"), default="so400m",
                        help="so400m = the real NearID backbone at 384 px; tiny = a 2-layer 56 px stand-in")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None,
                        help="float32 / float16 / bfloat16 (default fp16 on CUDA, fp32 on CPU)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    parser.add_argument("--modes", default="refl,draft-1,draft_lv",
                        help="comma-separated: refl (1 UNet pass with grad), draft-1, draft_lv (n=2)")
    parser.add_argument("--steps", type=int, default=4, help="reward sampler steps (the no-grad part of each mode)")
    parser.add_argument("--mode", default="refl", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.dtype = args.dtype or ("float16" if args.device.startswith("cuda") else "float32")
    if args.child:
        print("RESULT " + json.dumps(measure(args)))
        return
    print(f"reward step | SD1.5 UNet + LoRA r4, SD VAE, NearID {args.scorer_size} | {args.resolution}px | "
          f"{args.steps} sampler steps | {args.device} {args.dtype} | threads={args.threads or torch.get_num_threads()}")
    for mode in args.modes.split(","):
        results = []
        for checkpointing in (False, True):  # each configuration in its own process
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--steps", str(args.steps), "--resolution",
                   str(args.resolution), "--scorer-size", args.scorer_size, "--device", args.device, "--dtype",
                   args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads)]
            out = subprocess.run(cmd + (["--checkpointing"] if checkpointing else []), capture_output=True, text=True,
                                 env=dict(os.environ))
            lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
            if out.returncode or not lines:
                sys.exit(f"child failed ({out.returncode}):\n{out.stderr[-3000:]}")
            results.append(json.loads(lines[-1][len("RESULT "):]))
        for r in results:
            label = "with checkpointing   " if r["checkpointing"] else "without checkpointing"
            print(f"  {mode:8s} {label}: {r['step_s']:7.2f} s/step (runs {', '.join(f'{t:.2f}' for t in r['times'])}) "
                  f"| peak extra memory {r['peak_extra_gib']:6.2f} GiB (total {r['peak_total_gib']:.2f}, "
                  f"weights+state {r['weights_gib']:.2f}) | loss {r['loss']:.5f}")
        plain, ckpt = results
        print(f"  {mode:8s} checkpointing: memory x{ckpt['peak_extra_gib'] / max(plain['peak_extra_gib'], 1e-9):.2f}, "
              f"time x{ckpt['step_s'] / plain['step_s']:.2f}; same loss: {abs(plain['loss'] - ckpt['loss']) < 1e-4}")


if __name__ == "__main__":
    main()
