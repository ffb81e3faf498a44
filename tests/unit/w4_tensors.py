"""AWQ test tensors in the GPU layout the W4A16 kernels read (worker/quant/w4_layout.py)."""

import torch

from lmfleet.worker.quant.awq_format import dequantize, quantize_rtn
from lmfleet.worker.quant.w4_layout import repack_for_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_tensors(out_features: int, in_features: int, group: int, dtype: torch.dtype, seed: int,
                exact: bool = False):
    """-> (W^T (in, out) float32 as the format dequantizes it, packed, zeros, scales), the
    last three on DEVICE. `exact`: W^T = (code - zero) * scale unrounded, what the kernels
    that apply zero and scale in float32 multiply by (the format's dequantization rounds
    each weight to `dtype`, 2^-9 relative in bfloat16)."""
    generator = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales = quantize_rtn(
        torch.randn(out_features, in_features, generator=generator), group)
    weight_t = dequantize(qweight, qzeros, scales.to(dtype).float() if exact else scales.to(dtype),
                          group, torch.float32 if exact else dtype).float()
    packed, zeros, gpu_scales = repack_for_gpu(qweight, qzeros, scales, dtype)
    return weight_t, packed.to(DEVICE), zeros.to(DEVICE), gpu_scales.to(DEVICE)
