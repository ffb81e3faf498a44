"""W4A16 on tensor cores for one row: the "stack" path of triton_w4a16.w4a16_matmul, for
bfloat16 and float16 activations.

The mma path (triton_w4a16_mma.py) pads one row of x to the MMA's narrow side of 16, so
15 of the 16 columns it loads, permutes and sums are zeros, and each group waits for its
own MMA before the float32 zero-and-scale step. Here the 16 columns carry STACK groups
instead: column s holds x's k of group g0 + s, and the weights of those STACK groups are
stacked as rows of one (STACK * BN, G) operand. Block s of the product's rows times column
s is group g0 + s's share; the other blocks are discarded. The MMA does no more work per
weight than the padded one, but x is loaded and summed once for STACK groups, and one MMA
(one wait) serves them all.

The nibble-to-16-bit trick, the k order within a group (_k_of) and the numerics are the
mma path's.
"""

from __future__ import annotations

import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import start_in_chain
from lmfleet.worker.kernels.triton_split_k import finish_split_k
from lmfleet.worker.kernels.triton_w4_tiles import column_words, group_words
from lmfleet.worker.kernels.triton_w4a16_mma import ROWS, permute_to_k_of, unpack_halves

_COLUMNS = tl.constexpr(ROWS)  # the MMA's narrow side, 16 columns of x


@triton.jit
def _stack_weights(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, col_words, first_group,
                   valid, stride_zg, stride_sg, GROUP: tl.constexpr, TILE: tl.constexpr,
                   BLOCK_N: tl.constexpr, STACK: tl.constexpr):
    """STACK groups from first_group: words (STACK * BN, G / 8), group s's columns at rows
    s * BN ..; zeros and scales (STACK, BN). `valid` False loads nothing."""
    stack = tl.arange(0, STACK)  # (S,)
    words = tl.arange(0, GROUP // 8)  # (G / 8,)
    at = ((first_group + stack)[:, None, None] * group_words(GROUP, TILE)
          + col_words[None, :, None] + words[None, None, :])  # (S, BN, G / 8)
    # (stack >= 0) is all true: it only broadcasts the columns' mask over the stack
    mask = (col_mask[None, :] & valid) & (stack >= 0)[:, None]  # (S, BN)
    packed = tl.reshape(tl.load(w_ptr + at, mask=mask[:, :, None], other=0),
                        (STACK * BLOCK_N, GROUP // 8))  # (S BN, G / 8)
    group_at = (first_group + stack)[:, None]  # (S, 1)
    zero = tl.load(zeros_ptr + group_at * stride_zg + cols[None, :], mask=mask, other=0.0)
    scale = tl.load(scales_ptr + group_at * stride_sg + cols[None, :], mask=mask, other=0.0)
    return packed, zero, scale  # zero, scale (S, BN)


@triton.jit
def _stack_x(x_ptr, first_group, valid, GROUP: tl.constexpr, STACK: tl.constexpr):
    """x (G, 16) in k order for STACK groups from first_group: column s = group s's k, the
    rest zeros. `valid` False loads nothing."""
    columns = tl.arange(0, _COLUMNS)  # (16,) the MMA's narrow side
    return tl.load(x_ptr + (first_group + columns)[None, :] * GROUP
                   + tl.arange(0, GROUP)[:, None],
                   mask=(columns < STACK)[None, :] & valid, other=0.0)  # (G, 16)


@triton.jit
def w4a16_stack_kernel(x_ptr, w_ptr, zeros_ptr, scales_ptr, partial_ptr, out_ptr,
                       counter_ptr, halves_bits, N, K, steps_per_split, splits, stride_zg,
                       stride_sg, stride_ps, stride_om, GROUP: tl.constexpr,
                       TILE: tl.constexpr, BLOCK_N: tl.constexpr, STACK: tl.constexpr,
                       OFFSET: tl.constexpr, SPLIT_K: tl.constexpr,
                       PREFETCH: tl.constexpr = False, PDL: tl.constexpr = False):
    """A program per (column tile, split of K); one row of x; each step takes STACK
    groups. PREFETCH loads the next step into registers before this one is multiplied,
    and under PDL the first step's weights before waiting for x (triton_pdl.py); without
    it Triton's pipeliner (num_stages >= 2) prefetches, and the program waits first."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    col_mask = cols < N
    col_words = column_words(cols, K, GROUP, TILE)  # (BN,)
    # column c of the product belongs to stack block c
    own = (tl.arange(0, _COLUMNS)[None, None, :]
           == tl.arange(0, STACK)[:, None, None])  # (S, 1, 16)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    step_start = pid_k * steps_per_split
    step_end = tl.minimum(K // (GROUP * STACK), step_start + steps_per_split)
    if PREFETCH:
        next_weights = _stack_weights(w_ptr, zeros_ptr, scales_ptr, cols, col_mask, col_words,
                                      step_start * STACK, step_start < step_end, stride_zg,
                                      stride_sg, GROUP, TILE, BLOCK_N, STACK)
        start_in_chain(PDL)
        next_x = _stack_x(x_ptr, step_start * STACK, step_start < step_end, GROUP, STACK)
    else:
        start_in_chain(PDL)
    for step in range(step_start, step_end):
        if PREFETCH:
            packed, zero, scale = next_weights
            x = next_x
            valid = step + 1 < step_end
            next_weights = _stack_weights(w_ptr, zeros_ptr, scales_ptr, cols, col_mask,
                                          col_words, (step + 1) * STACK, valid, stride_zg,
                                          stride_sg, GROUP, TILE, BLOCK_N, STACK)
            next_x = _stack_x(x_ptr, (step + 1) * STACK, valid, GROUP, STACK)
        else:
            packed, zero, scale = _stack_weights(
                w_ptr, zeros_ptr, scales_ptr, cols, col_mask, col_words, step * STACK, True,
                stride_zg, stride_sg, GROUP, TILE, BLOCK_N, STACK)
            x = _stack_x(x_ptr, step * STACK, True, GROUP, STACK)
        weight = unpack_halves(packed, halves_bits, x_ptr.dtype.element_ty,
                               STACK * BLOCK_N, GROUP)  # (S BN, G) OFFSET + code
        x_sum = tl.sum(x.to(tl.float32), axis=0)  # (16,) column s: group s's sum of x
        x = permute_to_k_of(x, GROUP, _COLUMNS)  # (G, 16) in the weights' k order
        products = tl.reshape(tl.dot(weight, x),
                              (STACK, BLOCK_N, _COLUMNS))  # (S, BN, 16) sum (OFFSET + code) x
        mine = tl.sum(tl.where(own, products, 0.0), axis=2)  # (S, BN) block s, column s
        sums = tl.sum(tl.where(own, x_sum[None, None, :], 0.0), axis=2)  # (S, 1)
        acc += tl.sum(scale.to(tl.float32) * (
            mine - (zero.to(tl.float32) + OFFSET) * sums), axis=0)  # (BN,)
    row = tl.arange(0, 1)  # (1,)
    finish_split_k(acc[None, :], row, cols, row >= 0, col_mask, partial_ptr, out_ptr,
                   counter_ptr, pid_n, pid_k, splits, stride_ps, stride_om, SPLIT_K)
