"""The Triton fused ops as the model layers see them: the same four methods as the CPU's
`CpuOps` (supports, add_rms_norm, silu_mul, rotary_store_kv), handed to the layers by
`attach_fused_ops` when the Triton attention backend runs.

Each kernel reproduces the rounding of the torch ops it replaces (see the kernel files),
so bf16 results match the eager torch path and float32 stays exact enough for greedy
equality with Hugging Face.
"""

from __future__ import annotations

from typing import Optional

import torch

from lmfleet.worker.kernels.triton_activation import silu_mul
from lmfleet.worker.kernels.triton_rms_norm import add_rms_norm
from lmfleet.worker.kernels.triton_rotary import rotary_store_kv

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class TritonOps:
    def __init__(self, device_type: str) -> None:
        # "cuda"; "cpu" only under TRITON_INTERPRET=1 (the tests).
        self.device_type = device_type

    def supports(self, x: torch.Tensor) -> bool:
        return x.device.type == self.device_type and x.dtype in _DTYPES

    def add_rms_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor],
                     weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (T, H) += delta (T, H) if given, in place; returns RMSNorm(x) (T, H)."""
        return add_rms_norm(x, delta, weight, eps)

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2I) -> silu(gate) * up (T, I)."""
        return silu_mul(gate_up)

    def rotary_store_kv(self, qkv: torch.Tensor, rope, num_heads: int, num_kv_heads: int,
                        kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """qkv (T, (Hq + 2 Hkv) D): q rotated in place, rotated k and v stored at
        slot_mapping (T,) (-1: padding, skipped) of one layer's cache kv."""
        rotary_store_kv(qkv, rope.cos_table, rope.sin_table, rope.positions, num_heads,
                        num_kv_heads, kv, slot_mapping)
