"""LoRA personalisation of SD1.5 / SDXL with NearID as a differentiable identity reward.

    accelerate launch -m reward_finetune.train \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --reward_mode refl --reward_weight 0.1 --reward_schedule linear --reward_warmup_steps 100 \\
        --validation_prompt "a photo of sks dog on the beach" --checkpointing_steps 100 \\
        --mixed_precision fp16 --gradient_checkpointing --output_dir sks-dog

One trainer for both model families (SDXL adds a second text encoder, pooled embeddings and `add_time_ids`). Each
optimisation step adds, with their weights:

* the DreamBooth denoising loss on the instance images (+ prior preservation on class images), and
* the identity reward `1 - cos(NearID(generated), NearID(instance images))`, computed on images the model samples
  itself, by one of two modes:
  - `refl` (ReFL): DDIM-sample without gradients to a random late step, predict x0 in one step with gradients,
    VAE-decode, score;
  - `draft` (DRaFT-K): DDIM-sample to the end, keeping gradients through the last K steps only, decode, score.
  Its weight follows `--reward_schedule` (constant, or a linear ramp from `--reward_start_step`).

At every checkpoint the validation images are scored with NearID against the instance images: the identity curve is
written to `identity.csv` and `identity_curve.png`, logged to the trackers, and the best checkpoint is recorded in
`best_checkpoint.json`. Outputs: `pytorch_lora_weights.safetensors` (diffusers keys, `pipe.load_lora_weights`) and
a kohya-key copy for ComfyUI's LoraLoader. All randomness of a step is drawn from a generator seeded by
(seed, step), so a resumed run continues exactly as an uninterrupted one.
"""

from __future__ import annotations

import csv
import json
import logging
import shutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.optimization import get_scheduler
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image
from tqdm.auto import tqdm
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from nearid_core.preprocessing import IMAGE_SUFFIXES
from nearid_core.preprocessing import load_image

from .config import TrainConfig, config_to_dict, parse_args
from .export import save_kohya_lora, write_model_card
from .reward import NearIDReward

logger = logging.getLogger(__name__)

LORA_TARGET_MODULES = ["to_k", "to_q", "to_v", "to_out.0"]  # as diffusers' train_dreambooth_lora*.py
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
CHECKPOINT_PREFIX = "checkpoint-"
IDENTITY_CSV = "identity.csv"
IDENTITY_PLOT = "identity_curve.png"
BEST_CHECKPOINT_JSON = "best_checkpoint.json"
TRACKER_PROJECT = "nearid-reward-lora"
KOHYA_BASE_VERSION = {"sd15": "sd_v1", "sdxl": "sdxl_base_v1-0"}  # kohya's ss_base_model_version values


# ----------------------------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Models:
    """The frozen parts of the pipeline plus the UNet that gets the LoRA."""

    model_type: str  # "sd15" | "sdxl"
    tokenizers: list
    text_encoders: list
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    noise_scheduler: DDPMScheduler


def detect_model_type(config: TrainConfig) -> str:
    """"sdxl" for StableDiffusionXL* pipelines (or ones with a second text encoder), else "sd15"."""
    if config.model_type != "auto":
        return config.model_type
    index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    return "sdxl" if "XL" in index.get("_class_name", "") or "text_encoder_2" in index else "sd15"


def load_models(config: TrainConfig, model_type: str) -> Models:
    """Load tokenizer(s), text encoder(s), VAE, UNet and noise scheduler from a hub id or a pipeline directory."""
    path, rev, var = config.pretrained_model_name_or_path, config.revision, config.variant
    tokenizers = [CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=rev)]
    text_encoders = [CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=rev, variant=var)]
    if model_type == "sdxl":
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=rev))
        text_encoders.append(
            CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", revision=rev, variant=var)
        )
    vae_path = config.pretrained_vae_model_name_or_path
    vae = AutoencoderKL.from_pretrained(vae_path or path, subfolder=None if vae_path else "vae",
                                        revision=None if vae_path else rev, variant=None if vae_path else var)
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=rev, variant=var)
    noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=rev)
    if config.prediction_type is not None:
        noise_scheduler.register_to_config(prediction_type=config.prediction_type)
    return Models(model_type, tokenizers, text_encoders, vae, unet, noise_scheduler)


def add_lora(unet: UNet2DConditionModel, config: TrainConfig) -> None:
    """Freeze the UNet and add a PEFT LoRA adapter on the attention projections (diffusers' dreambooth recipe)."""
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=config.rank, lora_alpha=config.effective_lora_alpha, lora_dropout=config.lora_dropout,
                                init_lora_weights="gaussian", target_modules=LORA_TARGET_MODULES))


def unet_lora_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's LoRA tensors with diffusers keys (`<module>.lora_A.weight`, no `unet.` prefix)."""
    return convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))


def lora_metadata(unet: torch.nn.Module) -> dict:
    """The adapter's rank/alpha/targets, stored in the safetensors header so `load_lora_weights` rebuilds it exactly."""
    cfg = unet.peft_config["default"]
    return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
            "target_modules": sorted(cfg.target_modules), "use_dora": cfg.use_dora, "bias": cfg.bias}


def save_lora(unet: torch.nn.Module, directory: str | Path, model_type: str, config: TrainConfig) -> None:
    """Write both LoRA files into `directory`: diffusers keys (`pytorch_lora_weights.safetensors`) and kohya keys."""
    state = unet_lora_state_dict(unet)
    pipeline_cls = StableDiffusionXLPipeline if model_type == "sdxl" else StableDiffusionPipeline
    pipeline_cls.save_lora_weights(save_directory=str(directory), unet_lora_layers=state,
                                   unet_lora_adapter_metadata=lora_metadata(unet), safe_serialization=True)
    save_kohya_lora(state, Path(directory) / config.kohya_lora_name, alpha=config.effective_lora_alpha,
                    metadata={"ss_base_model_version": KOHYA_BASE_VERSION[model_type],
                              "ss_sd_model_name": config.pretrained_model_name_or_path})


def load_lora_into_unet(unet: torch.nn.Module, directory: str | Path) -> None:
    """Load `pytorch_lora_weights.safetensors` from a checkpoint folder into a UNet that already has the adapter."""
    state, _ = StableDiffusionPipeline.lora_state_dict(str(directory))
    unet_state = {k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")}
    unet_state = convert_unet_state_dict_to_peft(unet_state)
    result = set_peft_model_state_dict(unet, unet_state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise RuntimeError(f"Checkpoint {directory} has LoRA keys this UNet does not: {unexpected[:5]}")


# ----------------------------------------------------------------------------------------------------------------------
# Prompts and UNet calls
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Conditioning:
    """Text conditioning of a batch: prompt_embeds [B, L, C]; SDXL adds pooled [B, P] and time_ids [B, 6]."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor | None = None
    time_ids: torch.Tensor | None = None

    def unet_kwargs(self) -> dict:
        kwargs = {"encoder_hidden_states": self.prompt_embeds}
        if self.pooled is not None:
            kwargs["added_cond_kwargs"] = {"text_embeds": self.pooled, "time_ids": self.time_ids}
        return kwargs

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        pooled = None if parts[0].pooled is None else torch.cat([p.pooled for p in parts])
        time_ids = None if parts[0].time_ids is None else torch.cat([p.time_ids for p in parts])
        return Conditioning(torch.cat([p.prompt_embeds for p in parts]), pooled, time_ids)


@torch.no_grad()
def encode_prompts(
    text_encoders: list, tokenizers: list, prompts: list[str]
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Prompts -> (prompt_embeds [B, L, C], pooled [B, P] or None) as diffusers' SD1.5 / SDXL pipelines build them.

    SD1.x: the text encoder's last hidden state. SDXL: the penultimate hidden states of both encoders concatenated
    along C, and the second encoder's projected pooled output.
    """
    if len(text_encoders) == 1:
        tok, enc = tokenizers[0], text_encoders[0]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(enc.device))[0], None
    embeds, pooled = [], None
    for tok, enc in zip(tokenizers, text_encoders):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        pooled = out[0]
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def sdxl_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """SDXL micro-conditioning `add_time_ids` [6]: original (h, w), crop top-left (y, x), target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


class PromptCache:
    """Text embeddings of the run's few fixed prompts, computed once (the text encoders are frozen)."""

    def __init__(self, models: Models, dtype: torch.dtype) -> None:
        self.models, self.dtype, self._cache = models, dtype, {}

    def __call__(self, prompts: list[str], time_ids: torch.Tensor | None = None) -> Conditioning:
        """Conditioning for a batch of prompts; `time_ids` [B, 6] is required for SDXL."""
        for p in set(prompts) - self._cache.keys():
            embeds, pooled = encode_prompts(self.models.text_encoders, self.models.tokenizers, [p])
            self._cache[p] = (embeds.to(self.dtype), None if pooled is None else pooled.to(self.dtype))
        embeds = torch.cat([self._cache[p][0] for p in prompts])
        if self.models.model_type != "sdxl":
            return Conditioning(embeds)
        if time_ids is None:
            raise ValueError("SDXL conditioning needs time_ids [B, 6].")
        pooled = torch.cat([self._cache[p][1] for p in prompts])
        return Conditioning(embeds, pooled, time_ids.to(embeds.device, self.dtype))


def unet_predict(
    unet: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor, cond: Conditioning
) -> torch.Tensor:
    """One UNet call -> model output [B, 4, h, w] (noise or v, per the scheduler's prediction type)."""
    return unet(latents, timestep, **cond.unet_kwargs(), return_dict=False)[0]


def make_denoiser(
    unet: torch.nn.Module, cond: Conditioning, uncond: Conditioning | None = None, guidance_scale: float = 1.0
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """`denoise(latents, t) -> model output`, with classifier-free guidance when `guidance_scale > 1`."""
    if uncond is None or guidance_scale <= 1.0:
        return lambda latents, t: unet_predict(unet, latents, t, cond)
    both = Conditioning.cat([uncond, cond])

    def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        out_uncond, out_cond = unet_predict(unet, torch.cat([latents, latents]), t, both).chunk(2)
        return out_uncond + guidance_scale * (out_cond - out_uncond)

    return denoise


# ----------------------------------------------------------------------------------------------------------------------
# Reward samplers (ReFL, DRaFT-K)
# ----------------------------------------------------------------------------------------------------------------------


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate x0 from x_t and the model output at `timestep` (epsilon, v_prediction or sample)."""
    alpha_prod = scheduler.alphas_cumprod.to(sample.device)[timestep].to(torch.float32)
    a, s = alpha_prod.sqrt(), (1 - alpha_prod).sqrt()
    kind = scheduler.config.prediction_type
    x, out = sample.float(), model_output.float()
    if kind == "epsilon":
        return (x - s * out) / a
    if kind == "v_prediction":
        return a * x - s * out
    if kind == "sample":
        return out
    raise ValueError(f"Unsupported prediction_type {kind!r}.")


def _ddim_step(scheduler, denoise, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    out = denoise(scheduler.scale_model_input(latents, t), t)
    return scheduler.step(out, t, latents, return_dict=False)[0].to(latents.dtype)


def refl_sample(denoise: Callable, scheduler, latents: torch.Tensor, stop_index: int) -> torch.Tensor:
    """ReFL: sample without gradients up to `scheduler.timesteps[stop_index]`, then predict x0 in one step with
    gradients.

    Args:
        denoise: `denoise(latents, t) -> model output` (see `make_denoiser`).
        scheduler: a scheduler with `set_timesteps` already called (DDIM).
        latents: initial noise [B, 4, h, w] (already scaled by `init_noise_sigma`).
        stop_index: index into `scheduler.timesteps`, 0 <= stop_index < len(timesteps).

    Returns:
        x0 latents [B, 4, h, w] float32, whose graph holds exactly one `denoise` call.
    """
    timesteps = scheduler.timesteps
    if not 0 <= stop_index < len(timesteps):
        raise ValueError(f"stop_index must be in [0, {len(timesteps)}); got {stop_index}.")
    with torch.no_grad():
        for t in timesteps[:stop_index]:
            latents = _ddim_step(scheduler, denoise, latents, t)
    t = timesteps[stop_index]
    return predict_x0(scheduler, latents, denoise(scheduler.scale_model_input(latents, t), t), t)


def draft_sample(denoise: Callable, scheduler, latents: torch.Tensor, k: int) -> torch.Tensor:
    """DRaFT-K: sample the whole schedule; gradients flow through the last `k` steps only (truncated backprop).

    Returns:
        Final latents [B, 4, h, w], whose graph holds exactly the last `k` `denoise` calls.
    """
    timesteps = scheduler.timesteps
    if not 1 <= k <= len(timesteps):
        raise ValueError(f"k must be in [1, {len(timesteps)}]; got {k}.")
    first_grad = len(timesteps) - k
    for i, t in enumerate(timesteps):
        with torch.set_grad_enabled(i >= first_grad):
            latents = _ddim_step(scheduler, denoise, latents, t)
    return latents


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> images [B, 3, H, W] in about [-1, 1] (differentiable)."""
    latents = latents.to(vae.dtype) / vae.config.scaling_factor
    if getattr(vae.config, "shift_factor", None):
        latents = latents + vae.config.shift_factor
    return vae.decode(latents, return_dict=False)[0]


def encode_images(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] -> scaled latents [B, 4, h, w] (one posterior sample)."""
    latents = vae.encode(pixels.to(vae.dtype)).latent_dist.sample(generator=generator)
    if getattr(vae.config, "shift_factor", None):
        latents = latents - vae.config.shift_factor
    return latents * vae.config.scaling_factor


def reward_weight_at(step: int, config: TrainConfig) -> float:
    """Weight of the reward at optimisation step `step` (0-based): 0 before `--reward_start_step`, then
    `--reward_weight` (constant) or a linear ramp reaching it after `--reward_warmup_steps` (linear); 0 on steps
    skipped by `--reward_every` and when `--reward_mode none`."""
    if config.reward_mode == "none" or step < config.reward_start_step:
        return 0.0
    since = step - config.reward_start_step
    if since % config.reward_every:
        return 0.0
    if config.reward_schedule == "linear" and config.reward_warmup_steps > 0:
        return config.reward_weight * min(1.0, (since + 1) / config.reward_warmup_steps)
    return config.reward_weight


# ----------------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------------


def image_files(directory: str | Path) -> list[Path]:
    """Image files of a folder, sorted by name."""
    files = sorted(p for p in Path(directory).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"No images ({', '.join(IMAGE_SUFFIXES)}) in {directory}.")
    return files


@dataclass
class ImageSet:
    """Images resized so that the short side is the training resolution, kept as [3, h, w] tensors in [-1, 1]."""

    images: list[torch.Tensor]
    original_sizes: list[tuple[int, int]]

    @classmethod
    def from_folder(cls, directory: str | Path, resolution: int, limit: int | None = None) -> "ImageSet":
        images, sizes = [], []
        for path in image_files(directory)[:limit]:
            img = load_image(path)
            sizes.append((img.height, img.width))
            scale = resolution / min(img.size)
            img = img.resize((max(resolution, round(img.width * scale)), max(resolution, round(img.height * scale))),
                             Image.BILINEAR)
            x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 127.5 - 1
            images.append(x)
        return cls(images, sizes)

    def __len__(self) -> int:
        return len(self.images)

    def sample(self, n: int, resolution: int, generator: torch.Generator, center_crop: bool = False,
               random_flip: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """n random crops: (pixels [n, 3, R, R] in [-1, 1], SDXL time_ids [n, 6])."""
        pixels, time_ids = [], []
        for i in torch.randint(len(self.images), (n,), generator=generator).tolist():
            x = self.images[i]
            h, w = x.shape[-2:]
            if center_crop:
                top, left = (h - resolution) // 2, (w - resolution) // 2
            else:
                top = int(torch.randint(h - resolution + 1, (1,), generator=generator))
                left = int(torch.randint(w - resolution + 1, (1,), generator=generator))
            x = x[:, top: top + resolution, left: left + resolution]
            if random_flip and bool(torch.rand((), generator=generator) < 0.5):
                x = x.flip(-1)
            pixels.append(x)
            time_ids.append(sdxl_time_ids(self.original_sizes[i], (top, left), (resolution, resolution)))
        return torch.stack(pixels), torch.stack(time_ids)


def step_generator(seed: int | None, step: int, process_index: int = 0, stream: int = 0) -> torch.Generator:
    """CPU generator for one (micro-)step: everything random in a step comes from here, so resuming is exact."""
    base = 0 if seed is None else seed
    return torch.Generator().manual_seed((base * 1_000_003 + step * 7919 + process_index * 104_729 + stream) % 2**63)


def ensure_class_images(config: TrainConfig, models: Models) -> None:
    """Generate the missing class images for prior preservation with the base model (before the LoRA is added)."""
    class_dir = Path(config.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    missing = config.num_class_images - have
    if missing <= 0:
        return
    logger.info("Generating %d class images for %r in %s", missing, config.class_prompt, class_dir)
    pipe = build_pipeline(models, models.unet)
    generator = torch.Generator().manual_seed(config.seed or 0)
    for start in range(0, missing, config.sample_batch_size):
        n = min(config.sample_batch_size, missing - start)
        with torch.no_grad():
            images = pipe([config.class_prompt] * n, num_inference_steps=config.validation_num_inference_steps,
                          guidance_scale=config.validation_guidance_scale, height=config.resolution,
                          width=config.resolution, generator=generator).images
        for i, image in enumerate(images):
            image.save(class_dir / f"class_{have + start + i:05d}.png")


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints (diffusers-style checkpoint-{step} folders)
# ----------------------------------------------------------------------------------------------------------------------


def checkpoint_step(path: str | Path) -> int:
    """`.../checkpoint-1500` -> 1500."""
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """checkpoint-{step} folders of `output_dir`, oldest (lowest step) first."""
    if not Path(output_dir).is_dir():
        return []
    found = [p for p in Path(output_dir).iterdir()
             if p.is_dir() and p.name.startswith(CHECKPOINT_PREFIX) and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=checkpoint_step)


def prune_checkpoints(output_dir: str | Path, total_limit: int | None, protect: Sequence[str] = ()) -> list[Path]:
    """Before saving one more checkpoint, delete the oldest so that at most `total_limit` remain afterwards.

    Folders named in `protect` (the best checkpoint) are never deleted, even if that keeps one more than the limit.
    Returns the deleted folders.
    """
    if total_limit is None:
        return []
    candidates = [p for p in list_checkpoints(output_dir) if p.name not in protect]
    kept = len(list_checkpoints(output_dir))
    removed = []
    for path in candidates:
        if kept < total_limit:
            break
        shutil.rmtree(path)
        removed.append(path)
        kept -= 1
    if removed:
        logger.info("checkpoints_total_limit=%d: removed %s", total_limit, ", ".join(p.name for p in removed))
    return removed


def resolve_resume_checkpoint(output_dir: str | Path, resume: str | None) -> Path | None:
    """`--resume_from_checkpoint` -> the folder to load: "latest" = highest step in `output_dir` (None if there is
    none: a fresh start), otherwise the path as given or under `output_dir`."""
    if resume is None:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        path = Path(output_dir) / path.name
    if not path.is_dir():
        raise FileNotFoundError(f"Checkpoint {resume!r} not found (also looked in {output_dir}).")
    return path


def register_lora_checkpoint_hooks(accelerator: Accelerator, unet: torch.nn.Module, model_type: str,
                                   config: TrainConfig) -> None:
    """Make `accelerator.save_state` write only the LoRA (both key formats) and `load_state` read it back."""
    unet_cls = type(accelerator.unwrap_model(unet))

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        for model in models:
            if isinstance(accelerator.unwrap_model(model), unet_cls):
                save_lora(accelerator.unwrap_model(model), output_dir, model_type, config)
            if weights:
                weights.pop()  # keep accelerate from writing the full frozen UNet

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            if isinstance(accelerator.unwrap_model(model), unet_cls):
                load_lora_into_unet(accelerator.unwrap_model(model), input_dir)
                cast_training_params(model, dtype=torch.float32)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ----------------------------------------------------------------------------------------------------------------------
# Identity validation log
# ----------------------------------------------------------------------------------------------------------------------


class IdentityLog:
    """The identity curve: one row per validation (`identity.csv`), its plot and the best checkpoint.

    The score of a validation is the mean NearID cosine, in [-1, 1] (higher = closer to the subject), of the
    validation images to the instance images (reduced over them as `--reward_reduce`). The row of the base model
    (step 0, checkpoint "base") is plotted but cannot be the best checkpoint.
    """

    FIELDS = ("step", "checkpoint", "identity_mean", "identity_min", "identity_max", "scores")

    def __init__(self, output_dir: str | Path) -> None:
        self.output_dir = Path(output_dir)
        self.rows: list[dict] = []
        path = self.output_dir / IDENTITY_CSV
        if path.exists():
            with path.open(newline="") as f:
                for row in csv.DictReader(f):
                    row["step"] = int(row["step"])
                    for key in ("identity_mean", "identity_min", "identity_max"):
                        row[key] = float(row[key])
                    self.rows.append(row)

    def truncate_after(self, step: int) -> None:
        """Forget rows after `step` (a resumed run redoes them)."""
        self.rows = [r for r in self.rows if r["step"] <= step]
        self._write()

    def append(self, step: int, checkpoint: str, scores: torch.Tensor) -> dict:
        scores = scores.detach().float().cpu()
        row = {"step": step, "checkpoint": checkpoint, "identity_mean": float(scores.mean()),
               "identity_min": float(scores.min()), "identity_max": float(scores.max()),
               "scores": " ".join(f"{s:.5f}" for s in scores.tolist())}
        self.rows = [r for r in self.rows if r["step"] != step] + [row]
        self._write()
        return row

    def best(self) -> dict | None:
        """The checkpoint row with the highest mean identity (the earliest on ties), or None."""
        eligible = [r for r in self.rows if r["checkpoint"] != "base"]
        return max(eligible, key=lambda r: (r["identity_mean"], -r["step"])) if eligible else None

    def _write(self) -> None:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        with (self.output_dir / IDENTITY_CSV).open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.FIELDS)
            writer.writeheader()
            writer.writerows(self.rows)
        best = self.best()
        best_path = self.output_dir / BEST_CHECKPOINT_JSON
        if best is None:
            best_path.unlink(missing_ok=True)
        else:
            lora = (LORA_WEIGHT_NAME if best["checkpoint"] == "final" else f"{best['checkpoint']}/{LORA_WEIGHT_NAME}")
            best_path.write_text(json.dumps({
                "checkpoint": best["checkpoint"], "step": best["step"], "identity_mean": best["identity_mean"],
                "lora_weights": lora,
                "metric": "mean NearID cosine of the validation images to the instance images (higher is better)",
            }, indent=2))
        if self.rows:
            self._plot(best)

    def _plot(self, best: dict | None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = sorted(self.rows, key=lambda r: r["step"])
        steps = [r["step"] for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.fill_between(steps, [r["identity_min"] for r in rows], [r["identity_max"] for r in rows], alpha=0.2,
                        label="min-max")
        ax.plot(steps, [r["identity_mean"] for r in rows], marker="o", label="mean")
        if best is not None:
            ax.plot([best["step"]], [best["identity_mean"]], marker="*", markersize=16, color="tab:red", linestyle="",
                    label=f"best: {best['checkpoint']}")
        ax.set_xlabel("step")
        ax.set_ylabel("NearID identity (cosine)")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize=8)
        fig.tight_layout()
        fig.savefig(self.output_dir / IDENTITY_PLOT, dpi=100)
        plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the step, checkpoint and validation functions share."""

    config: TrainConfig
    accelerator: Accelerator
    models: Models
    unet: torch.nn.Module  # prepared (possibly wrapped) UNet with the LoRA adapter
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    weight_dtype: torch.dtype
    prompts: PromptCache
    instance: ImageSet
    classes: ImageSet | None
    reward: NearIDReward | None
    reward_scheduler: DDIMScheduler
    identity_log: IdentityLog
    global_step: int = 0
    logs: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def make_accelerator(config: TrainConfig) -> Accelerator:
    project = ProjectConfiguration(project_dir=config.output_dir,
                                   logging_dir=str(Path(config.output_dir) / config.logging_dir))
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                       mixed_precision=config.mixed_precision,
                       log_with=None if config.report_to == "none" else config.report_to, project_config=project)


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def build_pipeline(models: Models, unet: torch.nn.Module) -> DiffusionPipeline:
    """An inference pipeline over the loaded components (no safety checker: it would blank images before scoring)."""
    scheduler = DPMSolverMultistepScheduler.from_config(models.noise_scheduler.config)
    if models.model_type == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=models.vae, text_encoder=models.text_encoders[0],
                                         text_encoder_2=models.text_encoders[1], tokenizer=models.tokenizers[0],
                                         tokenizer_2=models.tokenizers[1], unet=unet, scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(vae=models.vae, text_encoder=models.text_encoders[0],
                                       tokenizer=models.tokenizers[0], unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def place_models(config: TrainConfig, accelerator: Accelerator, models: Models, weight_dtype: torch.dtype) -> None:
    """Freeze everything and move it to the device: text encoders and UNet in the weight dtype, the VAE too except
    SDXL's own VAE, which overflows in fp16 and stays fp32 (as in diffusers' SDXL script)."""
    device = accelerator.device
    models.vae.requires_grad_(False)
    models.unet.requires_grad_(False)
    for enc in models.text_encoders:
        enc.requires_grad_(False).to(device, dtype=weight_dtype)
    keep_fp32 = models.model_type == "sdxl" and not config.pretrained_vae_model_name_or_path
    models.vae.to(device, dtype=torch.float32 if keep_fp32 else weight_dtype)
    models.unet.to(device, dtype=weight_dtype)


def make_trainable(config: TrainConfig, models: Models, weight_dtype: torch.dtype) -> None:
    """Add the LoRA, switch on gradient checkpointing (UNet, and the VAE decoder used by the reward); the LoRA
    weights stay fp32 under mixed precision (autocast runs the matmuls in half precision)."""
    add_lora(models.unet, config)
    if config.gradient_checkpointing:
        models.unet.enable_gradient_checkpointing()
        models.vae.enable_gradient_checkpointing()
    if weight_dtype != torch.float32:
        cast_training_params(models.unet, dtype=torch.float32)


def make_optimizer(config: TrainConfig, accelerator: Accelerator, unet: torch.nn.Module):
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    return optimizer, lr_scheduler


def make_reward(config: TrainConfig, accelerator: Accelerator, weight_dtype: torch.dtype) -> NearIDReward | None:
    """The NearID reward (also the validation scorer); None when neither reward nor validation needs it."""
    if config.reward_mode == "none" and config.validation_prompt is None:
        return None
    return NearIDReward(config.nearid_model, [str(p) for p in image_files(config.instance_data_dir)],
                        reduce=config.reward_reduce, gradient_checkpointing=config.gradient_checkpointing,
                        device=accelerator.device, dtype=weight_dtype)


def setup_run(config: TrainConfig) -> Run:
    """Accelerator, models, LoRA, optimizer, data, reward: everything before the first step."""
    accelerator = make_accelerator(config)
    if config.seed is not None:
        set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    model_type = detect_model_type(config)
    models = load_models(config, model_type)
    weight_dtype = weight_dtype_of(accelerator)
    place_models(config, accelerator, models, weight_dtype)
    if config.with_prior_preservation and accelerator.is_main_process:
        ensure_class_images(config, models)  # with the base model, before the LoRA
    accelerator.wait_for_everyone()
    make_trainable(config, models, weight_dtype)
    register_lora_checkpoint_hooks(accelerator, models.unet, model_type, config)
    optimizer, lr_scheduler = make_optimizer(config, accelerator, models.unet)
    unet, optimizer, lr_scheduler = accelerator.prepare(models.unet, optimizer, lr_scheduler)
    instance = ImageSet.from_folder(config.instance_data_dir, config.resolution)
    classes = (ImageSet.from_folder(config.class_data_dir, config.resolution, limit=config.num_class_images)
               if config.with_prior_preservation else None)
    reward_scheduler = DDIMScheduler.from_config(models.noise_scheduler.config)
    return Run(config, accelerator, models, unet, optimizer, lr_scheduler, weight_dtype,
               PromptCache(models, weight_dtype), instance, classes, make_reward(config, accelerator, weight_dtype),
               reward_scheduler, IdentityLog(config.output_dir))


def denoising_loss(run: Run, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DreamBooth loss on a batch of instance images (+ class images for prior preservation): MSE to the noise
    (or v) target at random timesteps."""
    c = run.config
    pixels, time_ids = run.instance.sample(c.train_batch_size, c.resolution, generator, c.center_crop, c.random_flip)
    prompts = [c.instance_prompt] * c.train_batch_size
    if run.classes is not None:
        class_pixels, class_time_ids = run.classes.sample(c.train_batch_size, c.resolution, generator, c.center_crop,
                                                          c.random_flip)
        pixels, time_ids = torch.cat([pixels, class_pixels]), torch.cat([time_ids, class_time_ids])
        prompts += [c.class_prompt] * c.train_batch_size
    vae, scheduler = run.models.vae, run.models.noise_scheduler
    with torch.no_grad():
        latents = encode_images(vae, pixels.to(run.device), generator).to(run.weight_dtype)
    noise = torch.randn(latents.shape, generator=generator).to(latents)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
    timesteps = timesteps.to(run.device)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, timesteps)
    pred = unet_predict(run.unet, noisy, timesteps, run.prompts(prompts, time_ids))
    if run.classes is None:
        loss = F.mse_loss(pred.float(), target.float())
        return loss, {"denoising_loss": loss.item()}
    pred, prior_pred = pred.chunk(2)
    target, prior_target = target.chunk(2)
    instance_loss = F.mse_loss(pred.float(), target.float())
    prior_loss = F.mse_loss(prior_pred.float(), prior_target.float())
    return instance_loss + c.prior_loss_weight * prior_loss, {"denoising_loss": instance_loss.item(),
                                                              "prior_loss": prior_loss.item()}


def reward_loss(run: Run, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Sample images with the current LoRA (ReFL or DRaFT-K), decode them and score them: loss [B] = 1 - cosine."""
    c = run.config
    b = c.reward_batch_size
    res = c.reward_resolution or c.resolution
    prompts = c.reward_prompt or [c.instance_prompt]
    batch_prompts = [prompts[(run.global_step * b + i) % len(prompts)] for i in range(b)]
    time_ids = torch.stack([sdxl_time_ids((res, res), (0, 0), (res, res))] * b)
    cond = run.prompts(batch_prompts, time_ids)
    uncond = run.prompts([""] * b, time_ids) if c.reward_guidance_scale > 1 else None
    denoise = make_denoiser(run.unet, cond, uncond, c.reward_guidance_scale)
    scheduler = run.reward_scheduler
    scheduler.set_timesteps(c.reward_num_inference_steps, device=run.device)
    factor = 2 ** (len(run.models.vae.config.block_out_channels) - 1)
    shape = (b, run.models.unet.config.in_channels, res // factor, res // factor)
    latents = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(run.device, run.weight_dtype)
    if c.reward_mode == "refl":
        lo, hi = c.refl_step_range
        stop = int(torch.randint(lo, hi, (1,), generator=generator))
        latents = refl_sample(denoise, scheduler, latents, stop)
    else:
        latents = draft_sample(denoise, scheduler, latents, c.draft_k)
    losses = run.reward(decode_latents(run.models.vae, latents), input_range="-1,1")
    return losses, {"reward_loss": losses.mean().item(), "identity": 1.0 - losses.mean().item()}


def training_step(run: Run) -> dict:
    """One optimisation step (`--gradient_accumulation_steps` micro-batches); returns the logs."""
    c, acc = run.config, run.accelerator
    logs: dict = {}
    weight = reward_weight_at(run.global_step, c)
    for micro in range(c.gradient_accumulation_steps):
        micro_step = run.global_step * c.gradient_accumulation_steps + micro
        generator = step_generator(c.seed, micro_step, acc.process_index)
        with acc.accumulate(run.unet):
            if c.denoising_loss_weight > 0:
                with acc.autocast():
                    loss, parts = denoising_loss(run, generator)
                acc.backward(c.denoising_loss_weight * loss)
                logs.update(parts)
            if weight > 0:  # separate backward: the denoising graph is already freed
                with acc.autocast():
                    losses, parts = reward_loss(run, generator)
                acc.backward(weight * losses.mean())
                logs.update(parts)
            if acc.sync_gradients and c.max_grad_norm > 0:
                acc.clip_grad_norm_([p for p in run.unet.parameters() if p.requires_grad], c.max_grad_norm)
            run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
    logs["reward_weight"] = weight
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    return logs


def save_checkpoint(run: Run) -> Path:
    """Prune (keeping the best), then `accelerator.save_state` into output_dir/checkpoint-{step}."""
    best = run.identity_log.best()
    prune_checkpoints(run.config.output_dir, run.config.checkpoints_total_limit,
                      protect=[best["checkpoint"]] if best else [])
    path = Path(run.config.output_dir) / f"{CHECKPOINT_PREFIX}{run.global_step}"
    run.accelerator.save_state(str(path))
    logger.info("Saved %s", path)
    return path


def resume(run: Run) -> None:
    """Load the checkpoint named by `--resume_from_checkpoint` (LoRA, optimizer, LR scheduler, RNG) and set the step."""
    path = resolve_resume_checkpoint(run.config.output_dir, run.config.resume_from_checkpoint)
    if path is None:
        if run.config.resume_from_checkpoint is not None:
            logger.info("No checkpoint in %s to resume from: starting a new run.", run.config.output_dir)
        return
    logger.info("Resuming from %s", path)
    run.accelerator.load_state(str(path))
    run.global_step = checkpoint_step(path)
    run.identity_log.truncate_after(run.global_step)


@torch.no_grad()
def validate(run: Run, checkpoint: str) -> dict | None:
    """Sample the validation prompt, score the images with NearID against the instance images, log the curve."""
    c, acc = run.config, run.accelerator
    if c.validation_prompt is None or not acc.is_main_process:
        return None
    unet = acc.unwrap_model(run.unet)
    was_training = unet.training
    unet.eval()
    pipe = build_pipeline(run.models, unet)
    generator = torch.Generator().manual_seed(c.seed or 0)
    with acc.autocast():
        images = pipe([c.validation_prompt] * c.num_validation_images,
                      num_inference_steps=c.validation_num_inference_steps, guidance_scale=c.validation_guidance_scale,
                      height=c.resolution, width=c.resolution,
                      generator=generator, output_type="pt").images
    unet.train(was_training)
    images = images.float().clamp(0, 1)
    scores = run.reward.similarity(images, input_range="0,1")
    row = run.identity_log.append(run.global_step, checkpoint, scores)
    _save_validation_images(images, Path(c.output_dir) / "validation" / f"step-{run.global_step:06d}")
    acc.log({"validation/identity_mean": row["identity_mean"], "validation/identity_min": row["identity_min"],
             "validation/identity_max": row["identity_max"]}, step=run.global_step)
    _log_images_to_trackers(acc, images, run.global_step)
    logger.info("step %d (%s): NearID identity %.4f (min %.4f, max %.4f)", run.global_step, checkpoint,
                row["identity_mean"], row["identity_min"], row["identity_max"])
    return row


def _save_validation_images(images: torch.Tensor, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for i, arr in enumerate(arrays):
        Image.fromarray(arr).save(directory / f"{i:02d}.png")


def _log_images_to_trackers(accelerator: Accelerator, images: torch.Tensor, step: int) -> None:
    arrays = (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(a) for a in arrays]}, step=step)


def finish(run: Run, validated_at_last_step: bool) -> None:
    """Write the final LoRA files (diffusers + kohya), validate the final weights if not done, and the model card."""
    c, acc = run.config, run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        save_lora(acc.unwrap_model(run.unet), c.output_dir, run.models.model_type, c)
        if not validated_at_last_step:
            validate(run, "final")
        write_model_card(c.output_dir, c.pretrained_model_name_or_path, c.instance_prompt, c.reward_mode,
                         run.identity_log.rows, run.identity_log.best(), kohya_file=c.kohya_lora_name)
    acc.end_training()


def _tracker_config(config: TrainConfig) -> dict:
    return {k: v for k, v in config_to_dict(config).items() if isinstance(v, (int, float, str, bool))}


def train(config: TrainConfig) -> Run:
    """Run the whole fine-tuning; returns the final `Run` (its `identity_log` holds the identity curve)."""
    run = setup_run(config)
    resume(run)
    if run.accelerator.is_main_process and config.report_to != "none":
        run.accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config))
    if run.global_step == 0:
        validate(run, "base")
    progress = tqdm(total=config.max_train_steps, initial=run.global_step, desc="steps",
                    disable=not run.accelerator.is_local_main_process)
    validated_at_last_step = run.global_step == config.max_train_steps and run.global_step > 0
    run.unet.train()
    while run.global_step < config.max_train_steps:
        logs = training_step(run)
        run.global_step += 1
        progress.update(1)
        progress.set_postfix({k: round(v, 4) for k, v in logs.items() if k in ("denoising_loss", "reward_loss")})
        run.accelerator.log(logs, step=run.global_step)
        run.logs = logs
        validated_at_last_step = False
        if run.global_step % config.checkpointing_steps == 0 and run.accelerator.is_main_process:
            path = save_checkpoint(run)
            validated_at_last_step = validate(run, path.name) is not None
    progress.close()
    finish(run, validated_at_last_step)
    return run


def main(argv: Sequence[str] | None = None) -> Run:
    """`python -m reward_finetune.train` / `accelerate launch -m reward_finetune.train` entry point."""
    config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(config)


if __name__ == "__main__":
    main(sys.argv[1:])
