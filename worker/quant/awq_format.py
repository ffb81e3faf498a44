"""The AutoAWQ checkpoint format (GEMM version, 4-bit, with zero points), from its spec.

A linear layer y = x W^T with W (out, in) is stored as three tensors:
- `qweight` int32 (in, out / 8): the 4-bit codes of W^T, eight output columns per int32;
- `qzeros` int32 (in / g, out / 8): the 4-bit zero point of each group of g input rows,
  packed the same way;
- `scales` float16 (in / g, out): the scale of each group.
W^T[k, n] = (code[k, n] - zero[k // g, n]) * scale[k // g, n].

Packing order: nibble i (bits 4i .. 4i + 3) of packed column c holds output column
8c + AWQ_ORDER[i]. This is AutoAWQ's order, so vLLM and LMDeploy read what we write.
"""

from __future__ import annotations

import torch

BITS = 4
PACK = 32 // BITS  # codes per int32
MAX_CODE = (1 << BITS) - 1
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# The nibble each output column of a group of eight sits in: the inverse of AWQ_ORDER.
_NIBBLE_OF_COLUMN = tuple(AWQ_ORDER.index(column) for column in range(PACK))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes (rows, cols) integers in [0, 15] -> int32 (rows, cols / 8), AWQ order."""
    rows, cols = codes.shape
    if cols % PACK:
        raise ValueError(f"{cols} columns do not pack into int32s of {PACK} codes")
    grouped = codes.to(torch.int64).view(rows, cols // PACK, PACK)  # (R, C/8, 8)
    packed = torch.zeros(rows, cols // PACK, dtype=torch.int64, device=codes.device)
    for column in range(PACK):
        packed |= grouped[:, :, column] << (BITS * _NIBBLE_OF_COLUMN[column])
    # int64 -> int32 keeps the low 32 bits (two's complement), as AutoAWQ's int32 holds them.
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 (rows, cols / 8) -> int32 codes (rows, cols) in [0, 15]."""
    shifts = torch.tensor([BITS * n for n in _NIBBLE_OF_COLUMN], dtype=torch.int32,
                          device=packed.device)  # (8,)
    codes = (packed[:, :, None] >> shifts) & MAX_CODE  # (R, C/8, 8)
    return codes.reshape(packed.shape[0], -1)


def quantize_rtn(weight: torch.Tensor, group_size: int,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest with zero points: W (out, in) -> (qweight, qzeros, scales)."""
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"in_features={in_features} is not a multiple of the group size "
                         f"{group_size}")
    groups = weight.detach().float().reshape(out_features, in_features // group_size,
                                             group_size)  # (out, in/g, g)
    low = groups.amin(dim=-1, keepdim=True)  # (out, in/g, 1)
    high = groups.amax(dim=-1, keepdim=True)
    scales = (high - low).clamp(min=1e-5) / MAX_CODE  # (out, in/g, 1)
    zeros = (-torch.round(low / scales)).clamp(0, MAX_CODE)
    codes = (torch.round(groups / scales) + zeros).clamp(0, MAX_CODE)  # (out, in/g, g)
    codes_t = codes.reshape(out_features, in_features).t().contiguous()  # (in, out)
    return (pack(codes_t), pack(zeros[..., 0].t().contiguous()),
            scales[..., 0].t().contiguous().to(torch.float16))


def dequantize(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """-> W^T (in, out) in dtype."""
    codes = unpack(qweight)  # (in, out)
    zeros = unpack(qzeros).repeat_interleave(group_size, dim=0)  # (in, out)
    group_scales = scales.to(dtype).repeat_interleave(group_size, dim=0)  # (in, out)
    return (codes - zeros).to(dtype) * group_scales
