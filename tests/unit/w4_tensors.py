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


def exact_weight_t(packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                   group: int) -> torch.Tensor:
    """W^T (in, out) float32 as (code - zero) * scale, unrounded: what the kernels that
    apply the zero and scale in float32 multiply by (the format's dequantization rounds
    each weight to the activations' dtype, 2^-9 relative in bfloat16)."""
    packed, zeros, scales = packed.cpu(), zeros.cpu().float(), scales.cpu().float()
    out_features = packed.shape[0]
    codes = torch.stack([(packed >> (4 * j)) & 15 for j in range(8)], dim=-1)  # (N, K / 8, 8)
    codes = codes.reshape(out_features, -1).float()  # (N, K)
    zero = zeros.repeat_interleave(group, dim=0).t()  # (N, K)
    scale = scales.repeat_interleave(group, dim=0).t()  # (N, K)
    return ((codes - zero) * scale).t()  # (K, N)
