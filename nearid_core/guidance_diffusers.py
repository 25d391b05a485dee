"""Identity guidance for unmodified diffusers pipelines (SD1.5 / SDXL, FLUX.1, SD3), over `nearid_core.guidance`.

`guided(pipe, ...)` is a context manager: while it is open, `pipe.scheduler.step` is wrapped so that each step's
model output (after classifier-free guidance) is converted to the clean-latent estimate x0 with the scheduler's own
quantities, guided toward the references, converted back and handed to the real step:

* DDPM-type schedulers (DDIM, DDPM, PNDM, DPM-Solver multistep / singlestep, UniPC, DEIS): epsilon, v_prediction or
  sample prediction at the step's alpha_t / sigma_t (the scheduler's `_sigma_to_alpha_sigma_t` of its
  `sigmas[step_index]` where it has them, so Karras or flow sigmas are followed; else `alphas_cumprod[t]`);
* k-diffusion Euler-type schedulers (Euler, Euler ancestral, LMS): x0 = x - sigma * eps, or the v form;
* `FlowMatchEulerDiscreteScheduler` (FLUX.1, SD3): x0 = x_t - sigma * v.

FLUX's packed 2x2 latents are unpacked (diffusers' own `_unpack_latents`) for decoding and repacked after. Progress
is the fraction of the pipeline's steps done (step i of n: i / n). Only the cheap form is available here (the
pipeline owns the denoiser call); `through_denoiser` needs a loop that calls `IdentityGuidance.guide` with `x0_fn`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from .guidance import IdentityGuidance
from .preprocessing import Images

__all__ = ["UnsupportedSchedulerError", "guided", "pipeline_decoder", "schedule_kind", "x0_coefficients"]

VP_SCHEDULERS = ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "DPMSolverMultistepScheduler",
                 "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler", "DEISMultistepScheduler")
K_DIFFUSION_SCHEDULERS = ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "LMSDiscreteScheduler")
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler",)
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class UnsupportedSchedulerError(ValueError):
    """A scheduler (or prediction type) whose model output the adapter cannot convert to x0."""


def _step_index(scheduler, timestep) -> int:
    """The index of `timestep` in the scheduler's schedule (its own counter where it keeps one)."""
    index = getattr(scheduler, "step_index", None)
    if index is not None:
        return int(index)
    if hasattr(scheduler, "index_for_timestep"):
        return int(scheduler.index_for_timestep(timestep))
    timesteps = scheduler.timesteps
    matches = (timesteps == torch.as_tensor(timestep, device=timesteps.device).to(timesteps.dtype)).nonzero()
    return int(matches[0]) if len(matches) else 0


def schedule_kind(scheduler) -> str:
    """How the scheduler parametrises x_t: "flow" (x_t = (1 - sigma) x0 + sigma eps), "k" (k-diffusion, x_t = x0 +
    sigma eps) or "vp" (x_t = alpha_t x0 + sigma_t eps).

    Raises:
        UnsupportedSchedulerError: naming the scheduler class or prediction type, and the supported ones.
    """
    name = type(scheduler).__name__
    if name in FLOW_SCHEDULERS:
        return "flow"
    kind = getattr(scheduler.config, "prediction_type", None)
    if name in VP_SCHEDULERS + K_DIFFUSION_SCHEDULERS and kind not in PREDICTION_TYPES:
        raise UnsupportedSchedulerError(f"{name} predicts {kind!r}; identity guidance supports "
                                        f"{', '.join(PREDICTION_TYPES)} (and flow matching).")
    if name in K_DIFFUSION_SCHEDULERS:
        return "k"
    if name in VP_SCHEDULERS:
        return "vp"
    raise UnsupportedSchedulerError(
        f"Identity guidance cannot convert {name}'s model output to x0; supported: "
        f"{', '.join(VP_SCHEDULERS + K_DIFFUSION_SCHEDULERS + FLOW_SCHEDULERS)}. Set pipe.scheduler to one of them "
        "(e.g. pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)).")


def x0_coefficients(scheduler, timestep, index: int) -> tuple[float, float]:
    """(c_x, c_out) with x0 = c_x * sample + c_out * model_output at step `index` / `timestep`, from the scheduler's
    own quantities; the map is inverted exactly (c_out != 0)."""
    kind = schedule_kind(scheduler)
    if kind == "flow":
        return 1.0, -float(scheduler.sigmas[index])
    prediction = scheduler.config.prediction_type
    if prediction == "sample":
        return 0.0, 1.0
    if kind == "k":
        sigma = float(scheduler.sigmas[index])
        if prediction == "epsilon":
            return 1.0, -sigma
        return 1.0 / (sigma**2 + 1), -sigma / (sigma**2 + 1) ** 0.5
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and getattr(scheduler, "sigmas", None) is not None:
        alpha, sigma = (float(v) for v in scheduler._sigma_to_alpha_sigma_t(scheduler.sigmas[index]))
    else:
        alpha_bar = float(scheduler.alphas_cumprod[int(timestep)])
        alpha, sigma = alpha_bar**0.5, (1 - alpha_bar) ** 0.5
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    return alpha, -sigma


def pipeline_decoder(pipe):
    """The pipeline's VAE decode of spatial latents [N, C, h, w] (as the denoiser sees them: scaled, shifted) ->
    images in about [-1, 1], differentiable; the VAE's dtype and device."""
    vae = pipe.vae
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    def decode(latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(vae.device, vae.dtype) / scaling + shift
        return vae.decode(z, return_dict=False)[0]

    return decode


@contextmanager
def guided(pipe, scorer_or_guidance, references: Images | torch.Tensor | None = None,
           **kwargs) -> Iterator[IdentityGuidance]:
    """Guide every call of `pipe` inside the `with` block toward the references' identity.

    Example:
        >>> scorer = NearIDScorer.from_pretrained()
        >>> with guided(pipe, scorer, ["ref1.png", "ref2.png"], strength=0.02) as guidance:
        ...     image = pipe("a photo of sks dog").images[0]

    Args:
        pipe: a diffusers pipeline with `vae` and `scheduler` (StableDiffusion(XL)Pipeline, FluxPipeline,
            StableDiffusion3Pipeline, ...).
        scorer_or_guidance: a `NearIDScorer` (then `references` and the `IdentityGuidance` arguments in `kwargs`),
            or a ready `IdentityGuidance` (its decode should be `pipeline_decoder(pipe)`).
        references: images or [R, D] embeddings of the subject.

    Yields:
        the `IdentityGuidance` in use (`last_loss`, `guided_steps`).
    """
    if isinstance(scorer_or_guidance, IdentityGuidance):
        if references is not None or kwargs:
            raise ValueError("guided(): pass references and guidance options only with a scorer, not with a ready "
                             "IdentityGuidance.")
        guidance = scorer_or_guidance
    else:
        if references is None:
            raise ValueError("guided(): references are required with a scorer (images or [R, D] embeddings).")
        guidance = IdentityGuidance.from_scorer(scorer_or_guidance, references, pipeline_decoder(pipe), **kwargs)
    if guidance.through_denoiser:
        raise ValueError("guided(): through_denoiser is not available for diffusers pipelines (the pipeline owns the "
                         "denoiser call); use the cheap form (through_denoiser=False).")
    scheduler = pipe.scheduler
    schedule_kind(scheduler)  # an unsupported scheduler is refused before sampling starts
    size: dict[str, int] = {}
    packed = hasattr(pipe, "_unpack_latents")
    real_step = scheduler.step
    real_prepare = pipe.prepare_latents
    signature = inspect.signature(real_prepare)

    @functools.wraps(real_prepare)  # the pipeline inspects the signatures
    def prepare_latents(*args, **kw):
        bound = signature.bind(*args, **kw)
        size.update(height=int(bound.arguments["height"]), width=int(bound.arguments["width"]))
        return real_prepare(*args, **kw)

    @functools.wraps(real_step)  # the pipeline passes eta / generator only to a step that takes them
    def step(model_output, timestep, sample, *args, **kw):
        index = _step_index(scheduler, timestep)
        progress = index / max(len(scheduler.timesteps), 1)
        if not guidance.active(progress, index):
            return real_step(model_output, timestep, sample, *args, **kw)
        c_x, c_out = x0_coefficients(scheduler, timestep, index)
        x0 = c_x * sample.float() + c_out * model_output.float()
        if packed:
            x0 = pipe._unpack_latents(x0, size["height"], size["width"], pipe.vae_scale_factor)
        guided_x0 = guidance.guide(x0, progress, index)
        if packed:
            b, c, h, w = guided_x0.shape
            guided_x0 = pipe._pack_latents(guided_x0, b, c, h, w)
        output = ((guided_x0 - c_x * sample.float()) / c_out).to(model_output.dtype)
        return real_step(output, timestep, sample, *args, **kw)

    patched = [(scheduler, "step", step), (pipe, "prepare_latents", prepare_latents)]
    saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patched]
    for obj, name, fn in patched:
        setattr(obj, name, fn)
    try:
        yield guidance
    finally:
        for obj, name, before in saved:  # the methods as they were (the class's own, usually)
            if before is None:
                delattr(obj, name)
            else:
                setattr(obj, name, before)
