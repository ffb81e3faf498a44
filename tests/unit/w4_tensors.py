"""AWQ test tensors in the GPU layout the W4A16 kernels read (worker/quant/w4_layout.py)."""

import torch

from lmfleet.worker.quant.awq_format import dequantize, quantize_rtn
from lmfleet.worker.quant.w4_layout import repack_for_gpu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def gpu_tensors(out_features: int, in_features: int, group: int, dtype: torch.dtype, seed: int):
    """-> (W^T (in, out) float32 as the format dequantizes it, packed, zeros, scales), the
    last three on DEVICE."""
    generator = torch.Generator().manual_seed(seed)
    qweight, qzeros, scales = quantize_rtn(
        torch.randn(out_features, in_features, generator=generator), group)
    weight_t = dequantize(qweight, qzeros, scales.to(dtype), group, dtype).float()
    packed, zeros, gpu_scales = repack_for_gpu(qweight, qzeros, scales, dtype)
    return weight_t, packed.to(DEVICE), zeros.to(DEVICE), gpu_scales.to(DEVICE)
