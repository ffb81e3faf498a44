"""The int8 KV cache's per-token, per-head encoding.

Each (token, KV head) vector x of D values is stored as D + 8 int8 bytes: the codes
q = round((x - min) / scale) - 128 in [-128, 127], then the float32 scale = (max - min) /
255 and zero point = min, as 8 raw bytes. Keeping them in the same row as the codes means
every block copy (swap to the host tier and back, prefix-cache reuse, parked sessions)
carries them with no bookkeeping of its own. x = (q + 128) * scale + min.

D + 8 bytes instead of 2D (16-bit) or 4D (float32): about half the memory of a bfloat16
cache for head_dim 128, so the same memory holds about twice the tokens.
"""

from __future__ import annotations

import torch

EXTRA_BYTES = 8  # float32 scale and zero point


def encoded_width(head_dim: int) -> int:
    return head_dim + EXTRA_BYTES


def encode(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) float -> (..., D + 8) int8."""
    x = x.float()
    low = x.amin(dim=-1, keepdim=True)  # (..., 1)
    scale = (x.amax(dim=-1, keepdim=True) - low).clamp(min=1e-8) / 255  # (..., 1)
    codes = (torch.round((x - low) / scale) - 128).clamp(-128, 127).to(torch.int8)  # (..., D)
    params = torch.cat((scale, low), dim=-1).contiguous().view(torch.int8)  # (..., 8)
    return torch.cat((codes, params), dim=-1)


def decode(encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D + 8) int8 -> x (..., D) in dtype."""
    params = encoded[..., -EXTRA_BYTES:].contiguous().view(torch.float32)  # (..., 2)
    codes = encoded[..., :-EXTRA_BYTES].float() + 128  # (..., D)
    return (codes * params[..., :1] + params[..., 1:]).to(dtype)
