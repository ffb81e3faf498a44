"""Fused CPU float32 ops for the Llama layer (cpu_ops.c), and the pass that hands them to
a loaded model.

`load_cpu_ops(build_dir)` returns `CpuOps`, or None where the C file cannot be built (the
reason is logged; the model keeps its torch ops). `attach_fused_ops(model, ops)` sets
`ops` on every RMSNorm, attention and MLP module; each uses them for float32 CPU tensors
and its torch ops otherwise, so the model code stays free of the choice.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lmfleet.worker.model.layers import GatedMLP, RMSNorm, RopeStep
from lmfleet.worker.model.llama import Attention
from lmfleet.worker.model.native_build import load_native

SOURCE = Path(__file__).with_name("cpu_ops.c")
# No -ffast-math: every product and sum rounds as torch's do (see the C file).
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffp-contract=off", "-fopenmp")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def load_cpu_ops(build_dir: Path) -> Optional[CpuOps]:
    library = load_native(SOURCE, CFLAGS, ("-lmvec", "-lm"), build_dir)
    return None if library is None else CpuOps(library)


def _check_contiguous(**tensors: Optional[torch.Tensor]) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and not tensor.is_contiguous():
            raise ValueError(f"cpu ops: {name} must be contiguous")


class CpuOps:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._rms_norm = library.add_rms_norm_f32
        self._rms_norm.restype = None
        self._rms_norm.argtypes = [_ptr, _ptr, _ptr, _ptr, _i64, _i64, ctypes.c_float]
        self._silu_mul = library.silu_mul_f32
        self._silu_mul.restype = None
        self._silu_mul.argtypes = [_ptr, _i64, _i64, _ptr]
        self._rotary = library.rotary_store_kv_f32
        self._rotary.restype = None
        self._rotary.argtypes = [_ptr, _i64, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _i64,
                                 _ptr]

    @staticmethod
    def supports(x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32

    def add_rms_norm(self, x: torch.Tensor, delta: Optional[torch.Tensor],
                     weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (T, H) += delta (T, H) if given, in place; returns RMSNorm(x) (T, H)."""
        _check_contiguous(x=x, delta=delta, weight=weight)
        out = torch.empty_like(x)
        self._rms_norm(x.data_ptr(), 0 if delta is None else delta.data_ptr(),
                       weight.data_ptr(), out.data_ptr(), x.shape[0], x.shape[1], eps)
        return out

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """gate_up (T, 2I) -> silu(gate) * up (T, I), contiguous."""
        _check_contiguous(gate_up=gate_up)
        inter = gate_up.shape[1] // 2
        out = gate_up.new_empty((gate_up.shape[0], inter))
        self._silu_mul(gate_up.data_ptr(), gate_up.shape[0], inter, out.data_ptr())
        return out

    def rotary_store_kv(self, qkv: torch.Tensor, rope: RopeStep, num_heads: int,
                        num_kv_heads: int, kv: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """qkv (T, (Hq + 2 Hkv) D): q and k rotated in place by the step's cos, sin (T, D);
        k and v stored at slot_mapping (T,) of one layer's cache kv (2, blocks, block_size,
        Hkv, D)."""
        cos, sin = rope.cos_sin()
        _check_contiguous(qkv=qkv, cos=cos, sin=sin, kv=kv, slot_mapping=slot_mapping)
        head_dim = kv.shape[-1]
        num_slots = kv.shape[1] * kv.shape[2]
        self._rotary(qkv.data_ptr(), qkv.shape[1], cos.data_ptr(), sin.data_ptr(),
                     qkv.shape[0], num_heads, num_kv_heads, head_dim, kv.data_ptr(), num_slots,
                     slot_mapping.data_ptr())


def attach_fused_ops(model: nn.Module, ops: Any) -> nn.Module:
    """Hand the device's fused kernels (CpuOps here, TritonOps on CUDA: the same four
    methods) to every RMSNorm, attention and MLP module; each uses them for the tensors
    `ops.supports` and its torch ops otherwise, so the model code stays free of the choice."""
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention, GatedMLP)):
            module.fused_ops = ops
    return model
