"""4-bit-weight x 16/32-bit-activation matmul for AWQ checkpoints, in one Triton kernel.

`w4a16_matmul(x, qweight, qzeros, scales, group_size)`:
- x (M, K) float16, bfloat16 or float32, rows contiguous;
- qweight int32 (K, N / 8), qzeros int32 (K / G, N / 8), scales (K / G, N) in x's dtype:
  AutoAWQ's GEMM layout (worker/quant/awq_format.py): column n of a packed int32 sits in
  nibble (n % 8 // 2) + 4 * (n % 2);
- returns x @ W^T (M, N) in x's dtype, W^T[k, n] = (code - zero) * scale of k's group.

Each program computes one (BLOCK_M, BLOCK_N) tile of the output: for each BLOCK_K slice
of K it loads the packed codes (each int32 once per column it holds: repeated loads hit
the cache), unpacks and dequantizes them in registers with the slice's group zero and
scale, and accumulates x_tile @ w_tile in float32. The weights are read from memory as
4-bit codes, a quarter of a 16-bit weight's bytes: what makes decode faster. BLOCK_K
divides the group size, so a slice has one zero and one scale per column.

Dequantized weights are rounded to x's dtype before the dot (what dequantizing and then
multiplying would give), and the accumulation is float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_rounding import check_device, check_float

_PACK = 8


@triton.jit
def _w4a16_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, M, N, K,
                  stride_xm, stride_qk, stride_zg, stride_sg, stride_om,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_mask = rows < M
    col_mask = cols < N
    packed_cols = cols // 8  # (BN,)
    in_pack = cols % 8
    shifts = ((in_pack // 2) + (in_pack % 2) * 4) * 4  # (BN,) AWQ's nibble order
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = ks < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        packed = tl.load(qweight_ptr + ks[:, None] * stride_qk + packed_cols[None, :],
                         mask=k_mask[:, None] & col_mask[None, :], other=0)  # (BK, BN)
        codes = (packed >> shifts[None, :]) & 0xF  # (BK, BN)
        group = k0 // GROUP
        packed_zeros = tl.load(qzeros_ptr + group * stride_zg + packed_cols, mask=col_mask,
                               other=0)  # (BN,)
        zeros = (packed_zeros >> shifts) & 0xF  # (BN,)
        scales = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask,
                         other=0.0)  # (BN,) x's dtype
        weight = ((codes - zeros[None, :]).to(tl.float32)
                  * scales[None, :].to(tl.float32)).to(x.dtype)  # (BK, BN)
        acc += tl.dot(x, weight, input_precision="ieee" if x.dtype == tl.float32 else None)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _block_k(group_size: int) -> int:
    for block in (64, 32, 16):
        if group_size % block == 0:
            return block
    raise ValueError(f"group size {group_size} is not a multiple of 16")


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """x (M, K) -> (M, N); see the module doc."""
    check_device(x, qweight, qzeros, scales)
    check_float("x", x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (M, K) with contiguous rows, got {tuple(x.shape)}")
    M, K = x.shape
    N = qweight.shape[1] * _PACK
    if qweight.shape[0] != K or scales.shape != (K // group_size, N):
        raise ValueError(f"qweight {tuple(qweight.shape)} and scales {tuple(scales.shape)} do "
                         f"not fit x {tuple(x.shape)} with group size {group_size}")
    if scales.dtype != x.dtype:
        raise ValueError(f"scales must be {x.dtype}, got {scales.dtype}")
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block_m = 16 if M <= 16 else 64
    block_n, block_k = 64, _block_k(group_size)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n))
    _w4a16_kernel[grid](x, qweight, qzeros, scales, out, M, N, K, x.stride(0),
                        qweight.stride(0), qzeros.stride(0), scales.stride(0), out.stride(0),
                        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return out
