"""The fp8 KV cache's per-token, per-head encoding (e4m3, as Hopper GPUs compute it).

Each (token, KV head) vector x of D values is stored as D + 4 bytes: the float8 e4m3 codes
of x / scale, then the float32 scale = max|x| / 448 (e4m3's largest finite value) as 4
raw bytes. The cache tensor is uint8 (raw bytes: indexing and copies work on it
everywhere); its dtype is what tells an fp8 cache from an int8 one (kv/int8_codec.py).
x = code * scale.
"""

from __future__ import annotations

import torch

EXTRA_BYTES = 4  # float32 scale
STORAGE_DTYPE = torch.uint8
E4M3_MAX = 448.0


def encoded_width(head_dim: int) -> int:
    return head_dim + EXTRA_BYTES


def encode(x: torch.Tensor) -> torch.Tensor:
    """x (..., D) float -> (..., D + 4) uint8."""
    x = x.float()
    scale = (x.abs().amax(dim=-1, keepdim=True) / E4M3_MAX).clamp(min=1e-12)  # (..., 1)
    codes = (x / scale).to(torch.float8_e4m3fn).view(torch.uint8)  # (..., D)
    return torch.cat((codes, scale.contiguous().view(torch.uint8)), dim=-1)


def decode(encoded: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(..., D + 4) uint8 -> x (..., D) in dtype."""
    scale = encoded[..., -EXTRA_BYTES:].contiguous().view(torch.float32)  # (..., 1)
    codes = encoded[..., :-EXTRA_BYTES].contiguous().view(torch.float8_e4m3fn).float()
    return (codes * scale).to(dtype)
