"""SwiGLU's elementwise step in one Triton kernel: silu(gate) * up.

`silu_mul(gate_up)`, mirroring `GatedMLP.forward` in model/layers.py (and
`CpuOps.silu_mul`):
- gate_up (T, 2I) float32, float16 or bfloat16, the fused gate/up projection's output:
  each row's gate half, then its up half. The last dim must be contiguous; rows may be
  strided.
- Returns a new contiguous (T, I) tensor of the same dtype:
      out = F.silu(gate, inplace=True).mul_(up)
  i.e. silu(g) = g / (1 + exp(-g)) in float32, rounded to the dtype (what the in-place silu
  stores), then times up, rounded to the dtype again.

Rounding: the division is IEEE (`div_rn`) and exp is CUDA's accurate expf (libdevice) on
the GPU, the formula and op order of torch's CUDA silu kernel; under the interpreter exp is
numpy's. 16-bit results therefore equal torch's except, rarely, by 1 ulp where the two
exps differ in their last float32 bit; float32 results agree to ~1e-6 relative.

Grid (T, cdiv(I, BLOCK)): rows on the first axis (no 65535 limit), column tiles on the
second, so any T and I (14336 and up) fit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from lmfleet.worker.kernels.triton_pdl import pdl_options, start_in_chain
from lmfleet.worker.kernels.triton_rounding import (
    INTERPRET,
    check_device,
    check_float,
    round_to,
    rounded,
    soft_bf16,
)

_BLOCK = 1024  # columns per program: 8 elements a thread at 4 warps, wide vector loads


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr, in_row_stride, out_row_stride, inter,
    BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr, LIBDEVICE_EXP: tl.constexpr,
    PDL: tl.constexpr,
):
    start_in_chain(PDL)
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may pass 2**31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)  # (BLOCK,)
    mask = cols < inter  # (BLOCK,)
    gate_ptrs = gate_up_ptr + row * in_row_stride + cols  # (BLOCK,)
    gate = tl.load(gate_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    up = tl.load(gate_ptrs + inter, mask=mask, other=0.0).to(tl.float32)  # (BLOCK,)
    if LIBDEVICE_EXP:
        # tl.exp is ex2.approx on a scaled argument (error grows with |g|); libdevice's expf
        # is the one torch's CUDA kernels call.
        e = libdevice.exp(-gate)  # (BLOCK,)
    else:
        e = tl.exp(-gate)  # the interpreter: numpy's exp (no libdevice there)
    # F.silu in float32, stored rounded to the dtype by the in-place silu.
    silu = rounded(tl.div_rn(gate, 1.0 + e), out_ptr, SOFT_BF16)  # (BLOCK,)
    # .mul_(up): one float32 product rounded to the dtype (exact before rounding for 16-bit).
    out = round_to(silu * up, out_ptr, SOFT_BF16)  # (BLOCK,)
    tl.store(out_ptr + row * out_row_stride + cols, out, mask=mask)


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up (T, 2I) -> silu(gate) * up (T, I), a new contiguous tensor."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be (T, 2I), got shape {tuple(gate_up.shape)}")
    check_float("gate_up", gate_up)
    if gate_up.shape[1] > 1 and gate_up.stride(1) != 1:
        raise ValueError("gate_up must have a contiguous last dim")
    check_device(gate_up)
    tokens, inter = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((tokens, inter), dtype=gate_up.dtype, device=gate_up.device)  # (T, I)
    if tokens == 0 or inter == 0:
        return out
    block = min(_BLOCK, triton.next_power_of_2(inter))
    grid = (tokens, triton.cdiv(inter, block))
    _silu_mul_kernel[grid](
        gate_up, out, gate_up.stride(0), out.stride(0), inter,
        BLOCK=block, SOFT_BF16=soft_bf16(gate_up.dtype), LIBDEVICE_EXP=not INTERPRET,
        **pdl_options(gate_up.device),
        num_warps=4,
        # No fused multiply-adds, so every product rounds on its own, as torch's do.
        enable_fp_fusion=False,
    )
    return out
