"""Attention over the paged KV cache with Triton kernels (the CUDA default).

Decode rows run the split-K paged decode kernel, which reads each request's blocks in
place through its block table (no gathered copy of the history); prefill chunks and
prefix-cache hits run the varlen paged prefill kernel over the same cache. Both read the
runner's int32 device buffers directly, so a step's metadata is a handful of views and
two small index ops, and a captured CUDA graph only needs those buffers refilled.

Block size 64 by default: a block's tokens of one KV head form one tile of the kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lmfleet.worker.model.attention.base import (
    AttentionBackend,
    CommonAttentionMetadata,
    KVCache,
)
from lmfleet.worker.model.attention.torch_ref import write_kv


def _kernels():
    # Imported on first use: triton is only needed where this backend runs.
    from lmfleet.worker.kernels import triton_paged_attention

    return triton_paged_attention


@dataclass
class TritonAttentionMetadata:
    slot_mapping: torch.Tensor  # (T,) int32, -1: padding row (nothing stored)
    num_decodes: int
    decode_block_tables: torch.Tensor  # (Bd, W) int32
    decode_seq_lens: torch.Tensor  # (Bd,) int32, 0: padding row
    num_splits: int  # split-K partitions of the decode kernel (static under a graph)
    num_prefills: int
    prefill_block_tables: torch.Tensor  # (Bp, W) int32
    prefill_seq_lens: torch.Tensor  # (Bp,) int32
    prefill_query_start_loc: torch.Tensor  # (Bp + 1,) int32, offsets into the prefill rows
    prefill_max_query_len: int


class TritonAttention(AttentionBackend):
    name = "triton"
    default_block_size = 64

    def __init__(self, num_kv_heads: int, device: torch.device) -> None:
        self.num_kv_heads = num_kv_heads
        self.num_sms = torch.cuda.get_device_properties(device).multi_processor_count \
            if device.type == "cuda" else 132

    @staticmethod
    def supports_dtype(device: torch.device, dtype: torch.dtype) -> bool:
        return dtype in (torch.float32, torch.float16, torch.bfloat16)

    @property
    def supports_cuda_graphs(self) -> bool:
        return True

    def _num_splits(self, batch_size: int, max_seq_len: int) -> int:
        return _kernels().choose_num_splits(batch_size, max_seq_len, self.num_kv_heads,
                                            self.num_sms)

    def build_metadata(self, common: CommonAttentionMetadata) -> TritonAttentionMetadata:
        num_decodes = common.num_decodes
        decode_max_len = int(common.seq_lens_host[:num_decodes].max(initial=0))
        start = common.query_start_loc[num_decodes:]  # (Bp + 1,)
        return TritonAttentionMetadata(
            slot_mapping=common.slot_mapping,
            num_decodes=num_decodes,
            decode_block_tables=common.block_tables[:num_decodes],
            decode_seq_lens=common.seq_lens[:num_decodes],
            num_splits=self._num_splits(num_decodes, decode_max_len),
            num_prefills=common.num_prefills,
            prefill_block_tables=common.block_tables[num_decodes:],
            prefill_seq_lens=common.seq_lens[num_decodes:],
            # Decodes come first with one token each, so prefill rows start at num_decodes.
            prefill_query_start_loc=start - num_decodes,
            prefill_max_query_len=int(common.query_lens[num_decodes:].max(initial=1)),
        )

    def graph_metadata(self, common: CommonAttentionMetadata,
                       max_seq_len: int) -> TritonAttentionMetadata:
        metadata = self.build_metadata(common)
        # The split count is fixed at capture, for the longest context the graph may see;
        # splits that get no tokens at a shorter one cost a few idle programs.
        metadata.num_splits = self._num_splits(common.num_decodes, max_seq_len)
        return metadata

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: TritonAttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        kernels = _kernels()
        if not kv_written:
            _store_kv(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)  # (T, Hq, D)
        num_decodes = metadata.num_decodes
        if num_decodes:
            kernels.paged_decode_attention(
                q[:num_decodes], kv_cache.stacked, metadata.decode_block_tables,
                metadata.decode_seq_lens, scale, out[:num_decodes],
                num_splits=metadata.num_splits)
        if metadata.num_prefills:
            kernels.paged_prefill_attention(
                q[num_decodes:], kv_cache.stacked, metadata.prefill_block_tables,
                metadata.prefill_query_start_loc, metadata.prefill_seq_lens,
                metadata.prefill_max_query_len, scale, out[num_decodes:])
        return out


def _store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
              slot_mapping: torch.Tensor) -> None:
    """k, v (T, Hkv, D) into the cache at their slots (the torch backend's store). Only for
    steps without padding rows: graph buckets pad, and there the fused rotary kernel (which
    skips slot -1) stores."""
    write_kv(k, v, kv_cache, slot_mapping.long())
