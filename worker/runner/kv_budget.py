"""How large one KV block is on this rank, and how many blocks the memory budget holds.

A rank's cache is (layers of its stage, 2, blocks, block_size, its KV heads, row width):
the row is head_dim values of the model dtype, or head_dim codes + their scale (and zero)
bytes for an encoded cache (kv/kv_codecs.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lmfleet.worker.config import CacheConfig
from lmfleet.worker.kv.kv_codecs import CODECS, storage_dtype
from lmfleet.worker.kv.manager import blocks_for_tokens

# CPU default for the KV budget when none is given: a share of available memory, capped,
# because the cache is zero-filled (and so committed) at start-up.
CPU_KV_MEMORY_FRACTION = 0.2
CPU_KV_MEMORY_CAP = 2 << 30
CUDA_KV_MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class KVLayout:
    num_layers: int  # this stage's
    num_kv_heads: int  # this rank's
    head_dim: int
    model_dtype: torch.dtype
    codec: Optional[str]  # "int8" | "fp8" | None (plain values)

    @property
    def dtype(self) -> torch.dtype:
        """The cache tensor's dtype."""
        return storage_dtype(self.codec) if self.codec else self.model_dtype

    @property
    def width(self) -> int:
        """Elements per (token, KV head) row."""
        if self.codec is None:
            return self.head_dim
        return CODECS[self.codec].encoded_width(self.head_dim)

    def block_bytes(self, block_size: int) -> int:
        return (block_size * 2 * self.num_layers * self.num_kv_heads * self.width
                * self.dtype.itemsize)


def available_cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


def local_num_kv_blocks(cache: CacheConfig, device: torch.device, block_bytes: int,
                        block_size: int, max_num_seqs: int, max_model_len: int) -> int:
    """The blocks this rank's budget holds: an explicit count, else an explicit byte budget,
    else a share of memory (CUDA: of the device's total, minus what is already in use, as
    vLLM's gpu_memory_utilization; CPU: of the memory available, capped)."""
    if cache.num_kv_blocks is not None:
        return cache.num_kv_blocks
    if cache.kv_cache_memory_bytes is not None:
        budget = cache.kv_cache_memory_bytes
    elif device.type == "cuda":
        fraction = cache.kv_cache_memory_fraction or CUDA_KV_MEMORY_FRACTION
        free, total = torch.cuda.mem_get_info(device)
        budget = int(fraction * total) - (total - free)
    else:
        fraction = cache.kv_cache_memory_fraction or CPU_KV_MEMORY_FRACTION
        budget = min(int(fraction * available_cpu_memory()), CPU_KV_MEMORY_CAP)
    num_blocks = budget // block_bytes
    # More blocks than every sequence at full length could use is wasted memory.
    most_useful = max_num_seqs * blocks_for_tokens(max_model_len, block_size)
    num_blocks = min(num_blocks, most_useful)
    if num_blocks < 1:
        raise ValueError(f"KV cache budget of {budget} bytes holds no {block_size}-token"
                         " block; raise the memory budget or set num_kv_blocks")
    return num_blocks
