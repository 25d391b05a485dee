"""Opt-in int8 for CPU bulk scoring: the trunk's linears as torchao int8 dynamic-activation / int8-weight layers.

``NearIDScorer.from_pretrained(..., quantize="int8")`` (CLI: ``--dtype int8``) quantizes every ``nn.Linear`` of the
SigLIP encoder (q/k/v/out projections and the MLP, 98% of the FLOPs) with torchao's maintained
``Int8DynamicActivationInt8WeightConfig``: per-channel int8 weights, per-token int8 activations computed on the fly.
Everything else (patch embedding, LayerNorms, attention core) runs in the scorer's dtype, default fp32, and the MAP
head in fp32 as on the default path. Each encoder layer is wrapped in ``torch.compile`` by default (`compile_trunk`):
eager, the int8 layers ran 0.6x the speed of bf16 on an AMD Zen 5; compiled, inductor fuses the activation
quantization, LayerNorms and GELU around the int8 matmuls, and fp32 around them measured faster than bf16. With
bf16 around the int8 linears the scorer does not compile by default: torch 2.13's inductor fails on it (a C++ error,
"conflicting declaration at_BFloat16_tmp_acc0_vec"), so ``compile=True`` there may raise. torch.compile on a CPU
needs a C++ compiler (g++); without one pass ``compile=False``.

torchao is an optional extra (``pip install 'nearid-toolkit[int8]'``), imported only when int8 is asked for. CUDA is
refused: this path is measured and meant for CPUs; on a GPU the fp16 default is the fast one.

Measured cosines on random weights are indicative only: real SigLIP activations have outlier channels, which per-token
int8 activations handle worse, so re-measure the int8 cosine on the real checkpoint before relying on it.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

QUANTIZATIONS = ("int8",)
#: The dtype of everything but the int8 linears unless one is given: fp32 with compiled layers measured fastest
#: (inductor fuses the activation quantization, LayerNorms and GELU around the int8 matmuls).
INT8_OTHER_DTYPE = torch.float32
INSTALL_HINT = "pip install 'nearid-toolkit[int8]' (or pip install torchao)"


class QuantizationError(ValueError):
    """An int8 request that cannot be served: torchao missing, an unknown scheme, or a device it is not for."""


def check_quantize(quantize: str | None, device: torch.device) -> None:
    """Refuse an unknown `quantize` value or a non-CPU device before anything loads.

    Raises:
        QuantizationError: naming the value and the fix.
    """
    if quantize is None:
        return
    if quantize not in QUANTIZATIONS:
        raise QuantizationError(f"quantize must be one of {', '.join(QUANTIZATIONS)} or None; got {quantize!r}.")
    if device.type != "cpu":
        raise QuantizationError(f"quantize={quantize!r} is for CPUs; device {device} is not one. On CUDA use the "
                                "default fp16 (or bf16), or pass device='cpu'.")


def _torchao_quantize():
    """torchao's ``quantize_`` and int8 config, with a clear error when torchao is not installed."""
    quiet = logging.getLogger("torchao")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # a CPU torch cannot load torchao's CUDA extensions; it says so at every import
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError as err:
        raise QuantizationError(f"quantize='int8' needs torchao, which is not installed: {INSTALL_HINT}.") from err
    finally:
        quiet.setLevel(level)
    return quantize_, Int8DynamicActivationInt8WeightConfig


def trunk_layers(model: nn.Module) -> nn.ModuleList:
    """The encoder layers of a `NearIDModel`'s SigLIP tower."""
    return model._tower.encoder.layers


def quantize_trunk_int8(model: nn.Module) -> nn.Module:
    """Quantize the linears of `model`'s encoder layers to int8 in place (head and embeddings untouched); returns it."""
    quantize_, config = _torchao_quantize()
    quantize_(trunk_layers(model), config(), filter_fn=lambda module, _: isinstance(module, nn.Linear))
    return model


def compile_trunk(model: nn.Module) -> nn.Module:
    """Wrap each encoder layer of `model` in ``torch.compile`` in place; returns it. The layers share one shape, so
    the compiled code is reused across them; the first batch (and the first of a new batch size) pays the compile."""
    for layer in trunk_layers(model):
        layer.compile()
    return model
