"""The attention backend registry: what "auto" means per device, clear errors for names
and devices a backend cannot serve, and optional backends registering themselves."""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.model.attention import registry
from lmfleet.worker.model.attention.torch_ref import TorchAttention


def test_auto_is_torch_on_cpu_and_triton_on_cuda():
    assert registry.resolve_backend_name("auto", torch.device("cpu")) == "torch"
    expected = "triton" if registry.triton_available() else "torch"
    assert registry.resolve_backend_name("auto", torch.device("cuda")) == expected


def test_unknown_backend_names_the_registered_ones():
    with pytest.raises(ValueError, match="registered: .*torch.*triton"):
        registry.resolve_backend_name("flash", torch.device("cpu"))


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        registry.resolve_backend_name("triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.resolve_backend_name("triton", torch.device("cpu")) == "triton"


def test_an_optional_backend_registers_and_is_built_by_name(monkeypatch):
    monkeypatch.setattr(registry, "_FACTORIES", dict(registry._FACTORIES))
    built = []

    def factory(num_kv_heads, device, cpu_decode_kernel):
        built.append((num_kv_heads, device.type))
        return TorchAttention()

    registry.register_backend("mine", factory)
    assert registry.resolve_backend_name("mine", torch.device("cpu")) == "mine"
    backend = registry.make_backend("mine", 2, torch.device("cpu"))
    assert isinstance(backend, TorchAttention) and built == [(2, "cpu")]
