"""Reward samplers: how the trainer generates the images the identity reward scores, and where gradients flow.

All of them run a family's `RewardSampler` (DDIM for SD1.5 / SDXL) from fresh noise with the current LoRA:

* `refl_sample` (ReFL, ImageReward): sample without gradients to a random late step, then predict x0 in one step with
  gradients. Cheapest: one denoiser pass carries gradients.
* `draft_sample` (DRaFT-K): sample the whole schedule, gradients through the last K steps only (truncated backprop).
  With `draw_k` the K of each step is random (AlignProp's randomised truncation).
* `draft_lv_sample` (DRaFT-LV): sample the whole schedule without gradients, re-noise the final sample n times to
  the last step's noise level and denoise each copy in one step with gradients; the reward averages the n copies.
  Lower-variance gradients than DRaFT-1 for about the same cost.

`eta` > 0 makes every sampler step stochastic (DDIM's eta), drawing its noise from the step's generator.
"""

from __future__ import annotations

import torch

from .families.base import Denoise, RewardSampler

K_DISTRIBUTIONS = ("fixed", "uniform", "gaussian")


def refl_sample(sampler: RewardSampler, denoise: Denoise, latents: torch.Tensor, stop_index: int, eta: float = 0.0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """ReFL: no-gradient steps up to `timesteps[stop_index]`, then x0 predicted in one step with gradients.

    Returns:
        x0 latents, float32, whose graph holds exactly one `denoise` call.
    """
    n = len(sampler.timesteps)
    if not 0 <= stop_index < n:
        raise ValueError(f"stop_index must be in [0, {n}); got {stop_index}.")
    with torch.no_grad():
        for i in range(stop_index):
            latents = sampler.step(denoise, latents, i, eta, generator)
    return sampler.predict_x0(denoise, latents, stop_index)


def draft_sample(sampler: RewardSampler, denoise: Denoise, latents: torch.Tensor, k: int, eta: float = 0.0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """DRaFT-K: the whole schedule; gradients flow through the last `k` steps only.

    Returns:
        Final latents whose graph holds exactly the last `k` `denoise` calls.
    """
    n = len(sampler.timesteps)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}]; got {k}.")
    for i in range(n):
        with torch.set_grad_enabled(i >= n - k):
            latents = sampler.step(denoise, latents, i, eta, generator)
    return latents


def draft_lv_sample(sampler: RewardSampler, denoise: Denoise, latents: torch.Tensor, n: int, eta: float = 0.0,
                    generator: torch.Generator | None = None, denoise_copies: Denoise | None = None) -> torch.Tensor:
    """DRaFT-LV: sample to the end without gradients, then `n` re-noised copies of each final sample, each denoised by
    the last step with gradients.

    Args:
        denoise_copies: `denoise` for the [n * B] batch of copies (conditioning repeated n times); default `denoise`
            (for conditioning that broadcasts).

    Returns:
        [n * B, ...] latents (copy-major: copy j of image b is row j * B + b), each graph one `denoise` call.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1; got {n}.")
    last = len(sampler.timesteps) - 1
    with torch.no_grad():
        for i in range(last + 1):
            latents = sampler.step(denoise, latents, i, eta, generator)
        noisy = sampler.renoise(latents.repeat(n, *([1] * (latents.ndim - 1))), last, generator)
    return sampler.step(denoise_copies or denoise, noisy, last, 0.0, generator)


def draw_k(k: int, distribution: str, n_steps: int, generator: torch.Generator, k_min: int = 1,
           std: float | None = None) -> int:
    """The truncation K of one DRaFT step.

    Args:
        k: "fixed": K itself; "uniform": the largest K, drawn uniformly from [k_min, k]; "gaussian": the mean,
            K = round(N(k, std)) redrawn until in [k_min, n_steps] (AlignProp's randomised truncation, both forms).
        std: gaussian only; default k / 2.
    """
    if distribution == "fixed":
        return k
    if distribution == "uniform":
        return int(torch.randint(k_min, k + 1, (1,), generator=generator))
    if distribution == "gaussian":  # redrawn until in range, as AlignProp does
        sigma = k / 2 if std is None else std
        for _ in range(100):
            value = round(k + sigma * float(torch.randn((), generator=generator)))
            if k_min <= value <= n_steps:
                return int(value)
        return int(min(max(value, k_min), n_steps))
    raise ValueError(f"distribution must be one of {', '.join(K_DISTRIBUTIONS)}; got {distribution!r}.")
