"""The model-family seam: what the reward trainer needs from one kind of diffusers pipeline.

A family (`ModelFamily` subclass, one module each under `reward_finetune/families/`) owns everything that differs
between pipelines: loading the components, prompt encoding, the denoiser call, the denoising loss, the reward
sampler (its timesteps, x0 estimate, step and re-noising), the LoRA targets, and saving / loading / exporting the
LoRA. The trainer (`reward_finetune.train`) only calls these methods.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch


@dataclass
class Conditioning:
    """Text conditioning of a batch, as keyword arguments of the denoiser (family-specific keys)."""

    kwargs: dict[str, torch.Tensor | dict[str, torch.Tensor]]

    @staticmethod
    def cat(parts: Sequence["Conditioning"]) -> "Conditioning":
        """Concatenate along the batch (e.g. [uncond, cond] for classifier-free guidance)."""
        def join(values):
            if isinstance(values[0], dict):
                return {k: torch.cat([v[k] for v in values]) for k in values[0]}
            return torch.cat(values)

        return Conditioning({k: join([p.kwargs[k] for p in parts]) for k in parts[0].kwargs})

    def repeat(self, n: int) -> "Conditioning":
        """The batch repeated `n` times (copy-major), as `torch.Tensor.repeat` along the batch."""
        return Conditioning.cat([self] * n)


def size_info(original_size: tuple[int, int], crop_top_left: tuple[int, int],
              target_size: tuple[int, int]) -> torch.Tensor:
    """Size micro-conditioning of one image [6]: original (h, w), crop top-left (y, x), target (h, w) (SDXL's
    `add_time_ids`; other families ignore it)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


WEIGHTING_SCHEMES = ("sigma_sqrt", "logit_normal", "mode", "cosmap", "none")  # diffusers.training_utils' (flow loss)

Denoise = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timestep) -> model output


class RewardSampler(abc.ABC):
    """The sampler the reward runs through (a fixed number of steps, with or without gradients per step)."""

    timesteps: torch.Tensor

    @abc.abstractmethod
    def initial_latents(self, batch_size: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        """Starting noise for `batch_size` images of `resolution` px."""

    @abc.abstractmethod
    def step(self, denoise: Denoise, latents: torch.Tensor, index: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One sampler step from `timesteps[index]` to the next (stochastic with `eta > 0`)."""

    @abc.abstractmethod
    def predict_x0(self, denoise: Denoise, latents: torch.Tensor, index: int) -> torch.Tensor:
        """One denoiser call at `timesteps[index]` -> the clean-latent estimate x0 (float32)."""

    @abc.abstractmethod
    def renoise(self, x0: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        """Fresh noise added to clean latents `x0` at the noise level of `timesteps[index]` (DRaFT-LV)."""


class ModelFamily(abc.ABC):
    """A loaded pipeline of one family: frozen components plus the denoiser that gets the LoRA.

    Subclasses set the class attributes and implement the abstract methods; `reward_finetune.families.FAMILIES`
    maps the pipeline classes of `model_index.json` to them.
    """

    name: ClassVar[str]  # the --model_type value, e.g. "sdxl"
    default_resolution: ClassVar[int]
    default_guidance_scale: ClassVar[float] = 7.5  # the pipeline's default (reward / validation guidance)
    lora_target_modules: ClassVar[list[str]]
    has_kohya_export: ClassVar[bool] = True  # save_lora also writes a kohya-key copy for ComfyUI

    denoiser: torch.nn.Module  # the UNet / transformer (gets the LoRA)
    vae: torch.nn.Module

    @classmethod
    @abc.abstractmethod
    def from_pretrained(cls, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> "ModelFamily":
        """Load every component from a hub id or a pipeline directory."""

    @classmethod
    def check_config(cls, config) -> None:
        """Check the flags that depend on the family (`TrainConfig`), before anything is loaded; raise ValueError
        naming the flag."""

    def configure(self, config) -> None:
        """Read the family's own flags from the run's `TrainConfig` (after loading, before training)."""

    @abc.abstractmethod
    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Freeze every component and move it to `device` in the dtype it runs in."""

    @abc.abstractmethod
    def enable_gradient_checkpointing(self) -> None:
        """Activation checkpointing in the denoiser and the VAE decoder (the reward path)."""

    @abc.abstractmethod
    def conditioning(self, prompts: list[str], size_info: torch.Tensor | None = None) -> Conditioning:
        """Denoiser conditioning for prompts. `size_info` [B, 6] = original (h, w), crop top-left (y, x), target
        (h, w) of each image (micro-conditioning; families without it ignore it)."""

    @abc.abstractmethod
    def negative_conditioning(self, batch_size: int, size_info: torch.Tensor | None = None) -> Conditioning | None:
        """The unconditional branch of classifier-free guidance, as the family's pipeline builds it (None for a
        family that samples without one, e.g. guidance-distilled FLUX.1)."""

    def model_card_lines(self) -> list[str]:
        """Markdown bullets of the family's own training settings for the model card (default none)."""
        return []

    def prompt_inputs(self, prompts: list[str], guidance_scale: float) -> dict:
        """The prompt arguments of `pipeline(model)(...)` for `prompts` (validation, class images): the prompts
        themselves, or cached embeddings where the text encoders are offloaded."""
        return {"prompt": prompts}

    @abc.abstractmethod
    def predict(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """One denoiser call (`model` is `denoiser`, possibly wrapped by accelerate) -> model output."""

    def denoiser_fn(self, model: torch.nn.Module, cond: Conditioning, uncond: Conditioning | None = None,
                    guidance_scale: float = 1.0) -> Denoise:
        """`denoise(latents, t) -> model output`, with classifier-free guidance when `guidance_scale > 1`."""
        if uncond is None or guidance_scale <= 1.0:
            return lambda latents, t: self.predict(model, latents, t, cond)
        both = Conditioning.cat([uncond, cond])

        def denoise(latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            out_uncond, out_cond = self.predict(model, torch.cat([latents, latents]), t, both).chunk(2)
            return out_uncond + guidance_scale * (out_cond - out_uncond)

        return denoise

    @abc.abstractmethod
    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> latents as the denoiser sees them (one posterior sample)."""

    @abc.abstractmethod
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> images [B, 3, H, W] in about [-1, 1] (differentiable)."""

    @abc.abstractmethod
    def denoising_loss(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning,
                       generator: torch.Generator) -> torch.Tensor:
        """The family's training loss on clean latents: per-sample [B] float32 (DreamBooth's MSE for SD)."""

    @abc.abstractmethod
    def reward_sampler(self, num_inference_steps: int, device: torch.device, dtype: torch.dtype) -> RewardSampler:
        """The sampler of the reward, set to `num_inference_steps`."""

    def add_lora(self, rank: int, alpha: float, dropout: float) -> None:
        """Freeze the denoiser and add a PEFT LoRA adapter on `lora_target_modules` (gaussian init, as diffusers'
        DreamBooth LoRA scripts); the LoRA weights stay fp32 under mixed precision."""
        from diffusers.training_utils import cast_training_params
        from peft import LoraConfig

        self.denoiser.requires_grad_(False)
        self.denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                                             init_lora_weights="gaussian", target_modules=self.lora_target_modules))
        if next(self.denoiser.parameters()).dtype != torch.float32:
            cast_training_params(self.denoiser, dtype=torch.float32)

    @abc.abstractmethod
    def save_lora(self, model: torch.nn.Module, directory: str | Path, kohya_name: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        """Write the LoRA of `model` into `directory` in the files `pipe.load_lora_weights(directory)` reads, plus a
        ComfyUI copy named `kohya_name` where the family has one."""

    @abc.abstractmethod
    def load_lora(self, model: torch.nn.Module, directory: str | Path) -> None:
        """Load the LoRA saved by `save_lora` into `model` (which already has the adapter)."""

    @abc.abstractmethod
    def pipeline(self, model: torch.nn.Module):
        """An inference `DiffusionPipeline` over the loaded components and `model` (validation, class images)."""
