"""FLUX.1 dev and schnell (`FluxPipeline`): CLIP pooled + T5 prompt embeddings, packed 2x2 latent patches with
`img_ids` / `txt_ids`, the guidance embedding (dev, `guidance_embeds=True`) instead of classifier-free guidance,
dynamic shifting of the flow schedule by image size, LoRA on the targets of diffusers' `train_dreambooth_lora_flux.py`.

FLUX.1-dev is guidance-distilled: the guidance scale is an input of the transformer (`--guidance_scale` in the
denoising loss, as diffusers' script sets it; `--reward_guidance_scale` / `--validation_guidance_scale` in sampling),
and there is no unconditional branch. schnell has no guidance input; the scales are ignored there.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .base import Conditioning, Denoise
from .flow_matching import FlowMatchFamily, image_seq_len

MAX_SEQUENCE_LENGTH = 512  # FluxPipeline refuses longer T5 prompts


class FluxFamily(FlowMatchFamily):
    name: ClassVar[str] = "flux"
    default_resolution: ClassVar[int] = 1024
    default_guidance_scale: ClassVar[float] = 3.5  # FluxPipeline's
    default_max_sequence_length: ClassVar[int] = 512  # diffusers' train_dreambooth_lora_flux.py
    default_weighting_scheme: ClassVar[str] = "none"
    pipeline_cls: ClassVar[type] = FluxPipeline
    lora_target_modules: ClassVar[list[str]] = [  # train_dreambooth_lora_flux.py's default targets
        "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_q_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2"]

    @classmethod
    def check_config(cls, config) -> None:
        super().check_config(config)
        if config.max_sequence_length is not None and config.max_sequence_length > MAX_SEQUENCE_LENGTH:
            raise ValueError(f"--max_sequence_length must be <= {MAX_SEQUENCE_LENGTH} for FLUX.1 (FluxPipeline's "
                             f"limit); got {config.max_sequence_length}.")

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> "FluxFamily":
        return cls._load(path, revision, variant, vae_path,
                         [("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModel),
                          ("tokenizer_2", "text_encoder_2", T5TokenizerFast, T5EncoderModel)],
                         FluxTransformer2DModel)

    @property
    def guidance_embeds(self) -> bool:
        return bool(self.denoiser.config.guidance_embeds)

    def model_card_lines(self) -> list[str]:
        guidance = (f"embedded guidance {self.options.guidance_scale:g} in the denoising loss" if self.guidance_embeds
                    else "no guidance input (schnell)")
        return [*super().model_card_lines(), f"* FLUX.1: {guidance}."]

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """FluxPipeline.encode_prompt: T5 last hidden state (`max_sequence_length` tokens), CLIP pooled output."""
        (clip_tok, t5_tok), (clip, t5) = self.tokenizers, self.text_encoders
        pooled = clip(self._token_ids(clip_tok, prompt, clip_tok.model_max_length)).pooler_output
        embeds = t5(self._token_ids(t5_tok, prompt, self.options.max_sequence_length))[0]
        return embeds, pooled

    def _with_guidance(self, kwargs: dict, batch_size: int, scale: float) -> Conditioning:
        if self.guidance_embeds:
            kwargs = {**kwargs, "guidance": torch.full((batch_size,), float(scale), device=self.device)}
        return Conditioning(kwargs)

    def conditioning(self, prompts: list[str], size_info: torch.Tensor | None = None) -> Conditioning:
        """Prompt embeddings, and the guidance of the denoising loss (`--guidance_scale`) for FLUX.1-dev."""
        embeds, pooled = self._embeds(prompts)
        return self._with_guidance({"encoder_hidden_states": embeds, "pooled_projections": pooled}, len(prompts),
                                   self.options.guidance_scale)

    def negative_conditioning(self, batch_size: int, size_info: torch.Tensor | None = None) -> None:
        """None: FLUX.1 samples without an unconditional branch (guidance is embedded)."""
        return None

    def denoiser_fn(self, model: torch.nn.Module, cond: Conditioning, uncond: Conditioning | None = None,
                    guidance_scale: float = 1.0) -> Denoise:
        """`guidance_scale` goes into the guidance embedding (dev); `uncond` is unused."""
        if self.guidance_embeds:
            batch = cond.kwargs["encoder_hidden_states"].shape[0]
            cond = self._with_guidance(cond.kwargs, batch, guidance_scale)
        return lambda latents, t: self.predict(model, latents, t, cond)

    def predict(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        """Latents [B, C, h, w] are packed into 2x2 patches with their `img_ids` for the transformer and unpacked
        after; timesteps are on the scheduler's 0..1000 scale (the transformer reads t / 1000)."""
        b, c, h, w = latents.shape
        packed = FluxPipeline._pack_latents(latents, b, c, h, w)
        img_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, latents.device, latents.dtype)
        txt_ids = torch.zeros(cond.kwargs["encoder_hidden_states"].shape[1], 3, device=latents.device,
                              dtype=latents.dtype)
        t = timestep.to(latents.device, latents.dtype).reshape(-1).expand(b)
        out = model(hidden_states=packed, timestep=t / 1000, img_ids=img_ids, txt_ids=txt_ids, return_dict=False,
                    **cond.kwargs)[0]
        return FluxPipeline._unpack_latents(out, h * self.vae_scale, w * self.vae_scale, self.vae_scale)

    def schedule_kwargs(self, num_inference_steps: int, height: int, width: int) -> dict:
        """FluxPipeline's sigmas: linspace(1, 1/n, n), shifted by `mu` for the image's token count (dynamic
        shifting; schedulers without it ignore `mu`)."""
        config = self.noise_scheduler.config
        mu = calculate_shift(image_seq_len(height, width), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.15))
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        return {"sigmas": sigmas, "mu": mu}

    def prompt_inputs(self, prompts: list[str], guidance_scale: float) -> dict:
        embeds, pooled = self._embeds(prompts)
        return {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}

    def pipeline(self, model: torch.nn.Module) -> FluxPipeline:
        (tok, tok2), (enc, enc2) = self.tokenizers, self.text_encoders
        pipe = FluxPipeline(scheduler=self._scheduler_copy(), vae=self.vae, text_encoder=enc, tokenizer=tok,
                            text_encoder_2=enc2, tokenizer_2=tok2, transformer=model)
        pipe.set_progress_bar_config(disable=True)
        return pipe
