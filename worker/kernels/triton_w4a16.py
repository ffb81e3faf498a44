"""4-bit-weight x 16/32-bit-activation matmul for AWQ checkpoints on the GPU, in Triton.

`w4a16_matmul(x, packed, zeros, scales, group_size)`, on the weights as the GPU holds them
(worker/quant/w4_layout.py repacks AutoAWQ's tensors once, at load):
- x (M, K) float16, bfloat16 or float32, rows contiguous;
- packed int32 (ceil(N / T), K / G, T, G / 8), column n's words of group g at [n // T, g,
  n % T, :]: nibble j (bits 4j .. 4j + 3) of its word p is the code of W[n, gG + 8p + j],
  so one int32 holds eight consecutive k of one output column (triton_w4_tiles.py);
- zeros, scales (K / G, N) in x's dtype: W[n, k] = (code - zero) * scale of k's group;
- returns x @ W^T (M, N) in x's dtype.

The weights are read as 4-bit codes, a quarter of a 16-bit weight's bytes: what makes
decode faster. A nibble becomes a float without an int-to-float conversion (slow on the
GPU): OR-ed into the mantissa of 2^23, code * 16^i (the nibble left where it sits, or
after one shift for the top three) is the float 2^23 + code * 16^i, and subtracting 2^23
leaves it exactly. Four paths, by the number of rows M (default_launch, or a tuned
table: w4a16_tuning.py):
- "gemv" (decode): no tensor cores. A program per row and column tile walks K a step of
  block_k (whole groups) at a time; per step it loads (BLOCK_N, block_k / 8) packed
  words, multiplies each nibble by x pre-divided by its 16^i, and applies each group as
  s * (sum(x * code) - z * sum(x)): about three instructions a weight (a LOP3, a FADD,
  an FFMA), the zero and scale once a group.
- "mma" (16-bit activations): tensor cores, a nibble made a 16-bit float in about one
  instruction, the weights unpacked once for a tile of rows (triton_w4a16_mma.py).
- "dot": each (BLOCK_N, BLOCK_K) tile dequantized, rounded to x's dtype (what
  dequantizing and then multiplying gives) and multiplied by tl.dot.
- "dequant" (large prefills): the weight dequantized once into a dense (N, K) matrix and
  multiplied by torch.matmul; with many rows the matmul's compute outweighs reading the
  weight twice.

Split-K (gemv, mma and dot): with few rows, tiles over M and N alone leave most of the GPU
idle. K is cut into splits of whole groups, and triton_split_k.py adds the partials in
split order inside the same kernel: deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import pdl_options, start_in_chain
from lmfleet.worker.kernels.triton_rounding import check_device, check_float
from lmfleet.worker.kernels.triton_split_k import finish_split_k, num_splits, split_k_counters
from lmfleet.worker.kernels.triton_w4_tiles import column_words, group_words
from lmfleet.worker.kernels.triton_w4a16_mma import ROWS as MMA_ROWS
from lmfleet.worker.kernels.triton_w4a16_mma import offset_bits, w4a16_mma_kernel
from lmfleet.worker.kernels.triton_w4a16_stack import w4a16_stack_kernel

_PACK = 8
_MAGIC = 0x4B000000  # the float 2^23's bits: OR-ed with a nibble, 2^23 + the nibble


@dataclass(frozen=True)
class W4A16Launch:
    """How one matmul is launched: the path and its tile; splits None = the heuristic."""

    path: str  # "gemv" | "mma" (triton_w4a16_mma.py) | "stack" (..._stack.py) | "dot" | "dequant"
    block_n: int
    block_k: int  # K per step; gemv (one row a program): whole groups, else one group
    num_warps: int
    num_stages: int = 2  # gemv: >= 2 prefetches the next step's weights into registers
    splits: int | None = None
    programs_per_sm: int = 4  # split-K aims at this many programs per multiprocessor
    block_m: int = 0  # dot, mma: rows per program, 0 = 16, 32 or 64 by the rows
    permute_x: bool = False  # mma: load x in k order and permute it in registers
    prefetch: bool = False  # mma: the next group loaded into registers by hand
    weights_16: bool = False  # mma: zero and scale applied in x's dtype (one rounding)
    stack: int = 2  # stack (one row): groups stacked as the MMA's rows, a power of two <= 16


@triton.jit
def _nibble_value(words, HALF_SHIFT: tl.constexpr, magic):
    """code * 16^(HALF_SHIFT / 4) as float32, exactly, for the nibble at bits HALF_SHIFT of
    each word's low half. `magic` is _MAGIC passed at run time: with two constants the
    compiler emits an AND and an OR, with one in a register a single three-input LOP3."""
    bits = (words & (0xF << HALF_SHIFT)) | magic  # the float 2^23 + code * 16^i
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _high_half(words):
    """Each word's nibbles 4..7 moved to its low half (a logical shift: one instruction)."""
    return (words.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True)


@triton.jit
def _nibble(words, high, J: tl.constexpr, magic):
    """Nibble J of each word as code * 16^i (float32, exact), i = J for J <= 4 (bits up to
    19 fit the mantissa as they are), J - 4 for 5..7 (from _high_half: without a shift
    they would reach the exponent). One LOP3 and one FADD a weight."""
    if J <= 4:
        return _nibble_value(words, 4 * J, magic)
    else:
        return _nibble_value(high, 4 * (J - 4), magic)


@triton.jit
def _nibble_unit(J: tl.constexpr):
    """16^-i for _nibble's i: what x is multiplied by before nibble J's products."""
    if J <= 4:
        return 1.0 / (1 << (4 * J))
    else:
        return 1.0 / (1 << (4 * (J - 4)))


@triton.jit
def _gemv_step_load(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, col_words, groups, words,
                    step, valid, stride_zg, stride_sg, GROUP: tl.constexpr,
                    GROUPS: tl.constexpr, TILE: tl.constexpr):
    """A step's packed words (BN, S, G / 8) and its zeros and scales (BN, S); `valid` False
    loads nothing (the prefetch past the last step). col_words: column_words(cols)."""
    first_group = step * GROUPS
    mask = col_mask[:, None] & valid  # (BN, 1)
    packed = tl.load(w_ptr + col_words[:, None, None] + first_group * group_words(GROUP, TILE)
                     + words[None, :, :], mask=mask[:, :, None], other=0)  # (BN, S, G / 8)
    group_at = (first_group + groups)[None, :]  # (1, S)
    zero = tl.load(zeros_ptr + group_at * stride_zg + cols[:, None], mask=mask,
                   other=0.0)  # (BN, S)
    scale = tl.load(scales_ptr + group_at * stride_sg + cols[:, None], mask=mask,
                    other=0.0)  # (BN, S)
    return packed, zero, scale


@triton.jit
def _gemv_step_sum(packed, zero, scale, x_at, magic, BLOCK_N: tl.constexpr,
                   GROUP: tl.constexpr, GROUPS: tl.constexpr):
    """One step's (BN,) share of the product: packed (BN, S, G / 8) words, zero and scale
    (BN, S), x_at (S, G / 8) pointers to x[8 p] of each word p."""
    high = _high_half(packed)
    part = tl.zeros((BLOCK_N, GROUPS, GROUP // 8), dtype=tl.float32)
    x_sum = tl.zeros((GROUPS, GROUP // 8), dtype=tl.float32)
    for j in tl.static_range(8):
        x_j = tl.load(x_at + j).to(tl.float32)  # (S, G / 8) x[8 p + j]
        x_sum += x_j
        part += _nibble(packed, high, j, magic) * (x_j * _nibble_unit(j))[None, :, :]
    return tl.sum(scale.to(tl.float32) * (tl.sum(part, axis=2) - zero.to(tl.float32)
                                          * tl.sum(x_sum, axis=1)[None, :]), axis=1)


@triton.jit
def _w4a16_gemv_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, partial_ptr, out_ptr, counter_ptr,
                       magic, N, K, steps_per_split, splits, stride_xm, stride_zg, stride_sg,
                       stride_ps, stride_om, GROUP: tl.constexpr, TILE: tl.constexpr,
                       GROUPS: tl.constexpr, BLOCK_N: tl.constexpr, PREFETCH: tl.constexpr,
                       SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    """One row, BLOCK_N columns; each step takes GROUPS whole groups of K, a (BN, GROUPS,
    G / 8) tile of packed words. PREFETCH loads the next step's tile before the current
    one is multiplied: the load's latency hides behind the arithmetic. The first step's
    tile is loaded before waiting for x (triton_pdl.py), and that step is taken before the
    loop, so the loop is the same with and without PDL."""
    row = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    col_mask = cols < N
    groups = tl.arange(0, GROUPS)  # (S,) groups of a step
    words = groups[:, None] * (GROUP // 8) + tl.arange(0, GROUP // 8)[None, :]  # (S, G / 8)
    tile_words = (groups[:, None] * group_words(GROUP, TILE)
                  + tl.arange(0, GROUP // 8)[None, :])  # (S, G / 8) the words in the tiles
    col_words = column_words(cols, K, GROUP, TILE)  # (BN,)
    x_row = x_ptr + row * stride_xm + words * 8  # (S, G / 8) x[8 p] of step 0
    step_start = pid_k * steps_per_split
    step_end = tl.minimum(K // (GROUP * GROUPS), step_start + steps_per_split)
    packed, zero, scale = _gemv_step_load(w_ptr, zeros_ptr, scales_ptr, cols, col_mask,
                                          col_words, groups, tile_words, step_start,
                                          step_start < step_end, stride_zg, stride_sg,
                                          GROUP, GROUPS, TILE)
    start_in_chain(PDL)
    if PREFETCH:
        next_tile = _gemv_step_load(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, col_words,
                                    groups, tile_words, step_start + 1,
                                    step_start + 1 < step_end, stride_zg, stride_sg, GROUP,
                                    GROUPS, TILE)
    acc = _gemv_step_sum(packed, zero, scale, x_row + step_start * GROUPS * GROUP, magic,
                         BLOCK_N, GROUP, GROUPS)  # (BN,) every split has a step
    for step in range(step_start + 1, step_end):
        if PREFETCH:
            packed, zero, scale = next_tile
            next_tile = _gemv_step_load(w_ptr, zeros_ptr, scales_ptr, cols, col_mask,
                                        col_words, groups, tile_words, step + 1,
                                        step + 1 < step_end, stride_zg, stride_sg, GROUP,
                                        GROUPS, TILE)
        else:
            packed, zero, scale = _gemv_step_load(w_ptr, zeros_ptr, scales_ptr, cols, col_mask,
                                                  col_words, groups, tile_words, step, True,
                                                  stride_zg, stride_sg, GROUP, GROUPS, TILE)
        acc += _gemv_step_sum(packed, zero, scale, x_row + step * GROUPS * GROUP, magic,
                              BLOCK_N, GROUP, GROUPS)
    rows = row + tl.arange(0, 1)  # (1,)
    finish_split_k(acc[None, :], rows, cols, rows >= 0, col_mask, partial_ptr, out_ptr,
                   counter_ptr, row * tl.num_programs(1) + pid_n, pid_k, splits, stride_ps,
                   stride_om, SPLIT_K)


@triton.jit
def _dequant_tile(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, k0, magic, K, stride_zg,
                  stride_sg, GROUP: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """W[cols, k0 : k0 + BLOCK_K] (BN, BK) in OUT_DTYPE; BLOCK_K divides the group."""
    group = k0 // GROUP
    words = (group * group_words(GROUP, TILE) + (k0 % GROUP) // 8
             + tl.arange(0, BLOCK_K // 8))  # (BK / 8,) within the tiles
    packed = tl.load(w_ptr + column_words(cols, K, GROUP, TILE)[:, None] + words[None, :],
                     mask=col_mask[:, None], other=0)  # (BN, BK / 8)
    shifts = tl.arange(0, 8) * 4  # (8,)
    bits = ((packed[:, :, None] >> shifts[None, None, :]) & 0xF) | magic  # (BN, BK/8, 8)
    codes = tl.reshape(bits, (BLOCK_N, BLOCK_K)).to(tl.float32, bitcast=True) - 8388608.0
    zero = tl.load(zeros_ptr + group * stride_zg + cols, mask=col_mask,
                   other=0.0).to(tl.float32)  # (BN,)
    scale = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask,
                    other=0.0).to(tl.float32)  # (BN,)
    return ((codes - zero[:, None]) * scale[:, None]).to(OUT_DTYPE)  # (BN, BK)


@triton.jit
def _w4a16_dot_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, partial_ptr, out_ptr, counter_ptr,
                      magic, M, N, K, k_per_split, splits, stride_xm, stride_zg, stride_sg,
                      stride_ps, stride_om, GROUP: tl.constexpr, TILE: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      SPLIT_K: tl.constexpr, PDL: tl.constexpr):
    start_in_chain(PDL)  # the loop's loads are pipelined: nothing is loaded before it
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    row_mask = rows < M
    col_mask = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=row_mask[:, None],
                    other=0.0)  # (BM, BK)
        weight = _dequant_tile(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, k0, magic, K,
                               stride_zg, stride_sg, GROUP, TILE, BLOCK_N, BLOCK_K,
                               x.dtype)  # (BN, BK)
        acc += tl.dot(x, tl.trans(weight),
                      input_precision="ieee" if x.dtype == tl.float32 else None)
    finish_split_k(acc, rows, cols, row_mask, col_mask, partial_ptr, out_ptr, counter_ptr,
                   pid_m * tl.num_programs(1) + pid_n, pid_k, splits, stride_ps, stride_om,
                   SPLIT_K)


@triton.jit
def _w4_dequant_kernel(w_ptr, zeros_ptr, scales_ptr, out_ptr, magic, N, K, stride_zg,
                       stride_sg, stride_on, GROUP: tl.constexpr, TILE: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    k0 = tl.program_id(1) * BLOCK_K
    col_mask = cols < N
    weight = _dequant_tile(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, k0, magic, K,
                           stride_zg, stride_sg, GROUP, TILE, BLOCK_N, BLOCK_K,
                           out_ptr.dtype.element_ty)  # (BN, BK)
    ks = k0 + tl.arange(0, BLOCK_K)  # (BK,)
    tl.store(out_ptr + cols[:, None] * stride_on + ks[None, :], weight, mask=col_mask[:, None])


def default_launch(rows: int) -> W4A16Launch:
    """The launch for a step of `rows` rows where no tuned table applies."""
    if rows <= 4:
        return W4A16Launch("gemv", block_n=128, block_k=128, num_warps=2, num_stages=1,
                           programs_per_sm=8)
    if rows <= 64:
        return W4A16Launch("dot", block_n=64, block_k=64, num_warps=2 if rows <= 16 else 4)
    return W4A16Launch("dequant", block_n=128, block_k=32, num_warps=4)


def _rows_tile(rows: int) -> int:
    """The rows a program takes where the launch leaves it open: 16, 32 or 64."""
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


def _block_k(group_size: int, wanted: int) -> int:
    """The largest power-of-two divisor of the group size up to `wanted` (>= 16)."""
    block = wanted
    while block >= 16:
        if group_size % block == 0:
            return block
        block //= 2
    raise ValueError(f"group size {group_size} is not a multiple of 16")


def w4_dequantize(packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
                  group_size: int, launch: W4A16Launch | None = None) -> torch.Tensor:
    """-> W (N, K) in scales' dtype, on the tensors' device."""
    launch = launch or default_launch(1 << 30)
    K, N = scales.shape[0] * group_size, scales.shape[1]
    block_k = _block_k(group_size, launch.block_k)
    out = torch.empty((N, K), dtype=scales.dtype, device=packed.device)
    grid = (triton.cdiv(N, launch.block_n), K // block_k)
    _w4_dequant_kernel[grid](packed, zeros, scales, out, _MAGIC, N, K, zeros.stride(0),
                             scales.stride(0), out.stride(0), GROUP=group_size,
                             TILE=packed.shape[2], BLOCK_N=launch.block_n, BLOCK_K=block_k,
                             num_warps=launch.num_warps)
    return out


def _check(x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor,
           group_size: int) -> None:
    check_device(x, packed, zeros, scales)
    check_float("x", x)
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be (M, K) with contiguous rows, got {tuple(x.shape)}")
    M, K = x.shape
    N = scales.shape[-1]
    if (group_size <= 0 or group_size % 16 or K % group_size or packed.dim() != 4
            or packed.shape[1:] != (K // group_size, packed.shape[2], group_size // _PACK)
            or packed.shape[0] != -(-N // packed.shape[2]) or not packed.is_contiguous()
            or scales.shape != (K // group_size, N) or zeros.shape != scales.shape):
        raise ValueError(f"packed {tuple(packed.shape)}, zeros {tuple(zeros.shape)} and "
                         f"scales {tuple(scales.shape)} do not fit x {tuple(x.shape)} with "
                         f"group size {group_size}")
    if scales.dtype != x.dtype or zeros.dtype != x.dtype:
        raise ValueError(f"scales and zeros must be {x.dtype}, got {scales.dtype} and "
                         f"{zeros.dtype}")


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, zeros: torch.Tensor,
                 scales: torch.Tensor, group_size: int,
                 launch: W4A16Launch | None = None) -> torch.Tensor:
    """x (M, K) -> (M, N); see the module doc. `launch` overrides the GPU's tuned table
    (w4a16_tuning.py) and default_launch."""
    _check(x, packed, zeros, scales, group_size)
    M, K = x.shape
    N = scales.shape[1]
    if launch is None:
        from lmfleet.worker.kernels.w4a16_tuning import tuned_launch

        launch = tuned_launch(x.device, M, N, K, group_size) or default_launch(M)
    if launch.path in ("mma", "stack") and x.dtype == torch.float32:
        launch = default_launch(M)  # tensor cores take 16-bit operands: fp32 stays exact
    if launch.path == "dequant":
        return torch.matmul(x, w4_dequantize(packed, zeros, scales, group_size, launch).t())
    if launch.path == "gemv":
        if M > 16:
            raise ValueError(f"the gemv path takes at most 16 rows, got {M}")
        # a program per row: the rows of a tile read its weights from L2, not HBM, and
        # the measured one-row kernel beat one taking several rows at 2 and 4 rows
        block_m, chunk = 1, group_size
        steps = launch.block_k // group_size
        if (launch.block_k == steps * group_size and steps & (steps - 1) == 0
                and K % launch.block_k == 0):
            chunk = launch.block_k  # a power of two of whole groups per step
    elif launch.path == "mma":
        block_m, chunk = launch.block_m or _rows_tile(M), group_size
        if block_m < MMA_ROWS or block_m & (block_m - 1):
            raise ValueError(f"the mma path's row tile is a power of two >= {MMA_ROWS}, "
                             f"got {block_m}")
    elif launch.path == "stack":
        block_m, chunk = 1, launch.stack * group_size
        if M != 1 or launch.stack not in (1, 2, 4, 8, 16) or K % chunk:
            raise ValueError(f"the stack path takes one row and K a multiple of a power of "
                             f"two <= 16 groups, got {M} rows, K {K}, stack {launch.stack}")
    elif launch.path == "dot":
        block_m = launch.block_m or _rows_tile(M)
        chunk = _block_k(group_size, launch.block_k)
    else:
        raise ValueError(f"unknown W4A16 path {launch.path!r}")
    grid_mn = (triton.cdiv(M, block_m), triton.cdiv(N, launch.block_n))
    chunks = K // chunk
    per_split = triton.cdiv(chunks, num_splits(grid_mn[0] * grid_mn[1], chunks, x.device,
                                               launch.splits, launch.programs_per_sm))
    splits = triton.cdiv(chunks, per_split)  # none empty
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    partial = (torch.empty((splits, M, N), dtype=torch.float32, device=x.device)
               if splits > 1 else out)
    counters = split_k_counters(x.device) if splits > 1 else out
    args = (x, packed, zeros, scales, partial, out, counters, _MAGIC)
    strides = (x.stride(0), zeros.stride(0), scales.stride(0),
               partial.stride(0) if splits > 1 else 0, out.stride(0))
    options = dict(GROUP=group_size, TILE=packed.shape[2], BLOCK_N=launch.block_n,
                   SPLIT_K=splits > 1, **pdl_options(x.device),
                   num_warps=launch.num_warps, num_stages=launch.num_stages)
    if launch.path == "gemv":
        _w4a16_gemv_kernel[(M, grid_mn[1], splits)](*args, N, K, per_split, splits, *strides,
                                                    GROUPS=chunk // group_size,
                                                    PREFETCH=launch.num_stages >= 2, **options)
    elif launch.path == "stack":
        bits, offset = offset_bits(x.dtype)
        w4a16_stack_kernel[(grid_mn[1], splits)](
            *args[:-1], bits, N, K, per_split, splits, *strides[1:], STACK=launch.stack,
            OFFSET=offset, PREFETCH=launch.prefetch, **options)
    elif launch.path == "mma":
        bits, offset = offset_bits(x.dtype)
        w4a16_mma_kernel[(grid_mn[1], splits, grid_mn[0])](
            *args[:-1], bits, M, N, K, per_split, splits, *strides, BLOCK_M=block_m,
            OFFSET=offset, PERMUTE_X=launch.permute_x,
            PREFETCH=launch.prefetch, SCALE_16=launch.weights_16, **options)
    else:
        _w4a16_dot_kernel[(*grid_mn, splits)](*args, M, N, K, per_split * chunk, splits,
                                              *strides, BLOCK_M=block_m, BLOCK_K=chunk,
                                              **options)
    return out
