"""W4A16 on tensor cores for decode and mid-size steps: the "mma" path of
triton_w4a16.w4a16_matmul, for bfloat16 and float16 activations.

The decode kernel without tensor cores ("gemv") spends about three instructions a weight
turning nibbles into floats and multiplying them (a LOP3, a FADD, an FFMA), and is bound
by instruction issue. Here the tensor cores multiply, with the weights as the MMA's left
operand (out^T = W x^T, so the few rows of x pad the MMA's narrow side to 16), and a
nibble becomes a 16-bit float in about one instruction a weight:
- One shift and one LOP3 take nibbles i and i + 4 of a packed word (bits 4i and 16 + 4i)
  into the two halves of a 32-bit register OR-ed with the bits of OFFSET (128 in
  bfloat16, 1024 in float16): two 16-bit floats OFFSET + code, exact, side by side as the
  MMA reads its operand pairs.
- The tile's k order is chosen so that each lane of the MMA holds whole packed words:
  position q = 2 (G / 8) i + 2 p + h of a group holds nibble i + 4 h of word p. x is
  put in the same order (_k_of), so the product is unchanged: gathered so by its load, or
  loaded in k order and permuted in registers (PERMUTE_X, fewer instructions on sm_90).
- The MMA sums (OFFSET + code) * x in float32; s * (that - (OFFSET + z) * sum(x)) is the
  group's share, the zero and the offset taken out once a group. Subtracting in 16 bits
  instead would make the compiler unpack and repack every pair.

Numerics: the products are exact and summed in float32; taking OFFSET * sum(x) back out
costs about four bits of float32 (bfloat16) or seven (float16) of the sum, far below the
output's rounding. Float32 activations keep the exact decode kernel (w4a16_matmul routes
them there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import start_in_chain
from lmfleet.worker.kernels.triton_split_k import finish_split_k
from lmfleet.worker.kernels.triton_w4_tiles import column_words, group_words

# per activation dtype: (the bits of OFFSET in both 16-bit halves, OFFSET)
_HALVES = {torch.bfloat16: (0x43004300, 128.0), torch.float16: (0x64006400, 1024.0)}
ROWS = 16  # the MMA's narrow side: the fewest rows a program takes


def offset_bits(dtype: torch.dtype) -> tuple[int, float]:
    """(the OR constant, OFFSET) for activations of `dtype` (bfloat16 or float16)."""
    if dtype not in _HALVES:
        raise ValueError(f"the mma path takes bfloat16 or float16 activations, not {dtype}")
    return _HALVES[dtype]


@triton.jit
def _k_of(GROUP: tl.constexpr):
    """(G,) the k within a group that position q of the unpacked tile holds."""
    q = tl.arange(0, GROUP)
    return 8 * ((q % (GROUP // 4)) // 2) + q // (GROUP // 4) + 4 * (q % 2)


@triton.jit
def unpack_halves(packed, halves_bits, DTYPE: tl.constexpr, ROWS_OF: tl.constexpr,
                  GROUP: tl.constexpr):
    """Packed words (R, G / 8) -> (R, G) OFFSET + code as 16-bit floats of DTYPE, in
    _k_of's order: one shift and one LOP3 put nibbles i and i + 4 of a word in the two
    halves of a register OR-ed with OFFSET's bits (`halves_bits`)."""
    shifts = tl.arange(0, 4) * 4  # (4,)
    pairs = (((packed[:, None, :] >> shifts[None, :, None]) & 0x000F000F)
             | halves_bits)  # (R, 4, G / 8): nibbles i and i + 4 as OFFSET + code
    low = pairs.to(tl.int16)  # (R, 4, G / 8) nibble i
    high = (pairs >> 16).to(tl.int16)  # nibble i + 4
    return tl.reshape(tl.join(low, high).to(DTYPE, bitcast=True), (ROWS_OF, GROUP))


@triton.jit
def permute_to_k_of(x, GROUP: tl.constexpr, COLUMNS: tl.constexpr):
    """x (G, C) in k order -> _k_of's order: k = 8 b + 4 h + a to q = a G / 4 + 2 b + h."""
    return tl.reshape(tl.permute(tl.reshape(x, (GROUP // 8, 2, 4, COLUMNS)), (2, 0, 1, 3)),
                      (GROUP, COLUMNS))


@triton.jit
def _group_load(x_ptr, w_ptr, zeros_ptr, scales_ptr, rows, row_mask, cols, col_mask,
                col_words, group, valid, stride_xm, stride_zg, stride_sg, GROUP: tl.constexpr,
                TILE: tl.constexpr, PERMUTE_X: tl.constexpr):
    """A group's packed words (BN, G / 8), x (G, BM) in k order (PERMUTE_X) or _k_of's,
    zeros and scales (BN,); `valid` False loads nothing (the prefetch past the last
    group). col_words: column_words(cols)."""
    words = group * group_words(GROUP, TILE) + tl.arange(0, GROUP // 8)  # (G / 8,)
    packed = tl.load(w_ptr + col_words[:, None] + words[None, :],
                     mask=col_mask[:, None] & valid, other=0)  # (BN, G / 8)
    ks = tl.arange(0, GROUP) if PERMUTE_X else _k_of(GROUP)  # (G,)
    x = tl.load(x_ptr + rows[None, :] * stride_xm + group * GROUP + ks[:, None],
                mask=row_mask[None, :] & valid, other=0.0)  # (G, BM)
    zero = tl.load(zeros_ptr + group * stride_zg + cols, mask=col_mask & valid, other=0.0)
    scale = tl.load(scales_ptr + group * stride_sg + cols, mask=col_mask & valid, other=0.0)
    return packed, x, zero, scale


@triton.jit
def w4a16_mma_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, partial_ptr, out_ptr, counter_ptr,
                     halves_bits, M, N, K, groups_per_split, splits, stride_xm, stride_zg,
                     stride_sg, stride_ps, stride_om, GROUP: tl.constexpr, TILE: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, OFFSET: tl.constexpr,
                     SPLIT_K: tl.constexpr,
                     PERMUTE_X: tl.constexpr = False, PREFETCH: tl.constexpr = False,
                     SCALE_16: tl.constexpr = False, PDL: tl.constexpr = False):
    """A program per (column tile, split of K, tile of BLOCK_M rows).

    SCALE_16 applies the zero and scale to the 16-bit weights (paired 16-bit instructions,
    each weight rounded once, as the format's dequantization rounds it) and the MMA sums
    the products: no sum of x and no float32 step a group (x_sum is then unused, and
    compiled away). With num_stages >= 2 Triton's pipeliner copies the next groups' loads
    to shared memory ahead of use (cp.async); PREFETCH instead loads the next group into
    registers before the current one is multiplied, and the pipeliner leaves the loads
    alone. Under PDL the program waits first (triton_pdl.py): its first load takes x too."""
    start_in_chain(PDL)
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    col_mask = cols < N
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BM,) x's rows, the last tile padded
    row_mask = rows < M
    col_words = column_words(cols, K, GROUP, TILE)  # (BN,)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    group_start = pid_k * groups_per_split
    group_end = tl.minimum(K // GROUP, group_start + groups_per_split)
    if PREFETCH:
        next_group = _group_load(x_ptr, w_ptr, zeros_ptr, scales_ptr, rows, row_mask, cols,
                                 col_mask, col_words, group_start, group_start < group_end,
                                 stride_xm, stride_zg, stride_sg, GROUP, TILE, PERMUTE_X)
    for group in range(group_start, group_end):
        if PREFETCH:
            packed, x, zero, scale = next_group
            next_group = _group_load(x_ptr, w_ptr, zeros_ptr, scales_ptr, rows, row_mask, cols,
                                     col_mask, col_words, group + 1, group + 1 < group_end,
                                     stride_xm, stride_zg, stride_sg, GROUP, TILE, PERMUTE_X)
        else:
            packed, x, zero, scale = _group_load(
                x_ptr, w_ptr, zeros_ptr, scales_ptr, rows, row_mask, cols, col_mask, col_words,
                group, True, stride_xm, stride_zg, stride_sg, GROUP, TILE, PERMUTE_X)
        weight = unpack_halves(packed, halves_bits, x_ptr.dtype.element_ty, BLOCK_N,
                               GROUP)  # (BN, G) OFFSET + code in _k_of's order
        if SCALE_16:
            weight = ((weight - (zero + OFFSET).to(weight.dtype)[:, None])
                      * scale[:, None])  # (BN, G) (code - z) * s, rounded to x's dtype
        # over the padded tile even for one row: a second, one-row load of x cost more
        x_sum = tl.sum(x.to(tl.float32), axis=0)  # (BM,)
        if PERMUTE_X:
            x = permute_to_k_of(x, GROUP, BLOCK_M)  # (G, BM)
        if SCALE_16:
            acc = tl.dot(weight, x, acc)
        else:
            products = tl.dot(weight, x)  # (BN, BM) sum of (OFFSET + code) * x
            acc += scale.to(tl.float32)[:, None] * (
                products - (zero.to(tl.float32) + OFFSET)[:, None] * x_sum[None, :])
    finish_split_k(tl.trans(acc), rows, cols, row_mask, col_mask, partial_ptr, out_ptr,
                   counter_ptr, pid_m * tl.num_programs(0) + pid_n, pid_k, splits, stride_ps,
                   stride_om, SPLIT_K)
