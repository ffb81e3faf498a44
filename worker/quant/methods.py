"""The quantized linear methods by name: what a layer built with a `WeightQuantization`
holds and how it multiplies (awq_linear.py, gguf_linear.py)."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lmfleet.worker.quant import awq_linear, gguf_linear
from lmfleet.worker.quant.config import WeightQuantization

_METHODS = {"awq": awq_linear, "gguf": gguf_linear}


def create_parameters(layer: nn.Module, in_features: int, out_features: int,
                      quant: WeightQuantization) -> None:
    _METHODS[quant.method].create_parameters(layer, in_features, out_features, quant)


def check_output_parts(quant: WeightQuantization, local_sizes: list[int]) -> None:
    """ValueError when fused parts (q/k/v, gate/up) do not start on a stored element."""
    if quant.method == "awq":
        awq_linear.check_output_parts(local_sizes)


def finalize(layer: nn.Module, dtype: torch.dtype) -> None:
    """After loading: what the method's kernels need that the checkpoint does not hold."""
    finish = getattr(_METHODS[layer.quant.method], "finalize", None)
    if finish is not None:
        finish(layer, dtype)


def apply(layer: Any, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return _METHODS[layer.quant.method].apply(layer, x, bias)
