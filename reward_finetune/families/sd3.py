"""Stable Diffusion 3 / 3.5 (`StableDiffusion3Pipeline`): an MMDiT transformer with three text encoders (two CLIP
with projection, penultimate states concatenated and zero-padded to T5's width, then T5; pooled projections of both
CLIPs), classifier-free guidance on `""` as the pipeline does it, LoRA on the attention projections of diffusers'
`train_dreambooth_lora_sd3.py`. A pipeline saved without T5 (`text_encoder_3: null`) gets zeros in its place, as
the pipeline does.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift
from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

from .base import Conditioning
from .flow_matching import FlowMatchFamily, image_seq_len


class StableDiffusion3Family(FlowMatchFamily):
    name: ClassVar[str] = "sd3"
    default_resolution: ClassVar[int] = 1024
    default_guidance_scale: ClassVar[float] = 7.0  # StableDiffusion3Pipeline's
    default_max_sequence_length: ClassVar[int] = 77  # diffusers' train_dreambooth_lora_sd3.py
    default_weighting_scheme: ClassVar[str] = "logit_normal"
    default_precondition_outputs: ClassVar[bool] = True
    pipeline_cls: ClassVar[type] = StableDiffusion3Pipeline
    lora_target_modules: ClassVar[list[str]] = [  # train_dreambooth_lora_sd3.py's default targets
        "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out", "attn.to_k", "attn.to_out.0",
        "attn.to_q", "attn.to_v"]

    @classmethod
    def from_pretrained(cls, path: str, revision: str | None = None, variant: str | None = None,
                        vae_path: str | None = None, prediction_type: str | None = None) -> "StableDiffusion3Family":
        return cls._load(path, revision, variant, vae_path,
                         [("tokenizer", "text_encoder", CLIPTokenizer, CLIPTextModelWithProjection),
                          ("tokenizer_2", "text_encoder_2", CLIPTokenizer, CLIPTextModelWithProjection),
                          ("tokenizer_3", "text_encoder_3", T5TokenizerFast, T5EncoderModel)],
                         SD3Transformer2DModel)

    def _encode(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """StableDiffusion3Pipeline.encode_prompt without clip_skip."""
        clip_states, pooled = [], []
        for tok, enc in zip(self.tokenizers[:2], self.text_encoders[:2]):
            out = enc(self._token_ids(tok, prompt, tok.model_max_length), output_hidden_states=True)
            pooled.append(out[0])
            clip_states.append(out.hidden_states[-2])
        tok, enc = self.tokenizers[2], self.text_encoders[2]
        if enc is None:
            t5 = torch.zeros(1, self.options.max_sequence_length, self.denoiser.config.joint_attention_dim,
                             device=self.device, dtype=clip_states[0].dtype)
        else:
            t5 = enc(self._token_ids(tok, prompt, self.options.max_sequence_length))[0]
        clip = torch.cat(clip_states, dim=-1)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def conditioning(self, prompts: list[str], size_info: torch.Tensor | None = None) -> Conditioning:
        embeds, pooled = self._embeds(prompts)
        return Conditioning({"encoder_hidden_states": embeds, "pooled_projections": pooled})

    def negative_conditioning(self, batch_size: int, size_info: torch.Tensor | None = None) -> Conditioning:
        """The pipeline's default negative prompt: `""` through all three encoders."""
        return self.conditioning([""] * batch_size)

    def predict(self, model: torch.nn.Module, latents: torch.Tensor, timestep: torch.Tensor,
                cond: Conditioning) -> torch.Tensor:
        t = timestep.to(latents.device).reshape(-1).expand(latents.shape[0])
        return model(hidden_states=latents, timestep=t, return_dict=False, **cond.kwargs)[0]

    def schedule_kwargs(self, num_inference_steps: int, height: int, width: int) -> dict:
        """The pipeline's schedule: the scheduler's own sigmas, plus `mu` where it shifts dynamically."""
        config = self.noise_scheduler.config
        kwargs = {"num_inference_steps": num_inference_steps}
        if config.get("use_dynamic_shifting", None):
            kwargs["mu"] = calculate_shift(image_seq_len(height, width, self.denoiser.config.patch_size),
                                           config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                                           config.get("base_shift", 0.5), config.get("max_shift", 1.16))
        return kwargs

    def prompt_inputs(self, prompts: list[str], guidance_scale: float) -> dict:
        embeds, pooled = self._embeds(prompts)
        inputs = {"prompt_embeds": embeds, "pooled_prompt_embeds": pooled}
        if guidance_scale > 1:
            neg_embeds, neg_pooled = self._embeds([""] * len(prompts))
            inputs.update(negative_prompt_embeds=neg_embeds, negative_pooled_prompt_embeds=neg_pooled)
        return inputs

    def pipeline(self, model: torch.nn.Module) -> StableDiffusion3Pipeline:
        (tok, tok2, tok3), (enc, enc2, enc3) = self.tokenizers, self.text_encoders
        pipe = StableDiffusion3Pipeline(transformer=model, scheduler=self._scheduler_copy(), vae=self.vae,
                                        text_encoder=enc, tokenizer=tok, text_encoder_2=enc2, tokenizer_2=tok2,
                                        text_encoder_3=enc3, tokenizer_3=tok3)
        pipe.set_progress_bar_config(disable=True)
        return pipe
