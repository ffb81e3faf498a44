"""4-bit-weight x 16/32-bit-activation matmul for AWQ checkpoints, in Triton.

`w4a16_matmul(x, qweight, qzeros, scales, group_size)`:
- x (M, K) float16, bfloat16 or float32, rows contiguous;
- qweight int32 (K, N / 8), qzeros int32 (K / G, N / 8), scales (K / G, N) in x's dtype:
  AutoAWQ's GEMM layout (worker/quant/awq_format.py): column n of a packed int32 sits in
  nibble (n % 8 // 2) + 4 * (n % 2);
- returns x @ W^T (M, N) in x's dtype, W^T[k, n] = (code - zero) * scale of k's group.

The weights are read as 4-bit codes, a quarter of a 16-bit weight's bytes: what makes
decode faster. Each packed int32 is loaded once and its eight nibbles unpacked in
registers; BLOCK_K divides the group size, so a slice of K has one zero and one scale per
column. Three paths, by the number of rows M:
- "gemv" (M <= GEMV_MAX_ROWS, decode): no tensor cores; a program per row and column
  tile multiplies with float32 FMAs, applies each group's scale to the group's sums, and
  sums over K once at the end (`_w4a16_gemv_kernel`). A tl.dot would pad M to 16 rows and
  move the tile through shared memory for nothing. Exact codes minus zeros, float32
  products: as exact as the dequantize-then-multiply below, though rounded differently.
- The other two dequantize a (BLOCK_K, BLOCK_N) tile (`_dequant_tile`): the group zero
  and scale applied and the weight rounded to x's dtype, what dequantizing and then
  multiplying would give.
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
    block_m: int = 0  # rows per dot tile; 0 = 16, 32 or 64 by the step's rows


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
    bits = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000  # (BK, BN/8, 8)
    bits = tl.reshape(bits, (BLOCK_K, BLOCK_N))  # (BK, BN) column = pack * 8 + nibble
    group = k0 // GROUP
    packed_zeros = tl.load(qzeros_ptr + group * stride_zg + packs, mask=pack_mask,
                           other=0)  # (BN / 8,)
    zeros = tl.reshape((packed_zeros[:, None] >> shifts[None, :]) & 0xF, (BLOCK_N,))  # (BN,)
    scales = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask,
                     other=0.0)  # (BN,)
    # 2^23 + code as a float (no int-to-float conversion), minus 2^23 + zero: code - zero.
    codes = bits.to(tl.float32, bitcast=True) - (zeros.to(tl.float32) + 8388608.0)[None, :]
    return (codes * scales[None, :].to(tl.float32)).to(OUT_DTYPE)  # (BK, BN)


@triton.jit
def _tile_columns(pid_n, N, BLOCK_N: tl.constexpr):
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    packs = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # (BN / 8,) packed columns
    return cols, packs, cols < N, packs < N // 8


@triton.jit
def _w4a16_gemv_kernel(x_ptr, qweight_ptr, qzeros_ptr, scales_ptr, out_ptr, N, K,
                       k_per_split, stride_xm, stride_qk, stride_zg, stride_sg, stride_os,
                       stride_om, GROUP: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    """One row of x by a (BLOCK_N)-column tile over one split of K, without tensor cores.

    The tile stays packed-shaped, (BLOCK_K, BLOCK_N / 8, 8) with column pack * 8 + j in
    [., pack, j], so nothing is reshaped across threads. A nibble becomes a float without an
    int-to-float conversion (slow on the GPU): OR-ed into the mantissa of 2^23 it is the
    float 2^23 + code, and subtracting 2^23 + zero leaves code - zero exactly. Products
    accumulate per element over a group, the group's scale multiplies the sums once, and
    the sum over K across threads happens once, at the end.
    """
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    packs = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)  # (BN / 8,)
    pack_mask = packs < N // 8
    nibble = tl.arange(0, 8)
    shifts = ((nibble // 2) + (nibble % 2) * 4) * 4  # (8,) AWQ's nibble order
    cols = packs[:, None] * 8 + nibble[None, :]  # (BN / 8, 8)
    acc = tl.zeros((BLOCK_K, BLOCK_N // 8, 8), dtype=tl.float32)
    group_start = pid_k * (k_per_split // GROUP)
    group_end = tl.minimum(K // GROUP, group_start + k_per_split // GROUP)
    for group in range(group_start, group_end):
        packed_zeros = tl.load(qzeros_ptr + group * stride_zg + packs, mask=pack_mask,
                               other=0)  # (BN / 8,)
        zeros = ((packed_zeros[:, None] >> shifts[None, :]) & 0xF).to(tl.float32)  # (BN/8, 8)
        offsets = zeros + 8388608.0  # (BN / 8, 8) 2^23 + zero
        scales = tl.load(scales_ptr + group * stride_sg + cols, mask=pack_mask[:, None],
                         other=0.0).to(tl.float32)  # (BN / 8, 8)
        part = tl.zeros((BLOCK_K, BLOCK_N // 8, 8), dtype=tl.float32)
        for k0 in range(group * GROUP, group * GROUP + GROUP, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
            x = tl.load(x_ptr + row * stride_xm + ks).to(tl.float32)  # (BK,)
            packed = tl.load(qweight_ptr + ks[:, None] * stride_qk + packs[None, :],
                             mask=pack_mask[None, :], other=0)  # (BK, BN / 8)
            bits = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF) | 0x4B000000
            weight = bits.to(tl.float32, bitcast=True) - offsets[None, :, :]  # (BK, BN/8, 8)
            part += x[:, None, None] * weight
        acc += part * scales[None, :, :]
    total = tl.sum(acc, axis=0)  # (BN / 8, 8)
    tl.store(out_ptr + pid_k * stride_os + row * stride_om + cols,
             total.to(out_ptr.dtype.element_ty), mask=pack_mask[:, None])


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


def _block_k(group_size: int, wanted: int, smallest: int = 16) -> int:
    """The largest power-of-two divisor of the group size up to `wanted`."""
    block = wanted
    while block >= smallest:
        if group_size % block == 0:
            return block
        block //= 2
    raise ValueError(f"group size {group_size} is not a multiple of {smallest}")


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
        block_m = 1  # a program per row: a tile's rows run side by side and share L2
    elif launch.path == "dot":
        block_m = launch.block_m or (16 if M <= 16 else (32 if M <= 32 else 64))
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
    grid = (row_tiles, triton.cdiv(N, launch.block_n), splits)
    strides = (x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0),
               out.stride(0) if splits > 1 else 0, out.stride(-2))
    block_k = _block_k(group_size, launch.block_k, 8 if launch.path == "gemv" else 16)
    if launch.path == "gemv":
        _w4a16_gemv_kernel[grid](x, qweight, qzeros, scales, out, N, K,
                                 groups_per_split * group_size, *strides, GROUP=group_size,
                                 BLOCK_N=launch.block_n, BLOCK_K=block_k,
                                 num_warps=launch.num_warps, num_stages=launch.num_stages)
    else:
        _w4a16_dot_kernel[grid](x, qweight, qzeros, scales, out, M, N, K,
                                groups_per_split * group_size, *strides, GROUP=group_size,
                                BLOCK_M=block_m, BLOCK_N=launch.block_n, BLOCK_K=block_k,
                                num_warps=launch.num_warps, num_stages=launch.num_stages)
    if splits == 1:
        return out
    return out.sum(dim=0).to(x.dtype)  # (M, N): the partials in split order
