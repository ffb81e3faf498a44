"""Building blocks of the Llama family: RMSNorm, rotary embeddings, SwiGLU MLP.

Each mirrors the arithmetic of Hugging Face transformers' Llama (same op order and the
same float32 upcasts), because greedy outputs must match it token for token.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from lmfleet.worker.model.parallel_linear import MergedColumnParallelLinear, RowParallelLinear
from lmfleet.worker.quant.config import WeightQuantization


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.fused_ops = None  # the device's fused kernels, set by attach_fused_ops

    def forward(self, x: torch.Tensor, delta: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (T, H) -> normalized (T, H). With delta (T, H), x += delta in place first: the
        residual add that precedes every norm, fused with it."""
        if self.fused_ops is not None and self.fused_ops.supports(x):
            return self.fused_ops.add_rms_norm(x, delta, self.weight, self.eps)
        if delta is not None:
            x.add_(delta)
        input_dtype = x.dtype
        x = x.to(torch.float32)
        variance = x.pow(2).mean(-1, keepdim=True)  # (T, 1)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(input_dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: Optional[dict[str, Any]]) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), including Llama 3 and linear scaling."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if not scaling:
        return inv_freq
    rope_type = scaling.get("rope_type", scaling.get("type"))
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band
    # between is interpolated smoothly.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, computed once in float32.

    Precomputing is exact: each entry is the same single float32 product and cos/sin
    that transformers computes per call.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float,
                 scaling: Optional[dict[str, Any]]) -> None:
        super().__init__()
        inv_freq = rope_inv_freq(head_dim, theta, scaling)  # (D/2,)
        positions = torch.arange(max_positions, dtype=torch.float32)  # (P,)
        freqs = positions[:, None] * inv_freq[None, :]  # (P, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (P, D)
        self.register_buffer("cos_table", emb.cos(), persistent=False)
        self.register_buffer("sin_table", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype):
        """positions (T,) -> cos, sin (T, 1, D) ready to broadcast over heads."""
        cos = self.cos_table[positions].to(dtype)[:, None, :]
        sin = self.sin_table[positions].to(dtype)[:, None, :]
        return cos, sin


class RopeStep:
    """One step's rotary inputs, shared by every layer: the positions (T,) and the float32
    tables. Fused kernels that look positions up themselves read the tables; the torch and
    C paths read `cos_sin()`, gathered on first use and kept for the other layers."""

    def __init__(self, rotary: RotaryEmbedding, positions: torch.Tensor,
                 dtype: torch.dtype) -> None:
        self.positions = positions
        self.cos_table = rotary.cos_table  # (P, D) float32
        self.sin_table = rotary.sin_table  # (P, D) float32
        self._rotary = rotary
        self._dtype = dtype
        self._cos_sin: Optional[tuple[torch.Tensor, torch.Tensor]] = None

    def cos_sin(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (T, 1, D) in the model dtype."""
        if self._cos_sin is None:
            self._cos_sin = self._rotary(self.positions, self._dtype)
        return self._cos_sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return (x * cos) + (rotate_half(x) * sin)  # (T, heads, D)


class GatedMLP(nn.Module):
    """SwiGLU with gate and up projections fused into one matmul. Under tensor
    parallelism each rank holds intermediate_size / tp of gate and of up (column-parallel)
    and the matching input slice of down_proj (row-parallel, all-reduced)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool,
                 quant: Optional[WeightQuantization] = None) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias=bias,
            what="intermediate_size", quant=quant)
        self.intermediate_size = self.gate_up_proj.local_sizes[0]  # this rank's
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias=bias,
                                           what="intermediate_size", quant=quant)
        self.fused_ops = None  # the device's fused kernels, set by attach_fused_ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (T, H)
        gate_up = self.gate_up_proj(x)  # (T, 2I) (I: this rank's)
        if self.fused_ops is not None and self.fused_ops.supports(gate_up):
            return self.down_proj(self.fused_ops.silu_mul(gate_up))  # (T, H)
        gate, up = gate_up.split(self.intermediate_size, dim=-1)  # (T, I) views each
        # In place in gate_up's first half: the same values as silu(gate) * up, with no
        # (T, I) temporaries (large for prefills); down_proj reads the strided view.
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))  # (T, H)
