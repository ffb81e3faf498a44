"""The layout the GPU kernels read AWQ weights in (worker/kernels/triton_w4a16.py), made
once at load from AutoAWQ's tensors (awq_format.py).

AutoAWQ packs eight output columns into an int32 (qweight (in, out / 8)), which suits a
kernel that spreads columns over threads. A decode step's kernel wants each thread to walk
K down its own columns, summing without talking to other threads, so the GPU layout packs
eight consecutive k of one column instead, in natural order: nibble j of word p of column
n = code of W[n, 8p + j].

The words are stored in tiles, as a kernel streams them: packed (ceil(out / T), in / g, T,
g / 8) int32 with T = COLUMN_TILE, so one group of T columns (T x g / 2 bytes) is one
contiguous block, and a program walking K through its columns reads one block after the
next. With each column's words contiguous instead (out, in / 8), a group's step read T
pieces of g / 2 bytes, one per column, K / 2 bytes apart, which the memory system serves
markedly slower. Columns past `out` in the last tile are zeros, never read. Zero points
are unpacked to the model dtype (zeros (in / g, out)), beside the scales. The checkpoint
on disk keeps AutoAWQ's format.
"""

from __future__ import annotations

import torch

from lmfleet.worker.quant.awq_format import BITS, PACK, unpack

COLUMN_TILE = 64  # T: columns a stored tile holds (block_n of the launches is a multiple)


def repack_for_gpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's (qweight, qzeros, scales) -> (packed (ceil(out / T), in / g, T, g / 8)
    int32, zeros, scales (in / g, out) in dtype)."""
    codes_t = unpack(qweight).t()  # (out, in) = W's codes
    out_features, in_features = codes_t.shape
    groups = scales.shape[0]
    if in_features % PACK or in_features % groups or (in_features // groups) % PACK:
        raise ValueError(f"{in_features} input features in {groups} groups do not pack into "
                         f"int32s of {PACK}")
    grouped = codes_t.reshape(out_features, in_features // PACK, PACK)  # (out, in/8, 8)
    words = torch.zeros(out_features, in_features // PACK, dtype=torch.int64,
                        device=qweight.device)
    for nibble in range(PACK):
        words |= grouped[:, :, nibble].to(torch.int64) << (BITS * nibble)
    del grouped, codes_t
    return (tile_columns(words.to(torch.int32), groups),  # int64 -> int32: the low 32 bits
            unpack(qzeros).to(dtype).contiguous(), scales.to(dtype).contiguous())


def tile_columns(words: torch.Tensor, groups: int) -> torch.Tensor:
    """(out, in / 8) words, a column's contiguous -> (ceil(out / T), groups, T, in / 8 /
    groups), the stored tiles."""
    out_features, width = words.shape
    tiles = -(-out_features // COLUMN_TILE)
    padded = torch.zeros(tiles * COLUMN_TILE, width, dtype=words.dtype, device=words.device)
    padded[:out_features] = words
    return (padded.reshape(tiles, COLUMN_TILE, groups, width // groups)
            .permute(0, 2, 1, 3).contiguous())  # (tiles, groups, T, g / 8)

