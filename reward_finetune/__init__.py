"""NearID as a differentiable identity reward for LoRA personalisation of SD1.5 / SDXL (diffusers + peft + accelerate).

* `NearIDReward` (`reward_finetune.reward`): decoded images -> identity loss `1 - cosine` to reference embeddings.
* `python -m reward_finetune.train` / `accelerate launch -m reward_finetune.train`: the LoRA trainer.
* `reward_finetune.export`: PEFT/diffusers LoRA keys -> kohya keys for ComfyUI's LoraLoader.

Importing this package imports nothing heavy; `NearIDReward` is loaded on first access (torch + nearid_core only).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .reward import NearIDReward as NearIDReward

__all__ = ["NearIDReward"]


def __getattr__(name: str):
    if name == "NearIDReward":
        from .reward import NearIDReward

        return NearIDReward
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
