"""AWQ W4A16 as a linear layer's method: the parameters a quantized layer holds, and its
matmul.

A layer of this rank's `in_features` x `out_features` holds `qweight` int32 (in, out / 8),
`qzeros` int32 (in / g, out / 8) and `scales` (in / g, out) (awq_format.py). Tensor
parallelism splits them like the plain weight: column-parallel layers along the output
axis (axis 1, in packed elements for qweight and qzeros), row-parallel ones along the
input axis (axis 0, in groups for qzeros and scales); so a rank's slice must hold whole
packed elements and whole groups.

The matmul: on CUDA, `finalize` (after loading) repacks the tensors into the layout the
Triton W4A16 kernels read (w4_layout.py, kernels/triton_w4a16.py): 4-bit codes
dequantized in registers for decodes and small prefills, the weight dequantized once into
a dense matrix for large prefills. On the CPU this rank's weight is dequantized to the
activations' dtype and multiplied. All use exactly the checkpoint's W, so outputs match an
unquantized model holding the dequantized weights.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from lmfleet.worker.quant.awq_format import PACK, dequantize
from lmfleet.worker.quant.config import WeightQuantization
from lmfleet.worker.quant.layout import ParamLayout
from lmfleet.worker.quant.w4_layout import repack_for_gpu


def check_output_parts(local_sizes: list[int]) -> None:
    for size in local_sizes:
        if size % PACK:
            raise ValueError(f"AWQ: a fused part of {size} output features per rank is not "
                             f"a multiple of {PACK} (one packed int32)")


def create_parameters(layer: nn.Module, in_features: int, out_features: int,
                      quant: WeightQuantization) -> None:
    group = quant.group_size
    if out_features % PACK:
        raise ValueError(f"AWQ: {out_features} output features per rank is not a multiple "
                         f"of {PACK} (one packed int32)")
    if in_features % group:
        raise ValueError(f"AWQ: {in_features} input features per rank is not a multiple of "
                         f"the group size {group}")

    def add(name: str, shape: tuple[int, int], dtype: torch.dtype, layout: ParamLayout):
        layer.register_parameter(name, nn.Parameter(torch.empty(shape, dtype=dtype),
                                                    requires_grad=False))
        layer.layouts[name] = layout

    add("qweight", (in_features, out_features // PACK), torch.int32,
        ParamLayout(out_dim=1, in_dim=0, out_pack=PACK))
    add("qzeros", (in_features // group, out_features // PACK), torch.int32,
        ParamLayout(out_dim=1, in_dim=0, out_pack=PACK))
    add("scales", (in_features // group, out_features), torch.float32,
        ParamLayout(out_dim=1, in_dim=0))


def finalize(layer: nn.Module, dtype: torch.dtype) -> None:
    """On CUDA, after loading: AutoAWQ's tensors -> the GPU kernels' layout (w4_layout.py).
    The AutoAWQ qweight and qzeros are dropped; the same bytes live on as `w4_packed`."""
    if not layer.qweight.is_cuda:
        return
    packed, zeros, scales = repack_for_gpu(layer.qweight.data, layer.qzeros.data,
                                           layer.scales.data, dtype)
    for name in ("qweight", "qzeros", "scales"):
        del layer._parameters[name]
    layer.register_buffer("w4_packed", packed, persistent=False)  # (out, in / 8)
    layer.register_buffer("w4_zeros", zeros, persistent=False)  # (in / g, out)
    layer.register_buffer("w4_scales", scales, persistent=False)  # (in / g, out)


def apply(layer: Any, x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """x (T, in) -> (T, out)."""
    group = layer.quant.group_size
    if hasattr(layer, "w4_packed"):
        from lmfleet.worker.kernels.triton_w4a16 import w4a16_matmul

        out = w4a16_matmul(x, layer.w4_packed, layer.w4_zeros, layer.w4_scales,
                           group)  # (T, out)
    else:
        weight_t = dequantize(layer.qweight, layer.qzeros, layer.scales, group,
                              x.dtype)  # (in, out)
        out = torch.matmul(x, weight_t)  # (T, out)
    return out if bias is None else out + bias
