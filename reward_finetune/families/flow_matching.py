"""What the flow-matching transformer families (FLUX.1, SD3 / SD3.5) share: the rectified-flow path
x_t = (1 - σ) x0 + σ ε with velocity target v = ε - x0, `FlowMatchEulerDiscreteScheduler`'s sigmas, the Euler reward
sampler, the denoising loss of diffusers' `train_dreambooth_lora_flux.py` / `train_dreambooth_lora_sd3.py`, and LoRA
save / load in the diffusers `transformer.<module>.lora_A.weight` format, which ComfyUI's Flux and SD3 loaders map
as they are (so there is no kohya copy).

Text encoders are frozen and rest on the CPU: each prompt is encoded once, on the training device
(`diffusers.training_utils.offload_models`), and the cached embeddings feed the trainer and the validation pipeline.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import (
    _collate_lora_metadata,
    cast_training_params,
    compute_density_for_timestep_sampling,
    compute_loss_weighting_for_sd3,
    offload_models,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from .base import Conditioning, Denoise, ModelFamily, RewardSampler


@dataclass
class FlowMatchOptions:
    """The flow-matching flags of a run (diffusers' spelling), resolved to the family's defaults."""

    max_sequence_length: int
    weighting_scheme: str
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = False
    guidance_scale: float = 3.5  # FLUX.1-dev's embedded guidance in the denoising loss


class FlowMatchRewardSampler(RewardSampler):
    """Euler steps over the sigmas the family's pipeline would use; with `eta` > 0 each step samples the posterior
    of the linear path (DDIM's eta for x_t = (1 - σ) x0 + σ ε: eta = 1 is the DDPM-like posterior, 0 is Euler).

    The schedule may depend on the image size (FLUX's dynamic shift `mu`), so it is set for the size of the latents
    each method is given; `timesteps` are those of the last size used.
    """

    def __init__(self, scheduler_config, num_inference_steps: int, latent_channels: int, vae_scale: int,
                 device: torch.device, dtype: torch.dtype, schedule_kwargs: Callable[[int, int, int], dict],
                 resolution: int) -> None:
        self.scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.num_inference_steps, self.schedule_kwargs = num_inference_steps, schedule_kwargs
        self.channels, self.vae_scale, self.device, self.dtype = latent_channels, vae_scale, device, dtype
        self._schedules: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        side = resolution // vae_scale
        self.sigmas, self.timesteps = self._schedule_of(side, side)

    def _schedule_of(self, height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(sigmas [n + 1] ending in 0, timesteps [n]) for latents of height x width."""
        if (height, width) not in self._schedules:
            kwargs = self.schedule_kwargs(self.num_inference_steps, height, width)
            self.scheduler.set_timesteps(device=self.device, **kwargs)
            self._schedules[height, width] = (self.scheduler.sigmas.to(self.device, torch.float32),
                                              self.scheduler.timesteps.to(self.device))
        self.sigmas, self.timesteps = self._schedules[height, width]
        return self.sigmas, self.timesteps

    def _schedule(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._schedule_of(*latents.shape[-2:])

    def initial_latents(self, batch_size: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        side = resolution // self.vae_scale
        self._schedule_of(side, side)
        noise = torch.randn((batch_size, self.channels, side, side), generator=generator)
        return noise.to(self.device, self.dtype)

    def step(self, denoise: Denoise, latents: torch.Tensor, index: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        sigmas, timesteps = self._schedule(latents)
        s, s_next = sigmas[index], sigmas[index + 1]
        v, x = denoise(latents, timesteps[index]).float(), latents.float()
        if eta == 0:
            return (x + (s_next - s) * v).to(latents.dtype)
        x0, eps = x - s * v, x + (1 - s) * v
        a, a_next = 1 - s, 1 - s_next
        c = eta * s_next / s * torch.sqrt((s**2 - (a / a_next) ** 2 * s_next**2).clamp(min=0))
        z = torch.randn(latents.shape, generator=generator).to(latents.device, torch.float32)
        out = a_next * x0 + torch.sqrt((s_next**2 - c**2).clamp(min=0)) * eps + c * z
        return out.to(latents.dtype)

    def predict_x0(self, denoise: Denoise, latents: torch.Tensor, index: int) -> torch.Tensor:
        sigmas, timesteps = self._schedule(latents)
        return latents.float() - sigmas[index] * denoise(latents, timesteps[index]).float()

    def renoise(self, x0: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        sigma = self._schedule(x0)[0][index]
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, torch.float32)
        return ((1 - sigma) * x0.float() + sigma * noise).to(x0.dtype)


class FlowMatchFamily(ModelFamily):
    """A transformer family trained on the rectified-flow path (subclasses: FLUX.1, SD3)."""

    pipeline_cls: ClassVar[type]
    default_max_sequence_length: ClassVar[int]
    default_weighting_scheme: ClassVar[str]
    default_precondition_outputs: ClassVar[bool] = False
    has_kohya_export: ClassVar[bool] = False
    max_eta: ClassVar[float] = 1.0

    def __init__(self, tokenizers: list, text_encoders: list, vae: AutoencoderKL, transformer: torch.nn.Module,
                 noise_scheduler: FlowMatchEulerDiscreteScheduler) -> None:
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.vae, self.denoiser, self.noise_scheduler = vae, transformer, noise_scheduler
        self.options = FlowMatchOptions(self.default_max_sequence_length, self.default_weighting_scheme,
                                        precondition_outputs=self.default_precondition_outputs)
        self.weight_dtype, self.device = torch.float32, torch.device("cpu")
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    # -- flags and loading ------------------------------------------------------------------------------------------

    @classmethod
    def check_config(cls, config) -> None:
        """Flag checks that need the family, before anything is loaded."""
        if config.prediction_type is not None:
            raise ValueError(f"--prediction_type is for SD1.5 / SDXL; {cls.pipeline_cls.__name__} predicts the flow "
                             "velocity. Drop the flag.")
        if config.reward_eta > cls.max_eta:
            raise ValueError(f"--reward_eta must be in [0, {cls.max_eta:g}] for flow matching (1 = the posterior of "
                             f"the linear path, the most noise a step can take); got {config.reward_eta}.")
        if config.max_sequence_length is not None and config.max_sequence_length < 1:
            raise ValueError(f"--max_sequence_length must be >= 1; got {config.max_sequence_length}.")

    def configure(self, config) -> None:
        o = self.options
        self.options = FlowMatchOptions(
            max_sequence_length=config.max_sequence_length or o.max_sequence_length,
            weighting_scheme=config.weighting_scheme or o.weighting_scheme,
            logit_mean=config.logit_mean, logit_std=config.logit_std, mode_scale=config.mode_scale,
            precondition_outputs=bool(o.precondition_outputs if config.precondition_outputs is None
                                      else config.precondition_outputs),
            guidance_scale=config.guidance_scale)

    @staticmethod
    def _component(cls_, path: str, subfolder: str, revision: str | None, variant: str | None = None):
        kwargs = {"variant": variant} if variant is not None else {}
        return cls_.from_pretrained(path, subfolder=subfolder, revision=revision, **kwargs)

    @classmethod
    def _load(cls, path: str, revision: str | None, variant: str | None, vae_path: str | None,
              text_components: list[tuple[str, str, type, type]], transformer_cls: type) -> "FlowMatchFamily":
        """Load tokenizers / text encoders (None where model_index.json has none), VAE, transformer, scheduler."""
        index = DiffusionPipeline.load_config(path, revision=revision)
        tokenizers, encoders = [], []
        for tok_name, enc_name, tok_cls, enc_cls in text_components:
            present = (index.get(enc_name) or [None])[0] is not None
            tokenizers.append(cls._component(tok_cls, path, tok_name, revision) if present else None)
            encoders.append(cls._component(enc_cls, path, enc_name, revision, variant) if present else None)
        vae = AutoencoderKL.from_pretrained(vae_path) if vae_path else \
            cls._component(AutoencoderKL, path, "vae", revision, variant)
        transformer = cls._component(transformer_cls, path, "transformer", revision, variant)
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        return cls(tokenizers, encoders, vae, transformer, scheduler)

    def model_card_lines(self) -> list[str]:
        o = self.options
        weighting = o.weighting_scheme + (f" (logit mean {o.logit_mean:g}, std {o.logit_std:g})"
                                          if o.weighting_scheme == "logit_normal" else "")
        return [f"* Flow-matching loss: weighting scheme `{weighting}`, precondition_outputs "
                f"{int(o.precondition_outputs)}, T5 max_sequence_length {o.max_sequence_length}."]

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Transformer and VAE on `device` in the weight dtype; text encoders frozen on the CPU (moved to `device`
        only to encode a new prompt)."""
        self.weight_dtype, self.device = weight_dtype, torch.device(device)
        self.vae.requires_grad_(False).to(device, dtype=weight_dtype)
        self.denoiser.requires_grad_(False).to(device, dtype=weight_dtype)
        for enc in self.text_encoders:
            if enc is not None:
                enc.requires_grad_(False).to("cpu", dtype=weight_dtype)

    def enable_gradient_checkpointing(self) -> None:
        """Checkpoint every transformer block (diffusers does it whenever gradients are on, i.e. only in the reward
        sampler's gradient steps and the denoising loss) and the VAE decoder."""
        self.denoiser.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    # -- conditioning -----------------------------------------------------------------------------------------------

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One prompt -> (prompt_embeds [1, L, C], pooled_projections [1, P]) as the family's pipeline builds them."""
        raise NotImplementedError

    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        new = sorted(set(prompts) - self._prompt_cache.keys())
        if new:  # the text encoders are frozen: each prompt is encoded once, on the device
            encoders = [e for e in self.text_encoders if e is not None]
            with torch.no_grad(), offload_models(*encoders, device=self.device, offload=self.device.type != "cpu"):
                for p in new:
                    embeds, pooled = self._encode(p)
                    self._prompt_cache[p] = (embeds.to(self.device, self.weight_dtype),
                                             pooled.to(self.device, self.weight_dtype))
        return (torch.cat([self._prompt_cache[p][0] for p in prompts]),
                torch.cat([self._prompt_cache[p][1] for p in prompts]))

    def _token_ids(self, tokenizer, prompt: str, max_length: int) -> torch.Tensor:
        return tokenizer([prompt], padding="max_length", max_length=max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    # -- latents ----------------------------------------------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            latents = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist.sample(generator)
        return ((latents - self.vae.config.shift_factor) * self.vae.config.scaling_factor).to(self.weight_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor + self.vae.config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def denoising_loss(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning,
                       generator: torch.Generator) -> torch.Tensor:
        """Flow matching as diffusers' DreamBooth LoRA scripts define it: σ drawn by `--weighting_scheme`
        (`compute_density_for_timestep_sampling`) on the training schedule, x_t = (1 - σ) x0 + σ ε, MSE of the
        velocity to ε - x0 (or, with `--precondition_outputs`, of x_t - σ·v to x0) weighted by
        `compute_loss_weighting_for_sd3`; per sample [B] float32."""
        o, scheduler = self.options, self.noise_scheduler
        n = scheduler.config.num_train_timesteps
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, torch.float32)
        u = compute_density_for_timestep_sampling(o.weighting_scheme, latents.shape[0], o.logit_mean, o.logit_std,
                                                  o.mode_scale, generator=generator)
        indices = (u * n).long().clamp(0, n - 1)  # u can reach 1.0 ('mode' at u = 0), one past the schedule
        timesteps = scheduler.timesteps[indices].to(latents.device)
        sigmas = scheduler.sigmas[indices].to(latents.device, torch.float32).view(-1, *[1] * (latents.ndim - 1))
        x0 = latents.float()
        noisy = (1 - sigmas) * x0 + sigmas * noise
        pred = self.predict(model, noisy.to(latents.dtype), timesteps, cond).float()
        if o.precondition_outputs:
            pred, target = noisy - sigmas * pred, x0
        else:
            target = noise - x0
        weighting = compute_loss_weighting_for_sd3(o.weighting_scheme, sigmas).float()
        return (weighting * (pred - target) ** 2).flatten(1).mean(1)

    def schedule_kwargs(self, num_inference_steps: int, height: int, width: int) -> dict:
        """`scheduler.set_timesteps` arguments of the family's pipeline for latents of height x width."""
        return {"num_inference_steps": num_inference_steps}

    def reward_sampler(self, num_inference_steps: int, device: torch.device, dtype: torch.dtype
                       ) -> FlowMatchRewardSampler:
        return FlowMatchRewardSampler(self.noise_scheduler.config, num_inference_steps, self.latent_channels,
                                      self.vae_scale, device, dtype, self.schedule_kwargs, self.default_resolution)

    # -- LoRA -------------------------------------------------------------------------------------------------------

    def save_lora(self, model: torch.nn.Module, directory: str | Path, kohya_name: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        """`pytorch_lora_weights.safetensors` with `transformer.<module>.lora_A/B.weight` keys and the adapter
        config in its header; ComfyUI maps these keys itself, so `kohya_name` is not written."""
        self.pipeline_cls.save_lora_weights(save_directory=str(directory),
                                            transformer_lora_layers=get_peft_model_state_dict(model),
                                            safe_serialization=True,
                                            **_collate_lora_metadata({"transformer": model}))

    def load_lora(self, model: torch.nn.Module, directory: str | Path) -> None:
        state = self.pipeline_cls.lora_state_dict(str(directory))
        state = state[0] if isinstance(state, tuple) else state
        prefix = "transformer."
        peft_state = convert_unet_state_dict_to_peft({k[len(prefix):]: v for k, v in state.items()
                                                      if k.startswith(prefix)})
        result = set_peft_model_state_dict(model, peft_state, adapter_name="default")
        if getattr(result, "unexpected_keys", None):
            raise RuntimeError(f"Checkpoint {directory} has LoRA keys this transformer does not: "
                               f"{result.unexpected_keys[:5]}")
        cast_training_params(model, dtype=torch.float32)

    def _scheduler_copy(self) -> FlowMatchEulerDiscreteScheduler:
        return FlowMatchEulerDiscreteScheduler.from_config(self.noise_scheduler.config)


def image_seq_len(height: int, width: int, patch_size: int = 2) -> int:
    """Image tokens of latents height x width with `patch_size` patches (what `calculate_shift` reads)."""
    return math.ceil(height / patch_size) * math.ceil(width / patch_size)
