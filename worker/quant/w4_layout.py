"""The layout the GPU kernels read AWQ weights in (worker/kernels/triton_w4a16.py), made
once at load from AutoAWQ's tensors (awq_format.py).

AutoAWQ packs eight output columns into an int32 (qweight (in, out / 8)), which suits a
kernel that spreads columns over threads. A decode step's kernel wants each thread to walk
K down its own columns, summing without talking to other threads, so the GPU layout packs
eight consecutive k of one column instead, in natural order: packed (out, in / 8) int32,
nibble j of [n, p] = code of W[n, 8p + j]. Zero points are unpacked to the model dtype
(zeros (in / g, out)), beside the scales. Same bytes for the codes; the checkpoint on disk
keeps AutoAWQ's format.
"""

from __future__ import annotations

import torch

from lmfleet.worker.quant.awq_format import BITS, PACK, unpack


def repack_for_gpu(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """AutoAWQ's (qweight, qzeros, scales) -> (packed (out, in / 8) int32, zeros, scales
    (in / g, out) in dtype)."""
    codes_t = unpack(qweight).t()  # (out, in) = W's codes
    out_features, in_features = codes_t.shape
    if in_features % PACK:
        raise ValueError(f"{in_features} input features do not pack into int32s of {PACK}")
    grouped = codes_t.reshape(out_features, in_features // PACK, PACK)  # (out, in/8, 8)
    packed = torch.zeros(out_features, in_features // PACK, dtype=torch.int64,
                         device=qweight.device)
    for nibble in range(PACK):
        packed |= grouped[:, :, nibble].to(torch.int64) << (BITS * nibble)
    del grouped, codes_t
    # int64 -> int32 keeps the low 32 bits (two's complement).
    return (packed.to(torch.int32), unpack(qzeros).to(dtype).contiguous(),
            scales.to(dtype).contiguous())
