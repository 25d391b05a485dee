"""Command-line flags of `reward_finetune.train`, as a dataclass, and their cross-flag validation.

The flag names follow diffusers' `train_dreambooth_lora.py` / `train_dreambooth_lora_sdxl.py` and, for FLUX.1 and
SD3, `train_dreambooth_lora_flux.py` / `train_dreambooth_lora_sd3.py` (same spelling and meaning: `--guidance_scale`,
`--max_sequence_length`, `--weighting_scheme`, `--logit_mean`, `--logit_std`, `--mode_scale`,
`--precondition_outputs`); the reward flags are new and prefixed `--reward_`, `--refl_`, `--draft_`. `parse_args`
validates every flag combination before any model is loaded, so a mistyped run fails at once.

Defaults that differ from those scripts (SD script / SDXL script), chosen for reward training on one GPU:

| flag | here | diffusers |
|---|---|---|
| `--train_batch_size` | 1 | 4 |
| `--learning_rate` | 1e-4 | 5e-4 / 1e-4 |
| `--lr_warmup_steps` | 0 | 500 |
| `--max_train_steps` / `--num_train_epochs` | 500 steps when neither is given | 1 epoch |
| `--adam_weight_decay` | 1e-2 | 1e-2 / 1e-4 |
| `--validation_epochs` | unset: validate at checkpoints | 50 |
| `--report_to` | auto (the installed trackers) | tensorboard |

The same: rank 4, constant schedule, `--lr_num_cycles` 1, `--lr_power` 1, resolution 512 (SD) / 1024 (SDXL, FLUX.1,
SD3; diffusers' FLUX / SD3 scripts default to 512), `--guidance_scale` 3.5 (FLUX), `--max_sequence_length` 512 (FLUX) /
77 (SD3), `--weighting_scheme` none (FLUX) / logit_normal (SD3), `--precondition_outputs` 1 (SD3),
`--checkpointing_steps` 500, Adam betas / epsilon, `--max_grad_norm` 1, 4 validation images.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nearid_core.runs import available_trackers, resolve_resume
from nearid_core.scorer import DEFAULT_MODEL, REDUCTIONS

from .families import FAMILIES
from .families.base import WEIGHTING_SCHEMES
from .sampling import K_DISTRIBUTIONS
from .weighting import SCHEDULES, WEIGHTINGS

logger = logging.getLogger(__name__)

MODEL_TYPES = ("auto", *FAMILIES)
REWARD_MODES = ("none", "refl", "draft", "draft_lv")
MIXED_PRECISIONS = ("no", "fp16", "bf16")
PREDICTION_TYPES = ("epsilon", "v_prediction")
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEFAULT_MAX_TRAIN_STEPS = 500  # when neither --max_train_steps nor --num_train_epochs is given


@dataclass
class TrainConfig:
    """Every setting of one LoRA reward fine-tuning run (one field per command-line flag, same name).

    Build it with `parse_args(argv)` (which also validates) or directly and call `validate_config` yourself.
    """

    # model
    pretrained_model_name_or_path: str = ""
    revision: str | None = None
    variant: str | None = None
    model_type: str = "auto"
    pretrained_vae_model_name_or_path: str | None = None
    prediction_type: str | None = None
    # data (DreamBooth)
    instance_data_dir: str = ""
    instance_prompt: str = ""
    class_data_dir: str | None = None
    class_prompt: str | None = None
    with_prior_preservation: bool = False
    prior_loss_weight: float = 1.0
    num_class_images: int = 100
    sample_batch_size: int = 4
    resolution: int | None = None  # None = the family's default (SD1.5 512, SDXL / FLUX.1 / SD3 1024)
    center_crop: bool = False
    random_flip: bool = False
    # LoRA + optimisation
    rank: int = 4
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    output_dir: str = "nearid-lora"
    seed: int | None = None
    train_batch_size: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    denoising_loss_weight: float = 1.0
    # flow matching (FLUX.1, SD3): diffusers' flags; None = the family's default
    guidance_scale: float = 3.5
    max_sequence_length: int | None = None
    weighting_scheme: str | None = None
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: int | None = None
    # checkpoints
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    # validation
    validation_prompt: str | None = None
    num_validation_images: int = 4
    validation_num_inference_steps: int = 25
    validation_guidance_scale: float | None = None  # None = the pipeline's default (SD 7.5, FLUX 3.5, SD3 7)
    validation_epochs: int | None = None
    validation_holdout: int | None = None  # None = 1 instance image when there are at least 2
    report_to: str = "auto"
    logging_dir: str = "logs"
    # reward
    nearid_model: str = DEFAULT_MODEL
    reward_mode: str = "refl"
    reward_weighting: str = "ratio"
    reward_weight: float = 1.0
    reward_ratio_smoothing: float = 0.9
    reward_schedule: str = "constant"
    reward_start_step: int = 0
    reward_warmup_steps: int = 0
    reward_every: int = 1
    reward_reduce: str = "mean"
    reward_prompt: list[str] = field(default_factory=list)
    reward_batch_size: int = 1
    reward_resolution: int | None = None
    reward_num_inference_steps: int = 20
    reward_guidance_scale: float | None = None  # None = the pipeline's default
    reward_eta: float = 0.0
    refl_min_step: int | None = None
    refl_max_step: int | None = None
    draft_k: int = 1
    draft_k_distribution: str = "fixed"
    draft_k_min: int = 1
    draft_k_std: float | None = None
    draft_lv_n: int = 2
    # kohya export
    kohya_lora_name: str = "pytorch_lora_weights_kohya.safetensors"

    @property
    def effective_lora_alpha(self) -> float:
        """LoRA alpha; defaults to the rank (scale 1), as in diffusers' scripts."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def refl_step_range(self) -> tuple[int, int]:
        """[min, max) index into the reward sampler's timesteps where ReFL stops and predicts x0 in one step.

        Default: the last quarter of the schedule (ImageReward's ReFL stops at step 30..39 of 40).
        """
        n = self.reward_num_inference_steps
        lo = self.refl_min_step if self.refl_min_step is not None else (3 * n) // 4
        hi = self.refl_max_step if self.refl_max_step is not None else n
        return lo, hi

    def holdout_count(self, num_instance_images: int) -> int:
        """How many instance images (the last ones by file name) are held out of the reward for validation."""
        if self.validation_holdout is not None:
            return self.validation_holdout
        return 1 if num_instance_images >= 2 else 0


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser; every `dest` is a `TrainConfig` field."""
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="python -m reward_finetune.train",
        description="DreamBooth-style LoRA fine-tuning with NearID as a differentiable identity reward.",
    )
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True,
                   help="hub id or local diffusers pipeline directory (StableDiffusionPipeline, "
                        "StableDiffusionXLPipeline, FluxPipeline or StableDiffusion3Pipeline)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weight variant, e.g. fp16")
    g.add_argument("--model_type", choices=MODEL_TYPES, default=d.model_type,
                   help="auto = from the pipeline class in model_index.json")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a better VAE (e.g. an fp16-safe SDXL VAE); default the pipeline's own")
    g.add_argument("--prediction_type", choices=PREDICTION_TYPES, default=None,
                   help="override the scheduler's prediction type")

    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", required=True, help="folder with the images of the subject")
    g.add_argument("--instance_prompt", required=True, help='e.g. "a photo of sks dog"')
    g.add_argument("--class_data_dir", default=None, help="folder with (or for generated) class images")
    g.add_argument("--class_prompt", default=None, help='e.g. "a photo of dog"')
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--prior_loss_weight", type=float, default=d.prior_loss_weight)
    g.add_argument("--num_class_images", type=int, default=d.num_class_images,
                   help="missing class images are generated with the base model")
    g.add_argument("--sample_batch_size", type=int, default=d.sample_batch_size)
    g.add_argument("--resolution", type=int, default=None, help="default: SD1.5 512, SDXL / FLUX.1 / SD3 1024")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")

    g = p.add_argument_group("training")
    g.add_argument("--rank", type=int, default=d.rank, help="LoRA rank")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: --rank, i.e. scale 1)")
    g.add_argument("--lora_dropout", type=float, default=d.lora_dropout)
    g.add_argument("--output_dir", default=d.output_dir)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--train_batch_size", type=int, default=d.train_batch_size)
    g.add_argument("--max_train_steps", type=int, default=None,
                   help=f"optimisation steps; overrides --num_train_epochs (neither: {DEFAULT_MAX_TRAIN_STEPS})")
    g.add_argument("--num_train_epochs", type=int, default=None,
                   help="epochs over the instance images (or the class images, if more), as diffusers counts them")
    g.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    g.add_argument("--gradient_checkpointing", action="store_true",
                   help="activation checkpointing in the denoiser, the VAE decoder (reward) and the NearID backbone")
    g.add_argument("--learning_rate", type=float, default=d.learning_rate)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default=d.lr_scheduler)
    g.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps)
    g.add_argument("--lr_num_cycles", type=int, default=d.lr_num_cycles,
                   help="hard restarts of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=d.lr_power, help="power of the polynomial schedule")
    g.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    g.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    g.add_argument("--adam_weight_decay", type=float, default=d.adam_weight_decay)
    g.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    g.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm)
    g.add_argument("--mixed_precision", choices=MIXED_PRECISIONS, default=None,
                   help="default: accelerate's config (frozen weights are cast, LoRA stays fp32)")
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--denoising_loss_weight", type=float, default=d.denoising_loss_weight,
                   help="weight of the DreamBooth denoising loss; 0 = reward only")

    g = p.add_argument_group("flow matching (FLUX.1, SD3), as diffusers' train_dreambooth_lora_flux/sd3.py")
    g.add_argument("--guidance_scale", type=float, default=d.guidance_scale,
                   help="FLUX.1-dev: the embedded guidance of the denoising loss (a guidance-distilled model)")
    g.add_argument("--max_sequence_length", type=int, default=None,
                   help="T5 prompt tokens (default: FLUX 512, SD3 77)")
    g.add_argument("--weighting_scheme", choices=WEIGHTING_SCHEMES, default=None,
                   help="timestep sampling / loss weighting (default: FLUX none, SD3 logit_normal)")
    g.add_argument("--logit_mean", type=float, default=d.logit_mean, help="logit_normal: mean")
    g.add_argument("--logit_std", type=float, default=d.logit_std, help="logit_normal: standard deviation")
    g.add_argument("--mode_scale", type=float, default=d.mode_scale, help="mode: scale")
    g.add_argument("--precondition_outputs", type=int, choices=(0, 1), default=None,
                   help="1: loss on x_t - sigma * v against x0 (EDM preconditioning) instead of v against noise - x0 "
                        "(default: SD3 1, FLUX 0)")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpointing_steps", type=int, default=d.checkpointing_steps,
                   help="save checkpoint-{step} (accelerate state + LoRA files) and run validation every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None,
                   help="keep at most N checkpoint-* folders (the best one is never deleted)")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint-{step} folder, or "latest"')

    g = p.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None,
                   help="prompt sampled at each checkpoint; the images are scored with NearID against the training "
                        "and the held-out instance images")
    g.add_argument("--num_validation_images", type=int, default=d.num_validation_images)
    g.add_argument("--validation_num_inference_steps", type=int, default=d.validation_num_inference_steps)
    g.add_argument("--validation_guidance_scale", type=float, default=None,
                   help="default: the pipeline's (SD 7.5, FLUX.1 3.5 embedded, SD3 7)")
    g.add_argument("--validation_epochs", type=int, default=None,
                   help="also validate every N epochs (default: at checkpoints only)")
    g.add_argument("--validation_holdout", type=int, default=None,
                   help="instance images (the last by file name) the reward never sees, used as held-out "
                        "validation references; default 1 when there are at least 2, 0 = none")
    g.add_argument("--report_to", default=d.report_to,
                   help="auto (tensorboard / wandb if installed), tensorboard, wandb, comet_ml, mlflow, all or none")
    g.add_argument("--logging_dir", default=d.logging_dir)

    g = p.add_argument_group("NearID identity reward")
    g.add_argument("--nearid_model", default=d.nearid_model, help="NearID hub id or local checkpoint")
    g.add_argument("--reward_mode", choices=REWARD_MODES, default=d.reward_mode,
                   help="refl: sample without gradients to a random late step, predict x0 in one step; "
                        "draft: backpropagate through the last --draft_k sampling steps; draft_lv: re-noise the "
                        "final sample --draft_lv_n times, one-step gradients averaged; none: DreamBooth only")
    g.add_argument("--reward_weighting", choices=WEIGHTINGS, default=d.reward_weighting,
                   help="ratio: --reward_weight is the target ratio of the reward's gradient norm to the denoising "
                        "loss's on the LoRA; absolute: --reward_weight multiplies the loss 1 - cos")
    g.add_argument("--reward_weight", type=float, default=d.reward_weight,
                   help="the gradient-norm ratio (ratio weighting) or loss weight (absolute)")
    g.add_argument("--reward_ratio_smoothing", type=float, default=d.reward_ratio_smoothing,
                   help="EMA factor of the gradient-norm ratio estimate (0 = this step's ratio only)")
    g.add_argument("--reward_schedule", choices=SCHEDULES, default=d.reward_schedule,
                   help="constant: full weight from --reward_start_step; linear: ramp over --reward_warmup_steps")
    g.add_argument("--reward_start_step", type=int, default=d.reward_start_step)
    g.add_argument("--reward_warmup_steps", type=int, default=d.reward_warmup_steps)
    g.add_argument("--reward_every", type=int, default=d.reward_every, help="compute the reward every N steps")
    g.add_argument("--reward_reduce", choices=REDUCTIONS, default=d.reward_reduce,
                   help="how the instance images (references) combine")
    g.add_argument("--reward_prompt", action="append", default=None,
                   help="prompt(s) sampled for the reward (repeat the flag); default --instance_prompt")
    g.add_argument("--reward_batch_size", type=int, default=d.reward_batch_size)
    g.add_argument("--reward_resolution", type=int, default=None, help="default --resolution")
    g.add_argument("--reward_num_inference_steps", type=int, default=d.reward_num_inference_steps,
                   help="steps of the reward sampler (DDIM for SD, Euler for FLUX / SD3)")
    g.add_argument("--reward_guidance_scale", type=float, default=None,
                   help="guidance of the reward sampler; default the pipeline's (SD 7.5 CFG, FLUX.1 3.5 embedded, "
                        "SD3 7 CFG)")
    g.add_argument("--reward_eta", type=float, default=d.reward_eta,
                   help="DDIM eta of the reward sampler: 0 deterministic, 1 DDPM-like stochastic steps (flow "
                        "matching: the same posterior of the linear path, at most 1)")
    g.add_argument("--refl_min_step", type=int, default=None,
                   help="ReFL stops at a random sampler step in [min, max); default the last quarter")
    g.add_argument("--refl_max_step", type=int, default=None)
    g.add_argument("--draft_k", type=int, default=d.draft_k,
                   help="DRaFT-K: sampling steps with gradients (the largest K with uniform, the mean with gaussian)")
    g.add_argument("--draft_k_distribution", choices=K_DISTRIBUTIONS, default=d.draft_k_distribution,
                   help="fixed K, or AlignProp's randomised truncation: K drawn per step, uniform in "
                        "[--draft_k_min, --draft_k] or gaussian around --draft_k")
    g.add_argument("--draft_k_min", type=int, default=d.draft_k_min)
    g.add_argument("--draft_k_std", type=float, default=None, help="gaussian K: standard deviation (default K/2)")
    g.add_argument("--draft_lv_n", type=int, default=d.draft_lv_n, help="DRaFT-LV: re-noised copies per sample")
    g.add_argument("--kohya_lora_name", default=d.kohya_lora_name,
                   help="file name of the kohya-key export (ComfyUI LoraLoader)")
    return p


def parse_args(input_args: Sequence[str] | None = None) -> TrainConfig:
    """Parse and validate command-line flags (`input_args=None` reads `sys.argv`).

    Raises:
        ValueError: a flag value or a combination of flags is invalid; the message names the flags.
    """
    namespace = build_parser().parse_args(input_args)
    values = vars(namespace)
    values["reward_prompt"] = values["reward_prompt"] or []
    config = TrainConfig(**values)
    validate_config(config)
    return config


def validate_config(config: TrainConfig) -> None:
    """Check flag values and combinations without loading anything; warn about ignored flags.

    Raises:
        ValueError: naming the offending flag(s).
    """
    _check_choices(config)
    _check_positive(config)
    _check_paths(config)
    _check_prior_preservation(config)
    _check_reward(config)
    available_trackers(config.report_to, flag="--report_to")


def _check_choices(c: TrainConfig) -> None:
    for name, allowed in [("model_type", MODEL_TYPES), ("reward_mode", REWARD_MODES),
                          ("reward_schedule", SCHEDULES), ("reward_reduce", REDUCTIONS),
                          ("reward_weighting", WEIGHTINGS), ("draft_k_distribution", K_DISTRIBUTIONS),
                          ("lr_scheduler", LR_SCHEDULERS), ("weighting_scheme", (None, *WEIGHTING_SCHEMES))]:
        if getattr(c, name) not in allowed:
            raise ValueError(f"--{name} must be one of {', '.join(allowed)}; got {getattr(c, name)!r}.")
    if c.mixed_precision not in (None, *MIXED_PRECISIONS):
        raise ValueError(f"--mixed_precision must be one of {', '.join(MIXED_PRECISIONS)}; got {c.mixed_precision!r}.")
    if c.prediction_type not in (None, *PREDICTION_TYPES):
        raise ValueError(f"--prediction_type must be one of {', '.join(PREDICTION_TYPES)}; got {c.prediction_type!r}.")


def _check_positive(c: TrainConfig) -> None:
    for name in ("rank", "train_batch_size", "gradient_accumulation_steps", "checkpointing_steps",
                 "num_validation_images", "validation_num_inference_steps", "reward_every", "reward_batch_size",
                 "reward_num_inference_steps", "sample_batch_size", "lr_num_cycles", "draft_lv_n"):
        if getattr(c, name) < 1:
            raise ValueError(f"--{name} must be >= 1; got {getattr(c, name)}.")
    for name in ("max_train_steps", "num_train_epochs", "validation_epochs", "checkpoints_total_limit"):
        value = getattr(c, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name} must be >= 1 (or left unset); got {value}.")
    for name in ("resolution", "reward_resolution"):
        value = getattr(c, name)
        if value is not None and (value < 8 or value % 8):
            raise ValueError(f"--{name} must be a positive multiple of 8; got {value}.")
    for name in ("learning_rate", "denoising_loss_weight", "prior_loss_weight", "lr_warmup_steps",
                 "reward_start_step", "reward_warmup_steps", "lora_dropout", "reward_eta", "lr_power"):
        if getattr(c, name) < 0:
            raise ValueError(f"--{name} must be >= 0; got {getattr(c, name)}.")
    if c.validation_holdout is not None and c.validation_holdout < 0:
        raise ValueError(f"--validation_holdout must be >= 0; got {c.validation_holdout}.")
    if c.lora_alpha is not None and c.lora_alpha <= 0:
        raise ValueError(f"--lora_alpha must be > 0; got {c.lora_alpha}.")
    if not 0 <= c.reward_ratio_smoothing < 1:
        raise ValueError(f"--reward_ratio_smoothing must be in [0, 1); got {c.reward_ratio_smoothing}.")


def _check_paths(c: TrainConfig) -> None:
    if not c.pretrained_model_name_or_path:
        raise ValueError("--pretrained_model_name_or_path is required (a hub id or a diffusers pipeline directory).")
    if not c.instance_prompt:
        raise ValueError("--instance_prompt is required (e.g. 'a photo of sks dog').")
    if not c.instance_data_dir or not Path(c.instance_data_dir).is_dir():
        raise ValueError(f"--instance_data_dir {c.instance_data_dir!r} is not a directory of subject images.")
    if c.resume_from_checkpoint not in (None, "latest"):
        try:
            resolve_resume(c.output_dir, c.resume_from_checkpoint)
        except FileNotFoundError as err:
            raise ValueError(f"--resume_from_checkpoint: {err} Pass a checkpoint-{{step}} folder or 'latest'.") from err


def _check_prior_preservation(c: TrainConfig) -> None:
    if c.with_prior_preservation:
        missing = [flag for flag, value in (("--class_data_dir", c.class_data_dir), ("--class_prompt", c.class_prompt))
                   if not value]
        if missing:
            raise ValueError(f"--with_prior_preservation needs {' and '.join(missing)}.")
    else:
        for flag, value in (("--class_data_dir", c.class_data_dir), ("--class_prompt", c.class_prompt)):
            if value:
                logger.warning("%s is ignored without --with_prior_preservation.", flag)


def _check_reward(c: TrainConfig) -> None:
    if c.reward_weight < 0:
        raise ValueError(f"--reward_weight must be >= 0 (it weighs a loss to minimise); got {c.reward_weight}.")
    if c.reward_mode == "none":
        if c.denoising_loss_weight == 0:
            raise ValueError("--denoising_loss_weight 0 with --reward_mode none leaves nothing to train; "
                             "pick --reward_mode refl, draft or draft_lv, or a positive --denoising_loss_weight.")
        return
    if c.reward_weight == 0:
        logger.warning("--reward_weight 0: the reward is never computed; --reward_mode %s has no effect.",
                       c.reward_mode)
    if c.reward_weighting == "ratio" and c.denoising_loss_weight == 0:
        logger.warning("--reward_weighting ratio with --denoising_loss_weight 0: there is no denoising gradient to "
                       "take a ratio to, so --reward_weight is used as an absolute weight.")
    n = c.reward_num_inference_steps
    if c.reward_mode == "draft":
        if c.draft_k < 1 or c.draft_k > n:
            raise ValueError(
                f"--draft_k must be in [1, --reward_num_inference_steps={n}] (DRaFT-K backpropagates through the last "
                f"K of the sampling steps); got {c.draft_k}."
            )
        if c.draft_k_distribution == "uniform" and not 1 <= c.draft_k_min <= c.draft_k:
            raise ValueError(f"--draft_k_min must be in [1, --draft_k={c.draft_k}]; got {c.draft_k_min}.")
        if c.draft_k_std is not None and c.draft_k_std <= 0:
            raise ValueError(f"--draft_k_std must be > 0; got {c.draft_k_std}.")
    elif c.draft_k_distribution != "fixed":
        logger.warning("--draft_k_distribution is ignored with --reward_mode %s.", c.reward_mode)
    if c.reward_mode != "refl" and (c.refl_min_step is not None or c.refl_max_step is not None):
        logger.warning("--refl_min_step/--refl_max_step are ignored with --reward_mode %s.", c.reward_mode)
    if c.reward_mode == "refl":
        lo, hi = c.refl_step_range
        if not 0 <= lo < hi <= n:
            raise ValueError(
                f"--refl_min_step/--refl_max_step must satisfy 0 <= min < max <= --reward_num_inference_steps={n}; "
                f"got [{lo}, {hi})."
            )
    if c.reward_schedule == "linear" and c.reward_warmup_steps == 0:
        logger.warning("--reward_schedule linear with --reward_warmup_steps 0 is the constant schedule.")


def config_to_dict(config: TrainConfig) -> dict:
    """A JSON/tracker-friendly copy (lists joined), for `accelerator.init_trackers` and the run's config file."""
    out = dataclasses.asdict(config)
    out["reward_prompt"] = " | ".join(config.reward_prompt)
    return out
