"""GGUF blocks (Q4_0, Q4_1, Q8_0) as a linear layer's method: the packed rows a layer
holds, and its matmul.

A layer holds `qblocks` uint8 (out, in / 32 x bytes per block): GGUF's own row-major
layout (gguf_blocks.py). Column-parallel layers split the rows, row-parallel ones the
blocks of each row, so a rank's input features must be whole blocks. The matmul
dequantizes this rank's rows to the activations' dtype and multiplies (the weights
llama.cpp and transformers read from the same blocks).
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.worker.quant.config import WeightQuantization
from lmfleet.worker.quant.gguf_blocks import dequantize_blocks, packed_columns
from lmfleet.worker.quant.layout import ParamLayout


def create_parameters(layer: nn.Module, in_features: int, out_features: int,
                      quant: WeightQuantization) -> None:
    try:
        columns = packed_columns(in_features, quant.block_type)
    except ValueError as error:
        raise ValueError(f"GGUF: {error} (input features per rank)") from None
    layer.register_parameter("qblocks", nn.Parameter(
        torch.empty((out_features, columns), dtype=torch.uint8), requires_grad=False))
    layer.layouts["qblocks"] = ParamLayout(out_dim=0, in_dim=1)


def apply(layer: Any, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (T, in) -> (T, out)."""
    weight = dequantize_blocks(layer.qblocks, layer.quant.block_type, x.dtype)  # (out, in)
    return F.linear(x, weight, bias)  # (T, out)
