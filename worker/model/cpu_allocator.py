"""glibc malloc settings for CPU inference: keep freed memory in the process.

By default glibc serves each allocation above a (dynamic) threshold with its own mmap and
returns it to the kernel on free, and trims the heap top when it frees a lot. A forward
pass allocates and frees the same large temporaries (activations of a 900-token prefill
are 1-11 MB each) layer after layer, so every one of them page-faults in fresh memory.
On the 2-core CI machine that made the first step of `benchmarks/offline_throughput.py`
(64 prompts) take 1.4 s instead of 0.9 s. Serving allocators (PyTorch's CUDA caching
allocator, jemalloc / tcmalloc as Intel recommends for CPU inference) keep memory for
reuse; this does the same with glibc's own knobs.

It is process-wide: it changes how the whole process allocates (anything running beside
the engine gets the same, faster, behaviour) and keeps up to `TRIM_THRESHOLD` of freed
heap memory mapped. It is applied once, by the CPU model runner, and does nothing where
glibc's mallopt is not available.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

# mallopt parameter numbers from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Allocations up to this size come from the heap (glibc's largest allowed value on 64-bit).
MMAP_THRESHOLD = 32 << 20
# Freed memory at the heap top is returned to the kernel only beyond this much.
TRIM_THRESHOLD = 1 << 30


def keep_freed_memory() -> bool:
    """Apply the settings above; returns whether glibc accepted them."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    accepted = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not accepted:
        logger.debug("glibc mallopt refused the CPU allocator settings")
    return accepted
