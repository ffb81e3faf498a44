"""The attention backend interface and the per-step metadata every backend reads.

A step's tokens are flattened into one sequence of T tokens, decodes first, then
prefill chunks. `AttentionMetadata` says where each token's K/V goes in the paged cache
(`slot_mapping`) and, per request, which blocks hold its context.

Contract of `AttentionBackend.forward(q, k, v, kv_cache, metadata)`:
- q (T, num_heads, head_dim); k, v (T, num_kv_heads, head_dim), rotary already applied.
- It first writes k, v into `kv_cache` at `slot_mapping`, unless `kv_written` says the
  caller already did (and, with `dense_decode`, the decode rows' k, v into the dense cache
  too, in either case), then returns the attention
  output (T, num_heads, head_dim): each query attends causally to its own request's
  tokens [0, position] (the cached context plus this step's tokens before it).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Optional

import torch

from lmfleet.worker.model.attention.dense_decode import DenseDecodeStep


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


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner; shared by every layer."""

    slot_mapping: torch.Tensor  # (T,) int64 flat slot of each token in the cache
    block_size: int
    # Decode part: the first num_decode_tokens tokens, one per request. The three decode
    # tensors serve the gather path (tables and lengths also the CPU kernel, which needs no
    # mask, so the mask is empty then); all are empty when `dense_decode` is set.
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # (Bd, max_blocks) int64, padded with 0
    decode_seq_lens: torch.Tensor  # (Bd,) int64 context length including the new token
    # (Bd, 1, 1, L) key positions each decode may see (built once per step, not per layer).
    decode_mask: torch.Tensor
    # Prefill part: requests with one or more new tokens whose context may be cached.
    prefill_query_lens: list[int]  # new tokens per prefill request
    prefill_block_tables: torch.Tensor  # (Bp, max_blocks) int64, padded with 0
    prefill_seq_lens: torch.Tensor  # (Bp,) int64 total context after this step
    prefill_max_query_len: int
    prefill_max_seq_len: int
    # (Bp, max_query_len) index into the flat tokens of each prefill query (padding -> 0)
    # and the mask of real entries; built once so layers gather without Python loops.
    prefill_token_index: torch.Tensor
    prefill_query_mask: torch.Tensor  # (Bp, max_query_len) bool
    # (Bp, 1, max_query_len, max_seq_len) causal mask with each request's offset.
    prefill_mask: torch.Tensor
    # The decode rows' contexts held contiguously (dense_decode.py); None: gather them.
    dense_decode: Optional[DenseDecodeStep] = None

    @property
    def num_prefills(self) -> int:
        return len(self.prefill_query_lens)


class AttentionBackend(abc.ABC):
    name: str = "abstract"

    @abc.abstractmethod
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        """See the module docstring."""
