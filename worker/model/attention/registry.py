"""Which attention backend runs a model: `attention_backend="auto" | "triton" | "torch"`.

- "torch": gather + scaled-dot-product attention in PyTorch (any device), with the C decode
  kernel on CPU float32 when it builds.
- "triton": the paged Triton kernels (CUDA; on CPU only under TRITON_INTERPRET=1, which
  the tests use).
- "auto": Triton on CUDA when triton imports, else torch.

Optional backends register themselves with `register_backend` when their package imports
(none is required).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable

import torch

from lmfleet.worker.model.attention.base import AttentionBackend

logger = logging.getLogger(__name__)

# name -> factory(num_kv_heads, device, cpu_decode_kernel) -> backend
BackendFactory = Callable[..., AttentionBackend]
_FACTORIES: dict[str, BackendFactory] = {}


def register_backend(name: str, factory: BackendFactory) -> None:
    _FACTORIES[name] = factory


def _torch_backend(num_kv_heads, device, cpu_decode_kernel):
    from lmfleet.worker.model.attention.torch_ref import TorchAttention

    return TorchAttention(cpu_decode_kernel)


def _triton_backend(num_kv_heads, device, cpu_decode_kernel):
    from lmfleet.worker.model.attention.triton_backend import TritonAttention

    return TritonAttention(num_kv_heads, device)


register_backend("torch", _torch_backend)
register_backend("triton", _triton_backend)


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend_name(requested: str, device: torch.device) -> str:
    """The backend "auto" means on `device`; a named one must be registered and usable."""
    if requested == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if requested not in _FACTORIES:
        raise ValueError(f"unknown attention backend {requested!r}; registered: "
                         f"{', '.join(sorted(_FACTORIES))}")
    if requested == "triton" and not triton_available():
        raise ValueError("attention_backend='triton' needs the triton package")
    if requested == "triton" and device.type != "cuda" \
            and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("attention_backend='triton' needs device='cuda' (on CPU it runs "
                         "only under TRITON_INTERPRET=1, slowly: use 'torch' there)")
    return requested


def make_backend(name: str, num_kv_heads: int, device: torch.device,
                 cpu_decode_kernel=None) -> AttentionBackend:
    return _FACTORIES[name](num_kv_heads, device, cpu_decode_kernel)
