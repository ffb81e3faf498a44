"""Programmatic dependent launch (PDL, compute capability 9.0 and later) for the W4A16
kernels: a kernel may start while the kernel before it on the stream is still running.

At one decode row a W4A16 matmul reads megabytes of packed weights that no earlier kernel
writes, yet by default it starts only after the norm, SiLU or attention kernel before it
has finished and the launch latency has passed: the GPU's memory sits idle meanwhile.
Launched with PDL, the matmul's programs start as soon as the kernel before it lets them
(`let_next_start`, which the norm, SiLU and decode-attention kernels call first thing),
load their first step of weights, and only then wait (`wait_for_inputs`) until the kernel
before has finished and its writes are visible, before they read x or write anything.

The rule that keeps this exact: before `wait_for_inputs` a kernel reads only tensors no
kernel writes while the model runs (weights, zeros, scales) and writes nothing. The kernels
that follow a PDL kernel are launched as usual and wait for all of it.

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


@functools.cache
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@triton.jit
def wait_for_inputs(PDL: tl.constexpr):
    """Under PDL, block until the kernel before this one has finished and its writes are
    visible; a no-op otherwise."""
    if PDL:
        gdc_wait()


@triton.jit
def let_next_start(PDL: tl.constexpr):
    """Under PDL, let the next kernel on the stream start (it waits for this one's results
    in its own wait_for_inputs); a no-op otherwise."""
    if PDL:
        gdc_launch_dependents()
