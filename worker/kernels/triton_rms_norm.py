"""Residual add + RMSNorm in one Triton kernel: the step before every attention and MLP.

`add_rms_norm(x, delta, weight, eps)`, mirroring `RMSNorm.forward` in model/layers.py (and
`CpuOps.add_rms_norm`):
- x (T, H) float32, float16 or bfloat16, last dim contiguous (rows may be strided).
- delta (T, H) of x's dtype, or None. When given, `x += delta` happens IN PLACE first,
  rounded to x's dtype as `x.add_(delta)` rounds it (exact for every dtype: float32 sum of
  two 16-bit values, rounded once).
- Returns a new contiguous (T, H) tensor of dtype promote_types(weight, x), as torch's
  `weight * x.to(input_dtype)` has:
      normed = (x.float() * rsqrt(mean(x.float() ** 2) + eps)).to(x.dtype)
      out = weight * normed            (the product rounded to the output dtype)
- H <= MAX_HIDDEN: one program per row holds the whole row in one tile.

Rounding: the cast to x's dtype before the weight multiply and the rounded product are
torch's, so 16-bit outputs equal the torch path's except where the float32 inverse RMS
differs in its last bits (the sum of squares is added in a different order than torch's
reduction), which moves an output by at most 1 ulp, rarely. float32 outputs agree to
~1e-6 relative. rsqrt is `tl.math.rsqrt`: on CUDA the hardware rsqrt.approx, which CUDA's
rsqrtf (torch's CUDA rsqrt) also uses; under the interpreter 1 / sqrt, as torch's CPU rsqrt.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import pdl_options, start_in_chain
from lmfleet.worker.kernels.triton_rounding import (
    check_device,
    check_float,
    round_to,
    rounded,
    soft_bf16,
)

# The largest hidden size one tile holds (Llama 3 405B: 16384); larger rows raise ValueError.
MAX_HIDDEN = 16384


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, delta_ptr, weight_ptr, out_ptr,
    x_row_stride, delta_row_stride, out_row_stride,
    hidden, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
    SOFT_X: tl.constexpr, SOFT_OUT: tl.constexpr, PDL: tl.constexpr,
):
    start_in_chain(PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    cols = tl.arange(0, BLOCK)  # (BLOCK,)
    mask = cols < hidden  # (BLOCK,)
    x_ptrs = x_ptr + row * x_row_stride + cols  # (BLOCK,)
    # Masked lanes load 0, so they add nothing to the sum of squares.
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * delta_row_stride + cols, mask=mask,
                        other=0.0).to(tl.float32)  # (BLOCK,)
        # x.add_(delta): the float32 sum rounded once to x's dtype, stored back in place.
        summed = round_to(x + delta, x_ptr, SOFT_X)  # (BLOCK,) x's dtype
        tl.store(x_ptrs, summed, mask=mask)
        x = summed.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / hidden  # x.pow(2).mean(-1), float32
    inv_rms = tl.math.rsqrt(variance + eps)
    # (x * rsqrt(...)).to(input_dtype): rounded to x's dtype before the weight multiply.
    normed = rounded(x * inv_rms, x_ptr, SOFT_X)  # (BLOCK,)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    # weight * normed as torch's mul: one float32 product rounded to the output dtype (for
    # 16-bit operands the float32 product is exact, so this is the correctly rounded one).
    out = round_to(weight * normed, out_ptr, SOFT_OUT)  # (BLOCK,)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def _num_warps(block: int) -> int:
    # About 16 elements per thread: enough bytes in flight without spilling registers.
    return max(1, min(16, block // 512))


def add_rms_norm(x: torch.Tensor, delta: Optional[torch.Tensor], weight: torch.Tensor,
                 eps: float) -> torch.Tensor:
    """x (T, H) += delta (T, H) in place when delta is given; returns RMSNorm(x) (T, H),
    a new contiguous tensor of dtype promote_types(weight.dtype, x.dtype)."""
    if x.dim() != 2:
        raise ValueError(f"x must be (T, H), got shape {tuple(x.shape)}")
    tokens, hidden = x.shape
    check_float("x", x)
    check_float("weight", weight)
    if weight.shape != (hidden,):
        raise ValueError(f"weight must be ({hidden},), got {tuple(weight.shape)}")
    if hidden > MAX_HIDDEN:
        raise ValueError(f"hidden size {hidden} > {MAX_HIDDEN}, the most one tile holds")
    if hidden > 1 and x.stride(1) != 1:
        raise ValueError("x must have a contiguous last dim")
    weight = weight.contiguous()
    if delta is not None:
        if delta.shape != x.shape:
            raise ValueError(f"delta shape {tuple(delta.shape)} != x shape {tuple(x.shape)}")
        if delta.dtype != x.dtype:
            raise ValueError(f"delta dtype {delta.dtype} != x dtype {x.dtype}")
        if hidden > 1 and delta.stride(1) != 1:
            raise ValueError("delta must have a contiguous last dim")
        check_device(x, delta, weight)
    else:
        check_device(x, weight)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty((tokens, hidden), dtype=out_dtype, device=x.device)  # (T, H)
    if tokens == 0 or hidden == 0:
        return out
    block = triton.next_power_of_2(hidden)
    _add_rms_norm_kernel[(tokens,)](
        x, x if delta is None else delta, weight, out,
        x.stride(0), 0 if delta is None else delta.stride(0), out.stride(0),
        hidden, float(eps),
        HAS_DELTA=delta is not None, BLOCK=block,
        SOFT_X=soft_bf16(x.dtype), SOFT_OUT=soft_bf16(out_dtype),
        **pdl_options(x.device),
        num_warps=_num_warps(block),
        # No fused multiply-adds: each product and sum rounds on its own, as torch's do.
        enable_fp_fusion=False,
    )
    return out
