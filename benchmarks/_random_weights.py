"""Random weights for speed benchmarks: timing does not depend on the values, only on the architecture."""

from __future__ import annotations

import torch


def randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill a module's parameters fast (N(0, 0.02) weights, LayerNorm 1/0, zero biases); meta modules are
    materialised on the CPU first. Returns the module."""
    if any(p.is_meta for p in module.parameters()):
        module = module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name:
                p.fill_(1.0 if name.endswith("weight") else 0.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.normal_(0, 0.02, generator=gen)
    return module
