"""Programmatic dependent launch (worker/kernels/triton_pdl.py) on the GPU: a W4A16 matmul
that starts while the kernel before it still runs reads that kernel's output, not what the
buffer held before, in a CUDA graph replayed on fresh inputs and eagerly.

Run on the device machine; skipped where CUDA is absent or older than Hopper.
"""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.kernels.triton_pdl import pdl_enabled
from lmfleet.worker.kernels.triton_rms_norm import add_rms_norm
from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch, w4a16_matmul
from tests.unit.w4_tensors import gpu_tensors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available()
                       or torch.cuda.get_device_capability() < (9, 0),
                       reason="needs a CUDA GPU of capability >= 9.0"),
]

K, N, GROUP = 4096, 2048, 128
ROWS_BEFORE = 4096  # the norm's programs: the last of them ends well after the first start
LAUNCHES = [
    W4A16Launch("gemv", 128, GROUP, 4, num_stages=1, programs_per_sm=8),
    W4A16Launch("gemv", 64, 2 * GROUP, 4, num_stages=2, programs_per_sm=4),
    W4A16Launch("stack", 64, GROUP, 4, num_stages=1, programs_per_sm=4, stack=2,
                prefetch=True),
    W4A16Launch("stack", 64, GROUP, 4, num_stages=3, programs_per_sm=4, stack=4),
    W4A16Launch("mma", 64, GROUP, 4, num_stages=3, programs_per_sm=4, permute_x=True),
    W4A16Launch("dot", 64, 64, 2),
]


def _step(hidden: torch.Tensor, weight: torch.Tensor, tensors, launch: W4A16Launch):
    """The norm of every row (ROWS_BEFORE programs), then the matmul of its last row."""
    normed = add_rms_norm(hidden, None, weight, 1e-5)  # (R, K)
    return w4a16_matmul(normed[-1:], *tensors, GROUP, launch=launch)  # (1, N)


@pytest.mark.parametrize("launch", LAUNCHES, ids=lambda launch: launch.path)
def test_a_pdl_matmul_reads_the_norm_it_follows(launch, monkeypatch):
    device = torch.device("cuda")
    assert pdl_enabled(device)  # else this test compares the plain launch with itself
    _, *tensors = gpu_tensors(N, K, GROUP, torch.bfloat16, 5)
    weight = torch.rand(K, device=device, dtype=torch.bfloat16) + 0.5
    generator = torch.Generator(device=device).manual_seed(0)
    inputs = [torch.randn(ROWS_BEFORE, K, device=device, dtype=torch.bfloat16,
                          generator=generator) for _ in range(4)]
    monkeypatch.setenv("LMFLEET_PDL", "0")
    expected = [_step(hidden.clone(), weight, tensors, launch) for hidden in inputs]
    monkeypatch.delenv("LMFLEET_PDL")
    static = inputs[0].clone()
    _step(static, weight, tensors, launch)  # compiles the PDL kernels outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = _step(static, weight, tensors, launch)
    for hidden, want in zip(inputs, expected, strict=True):
        static.copy_(hidden)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, want)
    # eagerly, one step right after another on the stream
    eager = [_step(hidden.clone(), weight, tensors, launch) for hidden in inputs]
    assert all(torch.equal(got, want) for got, want in zip(eager, expected, strict=True))
    # the inputs differ, so a matmul reading a stale row would not match
    assert not torch.equal(expected[0], expected[1])
