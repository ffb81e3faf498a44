"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the kernels of
a decode step: a kernel may start while the kernel before it on the stream still runs.

At one decode row the step is some three hundred short kernels, and by default each starts
only after the one before has finished and the launch latency has passed: the GPU idles
between them. Launched with PDL, a kernel's programs are resident when the one before
lets them start, and each begins with `start_in_chain`: wait until the kernel before has
finished and its writes are visible, then let the next kernel start in turn. The W4A16
matmuls load their first step of weights before it: megabytes that no kernel writes, read
while the kernel before still runs.

The rule that keeps this exact: before `start_in_chain` a kernel reads only tensors no
kernel writes while the model runs (weights, zeros, scales) and writes nothing. A kernel
launched without PDL (torch's, cuBLAS's) waits for everything before it, as usual, and a
PDL kernel after it starts when it has finished.

The PDL instructions (griddepcontrol) exist only on the GPU, so PDL is a compile-time flag,
False under Triton's interpreter and on GPUs before Hopper. LMFLEET_PDL=0 turns it off,
for measuring what it gives.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

from lmfleet.worker.kernels.triton_rounding import INTERPRET


def pdl_enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL: a CUDA GPU of capability >= 9.0, not
    the interpreter, and LMFLEET_PDL not "0"."""
    if INTERPRET or device.type != "cuda" or os.environ.get("LMFLEET_PDL", "1") == "0":
        return False
    return _capability(device.index if device.index is not None else
                       torch.cuda.current_device()) >= (9, 0)


def pdl_options(device: torch.device) -> dict[str, bool]:
    """The launch keywords of a kernel that begins with start_in_chain: its PDL flag and
    Triton's launch_pdl, both pdl_enabled(device)."""
    enabled = pdl_enabled(device)
    return {"PDL": enabled, "launch_pdl": enabled}


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@triton.jit
def start_in_chain(PDL: tl.constexpr):
    """Under PDL: block until the kernel before this one has finished and its writes are
    visible, then let the next kernel on the stream start (it waits likewise). A no-op
    otherwise."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()
