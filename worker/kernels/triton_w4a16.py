"""4-bit-weight x 16/32-bit-activation matmul for AWQ checkpoints, in Triton.

`w4a16_matmul(x, qweight, qzeros, scales, group_size)`:
- x (M, K) float16, bfloat16 or float32, rows contiguous;
- qweight int32 (K, N / 8), qzeros int32 (K / G, N / 8), scales (K / G, N) in x's dtype:
  AutoAWQ's GEMM layout (worker/quant/awq_format.py): column n of a packed int32 sits in
  nibble (n % 8 // 2) + 4 * (n % 2);
- returns x @ W^T (M, N) in x's dtype, W^T[k, n] = (code - zero) * scale of k's group.

Every path dequantizes a (BLOCK_K, BLOCK_N) tile the same way (`_dequant_tile`): one load
per packed int32, the eight nibbles unpacked in registers, the slice's group zero and
scale applied, rounded to x's dtype (what dequantizing and then multiplying would give).
BLOCK_K divides the group size, so a slice has one zero and one scale per column. The
weights are read as 4-bit codes, a quarter of a 16-bit weight's bytes: what makes decode
faster. Three paths, by the number of rows M:
- "gemv" (M <= GEMV_MAX_ROWS, decode): no tensor cores; each program multiplies its rows
  by its tile with float32 FMAs and sums over K. A tl.dot would pad M to 16 rows and move
  the tile through shared memory for nothing.
- "dot" (up to DOT_MAX_ROWS): tl.dot per tile, float32 accumulation.
- "dequant" (more rows, large prefills): the weight is dequantized once into a dense
  (K, N) matrix by a Triton kernel and multiplied by torch.matmul; with many rows the
  matmul's compute outweighs reading the weight twice.

Split-K (gemv and dot): with few rows, tiles over M and N alone leave most of the GPU idle
(one row of a 4096 x 14336 layer is 112 tiles of 128 columns). K is cut into splits of
whole groups until there are enough programs, each writes its float32 partial sum, and the
partials are summed in a fixed order (deterministic, unlike atomics).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_rounding import check_device, check_float

_PACK = 8
GEMV_MAX_ROWS = 4
DOT_MAX_ROWS = 256


@dataclass(frozen=True)
class W4A16Launch:
    """How one matmul is launched: the path and its tile; splits None = the heuristic."""

    path: str  # "gemv" | "dot" | "dequant"
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int = 2
    splits: int | None = None
    programs_per_sm: int = 4  # split-K aims at this many programs per multiprocessor


@triton.jit
def _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, packs, cols, pack_mask, col_mask,
                  stride_qk, stride_zg, stride_sg, GROUP: tl.constexpr, BLOCK_K: tl.constexpr,
                  BLOCK_N: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W^T[k0 : k0 + BLOCK_K, cols] (BK, BN) in OUT_DTYPE; k0 is a multiple of BLOCK_K."""
    ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    nibble = tl.arange(0, 8)
    shifts = ((nibble // 2) + (nibble % 2) * 4) * 4  # (8,) AWQ's nibble order
    packed = tl.load(qweight_ptr + ks[:, None] * stride_qk + packs[None, :],
                     mask=pack_mask[None, :], other=0)  # (BK, BN / 8)
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF  # (BK, BN / 8, 8)
    codes = tl.reshape(codes, (BLOCK_K, BLOCK_N))  # (BK, BN) column = pack * 8 + nibble
    group = k0 // GROUP
    packed_zeros = tl.load(qzeros_ptr + group * stride_zg + packs, mask=pack_mask,
                           other=0)  # (BN / 8,)
    zeros = tl.reshape((packed_zeros[:, None] >> shifts[None, :]) & 0xF, (BLOCK_N,))  # (BN,)
    scales = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask,
                     other=0.0)  # (BN,)
    return ((codes - zeros[None, :]).to(tl.float32)
            * scales[None, :].to(tl.float32)).to(OUT_DTYPE)  # (BK, BN)


@triton.jit
def _tile_columns(pid_n, N, BLOCK_N: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    packs = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # (BN / 8,) packed columns
    return cols, packs, cols < N, packs < N // 8


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, M, N, K,
                       k_per_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_os,
                       stride_om, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)  # (BM,) all of M
    row_mask = rows < M
    cols, packs, col_mask, pack_mask = _tile_columns(pid_n, N, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None],
                    other=0.0)  # (BM, BK)
        weight = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, packs, cols, pack_mask,
                               col_mask, stride_qk, stride_zg, stride_sg, GROUP, BLOCK_K,
                               BLOCK_N, x.dtype)  # (BK, BN)
        acc += tl.sum(x.to(tl.float32)[:, :, None] * weight.to(tl.float32)[None, :, :],
                      axis=1)  # (BM, BN)
    tl.store(out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _w4a16_dot_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, M, N, K,
                      k_per_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_os,
                      stride_om, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    row_mask = rows < M
    cols, packs, col_mask, pack_mask = _tile_columns(pid_n, N, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None],
                    other=0.0)  # (BM, BK)
        weight = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, packs, cols, pack_mask,
                               col_mask, stride_qk, stride_zg, stride_sg, GROUP, BLOCK_K,
                               BLOCK_N, x.dtype)  # (BK, BN)
        acc += tl.dot(x, weight, input_precision="ieee" if x.dtype == tl.float32 else None)
    tl.store(out_ptr + pid_k * stride_os + rows[:, None] * stride_om + cols[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _awq_dequant_kernel(qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, stride_qk, stride_zg,
                        stride_sg, stride_ok, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    cols, packs, col_mask, pack_mask = _tile_columns(pid_n, N, BLOCK_N)
    k0 = pid_k * BLOCK_K
    ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    weight = _dequant_tile(qweight_ptr, qzeros_ptr, scales_ptr, k0, packs, cols, pack_mask,
                           col_mask, stride_qk, stride_zg, stride_sg, GROUP, BLOCK_K, BLOCK_N,
                           out_ptr.dtype.element_ty)  # (BK, BN)
    tl.store(out_ptr + ks[:, None] * stride_ok + cols[None, :], weight, mask=col_mask[None, :])


def default_launch(rows: int) -> W4A16Launch:
    """The launch for a step of `rows` rows (tuned on an H100: docs/quantization.md)."""
    if rows <= GEMV_MAX_ROWS:
        return W4A16Launch("gemv", block_n=128, block_k=32, num_warps=4)
    if rows <= DOT_MAX_ROWS:
        return W4A16Launch("dot", block_n=64, block_k=64, num_warps=2 if rows <= 16 else 4)
    return W4A16Launch("dequant", block_n=128, block_k=32, num_warps=4)


def _block_k(group_size: int, wanted: int) -> int:
    block = wanted
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    raise ValueError(f"group size {group_size} is not a multiple of 16")


def _num_splits(launch: W4A16Launch, tiles: int, num_groups: int, device: torch.device) -> int:
    """Splits of K (each whole groups) so that tiles x splits fill the multiprocessors."""
    if launch.splits is not None:
        return max(1, min(num_groups, launch.splits))
    if device.type != "cuda":
        return min(num_groups, 2) if tiles < 4 else 1  # the interpreter: exercise splitting
    wanted = launch.programs_per_sm * torch.cuda.get_device_properties(
        device).multi_processor_count
    return max(1, min(num_groups, triton.cdiv(wanted, tiles)))


def awq_dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, launch: W4A16Launch | None = None) -> torch.Tensor:
    """-> W^T (K, N) in scales' dtype, on the tensors' device."""
    launch = launch or default_launch(DOT_MAX_ROWS + 1)
    K, N = qweight.shape[0], qweight.shape[1] * _PACK
    block_k = _block_k(group_size, launch.block_k)
    out = torch.empty((K, N), dtype=scales.dtype, device=qweight.device)
    grid = (K // block_k, triton.cdiv(N, launch.block_n))
    _awq_dequant_kernel[grid](qweight, qzeros, scales, out, N, qweight.stride(0),
                              qzeros.stride(0), scales.stride(0), out.stride(0),
                              GROUP=group_size, BLOCK_N=launch.block_n, BLOCK_K=block_k,
                              num_warps=launch.num_warps)
    return out


def w4a16_matmul(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor,
                 scales: torch.Tensor, group_size: int,
                 launch: W4A16Launch | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N); see the module doc. `launch` overrides the GPU's tuned table
    (w4a16_tuning.py) and default_launch."""
    check_device(x, qweight, qzeros, scales)
    check_float("x", x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (M, K) with contiguous rows, got {tuple(x.shape)}")
    M, K = x.shape
    N = qweight.shape[1] * _PACK
    if (group_size <= 0 or K % group_size or qweight.shape[0] != K
            or scales.shape != (K // group_size, N)
            or qzeros.shape != (K // group_size, qweight.shape[1])):
        raise ValueError(f"qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)} and "
                         f"scales {tuple(scales.shape)} do not fit x {tuple(x.shape)} with "
                         f"group size {group_size}")
    if scales.dtype != x.dtype:
        raise ValueError(f"scales must be {x.dtype}, got {scales.dtype}")
    if launch is None:
        from lmfleet.worker.kernels.w4a16_tuning import tuned_launch

        launch = tuned_launch(x.device, M, N, K, group_size) or default_launch(M)
    if launch.path == "dequant":
        return torch.matmul(x, awq_dequantize(qweight, qzeros, scales, group_size, launch))
    if launch.path == "gemv":
        if M > 16:
            raise ValueError(f"the gemv path takes at most 16 rows, got {M}")
        kernel, block_m = _w4a16_gemv_kernel, triton.next_power_of_2(M)
    elif launch.path == "dot":
        kernel, block_m = _w4a16_dot_kernel, 16 if M <= 16 else (32 if M <= 32 else 64)
    else:
        raise ValueError(f"unknown W4A16 path {launch.path!r}")
    row_tiles = triton.cdiv(M, block_m)
    tiles = row_tiles * triton.cdiv(N, launch.block_n)
    num_groups = K // group_size
    groups_per_split = triton.cdiv(num_groups, _num_splits(launch, tiles, num_groups,
                                                           x.device))
    splits = triton.cdiv(num_groups, groups_per_split)  # none empty
    if splits == 1:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        out = torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(N, launch.block_n), splits)
    if launch.path == "dot":
        grid = (row_tiles, *grid)
    kernel[grid](x, qweight, qzeros, scales, out, M, N, K, groups_per_split * group_size,
                 x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                 out.stride(0) if splits > 1 else 0, out.stride(-2), GROUP=group_size,
                 BLOCK_M=block_m, BLOCK_N=launch.block_n,
                 BLOCK_K=_block_k(group_size, launch.block_k), num_warps=launch.num_warps,
                 num_stages=launch.num_stages)
    if splits == 1:
        return out
    return out.sum(dim=0).to(x.dtype)  # (M, N): the partials in split order
