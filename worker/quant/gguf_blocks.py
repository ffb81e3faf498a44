"""GGUF's block-quantized weights (llama.cpp's Q4_0, Q4_1 and Q8_0), kept packed.

A GGUF matrix of `rows` x `cols` weights is stored row by row in blocks of 32 weights
along the row; each block is a float16 scale d (Q4_1 also a float16 minimum m) followed by
the codes:
- Q4_0 (18 bytes): 16 bytes, weight j in the low nibble of byte j and weight j + 16 in its
  high nibble; w = d * (q - 8);
- Q4_1 (20 bytes): the same nibbles; w = d * q + m;
- Q8_0 (34 bytes): 32 int8 codes; w = d * q.
A row's bytes therefore slice cleanly at block boundaries: a tensor-parallel shard of the
input features is a column range of the (rows, blocks x bytes) uint8 array.

Dequantization here computes in float32 in the order llama.cpp's reference does (the gguf
package's `quants.dequantize`, which transformers uses), so it reproduces those weights
bit for bit.
"""

from __future__ import annotations

import torch

BLOCK = 32
# type name -> (GGML type id, bytes per block of 32 weights)
FORMATS = {"Q4_0": (2, 18), "Q4_1": (3, 20), "Q8_0": (8, 34)}


def block_bytes(qtype: str) -> int:
    if qtype not in FORMATS:
        raise ValueError(f"unsupported GGUF block type {qtype}; supported: "
                         f"{', '.join(FORMATS)}")
    return FORMATS[qtype][1]


def packed_columns(cols: int, qtype: str) -> int:
    """Bytes per row of `cols` weights."""
    if cols % BLOCK:
        raise ValueError(f"{cols} weights per row is not a multiple of the {BLOCK}-weight "
                         "GGUF block")
    return cols // BLOCK * block_bytes(qtype)


def dequantize_blocks(data: torch.Tensor, qtype: str,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """data uint8 (rows, blocks x bytes) -> weights (rows, blocks x 32) in dtype."""
    size = block_bytes(qtype)
    rows = data.shape[0]
    blocks = data.reshape(rows, -1, size)  # (R, B, bytes)
    scale = blocks[..., :2].contiguous().view(torch.float16).float()  # (R, B, 1)
    if qtype == "Q8_0":
        codes = blocks[..., 2:].contiguous().view(torch.int8).float()  # (R, B, 32)
        weights = scale * codes
    else:
        start = 4 if qtype == "Q4_1" else 2
        packed = blocks[..., start:]  # (R, B, 16)
        codes = torch.cat([packed & 0xF, packed >> 4], dim=-1).float()  # (R, B, 32)
        if qtype == "Q4_1":
            minimum = blocks[..., 2:4].contiguous().view(torch.float16).float()  # (R, B, 1)
            weights = scale * codes + minimum
        else:
            weights = scale * (codes - 8)
    return weights.reshape(rows, -1).to(dtype)  # (R, B x 32)
