"""Identity guidance: steer a diffusion sampler toward a subject with the gradient of the NearID identity loss.

Training-free classifier guidance with an identity model, in the line of Universal Guidance, FreeDoM and RectifID.
The mechanism works on the denoiser's clean-latent estimate x0, so it serves epsilon / v-prediction UNets and
flow-matching transformers alike: each integration converts its model output to x0, calls `IdentityGuidance.guide`,
and converts the guided x0 back (diffusers: `nearid_core.guidance_diffusers`; ComfyUI: `nearid_nodes.guidance`).

One guided step, per sample, with L = the identity loss (1 - cosine to the references) of the decoded x0:

* g = dL/dx0 through the decoder and the scorer (the cheap form), or, with `through_denoiser`, g = dL/dx_t through
  `x0_fn(x_t)` as well (Universal Guidance's forward form: one more denoiser pass with gradients per step);
* x0' = x0 - strength * rms(x0) * g / rms(g) (`normalize=True`, the default): the step is a fraction `strength` of
  the latent's own scale, whatever the latent space (SD's 4-channel, FLUX's 16-channel) or the gradient's size, so one
  default strength serves every model;
* x0' = x0 - strength * clip(g, max_grad_norm) with `normalize=False` (the raw classifier-guidance step; the norm of
  each sample's gradient is clipped to `max_grad_norm` when one is given).

Only the sampler's latents change: the gradient is taken with `torch.autograd.grad` w.r.t. the latents alone, so no
weight of the denoiser, decoder or scorer ever gets a `.grad`. It runs under an outer `torch.inference_mode()` or
`torch.no_grad()` (diffusers pipelines, ComfyUI) by switching both off for the gradient. Torch only: no diffusers or
ComfyUI import here.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .losses import identity_loss
from .names import REDUCTIONS
from .preprocessing import Images

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_STRENGTH", "IdentityGuidance", "identity_objective", "make_autograd_safe", "time_travel"]

#: The documented default: each guided step moves x0 by 1 % of its RMS, so a 20-30 step window moves it by at most
#: 20-30 % (README "Identity guidance" measures the curve).
DEFAULT_STRENGTH = 0.01

Loss = Callable[[torch.Tensor], torch.Tensor]  # images [N, 3, H, W] in [-1, 1] -> per-image loss [N], graph intact
Decode = Callable[[torch.Tensor], torch.Tensor]  # latents [N, C, h, w] -> images [N, 3, H, W] in about [-1, 1]
X0Fn = Callable[[torch.Tensor], torch.Tensor]  # x_t -> x0 estimate (one denoiser call, differentiable)


def identity_objective(scorer, reference_embeddings: torch.Tensor, reduce: str = "mean") -> Loss:
    """The NearID identity loss of decoded images, `1 - cosine` to the references ([N] in [0, 2]), graph intact.

    Args:
        scorer: a `NearIDScorer` (its `embed_pixels` does the checkpoint's own differentiable preprocessing).
        reference_embeddings: [R, D] embeddings of the subject (`scorer.as_embeddings(images)`).
        reduce: how the R cosines combine ("mean", "min", "max", "centroid"; `nearid_core.losses.identity_loss`).
    """
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {', '.join(REDUCTIONS)}; got {reduce!r}.")

    def loss(images: torch.Tensor) -> torch.Tensor:
        embeddings = scorer.embed_pixels(images, input_range="-1,1", normalize=False)
        return identity_loss(embeddings, reference_embeddings.to(embeddings.device), reduce=reduce)

    return loss


def _per_sample_rms(x: torch.Tensor) -> torch.Tensor:
    return x.float().pow(2).flatten(1).mean(1).sqrt().view(-1, *[1] * (x.ndim - 1))


class IdentityGuidance:
    """Guidance of a sampler's x0 estimates toward a subject's identity.

    Example:
        >>> guidance = IdentityGuidance.from_scorer(scorer, ["ref1.png", "ref2.png"], decode=my_vae_decode)
        >>> x0 = guidance.guide(x0, progress=i / num_steps, step=i)    # inside a sampling loop

    Args:
        loss: images [N, 3, H, W] in [-1, 1] -> per-image loss [N] (`identity_objective`, or a
            `reward_finetune.NearIDReward`); lower = closer to the subject.
        decode: latents [N, C, h, w] (the sampler's space, spatial layout) -> images in about [-1, 1], differentiable.
        strength: size of each guided step (see the module docstring); 0 switches guidance off.
        start, end: the window of sampling progress in [0, 1] where guidance acts (0 = the first, noisiest step;
            ComfyUI's start / end percent convention); both ends included.
        every_n_steps: guide only steps whose index is a multiple of this (1 = every step in the window).
        decode_scale: in (0, 1]: the latents are resized by this factor (bilinear, antialiased) before decoding, so
            the decoder, whose cost grows with the area, runs on fewer pixels; the scorer resizes to its own input
            size anyway. 1 = full resolution.
        normalize: the scale-free step (default) instead of the raw gradient step.
        max_grad_norm: with `normalize=False`, clip each sample's gradient to this L2 norm (None = no clipping).
        through_denoiser: differentiate through the denoiser too (`guide` then needs `x_t` and `x0_fn`).
    """

    def __init__(self, loss: Loss, decode: Decode, strength: float = DEFAULT_STRENGTH, start: float = 0.0,
                 end: float = 1.0, every_n_steps: int = 1, decode_scale: float = 1.0, normalize: bool = True,
                 max_grad_norm: float | None = None, through_denoiser: bool = False) -> None:
        if not (math.isfinite(strength) and strength >= 0):
            raise ValueError(f"strength must be a finite number >= 0; got {strength}.")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"start and end must satisfy 0 <= start <= end <= 1; got start={start}, end={end}.")
        if every_n_steps < 1:
            raise ValueError(f"every_n_steps must be >= 1; got {every_n_steps}.")
        if not 0.0 < decode_scale <= 1.0:
            raise ValueError(f"decode_scale must be in (0, 1]; got {decode_scale}.")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be > 0 or None; got {max_grad_norm}.")
        self.loss, self.decode = loss, decode
        self.strength, self.start, self.end = float(strength), float(start), float(end)
        self.every_n_steps, self.decode_scale = int(every_n_steps), float(decode_scale)
        self.normalize, self.max_grad_norm, self.through_denoiser = normalize, max_grad_norm, through_denoiser
        self.last_loss: torch.Tensor | None = None  # [N] identity loss of the x0 the last guided step started from
        self.guided_steps = 0

    @classmethod
    def from_scorer(cls, scorer, references: Images | torch.Tensor, decode: Decode, reduce: str = "mean",
                    **kwargs) -> "IdentityGuidance":
        """Guidance with the NearID loss of `scorer` against `references` (images, or [R, D] embeddings; embedded
        once, without gradients). `kwargs` are the other arguments of `IdentityGuidance`."""
        with torch.no_grad():
            refs = scorer.as_embeddings(references)
        if refs.shape[0] == 0:
            raise ValueError("references is empty: pass at least one image (or embedding) of the subject.")
        return cls(identity_objective(scorer, refs, reduce), decode, **kwargs)

    def active(self, progress: float, step: int | None = None) -> bool:
        """Whether a step at `progress` (index `step`; None = not known, counted as on the grid) is guided."""
        on_grid = step is None or step % self.every_n_steps == 0
        return self.strength > 0 and self.start <= progress <= self.end and on_grid

    def guide(self, x0: torch.Tensor, progress: float, step: int | None = None, x_t: torch.Tensor | None = None,
              x0_fn: X0Fn | None = None) -> torch.Tensor:
        """The guided x0 (same shape, dtype and device), or `x0` itself where the step is not guided.

        Args:
            x0: the denoiser's clean-latent estimate [N, C, h, w] (after classifier-free guidance).
            progress, step: where the sampler is (see `active`).
            x_t, x0_fn: the noisy latents and the function that predicted `x0` from them; needed (only) with
                `through_denoiser`.
        """
        if not self.active(progress, step):
            return x0
        grad = self.gradient(x0, x_t, x0_fn)
        return (x0.float() - self.delta(x0, grad)).to(x0.dtype)

    def gradient(self, x0: torch.Tensor, x_t: torch.Tensor | None = None, x0_fn: X0Fn | None = None) -> torch.Tensor:
        """dL/dx0 (or dL/dx_t with `through_denoiser`) summed over the batch: each sample's own gradient, float32."""
        if self.through_denoiser and (x_t is None or x0_fn is None):
            raise ValueError("through_denoiser=True needs x_t and x0_fn (the noisy latents and the denoiser's x0 "
                             "function); integrations that do not own the denoiser call use the cheap form.")
        with torch.inference_mode(False), torch.enable_grad():
            leaf = (x_t if self.through_denoiser else x0).detach().clone().float().requires_grad_(True)
            estimate = x0_fn(leaf).float() if self.through_denoiser else leaf
            if self.decode_scale != 1.0:
                estimate = F.interpolate(estimate, scale_factor=self.decode_scale, mode="bilinear",
                                         antialias=True, align_corners=False)
            loss = self.loss(self.decode(estimate))
            (grad,) = torch.autograd.grad(loss.sum(), leaf)
        self.last_loss = loss.detach()
        self.guided_steps += 1
        if not torch.isfinite(loss).all() or not torch.isfinite(grad).all():
            logger.warning("Identity guidance: non-finite loss or gradient (often an fp16 VAE overflowing; decode in "
                           "fp32 or bf16); the affected values get no guidance.")
        return torch.nan_to_num(grad.detach(), nan=0.0, posinf=0.0, neginf=0.0)

    def delta(self, x0: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        """What a guided step subtracts from x0, per sample (zero where the gradient is zero)."""
        grad = grad.to(x0.device, torch.float32)
        if self.normalize:
            g_rms = _per_sample_rms(grad)
            return self.strength * _per_sample_rms(x0) * grad / g_rms.clamp_min(1e-30) * (g_rms > 0)
        if self.max_grad_norm is not None:
            norm = grad.flatten(1).norm(dim=1).view(-1, *[1] * (grad.ndim - 1))
            grad = grad * (self.max_grad_norm / norm.clamp_min(1e-30)).clamp(max=1.0)
        return self.strength * grad


def time_travel(x_prev: torch.Tensor, prev: tuple[float, float], now: tuple[float, float],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """FreeDoM's time travel: re-noise latents from the step's target noise level back to the level it started at,
    so a loop that owns its denoiser can repeat a guided step (recurrence).

    A level is (signal scale a, noise scale s) of x = a * x0 + s * eps: (sqrt(alpha_bar), sqrt(1 - alpha_bar)) for
    DDPM-type schedules, (1 - sigma, sigma) for flow matching, (1, sigma) for k-diffusion. The result is
    (a_now / a_prev) * x_prev + sqrt(s_now^2 - (a_now / a_prev)^2 s_prev^2) * fresh noise, which has exactly the
    marginal of level `now` when `x_prev` has that of level `prev`. The diffusers and ComfyUI integrations do not own
    the denoiser call, so they do not repeat steps.
    """
    (a_prev, s_prev), (a_now, s_now) = prev, now
    ratio = a_now / a_prev
    var = s_now**2 - (ratio * s_prev) ** 2
    if var < -1e-12:
        raise ValueError(f"time_travel goes from less noise to more: level {prev} must be less noisy than {now}.")
    noise = torch.randn(x_prev.shape, generator=generator, dtype=torch.float32).to(x_prev.device)
    return (ratio * x_prev.float() + math.sqrt(max(var, 0.0)) * noise).to(x_prev.dtype)


def make_autograd_safe(module: torch.nn.Module) -> torch.nn.Module:
    """Replace parameters and buffers created under `torch.inference_mode()` (e.g. weights loaded inside a ComfyUI
    node) by ordinary copies, which autograd can save for the backward pass; in place, returns `module`.

    Inference tensors cannot take part in a graph ("Inference tensors cannot be saved for backward"), even when only
    the input's gradient is wanted. Tensors that are already ordinary are left alone, so a second call costs a scan.
    """
    with torch.inference_mode(False):
        for sub in module.modules():
            for name, p in list(sub._parameters.items()):
                if p is not None and p.is_inference():
                    sub._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
            for name, b in list(sub._buffers.items()):
                if b is not None and b.is_inference():
                    sub._buffers[name] = b.clone()
    return module
