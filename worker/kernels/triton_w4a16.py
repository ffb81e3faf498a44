"""4-bit-weight x 16/32-bit-activation matmul for AWQ checkpoints, in one Triton kernel.

`w4a16_matmul(x, qweight, qzeros, scales, group_size)`:
- x (M, K) float16, bfloat16 or float32, rows contiguous;
- qweight int32 (K, N / 8), qzeros int32 (K / G, N / 8), scales (K / G, N) in x's dtype:
  AutoAWQ's GEMM layout (worker/quant/awq_format.py): column n of a packed int32 sits in
  nibble (n % 8 // 2) + 4 * (n % 2);
- returns x @ W^T (M, N) in x's dtype, W^T[k, n] = (code - zero) * scale of k's group.

Each program computes one (BLOCK_M, BLOCK_N) tile of the output over one split of K: for
each BLOCK_K slice it loads the packed codes once per int32 (a (BLOCK_K, BLOCK_N / 8)
tile), unpacks the eight nibbles of each in registers, dequantizes them with the slice's
group zero and scale, and accumulates x_tile @ w_tile in float32. The weights are read as
4-bit codes, a quarter of a 16-bit weight's bytes: what makes decode faster. BLOCK_K
divides the group size, so a slice has one zero and one scale per column.

Split-K: a decode step has few rows (M), so tiles over M and N alone leave most of the
GPU idle (one row of a 4096 x 14336 layer is 112 tiles of 128 columns). When the tiles
are fewer than twice the multiprocessors, K is cut into splits of whole groups, each
program writes its float32 partial sum, and the partials are summed in a fixed order
(deterministic, unlike atomics).

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
def _w4a16_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, M, N, K, k_per_split,
                  stride_xm, stride_qk, stride_zg, stride_sg, stride_os, stride_om,
                  GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    packs = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # (BN / 8,) packed columns
    row_mask = rows < M
    col_mask = cols < N
    pack_mask = packs < N // 8
    nibble = tl.arange(0, 8)
    shifts = ((nibble // 2) + (nibble % 2) * 4) * 4  # (8,) AWQ's nibble order
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        k_mask = ks < k_end
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # (BM, BK)
        packed = tl.load(qweight_ptr + ks[:, None] * stride_qk + packs[None, :],
                         mask=k_mask[:, None] & pack_mask[None, :], other=0)  # (BK, BN / 8)
        codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # (BK, BN / 8, 8)
        codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # (BK, BN) column = pack * 8 + nibble
        group = k0 // GROUP
        packed_zeros = tl.load(qzeros_ptr + group * stride_zg + packs, mask=pack_mask,
                               other=0)  # (BN / 8,)
        zeros = tl.reshape((packed_zeros[:, None] >> shifts[None, :]) & 0xF,
                           (BLOCK_N,))  # (BN,)
        scales = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask,
                         other=0.0)  # (BN,) x's dtype
        weight = ((codes - zeros[None, :]).to(tl.float32)
                  * scales[None, :].to(tl.float32)).to(x.dtype)  # (BK, BN)
        acc += tl.dot(x, weight, input_precision="ieee" if x.dtype == tl.float32 else None)
    tl.store(out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _block_k(group_size: int) -> int:
    for block in (64, 32, 16):
        if group_size % block == 0:
            return block
    raise ValueError(f"group size {group_size} is not a multiple of 16")


def _num_splits(tiles: int, num_groups: int, device: torch.device) -> int:
    """Splits of K (each whole groups) so that tiles x splits reach ~2 programs per SM."""
    if device.type != "cuda":
        return min(num_groups, 2) if tiles < 4 else 1  # the interpreter: exercise splitting
    wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(num_groups, triton.cdiv(wanted, tiles)))


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor, group_size: int,
                 num_splits: int | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N); see the module doc. `num_splits` overrides the split-K choice."""
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
    small = M <= 16
    block_m, block_n, block_k = (16 if small else 64), 64, _block_k(group_size)
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    num_groups = K // group_size
    splits = num_splits or _num_splits(tiles, num_groups, x.device)
    groups_per_split = triton.cdiv(num_groups, splits)
    splits = triton.cdiv(num_groups, groups_per_split)  # none empty
    if splits == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, block_n), splits)
    _w4a16_kernel[grid](x, qweight, qzeros, scales, out, M, N, K,
                        groups_per_split * group_size, x.stride(0), qweight.stride(0),
                        qzeros.stride(0), scales.stride(0), out.stride(0) if splits > 1 else 0,
                        out.stride(-2), GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n,
                        BLOCK_K=block_k, num_warps=2 if small else 4)
    if splits == 1:
        return out
    return out.sum(dim=0).to(x.dtype)  # (M, N): the partials in split order
