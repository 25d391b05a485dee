"""Time and peak memory of one identity-reward step per reward mode, with and without gradient checkpointing.

The step is the trainer's reward path through a model family and the trainer's samplers (random weights: speed and
memory do not depend on them). `--family sd15` (default): `--steps` DDIM steps of an SD1.5 UNet (860M, rank-4 LoRA on
the attention projections), SD VAE decode, NearID reward (`NearIDReward`, preprocessing included), backward into the
LoRA. `--family flux` / `sd3`: the FLUX.1-dev / SD3.5-large transformer at its real width but `--depth` blocks
(FLUX: "double,single", default 1,1 of 19,38; SD3.5: N, default 2 of 38), the 16-channel VAE at real size, the
family's Euler reward sampler with the guidance embedding (FLUX, 3.5) or CFG (SD3, 7), random text embeddings of
`--max-sequence-length` T5 tokens. For these the child also reports the bytes autograd saves for the backward
(`torch.autograd.graph.saved_tensors_hooks`, storages counted once, weights excluded) per part: transformer, VAE
decode, NearID; README "Memory of a FLUX.1 reward step" extrapolates them.
Modes: `refl` (the last step predicts x0 with gradients), `draft-1` (the last step with gradients), `draft_lv`
(n = 2 re-noised copies, one batched gradient step). "checkpointing" switches on activation checkpointing in the
UNet, the VAE decoder and the NearID backbone together (`--gradient_checkpointing` of the trainer).

Each configuration runs in its own process. Memory: on CUDA `torch.cuda.max_memory_allocated` during the step minus
the memory allocated before it; on CPU the peak resident set during the step (VmHWM after resetting it through
/proc/self/clear_refs) minus the resident set before it (after `malloc_trim`), i.e. the activations and gradients on
top of the loaded weights. Time: median of `--repeats` steps after one
warm-up step.

    python benchmarks/reward_step.py [--family sd15|flux|sd3] [--depth 1,1] [--modes refl,draft-1,draft_lv]
        [--steps 4] [--resolution 256] [--max-sequence-length 512] [--scorer-size so400m|tiny]
        [--device cpu|cuda] [--dtype bfloat16] [--repeats 2]
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
FLOW_VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=16, sample_size=1024,
                use_quant_conv=False, use_post_quant_conv=False)  # FLUX.1's and SD3's VAE (scaling / shift differ)
FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))  # + num_layers 19 / 38
SD35_LARGE = dict(sample_size=128, patch_size=2, in_channels=16, attention_head_dim=64, num_attention_heads=38,
                  joint_attention_dim=4096, caption_projection_dim=2432, pooled_projection_dim=2048, out_channels=16,
                  pos_embed_max_size=192, qk_norm="rms_norm")  # + num_layers 38


def build_family(family_name: str, depth: str):
    """(family, conditioning factory) of `family_name` with random weights; flow families at reduced `depth`."""
    from diffusers import (AutoencoderKL, DDPMScheduler, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel,
                           SD3Transformer2DModel, UNet2DConditionModel)

    from nearid_core.checkpoint import no_init_weights

    if family_name == "sd15":
        from reward_finetune.families.stable_diffusion import StableDiffusionFamily

        with torch.device("meta"):  # the diffusers models have no buffers, so meta + to_empty is safe
            unet = UNet2DConditionModel(**SD15_UNET)
            vae = AutoencoderKL(**SD15_VAE)
        scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                  clip_sample=False, steps_offset=1)
        return StableDiffusionFamily([], [], randomise(vae, 1), randomise(unet, 0), scheduler)
    blocks = [int(d) for d in depth.split(",")]
    with no_init_weights():  # SD3's positional table is a buffer: build on the CPU, skip the slow init
        if family_name == "flux":
            from reward_finetune.families.flux import FluxFamily as cls

            transformer = FluxTransformer2DModel(**FLUX_DEV, num_layers=blocks[0], num_single_layers=blocks[1])
            vae = AutoencoderKL(**FLOW_VAE, scaling_factor=0.3611, shift_factor=0.1159)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        else:
            from reward_finetune.families.sd3 import StableDiffusion3Family as cls

            transformer = SD3Transformer2DModel(**SD35_LARGE, num_layers=blocks[0])
            vae = AutoencoderKL(**FLOW_VAE, scaling_factor=1.5305, shift_factor=0.0609)
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return cls([None] * 3, [None] * 3, randomise(vae, 1), randomise(transformer, 0), scheduler)


def conditioning(family, batch: int, seq: int, device, dtype):
    """Random text conditioning of the family's shapes (T5 `seq` tokens; SD3 adds its 77 CLIP tokens)."""
    from reward_finetune.families import Conditioning

    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(device, dtype)

    if family.name == "sd15":
        return Conditioning({"encoder_hidden_states": randn(batch, 77, 768)}), None
    config = family.denoiser.config
    if family.name == "flux":
        return Conditioning({"encoder_hidden_states": randn(batch, seq, config.joint_attention_dim),
                             "pooled_projections": randn(batch, config.pooled_projection_dim),
                             "guidance": torch.full((batch,), 1.0, device=device)}), None
    cond, uncond = ({"encoder_hidden_states": randn(batch, 77 + seq, config.joint_attention_dim),
                     "pooled_projections": randn(batch, config.pooled_projection_dim)} for _ in range(2))
    return Conditioning(cond), Conditioning(uncond)


def build(scorer_size: str, device: torch.device, dtype: torch.dtype, checkpointing: bool, steps: int,
          family_name: str = "sd15", depth: str = ""):
    """The family with random weights, a rank-4 LoRA, a NearID reward and the family's reward sampler."""
    from nearid_core import NearIDConfig, NearIDModel, NearIDScorer, PreprocessConfig
    from nearid_core.checkpoint import no_init_weights
    from nearid_core.configuration_nearid import SO400M_VISION_CONFIG
    from reward_finetune.reward import NearIDReward

    family = build_family(family_name, depth)
    vision = SO400M_VISION_CONFIG if scorer_size == "so400m" else TINY_VISION
    with no_init_weights():  # SigLIP has buffers (position ids): build on CPU, skip the slow init
        nearid = randomise(NearIDModel(NearIDConfig(vision_config=dict(vision))), 2)
    family.place(device, dtype)
    family.add_lora(rank=4, alpha=4.0, dropout=0.0)  # LoRA in fp32, as the trainer keeps it
    size = vision["image_size"]
    scorer = NearIDScorer(nearid.requires_grad_(False), PreprocessConfig(size=(size, size)), device=device, dtype=dtype)
    refs = torch.rand(3, 3, size, size, generator=torch.Generator().manual_seed(3))
    reward = NearIDReward(scorer, refs, gradient_checkpointing=checkpointing)
    if checkpointing:
        family.enable_gradient_checkpointing()
    family.denoiser.train()
    return family, reward, family.reward_sampler(steps, device, dtype)


class SavedBytes:
    """Bytes autograd saves for the backward, per labelled part (`phase`), each storage once, weights excluded."""

    def __init__(self, modules) -> None:
        self.weights = {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}
        self.phase = "other"

    def pack(self, tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in self.weights and ptr not in self.seen and tensor.device.type != "meta":
            self.seen.add(ptr)
            self.bytes[self.phase] = self.bytes.get(self.phase, 0) + storage.nbytes()
        return tensor

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)

    def label_blocks(self, model: torch.nn.Module) -> dict[str, int]:
        """Count what each transformer block saves under its own label (`transformer_blocks`, FLUX's
        `single_transformer_blocks`); returns {label: number of blocks}. Under activation checkpointing a block
        saves nothing here: it keeps its inputs in the checkpoint instead."""
        counts = {}
        for label in ("transformer_blocks", "single_transformer_blocks"):
            for block in getattr(model, label, []):
                block.register_forward_pre_hook(lambda *_, label=label: setattr(self, "phase", label))
                block.register_forward_hook(lambda *_: setattr(self, "phase", "denoiser"))
                counts[label] = counts.get(label, 0) + 1
        return counts


def reward_step(family, reward, sampler, mode: str, resolution: int, device, dtype, seq: int = 512,
                saved: SavedBytes | None = None) -> float:
    """One reward gradient step of `mode` (the trainer's samplers): sample, decode, NearID loss, backward; the loss.
    With `saved`, the bytes saved for the backward are counted per part (transformer / vae / nearid)."""
    import contextlib

    from reward_finetune.sampling import draft_lv_sample, draft_sample, refl_sample

    gen = torch.Generator().manual_seed(0)
    latents = sampler.initial_latents(1, resolution, gen)
    cond, uncond = conditioning(family, 1, seq, device, dtype)
    scale = family.default_guidance_scale
    denoise = family.denoiser_fn(family.denoiser, cond, uncond, scale)
    last = len(sampler.timesteps) - 1
    saved = saved or SavedBytes([])
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32), \
            (saved.hooks() if saved.weights else contextlib.nullcontext()):
        saved.phase = "denoiser"
        if mode == "refl":
            x = refl_sample(sampler, denoise, latents, last)
        elif mode == "draft-1":
            x = draft_sample(sampler, denoise, latents, 1)
        else:  # draft_lv n=2
            copies = family.denoiser_fn(family.denoiser, cond.repeat(2), None if uncond is None else uncond.repeat(2),
                                        scale)
            x = draft_lv_sample(sampler, denoise, latents, 2, generator=gen, denoise_copies=copies)
        saved.phase = "vae"
        images = family.decode_latents(x)
        saved.phase = "nearid"
        loss = reward(images).mean()
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
    family, reward, sampler = build(args.scorer_size, device, dtype, args.checkpointing, args.steps, args.family,
                                    args.depth)
    build_s = time.perf_counter() - start
    saved = SavedBytes([family.denoiser, family.vae, reward.scorer.model])
    blocks = saved.label_blocks(family.denoiser)
    seq = args.max_sequence_length
    reward_step(family, reward, sampler, args.mode, args.resolution, device, dtype, seq, saved)  # warm-up
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
        loss = reward_step(family, reward, sampler, args.mode, args.resolution, device, dtype, seq)
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
            "loss": loss, "build_s": build_s, "saved_gib": {k: v / 2**30 for k, v in saved.bytes.items()}, "blocks": blocks}


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
    parser.add_argument("--family", choices=("sd15", "flux", "sd3"), default="sd15")
    parser.add_argument("--depth", default=None,
                        help="flow transformer blocks: FLUX 'double,single' (default 1,1), SD3 'N' (default 2)")
    parser.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens of the random prompt")
    parser.add_argument("--mode", default="refl", help=argparse.SUPPRESS)  # child mode
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.depth = args.depth or {"sd15": "", "flux": "1,1", "sd3": "2"}[args.family]
    default_dtype = "bfloat16" if args.family != "sd15" else "float16" if args.device.startswith("cuda") else "float32"
    args.dtype = args.dtype or default_dtype
    if args.child:
        print("RESULT " + json.dumps(measure(args)))
        return
    model = {"sd15": "SD1.5 UNet + LoRA r4, SD VAE",
             "flux": f"FLUX.1-dev transformer at real width, blocks {args.depth} + LoRA r4, FLUX VAE, T5 "
                     f"{args.max_sequence_length} tok",
             "sd3": f"SD3.5-large transformer at real width, {args.depth} blocks + LoRA r4, SD3 VAE, CFG 7, T5 "
                    f"{args.max_sequence_length} tok"}[args.family]
    print(f"reward step | {model}, NearID {args.scorer_size} | {args.resolution}px | "
          f"{args.steps} sampler steps | {args.device} {args.dtype} | threads={args.threads or torch.get_num_threads()}")
    for mode in args.modes.split(","):
        results = []
        for checkpointing in (False, True):  # each configuration in its own process
            cmd = [sys.executable, __file__, "--child", "--mode", mode, "--steps", str(args.steps), "--resolution",
                   str(args.resolution), "--scorer-size", args.scorer_size, "--device", args.device, "--dtype",
                   args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads), "--family",
                   args.family, "--depth", args.depth, "--max-sequence-length", str(args.max_sequence_length)]
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
            if r["saved_gib"]:
                per_block = {k: v / r["blocks"][k] for k, v in r["saved_gib"].items() if k in r["blocks"]}
                print("      saved for backward (GiB): " + ", ".join(f"{k} {v:.4f}" for k, v in r["saved_gib"].items())
                      + "".join(f"; per {k[:-1]} {v:.4f}" for k, v in per_block.items()))
        plain, ckpt = results
        print(f"  {mode:8s} checkpointing: memory x{ckpt['peak_extra_gib'] / max(plain['peak_extra_gib'], 1e-9):.2f}, "
              f"time x{ckpt['step_s'] / plain['step_s']:.2f}; same loss: {abs(plain['loss'] - ckpt['loss']) < 1e-4}")


if __name__ == "__main__":
    main()
