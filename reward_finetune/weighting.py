"""How much the identity reward counts against the denoising loss at each optimisation step.

Two modes (`--reward_weighting`):

* `ratio` (default): `--reward_weight` is the target ratio ||w·g_reward|| / ||g_denoising|| of the two terms'
  gradient norms on the trainable (LoRA) parameters. The trainer computes both gradients separately, keeps an
  exponential moving average of each norm (`--reward_ratio_smoothing`) and sets
  w = reward_weight · EMA(||g_denoising||) / EMA(||g_reward||). The same value means the same thing for every model,
  resolution and LoRA size: 1.0 gives the reward as much pull on the LoRA as the denoising loss has, on average.
  (A moving average of the per-step ratio would not: the reward-gradient norm varies by orders of magnitude between
  steps, and the steps where it is small would inflate the weight of all the others.)
* `absolute`: w = `--reward_weight`, the plain loss weight (`loss = denoising + w · (1 - cos)`).

Either way `--reward_schedule` scales it: constant from `--reward_start_step`, or a linear ramp over
`--reward_warmup_steps`; steps skipped by `--reward_every` have no reward. Without a denoising loss (reward-only runs)
there is nothing to take a ratio to, and the weight is absolute.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

WEIGHTINGS = ("ratio", "absolute")
SCHEDULES = ("constant", "linear")


@dataclass
class RewardWeighting:
    """The reward weight of each step; `state_dict` / `load_state_dict` carry the moving average across a resume."""

    weight: float
    mode: str = "ratio"
    schedule: str = "constant"
    start_step: int = 0
    warmup_steps: int = 0
    every: int = 1
    smoothing: float = 0.9
    denoising_norm_ema: float | None = None  # EMA of ||g_denoising|| over the steps with a reward
    reward_norm_ema: float | None = None  # EMA of ||g_reward||

    def __post_init__(self) -> None:
        if self.mode not in WEIGHTINGS:
            raise ValueError(f"reward weighting must be one of {', '.join(WEIGHTINGS)}; got {self.mode!r}.")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"reward schedule must be one of {', '.join(SCHEDULES)}; got {self.schedule!r}.")
        if not 0 <= self.smoothing < 1:
            raise ValueError(f"reward ratio smoothing must be in [0, 1); got {self.smoothing}.")

    def scheduled(self, step: int) -> float:
        """The schedule's factor times `weight` at optimisation step `step` (0-based); 0 = no reward this step."""
        if step < self.start_step or (step - self.start_step) % self.every:
            return 0.0
        if self.schedule == "linear" and self.warmup_steps > 0:
            return self.weight * min(1.0, (step - self.start_step + 1) / self.warmup_steps)
        return self.weight

    def effective(self, step: int, denoising_norm: float | None, reward_norm: float) -> float:
        """The weight w applied to this step's reward gradient, given both terms' gradient norms (the denoising norm
        is None in reward-only runs). Updates the moving average in ratio mode."""
        target = self.scheduled(step)
        if target == 0.0:
            return 0.0
        if self.mode == "absolute" or denoising_norm is None:
            return target
        if math.isfinite(denoising_norm) and math.isfinite(reward_norm) and reward_norm > 0:
            self.denoising_norm_ema = self._smoothed(self.denoising_norm_ema, denoising_norm)
            self.reward_norm_ema = self._smoothed(self.reward_norm_ema, reward_norm)
        if not self.reward_norm_ema:  # no usable estimate yet (e.g. only zero reward gradients): skip the reward
            return 0.0
        return target * self.denoising_norm_ema / self.reward_norm_ema

    def _smoothed(self, average: float | None, value: float) -> float:
        return value if average is None else self.smoothing * average + (1 - self.smoothing) * value

    def state_dict(self) -> dict:
        return {"denoising_norm_ema": self.denoising_norm_ema, "reward_norm_ema": self.reward_norm_ema}

    def load_state_dict(self, state: dict) -> None:
        self.denoising_norm_ema = state.get("denoising_norm_ema")
        self.reward_norm_ema = state.get("reward_norm_ema")
