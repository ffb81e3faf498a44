"""Where the W4A16 kernels find a column's packed words: the stored tiles of
worker/quant/w4_layout.py, (ceil(N / TILE), K / GROUP, TILE, GROUP / 8) int32."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def column_words(cols, K, GROUP: tl.constexpr, TILE: tl.constexpr):
    """The offset of each column's first word (group 0); group g's words follow at
    g * group_words(GROUP, TILE), contiguous within the group."""
    return (cols // TILE) * (TILE * (K // 8)) + (cols % TILE) * (GROUP // 8)


@triton.jit
def group_words(GROUP: tl.constexpr, TILE: tl.constexpr):
    """Words from one group of a tile to the next: a whole tile's group block."""
    return TILE * (GROUP // 8)
