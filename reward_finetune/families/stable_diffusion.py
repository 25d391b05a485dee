"""Stable Diffusion 1.x / 2.x (`StableDiffusionPipeline`) and SDXL (`StableDiffusionXLPipeline`): UNet denoisers
with epsilon or v prediction, DDIM as the reward sampler, LoRA on the attention projections (diffusers' DreamBooth
LoRA recipe), kohya-key exports for ComfyUI."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import torch
import torch.nn.functional as F
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
from diffusers.training_utils import cast_training_params
from diffusers.utils import convert_state_dict_to_diffusers, convert_unet_state_dict_to_peft
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..export import save_kohya_lora
from .base import Conditioning, Denoise, ModelFamily, RewardSampler

PREDICTION_TYPES = ("epsilon", "v_prediction")


class DDIMRewardSampler(RewardSampler):
    """DDIM over a copy of the family's noise schedule (`eta` > 0 adds DDIM's stochastic term)."""

    def __init__(self, scheduler_config, num_inference_steps: int, latent_channels: int, vae_scale: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        self.scheduler = DDIMScheduler.from_config(scheduler_config)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self.timesteps = self.scheduler.timesteps
        self.channels, self.vae_scale, self.device, self.dtype = latent_channels, vae_scale, device, dtype

    def initial_latents(self, batch_size: int, resolution: int, generator: torch.Generator) -> torch.Tensor:
        side = resolution // self.vae_scale
        noise = torch.randn((batch_size, self.channels, side, side), generator=generator)
        return (noise * self.scheduler.init_noise_sigma).to(self.device, self.dtype)

    def _output(self, denoise: Denoise, latents: torch.Tensor, index: int) -> torch.Tensor:
        t = self.timesteps[index]
        return denoise(self.scheduler.scale_model_input(latents, t), t)

    def step(self, denoise: Denoise, latents: torch.Tensor, index: int, eta: float = 0.0,
             generator: torch.Generator | None = None) -> torch.Tensor:
        out = self._output(denoise, latents, index)
        noise = None
        if eta > 0:
            noise = torch.randn(latents.shape, generator=generator).to(latents.device, out.dtype)
        t = self.timesteps[index]
        return self.scheduler.step(out, t, latents, eta=eta, variance_noise=noise, return_dict=False)[0].to(
            latents.dtype)

    def predict_x0(self, denoise: Denoise, latents: torch.Tensor, index: int) -> torch.Tensor:
        return predict_x0(self.scheduler, latents, self._output(denoise, latents, index), self.timesteps[index])

    def renoise(self, x0: torch.Tensor, index: int, generator: torch.Generator) -> torch.Tensor:
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        t = self.timesteps[index].reshape(1).to(x0.device)
        return self.scheduler.add_noise(x0, noise, t)


def predict_x0(scheduler, sample: torch.Tensor, model_output: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """Clean-latent estimate x0 from x_t and the model output at `timestep` (epsilon or v_prediction), float32."""
    alpha_prod = scheduler.alphas_cumprod.to(sample.device)[timestep].to(torch.float32)
    a, s = alpha_prod.sqrt(), (1 - alpha_prod).sqrt()
    kind = scheduler.config.prediction_type
    x, out = sample.float(), model_output.float()
    if kind == "epsilon":
        return (x - s * out) / a
    if kind == "v_prediction":
        return a * x - s * out
    raise ValueError(f"Unsupported prediction_type {kind!r}; supported: {', '.join(PREDICTION_TYPES)}.")


class StableDiffusionFamily(ModelFamily):
    """SD 1.x / 2.x: one CLIP text encoder (last hidden state), UNet, DDPM training schedule."""

    name: ClassVar[str] = "sd15"
    default_resolution: ClassVar[int] = 512
    lora_target_modules: ClassVar[list[str]] = ["to_k", "to_q", "to_v", "to_out.0"]  # diffusers' dreambooth scripts
    kohya_base_version: ClassVar[str] = "sd_v1"  # kohya's ss_base_model_version
    pipeline_cls: ClassVar[type] = StableDiffusionPipeline

    def __init__(self, tokenizers: list, text_encoders: list, vae: AutoencoderKL, unet: UNet2DConditionModel,
                 noise_scheduler: DDPMScheduler, vae_is_own: bool = True, pipeline_config: dict | None = None) -> None:
        self.tokenizers, self.text_encoders = tokenizers, text_encoders
        self.vae, self.denoiser, self.noise_scheduler = vae, unet, noise_scheduler
        self.vae_is_own = vae_is_own
        self.pipeline_config = dict(pipeline_config or {})
        self._prompt_cache: dict[str, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self.weight_dtype = torch.float32
        kind = noise_scheduler.config.prediction_type
        if kind not in PREDICTION_TYPES:
            raise ValueError(f"The scheduler's prediction_type is {kind!r}; the trainer supports "
                             f"{', '.join(PREDICTION_TYPES)}. Pass --prediction_type to override it.")

    # -- loading ------------------------------------------------------------------------------------------------

    @classmethod
    def _text_components(cls, path: str, revision: str | None, variant: str | None) -> tuple[list, list]:
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", revision=revision)
        encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", revision=revision, variant=variant)
        return [tokenizer], [encoder]

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> "StableDiffusionFamily":
        tokenizers, text_encoders = cls._text_components(path, revision, variant)
        if vae_path:
            vae = AutoencoderKL.from_pretrained(vae_path)
        else:
            vae = AutoencoderKL.from_pretrained(path, subfolder="vae", revision=revision, variant=variant)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", revision=revision, variant=variant)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=revision)
        if prediction_type is not None:
            noise_scheduler.register_to_config(prediction_type=prediction_type)
        pipeline_config = DiffusionPipeline.load_config(path, revision=revision)
        return cls(tokenizers, text_encoders, vae, unet, noise_scheduler, vae_is_own=not vae_path,
                   pipeline_config=pipeline_config)

    def place(self, device: torch.device, weight_dtype: torch.dtype) -> None:
        """Text encoders and UNet in the weight dtype; the VAE too, except SDXL's own VAE, which overflows in fp16
        and stays fp32 (as in diffusers' SDXL script)."""
        self.weight_dtype = weight_dtype
        self.vae.requires_grad_(False)
        self.denoiser.requires_grad_(False)
        for enc in self.text_encoders:
            enc.requires_grad_(False).to(device, dtype=weight_dtype)
        self.vae.to(device, dtype=torch.float32 if self._vae_stays_fp32 else weight_dtype)
        self.denoiser.to(device, dtype=weight_dtype)

    @property
    def _vae_stays_fp32(self) -> bool:
        return False

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()
        self.vae.enable_gradient_checkpointing()

    # -- conditioning -----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One prompt -> (prompt_embeds [1, L, C], pooled [1, P] or None) as the family's pipeline builds them."""
        tok, enc = self.tokenizers[0], self.text_encoders[0]
        ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        return enc(ids.to(enc.device))[0], None

    def _embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        for p in set(prompts) - self._prompt_cache.keys():  # the text encoders are frozen: encode each prompt once
            embeds, pooled = self._encode(p)
            self._prompt_cache[p] = (embeds.to(self.weight_dtype),
                                     None if pooled is None else pooled.to(self.weight_dtype))
        embeds = torch.cat([self._prompt_cache[p][0] for p in prompts])
        pooled = None if self._prompt_cache[prompts[0]][1] is None else \
            torch.cat([self._prompt_cache[p][1] for p in prompts])
        return embeds, pooled

    def conditioning(self, prompts: list[str], size_info: torch.Tensor | None = None) -> Conditioning:
        return Conditioning({"encoder_hidden_states": self._embeds(prompts)[0]})

    def negative_conditioning(self, batch_size: int, size_info: torch.Tensor | None = None) -> Conditioning:
        return self.conditioning([""] * batch_size, size_info)

    def predict(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        return model(latents, timestep, **cond.kwargs, return_dict=False)[0]

    # -- latents ------------------------------------------------------------------------------------------------------

    @property
    def vae_scale(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.vae.device, self.vae.dtype)).latent_dist
            latents = dist.sample(generator=generator)
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents - self.vae.config.shift_factor
        return (latents * self.vae.config.scaling_factor).to(self.weight_dtype)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.vae.dtype) / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents, return_dict=False)[0]

    def denoising_loss(self, model: torch.nn.Module, latents: torch.Tensor, cond: Conditioning,
                       generator: torch.Generator) -> torch.Tensor:
        """DreamBooth: MSE to the noise (epsilon) or v target at uniformly drawn training timesteps, per sample."""
        scheduler = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = noise if scheduler.config.prediction_type == "epsilon" else \
            scheduler.get_velocity(latents, noise, timesteps)
        pred = self.predict(model, noisy, timesteps, cond)
        return F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)

    def reward_sampler(self, num_inference_steps: int, device: torch.device, dtype: torch.dtype) -> DDIMRewardSampler:
        return DDIMRewardSampler(self.noise_scheduler.config, num_inference_steps, self.denoiser.config.in_channels,
                                 self.vae_scale, device, dtype)

    # -- LoRA -----------------------------------------------------------------------------------------------------

    @staticmethod
    def lora_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The LoRA tensors with diffusers keys (`<module>.lora_A.weight`, no `unet.` prefix)."""
        return convert_state_dict_to_diffusers(get_peft_model_state_dict(model))

    @staticmethod
    def lora_metadata(model: torch.nn.Module) -> dict:
        """Rank / alpha / targets, stored in the safetensors header so `load_lora_weights` rebuilds the adapter."""
        cfg = model.peft_config["default"]
        return {"r": cfg.r, "lora_alpha": cfg.lora_alpha, "lora_dropout": cfg.lora_dropout,
                "target_modules": sorted(cfg.target_modules), "use_dora": cfg.use_dora, "bias": cfg.bias}

    def save_lora(self, model: torch.nn.Module, directory: str | Path, kohya_name: str | None = None,
                  metadata: dict[str, str] | None = None) -> None:
        state = self.lora_state_dict(model)
        self.pipeline_cls.save_lora_weights(save_directory=str(directory), unet_lora_layers=state,
                                            unet_lora_adapter_metadata=self.lora_metadata(model),
                                            safe_serialization=True)
        if kohya_name:
            alpha = float(model.peft_config["default"].lora_alpha)
            save_kohya_lora(state, Path(directory) / kohya_name, alpha=alpha,
                            metadata={"ss_base_model_version": self.kohya_base_version, **(metadata or {})})

    def load_lora(self, model: torch.nn.Module, directory: str | Path) -> None:
        state, _ = self.pipeline_cls.lora_state_dict(str(directory))
        unet_state = convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items()
                                                      if k.startswith("unet.")})
        result = set_peft_model_state_dict(model, unet_state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"Checkpoint {directory} has LoRA keys this UNet does not: {unexpected[:5]}")
        cast_training_params(model, dtype=torch.float32)

    # -- inference ------------------------------------------------------------------------------------------------

    def pipeline(self, model: torch.nn.Module) -> DiffusionPipeline:
        """No safety checker: it would blank images before they are scored."""
        pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizers[0],
                                       unet=model, scheduler=self._inference_scheduler(), safety_checker=None,
                                       feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def _inference_scheduler(self):
        return DPMSolverMultistepScheduler.from_config(self.noise_scheduler.config)


class StableDiffusionXLFamily(StableDiffusionFamily):
    """SDXL: two CLIP text encoders (penultimate states concatenated, pooled projection of the second), size
    micro-conditioning (`add_time_ids`), zero negative embeddings when `force_zeros_for_empty_prompt`."""

    name: ClassVar[str] = "sdxl"
    default_resolution: ClassVar[int] = 1024
    kohya_base_version: ClassVar[str] = "sdxl_base_v1-0"
    pipeline_cls: ClassVar[type] = StableDiffusionXLPipeline

    @classmethod
    def _text_components(cls, path: str, revision: str | None, variant: str | None) -> tuple[list, list]:
        tokenizers, encoders = super()._text_components(path, revision, variant)
        tokenizers.append(CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", revision=revision))
        encoders.append(CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2",
                                                                    revision=revision, variant=variant))
        return tokenizers, encoders

    @property
    def _vae_stays_fp32(self) -> bool:
        return self.vae_is_own

    @property
    def force_zeros_for_empty_prompt(self) -> bool:
        return bool(self.pipeline_config.get("force_zeros_for_empty_prompt", True))

    @torch.no_grad()
    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        embeds, pooled = [], None
        for tok, enc in zip(self.tokenizers, self.text_encoders):
            ids = tok([prompt], padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
            out = enc(ids.to(enc.device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1), pooled

    def _with_sizes(self, embeds: torch.Tensor, pooled: torch.Tensor, size_info: torch.Tensor | None) -> Conditioning:
        if size_info is None:
            raise ValueError("SDXL conditioning needs size_info [B, 6] (original size, crop top-left, target size).")
        return Conditioning({"encoder_hidden_states": embeds, "added_cond_kwargs": {
            "text_embeds": pooled, "time_ids": size_info.to(embeds.device, embeds.dtype)}})

    def conditioning(self, prompts: list[str], size_info: torch.Tensor | None = None) -> Conditioning:
        embeds, pooled = self._embeds(prompts)
        return self._with_sizes(embeds, pooled, size_info)

    def negative_conditioning(self, batch_size: int, size_info: torch.Tensor | None = None) -> Conditioning:
        if not self.force_zeros_for_empty_prompt:
            return self.conditioning([""] * batch_size, size_info)
        embeds, pooled = self._embeds([""] * batch_size)  # only for the shapes and dtype
        return self._with_sizes(torch.zeros_like(embeds), torch.zeros_like(pooled), size_info)

    def pipeline(self, model: torch.nn.Module) -> DiffusionPipeline:
        pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoders[0],
                                         text_encoder_2=self.text_encoders[1], tokenizer=self.tokenizers[0],
                                         tokenizer_2=self.tokenizers[1], unet=model,
                                         scheduler=self._inference_scheduler(),
                                         force_zeros_for_empty_prompt=self.force_zeros_for_empty_prompt)
        pipe.set_progress_bar_config(disable=True)
        return pipe
