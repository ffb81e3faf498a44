"""The attention backend interface, and the per-step metadata every backend is built from.

A step's tokens are flattened into one sequence of T tokens, decodes first (one token
each), then prefill chunks. The runner describes the step once, backend-neutrally, as
`CommonAttentionMetadata` (query start locations, sequence lengths, block tables, slot
mapping; on CUDA these are views of its persistent device buffers); each backend's
`build_metadata` turns that into the metadata its kernels read, once per step.

A backend owns:
- the KV cache layout and dtypes it accepts (`kv_cache_shape`, `supports_dtype`), and its
  preferred block size;
- its metadata builder;
- its CUDA-graph hooks: `graph_metadata` builds the metadata of a captured decode batch from
  static buffers, so a replay only needs the runner to refill those buffers.

Contract of `AttentionBackend.forward(q, k, v, kv_cache, metadata, scale, kv_written)`:
- q (T, num_heads, head_dim); k, v (T, num_kv_heads, head_dim), rotary already applied.
- It first writes k, v into `kv_cache` at the slot mapping, unless `kv_written` says the
  caller's fused kernel already did, then returns the attention output (T, num_heads,
  head_dim): each query attends causally to its own request's tokens [0, position] (the
  cached context plus this step's tokens before it). Rows with slot -1 are padding (CUDA
  graph buckets): nothing is written for them and their output is unspecified.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch


@dataclass
class KVCache:
    """One layer's paged cache: key and value (num_blocks, block_size, kv_heads, D), views
    of `stacked` (2, num_blocks, block_size, kv_heads, D) so both move in one op."""

    stacked: torch.Tensor
    layer_index: int

    @property
    def key(self) -> torch.Tensor:
        return self.stacked[0]

    @property
    def value(self) -> torch.Tensor:
        return self.stacked[1]


def kv_cache_shape(num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                   head_dim: int) -> tuple[int, ...]:
    """The one definition of the device KV storage: (L, 2, blocks, block_size, Hkv, D).
    Every layer's K and V sit together so a swap moves a block of all layers in one op,
    and a layer's slice is the `KVCache.stacked` its kernels read."""
    return (num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim)


@dataclass
class CommonAttentionMetadata:
    """One step, described once for every backend. Requests are rows, decodes first.

    Host arrays are numpy; device tensors are int32 (on CUDA: views of the runner's
    persistent buffers, so CUDA graphs can replay over them)."""

    num_decodes: int  # the first num_decodes rows have exactly one new token
    num_prefills: int  # the remaining rows (one or more new tokens, maybe cached history)
    num_tokens: int
    block_size: int
    max_query_len: int
    max_seq_len: int
    query_lens: np.ndarray  # (B,) new tokens of each row
    seq_lens_host: np.ndarray  # (B,) context length after this step
    block_tables_host: np.ndarray  # (B, W) block ids, 0 past each row's blocks
    slot_mapping: torch.Tensor  # (T,) flat cache slot of each token, -1: padding
    query_start_loc: torch.Tensor  # (B + 1,) offsets of each row's tokens
    seq_lens: torch.Tensor  # (B,)
    block_tables: torch.Tensor  # (B, W)
    # A backend-specific extra the runner prepared (the torch backend's dense decode copy).
    extra: Optional[Any] = None

    @property
    def num_reqs(self) -> int:
        return self.num_decodes + self.num_prefills


class AttentionBackend(abc.ABC):
    name: str = "abstract"
    # Tokens per KV block when the user sets none.
    default_block_size: int = 16

    @staticmethod
    def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
        """Whether this backend's kernels run with a KV cache of `dtype` on `device`."""
        return True

    @abc.abstractmethod
    def build_metadata(self, common: CommonAttentionMetadata) -> Any:
        """This backend's metadata for one step, read by every layer."""

    def graph_metadata(self, common: CommonAttentionMetadata, max_seq_len: int) -> Any:
        """Metadata for a captured decode batch over static buffers: it must stay valid
        for any contents of those buffers (any lengths up to `max_seq_len`)."""
        raise NotImplementedError(f"the {self.name} backend does not support CUDA graphs")

    @property
    def supports_cuda_graphs(self) -> bool:
        return False

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: Any, scale: float, kv_written: bool = False) -> torch.Tensor:
        """See the module docstring."""
