"""NearIDIdentityGuidance: a MODEL patch that steers any KSampler toward a subject with NearID's gradient.

A thin adapter over `nearid_core.guidance.IdentityGuidance`, installed with ComfyUI's own hook
`ModelPatcher.set_model_sampler_post_cfg_function`: after classifier-free guidance ComfyUI hands every model call's
denoised estimate x0 (in the model's latent space, for every model type: epsilon, v, flow) to the function, which
decodes it with the VAE's differentiable first-stage model (`latent_format.process_out` first), takes the gradient of
the NearID identity loss and returns the guided x0; ComfyUI's sampler continues from it. The VAE and the NearID model
are registered as additional models of the patched MODEL, so ComfyUI loads them with the denoiser at the start of
sampling (and offloads them with it).

The window is ComfyUI's start / end percent of the model's noise schedule (as ControlNet's): a call at noise level
sigma is guided when percent_to_sigma(end) <= sigma <= percent_to_sigma(start). Only the cheap form (gradients
through the decoder, not the denoiser) is offered: ComfyUI owns the denoiser call.
"""

from __future__ import annotations

import logging

import torch

from nearid_core.guidance import DEFAULT_STRENGTH, IdentityGuidance, identity_objective, make_autograd_safe

from . import comfy_env
from .loader import NearIDModelHandle
from .scoring import _REDUCE_INPUT, _REFERENCE_INPUTS, NearIDEmbedding, _references

logger = logging.getLogger(__name__)

ADDITIONAL_MODELS_KEY = "nearid_guidance"


def sigma_to_percent(model_sampling, sigma: float, iterations: int = 40) -> float:
    """ComfyUI's sampling percent of a noise level: the p in [0, 1] with `percent_to_sigma(p) = sigma` (bisection;
    `percent_to_sigma` decreases from the largest sigma at 0 to 0 at 1)."""
    lo, hi = 0.0, 1.0
    for _ in range(iterations):
        mid = (lo + hi) / 2
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def step_index(args: dict, sigma: float) -> int | None:
    """The sampler step of a model call: how many of the sampler's sigmas lie above `sigma` (None when ComfyUI did
    not pass them). A sampler's intermediate calls (Heun, DPM-2) count with the step they belong to."""
    sigmas = args.get("model_options", {}).get("transformer_options", {}).get("sample_sigmas")
    if sigmas is None:
        return None
    return int((sigmas.float() > sigma * (1 + 1e-5)).sum())


class ComfyIdentityGuidance:
    """The post-CFG function: ComfyUI's `args` -> guided denoised latents (or the input, where not guided)."""

    def __init__(self, handle: NearIDModelHandle, vae, reference_embeddings: torch.Tensor, reduce: str,
                 **options) -> None:
        self.handle, self.vae = handle, vae
        self.guidance = IdentityGuidance(identity_objective(handle.scorer, reference_embeddings, reduce),
                                         self._decode, **options)
        self._latent_out = None  # the sampled model's latent_format.process_out, set per call
        self._warned: set[str] = set()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> images in [-1, 1] through the VAE's first-stage model, where its weights are."""
        model = self.vae.first_stage_model
        weight = next(model.parameters())
        images = model.decode(self._latent_out(latents).to(weight.device, self.vae.vae_dtype)).float()
        comfy_env.check_interrupt()  # Cancel between the decode and the NearID forward / backward
        return images

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning("NearID Identity Guidance: %s", message)

    def _applies(self, denoised: torch.Tensor) -> bool:
        """Whether the VAE can decode these latents (image latents with its channel count)."""
        channels = getattr(self.vae, "latent_channels", None)
        if denoised.ndim != 4 or getattr(self.vae, "latent_dim", 2) != 2:
            self._warn_once("shape", f"latents of shape {tuple(denoised.shape)} are not 2-D image latents this VAE "
                                     "decodes; sampling continues unguided.")
            return False
        if channels is not None and denoised.shape[1] != channels:
            raise ValueError(f"NearID Identity Guidance: the model samples {denoised.shape[1]}-channel latents but the "
                             f"VAE decodes {channels}-channel ones; connect the VAE that belongs to the model.")
        return True

    def __call__(self, args: dict) -> torch.Tensor:
        denoised = args["denoised"]
        model = args["model"]
        sigma = float(args["sigma"].max())
        progress = sigma_to_percent(model.model_sampling, sigma)
        step = step_index(args, sigma)
        if not self.guidance.active(progress, step) or not self._applies(denoised):
            return denoised
        comfy_env.check_interrupt()
        self._latent_out = model.process_latent_out
        oom = comfy_env.oom_exception()
        try:
            scorer = self.handle.ready()
            with torch.inference_mode(False), torch.enable_grad():
                make_autograd_safe(self.vae.first_stage_model)
                make_autograd_safe(scorer.model)
                guided = self.guidance.guide(denoised.clone(), progress, step)
        except oom:
            self._warn_once("oom", "out of memory while decoding / scoring with gradients; this step stays unguided "
                                   "(lower decode_scale or the batch size).")
            return denoised
        logger.debug("NearID guidance at %.3f: identity %s", progress, (1 - self.guidance.last_loss).tolist())
        return guided


class NearIDIdentityGuidance:
    """Patch a MODEL so that every sampler using it is guided toward the references' identity."""

    DESCRIPTION = (
        "Identity guidance: while a KSampler runs, each step's denoised estimate is decoded with the VAE, scored by "
        "NearID against the reference images, and nudged along the gradient of the identity loss (training-free "
        "classifier guidance). Works with any model type, CFG, batches and offloading; costs one VAE decode plus one "
        "NearID forward and backward per guided step. Too much strength copies the references' pose or background: "
        "compare with NearID Score, and prefer Best-of-N when a few samples are cheap."
    )
    CATEGORY = "NearID/guidance"
    FUNCTION = "patch"
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with identity guidance; connect it to a KSampler instead of the original.",)

    @classmethod
    def INPUT_TYPES(cls) -> dict:
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model to guide (it is cloned, never changed)."}),
                "nearid_model": ("NEARID_MODEL", {"tooltip": "From NearID Model Loader."}),
                "vae": ("VAE", {"tooltip": "The VAE of the model: it decodes each step's estimate for scoring."}),
                "strength": ("FLOAT", {
                    "default": DEFAULT_STRENGTH, "min": 0.0, "max": 1.0, "step": 0.001, "round": 0.0001,
                    "tooltip": "Each guided step moves the estimate by this fraction of its own RMS, along the "
                               "identity gradient (0 = off). The default suits 20-30 steps; raise it slowly.",
                }),
                "start_percent": ("FLOAT", {
                    "default": 0.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Where in the noise schedule guidance starts (0 = the first, noisiest step).",
                }),
                "end_percent": ("FLOAT", {
                    "default": 1.0, "min": 0.0, "max": 1.0, "step": 0.01,
                    "tooltip": "Where guidance ends (1 = the last step).",
                }),
                "every_n_steps": ("INT", {
                    "default": 1, "min": 1, "max": 100,
                    "tooltip": "Guide every n-th sampler step only (fewer decodes: faster, weaker).",
                }),
                "decode_scale": ("FLOAT", {
                    "default": 1.0, "min": 0.125, "max": 1.0, "step": 0.125,
                    "tooltip": "Decode the estimate at this fraction of its size for scoring (0.5 = a quarter of the "
                               "VAE's work and memory); the guidance still acts on the full latent.",
                }),
                "reduce": _REDUCE_INPUT,
            },
            "optional": dict(_REFERENCE_INPUTS),
        }

    @classmethod
    def VALIDATE_INPUTS(cls, start_percent: float | None = 0.0, end_percent: float | None = 1.0) -> bool | str:
        if isinstance(start_percent, (int, float)) and isinstance(end_percent, (int, float)) \
                and start_percent > end_percent:
            return f"start_percent ({start_percent}) must not be above end_percent ({end_percent})."
        return True

    def patch(self, model, nearid_model: NearIDModelHandle, vae, strength: float, start_percent: float,
              end_percent: float, every_n_steps: int = 1, decode_scale: float = 1.0, reduce: str = "mean",
              reference_images: torch.Tensor | None = None,
              reference_embedding: NearIDEmbedding | None = None) -> tuple:
        if getattr(vae, "first_stage_model", None) is None:
            raise ValueError("NearID Identity Guidance: the VAE input has no decoder (first_stage_model); connect "
                             "the VAE output of the checkpoint loader or VAE Loader.")
        n_refs = 0 if reference_images is None else int(reference_images.shape[0])
        refs = _references(nearid_model, reference_images, reference_embedding, comfy_env.progress_bar(n_refs))
        with torch.inference_mode(False):
            refs = refs.clone()  # ordinary tensor: autograd saves it in the loss's backward
        guidance = ComfyIdentityGuidance(nearid_model, vae, refs, reduce, strength=strength, start=start_percent,
                                         end=end_percent, every_n_steps=every_n_steps, decode_scale=decode_scale)
        patched = model.clone()
        patched.set_model_sampler_post_cfg_function(guidance)
        patched.set_additional_models(ADDITIONAL_MODELS_KEY,
                                      [p for p in (vae.patcher, nearid_model.patcher) if p is not None])
        return (patched,)
