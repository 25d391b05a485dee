"""LoRA personalisation with NearID as a differentiable identity reward.

    accelerate launch -m reward_finetune.train \\
        --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --validation_prompt "a photo of sks dog on the beach" --checkpointing_steps 100 \\
        --mixed_precision fp16 --gradient_checkpointing --output_dir sks-dog

Each optimisation step adds two gradients on the LoRA parameters:

* the DreamBooth denoising loss on the instance images (+ prior preservation on class images), and
* the identity reward `1 - cos(NearID(generated), NearID(instance images))` on images the model samples itself, by
  `--reward_mode` (`refl` by default, `draft`, `draft_lv`; `none` = plain DreamBooth), see `reward_finetune.sampling`.

The two gradients are computed separately and combined as `g = g_denoising + w · g_reward`. By default
(`--reward_weighting ratio`) w is set so that ||w · g_reward|| / ||g_denoising|| = `--reward_weight` (smoothed), which
means the same for every model and resolution; `reward_finetune.weighting` has the details. Both gradient norms, w and
the reward's identity are logged to the trackers and the progress bar.

At every checkpoint (and every `--validation_epochs`) the validation images are scored against the training and the
held-out instance images and with a mean-pool similarity (`reward_finetune.validation`): `identity.csv`,
`identity_curve.png`, `best_checkpoint.json` (by held-out identity). Outputs: the family's LoRA files
(`pytorch_lora_weights.safetensors`, `pipe.load_lora_weights`) and, for SD1.5 / SDXL, a kohya-key copy for ComfyUI's
LoraLoader (ComfyUI maps the diffusers keys of FLUX.1 / SD3 itself).
All randomness of a step is drawn from generators seeded by (seed, step), with separate streams for the denoising
loss and the reward, so a resumed run continues exactly and a `--reward_mode none` control sees the same denoising
batches as a reward run.

Defaults that differ from diffusers' `train_dreambooth_lora*.py` are listed in `reward_finetune.config`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration, set_seed
from diffusers import DiffusionPipeline
from diffusers.optimization import get_scheduler
from PIL import Image
from tqdm.auto import tqdm

from nearid_core.preprocessing import IMAGE_SUFFIXES, load_image
from nearid_core.runs import (
    CHECKPOINT_MARKER,
    available_trackers,
    begin_checkpoint,
    checkpoint_folder,
    clean_stale_checkpoints,
    commit_checkpoint,
    prune_checkpoints,
    resolve_resume,
)
from nearid_core.scorer import NearIDScorer

from .config import DEFAULT_MAX_TRAIN_STEPS, TrainConfig, config_to_dict, parse_args
from .export import write_model_card
from .families import ModelFamily, RewardSampler, detect_family, family_class, size_info
from .reward import NearIDReward
from .sampling import draft_lv_sample, draft_sample, draw_k, refl_sample
from .validation import IdentityJudge, IdentityLog, split_references
from .weighting import RewardWeighting

logger = logging.getLogger(__name__)

TRACKER_PROJECT = "nearid-reward-lora"
DENOISING_STREAM, REWARD_STREAM = 0, 1  # generator streams of a step


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
        """n random crops: (pixels [n, 3, R, R] in [-1, 1], size micro-conditioning [n, 6])."""
        pixels, sizes = [], []
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
            sizes.append(size_info(self.original_sizes[i], (top, left), (resolution, resolution)))
        return torch.stack(pixels), torch.stack(sizes)


def step_generator(seed: int | None, step: int, process_index: int = 0, stream: int = 0) -> torch.Generator:
    """CPU generator for one (micro-)step and stream: everything random in a step comes from here, so resuming is
    exact and the denoising stream does not depend on whether the reward runs."""
    base = 0 if seed is None else seed
    return torch.Generator().manual_seed((base * 1_000_003 + step * 7919 + process_index * 104_729 + stream * 15_485_863)
                                         % 2**63)


def ensure_class_images(config: TrainConfig, family: ModelFamily, resolution: int) -> None:
    """Generate the missing class images for prior preservation with the base model (before the LoRA is added)."""
    class_dir = Path(config.class_data_dir)
    class_dir.mkdir(parents=True, exist_ok=True)
    have = len([p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES])
    missing = config.num_class_images - have
    if missing <= 0:
        return
    logger.info("Generating %d class images for %r in %s", missing, config.class_prompt, class_dir)
    pipe = family.pipeline(family.denoiser)
    generator = torch.Generator().manual_seed(config.seed or 0)
    for start in range(0, missing, config.sample_batch_size):
        n = min(config.sample_batch_size, missing - start)
        with torch.no_grad():
            images = pipe(**family.prompt_inputs([config.class_prompt] * n, config.validation_guidance_scale),
                          num_inference_steps=config.validation_num_inference_steps,
                          guidance_scale=config.validation_guidance_scale, height=resolution, width=resolution,
                          generator=generator).images
        for i, image in enumerate(images):
            image.save(class_dir / f"class_{have + start + i:05d}.png")


# ----------------------------------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the step, checkpoint and validation functions share."""

    config: TrainConfig
    accelerator: Accelerator
    family: ModelFamily
    model: torch.nn.Module  # the prepared (possibly wrapped) denoiser with the LoRA adapter
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    weight_dtype: torch.dtype
    resolution: int
    max_train_steps: int
    steps_per_epoch: int
    instance: ImageSet
    classes: ImageSet | None
    reward: NearIDReward | None
    judge: IdentityJudge | None
    sampler: RewardSampler | None
    weighting: RewardWeighting
    identity_log: IdentityLog | None = None
    global_step: int = 0
    logs: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


def resolve_family(config: TrainConfig) -> type[ModelFamily]:
    """`--model_type`, or the family of the pipeline class in model_index.json."""
    if config.model_type != "auto":
        return family_class(config.model_type)
    try:
        index = DiffusionPipeline.load_config(config.pretrained_model_name_or_path, revision=config.revision)
    except OSError as err:
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path {config.pretrained_model_name_or_path!r}: no diffusers pipeline "
            f"(model_index.json) there or on the hub ({err.__class__.__name__}: {str(err).splitlines()[0]})"
        ) from err
    return family_class(detect_family(index.get("_class_name", ""),
                                      source=f"{config.pretrained_model_name_or_path}/model_index.json"))


def with_family_defaults(config: TrainConfig, family_cls: type[ModelFamily]) -> TrainConfig:
    """The config with the family's own defaults filled in (the guidance scales of its pipeline)."""
    scale = family_cls.default_guidance_scale
    return dataclasses.replace(
        config, reward_guidance_scale=scale if config.reward_guidance_scale is None else config.reward_guidance_scale,
        validation_guidance_scale=(scale if config.validation_guidance_scale is None
                                   else config.validation_guidance_scale))


def make_accelerator(config: TrainConfig) -> Accelerator:
    project = ProjectConfiguration(project_dir=config.output_dir,
                                   logging_dir=str(Path(config.output_dir) / config.logging_dir))
    trackers = available_trackers(config.report_to)
    return Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                       mixed_precision=config.mixed_precision, log_with=trackers or None, project_config=project)


def weight_dtype_of(accelerator: Accelerator) -> torch.dtype:
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def training_length(config: TrainConfig, num_examples: int) -> tuple[int, int]:
    """(max_train_steps, steps_per_epoch), counting epochs as diffusers does: one epoch = every instance image (or
    class image, if more) once, in batches of `--train_batch_size`, over `--gradient_accumulation_steps`."""
    steps_per_epoch = math.ceil(math.ceil(num_examples / config.train_batch_size) / config.gradient_accumulation_steps)
    if config.max_train_steps is not None:
        return config.max_train_steps, steps_per_epoch
    if config.num_train_epochs is not None:
        return config.num_train_epochs * steps_per_epoch, steps_per_epoch
    return DEFAULT_MAX_TRAIN_STEPS, steps_per_epoch


def make_optimizer(config: TrainConfig, accelerator: Accelerator, model: torch.nn.Module, max_train_steps: int):
    lr = config.learning_rate
    if config.scale_lr:
        lr *= config.gradient_accumulation_steps * config.train_batch_size * accelerator.num_processes
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=max_train_steps * accelerator.num_processes,
                                 num_cycles=config.lr_num_cycles, power=config.lr_power)
    return optimizer, lr_scheduler


def make_scoring(config: TrainConfig, accelerator: Accelerator, weight_dtype: torch.dtype
                 ) -> tuple[NearIDReward | None, IdentityJudge | None]:
    """The NearID reward (on the reward references) and the validation judge (training + held-out references);
    None where the run needs neither. One scorer serves both."""
    wants_reward = config.reward_mode != "none" and config.reward_weight > 0
    if not wants_reward and config.validation_prompt is None:
        return None, None
    files = image_files(config.instance_data_dir)
    train_refs, heldout_refs = split_references(files, config.holdout_count(len(files)))
    if heldout_refs:
        logger.info("Held out of the reward for validation: %s", ", ".join(p.name for p in heldout_refs))
    scorer = NearIDScorer.from_pretrained(config.nearid_model, device=accelerator.device, dtype=weight_dtype)
    reward = NearIDReward(scorer, [str(p) for p in train_refs], reduce=config.reward_reduce,
                          gradient_checkpointing=config.gradient_checkpointing)
    judge = None
    if config.validation_prompt is not None:
        judge = IdentityJudge(scorer, [str(p) for p in train_refs], [str(p) for p in heldout_refs],
                              reduce=config.reward_reduce)
    return (reward if wants_reward else None), judge


def register_lora_checkpoint_hooks(accelerator: Accelerator, family: ModelFamily, config: TrainConfig) -> None:
    """Make `accelerator.save_state` write only the LoRA (both key formats) and `load_state` read it back."""
    denoiser_cls = type(family.denoiser)

    def save_hook(models, weights, output_dir):
        for model in models:
            if isinstance(accelerator.unwrap_model(model), denoiser_cls) and accelerator.is_main_process:
                family.save_lora(accelerator.unwrap_model(model), output_dir, kohya_name=config.kohya_lora_name,
                                 metadata={"ss_sd_model_name": config.pretrained_model_name_or_path})
            if weights:
                weights.pop()  # keep accelerate from writing the full frozen denoiser

    def load_hook(models, input_dir):
        while models:
            model = models.pop()
            if isinstance(accelerator.unwrap_model(model), denoiser_cls):
                family.load_lora(accelerator.unwrap_model(model), input_dir)

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def setup_run(config: TrainConfig) -> Run:
    """Accelerator, models, LoRA, optimizer, data, reward: everything before the first step."""
    family_cls = resolve_family(config)  # fails fast on an unsupported pipeline, before the accelerator
    family_cls.check_config(config)  # and on the family's flags, before loading
    config = with_family_defaults(config, family_cls)
    accelerator = make_accelerator(config)
    if config.seed is not None:
        set_seed(config.seed)
    if config.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    if accelerator.is_main_process:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        clean_stale_checkpoints(config.output_dir)
    resolution = config.resolution or family_cls.default_resolution
    family = family_cls.from_pretrained(config.pretrained_model_name_or_path, revision=config.revision,
                                        variant=config.variant, vae_path=config.pretrained_vae_model_name_or_path,
                                        prediction_type=config.prediction_type)
    family.configure(config)
    weight_dtype = weight_dtype_of(accelerator)
    family.place(accelerator.device, weight_dtype)
    if config.with_prior_preservation and accelerator.is_main_process:
        ensure_class_images(config, family, resolution)  # with the base model, before the LoRA
    accelerator.wait_for_everyone()
    family.add_lora(config.rank, config.effective_lora_alpha, config.lora_dropout)
    if config.gradient_checkpointing:
        family.enable_gradient_checkpointing()
    register_lora_checkpoint_hooks(accelerator, family, config)
    instance = ImageSet.from_folder(config.instance_data_dir, resolution)
    classes = (ImageSet.from_folder(config.class_data_dir, resolution, limit=config.num_class_images)
               if config.with_prior_preservation else None)
    max_steps, steps_per_epoch = training_length(config, max(len(instance), len(classes) if classes else 0))
    optimizer, lr_scheduler = make_optimizer(config, accelerator, family.denoiser, max_steps)
    model, optimizer, lr_scheduler = accelerator.prepare(family.denoiser, optimizer, lr_scheduler)
    reward, judge = make_scoring(config, accelerator, weight_dtype)
    sampler = (family.reward_sampler(config.reward_num_inference_steps, accelerator.device, weight_dtype)
               if reward is not None else None)
    weighting = RewardWeighting(config.reward_weight, config.reward_weighting, config.reward_schedule,
                                config.reward_start_step, config.reward_warmup_steps, config.reward_every,
                                config.reward_ratio_smoothing)
    return Run(config, accelerator, family, model, optimizer, lr_scheduler, weight_dtype, resolution, max_steps,
               steps_per_epoch, instance, classes, reward, judge, sampler, weighting)


# ----------------------------------------------------------------------------------------------------------------------
# One optimisation step
# ----------------------------------------------------------------------------------------------------------------------


def denoising_loss(run: Run, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """DreamBooth loss on a batch of instance images (+ class images for prior preservation)."""
    c = run.config
    pixels, sizes = run.instance.sample(c.train_batch_size, run.resolution, generator, c.center_crop, c.random_flip)
    prompts = [c.instance_prompt] * c.train_batch_size
    if run.classes is not None:
        class_pixels, class_sizes = run.classes.sample(c.train_batch_size, run.resolution, generator, c.center_crop,
                                                       c.random_flip)
        pixels, sizes = torch.cat([pixels, class_pixels]), torch.cat([sizes, class_sizes])
        prompts += [c.class_prompt] * c.train_batch_size
    family = run.family
    latents = family.encode_images(pixels.to(run.device), generator)
    losses = family.denoising_loss(run.model, latents, family.conditioning(prompts, sizes), generator)
    if run.classes is None:
        loss = losses.mean()
        return loss, {"denoising_loss": loss.item()}
    instance_loss, prior_loss = losses.chunk(2)
    instance_loss, prior_loss = instance_loss.mean(), prior_loss.mean()
    return instance_loss + c.prior_loss_weight * prior_loss, {"denoising_loss": instance_loss.item(),
                                                              "prior_loss": prior_loss.item()}


def reward_loss(run: Run, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Sample images with the current LoRA (`--reward_mode`), decode them and score them: loss [B] = 1 - cosine."""
    c, family, sampler = run.config, run.family, run.sampler
    b = c.reward_batch_size
    res = c.reward_resolution or run.resolution
    prompts = c.reward_prompt or [c.instance_prompt]
    batch_prompts = [prompts[(run.global_step * b + i) % len(prompts)] for i in range(b)]
    sizes = torch.stack([size_info((res, res), (0, 0), (res, res))] * b)
    cond = family.conditioning(batch_prompts, sizes)
    uncond = family.negative_conditioning(b, sizes) if c.reward_guidance_scale > 1 else None
    denoise = family.denoiser_fn(run.model, cond, uncond, c.reward_guidance_scale)
    latents = sampler.initial_latents(b, res, generator)
    extra = {}
    if c.reward_mode == "refl":
        lo, hi = c.refl_step_range
        stop = int(torch.randint(lo, hi, (1,), generator=generator))
        latents = refl_sample(sampler, denoise, latents, stop, c.reward_eta, generator)
        extra["refl_stop"] = stop
    elif c.reward_mode == "draft":
        k = draw_k(c.draft_k, c.draft_k_distribution, len(sampler.timesteps), generator, c.draft_k_min, c.draft_k_std)
        latents = draft_sample(sampler, denoise, latents, k, c.reward_eta, generator)
        extra["draft_k"] = k
    else:  # draft_lv
        n = c.draft_lv_n
        copies = family.denoiser_fn(run.model, cond.repeat(n), None if uncond is None else uncond.repeat(n),
                                    c.reward_guidance_scale)
        latents = draft_lv_sample(sampler, denoise, latents, n, c.reward_eta, generator, denoise_copies=copies)
    losses = run.reward(family.decode_latents(latents), input_range="-1,1")
    return losses, {"reward_loss": losses.mean().item(), "identity": 1.0 - losses.mean().item(), **extra}


def _take_grads(params: Sequence[torch.nn.Parameter], into: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """Move the parameters' .grad into `into` (added), leaving .grad empty for the next term."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    for p in params:
        p.grad = None
    if into is None:
        return grads
    return [a.add_(g) for a, g in zip(into, grads)]


def _mean_over_processes(accelerator: Accelerator, grads: list[torch.Tensor] | None) -> list[torch.Tensor] | None:
    if grads is None or accelerator.num_processes == 1:
        return grads
    flat = accelerator.reduce(torch.cat([g.flatten() for g in grads]), reduction="mean")
    return list(torch.split(flat, [g.numel() for g in grads]))


def _norm(grads: list[torch.Tensor], scale: float) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))) / scale


def training_step(run: Run) -> dict:
    """One optimisation step: each term's gradient over `--gradient_accumulation_steps` micro-batches, the reward
    weight from their norms, the combined gradient, clipping, the optimizer step. Returns the logs (losses averaged
    over the micro-batches)."""
    c, acc = run.config, run.accelerator
    params = run.trainable
    reward_on = run.reward is not None and run.weighting.scheduled(run.global_step) > 0
    den_grads = rew_grads = None
    sums: dict[str, float] = {}
    for micro in range(c.gradient_accumulation_steps):
        micro_step = run.global_step * c.gradient_accumulation_steps + micro
        with acc.no_sync(run.model):  # gradients are averaged over processes once, below
            if c.denoising_loss_weight > 0:
                with acc.autocast():
                    loss, parts = denoising_loss(run, step_generator(c.seed, micro_step, acc.process_index,
                                                                     DENOISING_STREAM))
                acc.backward(c.denoising_loss_weight * loss)
                den_grads = _take_grads(params, den_grads)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
            if reward_on:
                with acc.autocast():
                    losses, parts = reward_loss(run, step_generator(c.seed, micro_step, acc.process_index,
                                                                    REWARD_STREAM))
                acc.backward(losses.mean())
                rew_grads = _take_grads(params, rew_grads)
                for k, v in parts.items():
                    sums[k] = sums.get(k, 0.0) + v
    logs = {k: v / c.gradient_accumulation_steps for k, v in sums.items()}
    den_grads, rew_grads = _mean_over_processes(acc, den_grads), _mean_over_processes(acc, rew_grads)
    scale = float(acc.scaler.get_scale()) if acc.scaler is not None else 1.0  # fp16: the grads are loss-scaled
    den_norm = _norm(den_grads, scale) if den_grads is not None else None
    weight = 0.0
    if rew_grads is not None:
        rew_norm = _norm(rew_grads, scale)
        weight = run.weighting.effective(run.global_step, den_norm, rew_norm)
        logs.update({"grad_norm/reward": rew_norm, "reward_weight": weight})
        if den_norm:
            logs["reward_grad_ratio"] = weight * rew_norm / den_norm
    if den_norm is not None:
        logs["grad_norm/denoising"] = den_norm
    for i, p in enumerate(params):
        grad = den_grads[i] if den_grads is not None else torch.zeros_like(p)
        p.grad = grad.add_(rew_grads[i], alpha=weight) if rew_grads is not None and weight else grad
    if c.max_grad_norm > 0:
        acc.clip_grad_norm_(params, c.max_grad_norm)
    run.optimizer.step()
    run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    logs["lr"] = run.lr_scheduler.get_last_lr()[0]
    return logs


# ----------------------------------------------------------------------------------------------------------------------
# Checkpoints, validation, the loop
# ----------------------------------------------------------------------------------------------------------------------


def save_checkpoint(run: Run) -> Path:
    """`accelerator.save_state` on every process into a temporary folder, renamed to `checkpoint-{step}` once the
    LoRA, optimizer, scheduler, RNG and `trainer_state.json` are all written (nearid_core.runs)."""
    acc, out = run.accelerator, run.config.output_dir
    tmp = checkpoint_folder(out, run.global_step, temporary=True)
    if acc.is_main_process:
        begin_checkpoint(out, run.global_step)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()
    final = checkpoint_folder(out, run.global_step)
    if acc.is_main_process:
        state = {"global_step": run.global_step, "reward_weighting": run.weighting.state_dict()}
        (tmp / CHECKPOINT_MARKER).write_text(json.dumps(state, indent=1))
        final = commit_checkpoint(tmp)
        logger.info("Saved %s", final)
    acc.wait_for_everyone()
    return final


def resume(run: Run) -> int | None:
    """Load `--resume_from_checkpoint` (LoRA, optimizer, LR scheduler, RNG, reward-weight average); returns the
    resumed step, or None for a new run."""
    path = resolve_resume(run.config.output_dir, run.config.resume_from_checkpoint)
    if path is None:
        return None
    logger.info("Resuming from %s", path)
    run.accelerator.load_state(str(path))
    state = json.loads((path / CHECKPOINT_MARKER).read_text())
    run.global_step = int(state["global_step"])
    run.weighting.load_state_dict(state.get("reward_weighting", {}))
    return run.global_step


@torch.no_grad()
def validate(run: Run, checkpoint: str) -> dict | None:
    """Sample the validation prompt with fixed seeds and log the three identity similarities of the images."""
    c, acc = run.config, run.accelerator
    if run.judge is None or not acc.is_main_process:
        return None
    model = acc.unwrap_model(run.model)
    was_training = model.training
    model.eval()
    pipe = run.family.pipeline(model)
    generator = torch.Generator().manual_seed(c.seed or 0)
    with acc.autocast():
        images = pipe(**run.family.prompt_inputs([c.validation_prompt] * c.num_validation_images,
                                                 c.validation_guidance_scale),
                      num_inference_steps=c.validation_num_inference_steps, guidance_scale=c.validation_guidance_scale,
                      height=run.resolution, width=run.resolution, generator=generator, output_type="pt").images
    model.train(was_training)
    images = images.float().clamp(0, 1)
    row = run.identity_log.append(run.global_step, checkpoint, run.judge.measure(images))
    _save_validation_images(images, Path(c.output_dir) / "validation" / f"step-{run.global_step:06d}")
    acc.log({f"validation/{k}": row[k] for k in ("identity_train", "identity_heldout", "meanpool_similarity")
             if row[k] is not None}, step=run.global_step)
    _log_images_to_trackers(acc, images, run.global_step)
    logger.info("step %d (%s): NearID identity %.4f to the training references, %s held out; mean-pool %.4f",
                run.global_step, checkpoint, row["identity_train"],
                "-" if row["identity_heldout"] is None else f"{row['identity_heldout']:.4f}",
                row["meanpool_similarity"])
    return row


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def _save_validation_images(images: torch.Tensor, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for i, arr in enumerate(_uint8(images)):
        Image.fromarray(arr).save(directory / f"{i:02d}.png")


def _log_images_to_trackers(accelerator: Accelerator, images: torch.Tensor, step: int) -> None:
    arrays = _uint8(images)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(a) for a in arrays]}, step=step)


def prune(run: Run) -> None:
    if run.accelerator.is_main_process:
        best = run.identity_log.best()
        prune_checkpoints(run.config.output_dir, run.config.checkpoints_total_limit,
                          protect=[best["checkpoint"]] if best else [])


def finish(run: Run, validated_at_last_step: bool) -> None:
    """Write the final LoRA files, validate the final weights if not done, and the model card."""
    c, acc = run.config, run.accelerator
    acc.wait_for_everyone()
    if acc.is_main_process:
        run.family.save_lora(acc.unwrap_model(run.model), c.output_dir, kohya_name=c.kohya_lora_name,
                             metadata={"ss_sd_model_name": c.pretrained_model_name_or_path})
        if not validated_at_last_step:
            validate(run, "final")
        files = image_files(c.instance_data_dir)
        heldout = split_references(files, c.holdout_count(len(files)))[1]
        write_model_card(c.output_dir, run.family.name, c, run.identity_log.rows,
                         run.identity_log.best(), run.identity_log.selection_metric,
                         comfyui_file=None if run.family.has_kohya_export else "pytorch_lora_weights.safetensors",
                         heldout_references=[p.name for p in heldout], family_lines=run.family.model_card_lines())
    acc.end_training()


def _tracker_config(config: TrainConfig) -> dict:
    return {k: v for k, v in config_to_dict(config).items() if isinstance(v, (int, float, str, bool))}


PROGRESS_KEYS = ("denoising_loss", "identity", "reward_weight", "grad_norm/denoising", "grad_norm/reward")


def train(config: TrainConfig) -> Run:
    """Run the whole fine-tuning; returns the final `Run` (its `identity_log` holds the identity curve)."""
    run = setup_run(config)
    resumed_at = resume(run)
    run.identity_log = IdentityLog(config.output_dir, resume_step=resumed_at) if run.accelerator.is_main_process \
        else None
    if run.accelerator.is_main_process and run.accelerator.log_with:
        run.accelerator.init_trackers(TRACKER_PROJECT, config=_tracker_config(config))
    if run.global_step == 0:
        validate(run, "base")
    progress = tqdm(total=run.max_train_steps, initial=run.global_step, desc="steps",
                    disable=not run.accelerator.is_local_main_process)
    validated_at_last_step = run.global_step == run.max_train_steps and run.global_step > 0
    run.model.train()
    while run.global_step < run.max_train_steps:
        logs = training_step(run)
        run.global_step += 1
        progress.update(1)
        progress.set_postfix({k.replace("grad_norm/", "|g|_"): f"{logs[k]:.3g}" for k in PROGRESS_KEYS if k in logs})
        run.accelerator.log(logs, step=run.global_step)
        run.logs = logs
        validated_at_last_step = False
        at_checkpoint = run.global_step % config.checkpointing_steps == 0
        at_epoch = (config.validation_epochs is not None and run.global_step % run.steps_per_epoch == 0
                    and (run.global_step // run.steps_per_epoch) % config.validation_epochs == 0)
        if at_checkpoint:
            path = save_checkpoint(run)
            validated_at_last_step = validate(run, path.name) is not None
            prune(run)
        elif at_epoch:
            validated_at_last_step = validate(run, f"epoch-{run.global_step // run.steps_per_epoch}") is not None
    progress.close()
    finish(run, validated_at_last_step)
    return run


def main(argv: Sequence[str] | None = None) -> Run:
    """`python -m reward_finetune.train` / `accelerate launch -m reward_finetune.train` entry point."""
    config = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return train(config)


def _entry() -> None:
    """The command line: a user's mistake (bad flags, an unsupported or missing pipeline) is one message, exit 2."""
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as err:
        print(f"python -m reward_finetune.train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    _entry()
