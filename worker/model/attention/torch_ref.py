"""Reference attention over the paged KV cache in plain PyTorch (CPU and CUDA).

Per layer: scatter the step's K/V into the cache, gather each request's context blocks
into a padded (B, L, kv_heads, D) tensor, and run scaled-dot-product attention with a
mask; decodes and prefills are two batched groups, so there is no loop over requests.
Decode rows take one of two shortcuts when set up: the dense copy of their contexts
(dense_decode.py) or, on CPU float32, the C kernel reading the paged cache in place
(cpu_kernel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from lmfleet.worker.kv.kv_codecs import codec_of
from lmfleet.worker.model.attention.base import (
    AttentionBackend,
    CommonAttentionMetadata,
    KVCache,
)
from lmfleet.worker.model.attention.cpu_kernel import PagedDecodeKernel
from lmfleet.worker.model.attention.dense_decode import DenseDecodeStep


@dataclass
class AttentionMetadata:
    """The torch backend's metadata, built once per step; shared by every layer."""

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


def _trimmed(tables: np.ndarray, seq_lens: np.ndarray, block_size: int) -> np.ndarray:
    """(B, W) block tables cut to the widest row's blocks, as int64; (B, 1) when empty."""
    width = max(-(-int(seq_lens.max(initial=0)) // block_size), 1)
    out = np.zeros((len(tables), width), dtype=np.int64)
    out[:, :min(width, tables.shape[1])] = tables[:, :width]
    return out


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor):
    """Store the step's k, v (T, Hkv, D) at their slots, both in one indexed copy (encoded
    first in an int8 or fp8 cache)."""
    two, num_blocks, block_size, num_kv_heads, width = kv_cache.stacked.shape
    slots = kv_cache.stacked.view(two, num_blocks * block_size, num_kv_heads, width)
    values = torch.stack((k, v))  # (2, T, Hkv, D)
    codec = codec_of(kv_cache.stacked)
    if codec is not None:
        values = codec.encode(values)  # (2, T, Hkv, W)
        # Rows without a slot (-1: CUDA-graph padding) go to the encoded cache's spare last
        # block, which the block allocator never hands out (model_runner).
        slot_mapping = torch.where(slot_mapping < 0, slots.shape[1] - 1, slot_mapping)  # (T,)
    slots.index_copy_(1, slot_mapping, values)


def gather_context(kv_cache: KVCache, block_tables: torch.Tensor, max_len: int,
                   dtype: torch.dtype):
    """block_tables (B, nb) -> keys, values (B, Hkv, max_len, D) in dtype, gathered in one
    op (and decoded, from an int8 or fp8 cache)."""
    batch, num_table_blocks = block_tables.shape
    stacked = kv_cache.stacked
    gathered = stacked[:, block_tables]  # (2, B, nb, bs, Hkv, W)
    gathered = gathered.view(2, batch, num_table_blocks * stacked.shape[2], *stacked.shape[3:])
    gathered = gathered[:, :, :max_len]  # (2, B, L, Hkv, W)
    codec = codec_of(stacked)
    if codec is not None:
        gathered = codec.decode(gathered, dtype)  # (2, B, L, Hkv, D)
    gathered = gathered.transpose(2, 3)  # (2, B, Hkv, L, D)
    return gathered[0], gathered[1]


def build_decode_mask(seq_lens: torch.Tensor, max_len: int) -> torch.Tensor:
    """seq_lens (Bd,) -> (Bd, 1, 1, L): key j visible iff j < seq_len."""
    positions = torch.arange(max_len, device=seq_lens.device)  # (L,)
    return (positions[None, :] < seq_lens[:, None])[:, None, None, :]


def build_prefill_mask(seq_lens: torch.Tensor, query_mask: torch.Tensor,
                       max_len: int) -> torch.Tensor:
    """(Bp,) context lengths and (Bp, Q) real-query mask -> (Bp, 1, Q, L) causal mask."""
    query_lens = query_mask.sum(dim=1)  # (Bp,)
    # Absolute position of each query row: the new tokens are the last ones.
    query_pos = (seq_lens - query_lens)[:, None] + torch.arange(
        query_mask.shape[1], device=seq_lens.device)[None, :]  # (Bp, Q)
    key_pos = torch.arange(max_len, device=seq_lens.device)  # (L,)
    mask = key_pos[None, None, :] <= query_pos[:, :, None]  # (Bp, Q, L)
    # Padding rows would see nothing (NaN from softmax); let them see key 0.
    mask = mask & query_mask[:, :, None] | (key_pos == 0)[None, None, :]
    return mask[:, None]


def dense_decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                           step: DenseDecodeStep, layer: int, scale: float) -> torch.Tensor:
    """Decode rows q (Bd, Hq, D), k, v (Bd, Hkv, D) over the dense cache -> (Bd, Hq, D)."""
    num_rows, num_heads, head_dim = q.shape
    storage = step.storage[layer, :, :num_rows]  # (2, Bd, Hkv, capacity, D): slots in use
    # Indices on dims 1 and 3 with a slice between: the indexed view is (Bd, 2, Hkv, D).
    storage[:, step.slots, :, step.positions] = torch.stack((k, v), dim=1)
    num_kv_heads = storage.shape[2]
    grouped = q.reshape(num_rows, num_kv_heads, -1, head_dim)  # (Bd, Hkv, Hq / Hkv, D)
    if step.rows_are_slots:
        slot_q = grouped
    else:
        slot_q = torch.empty_like(grouped)  # (Bd, Hkv, Hq / Hkv, D) in slot order
        slot_q[step.slots] = grouped
    attn = F.scaled_dot_product_attention(
        slot_q, storage[0, :, :, :step.length], storage[1, :, :, :step.length],
        attn_mask=step.mask, scale=scale,
    )  # (Bd, Hkv, Hq / Hkv, D) in slot order
    if not step.rows_are_slots:
        attn = attn[step.slots]
    return attn.reshape(num_rows, num_heads, head_dim)


class TorchAttention(AttentionBackend):
    """With a `cpu_decode_kernel`, float32 CPU decode rows attend through it, reading the
    paged cache in place; else through the dense copy or by gathering."""

    name = "torch"
    default_block_size = 16

    def __init__(self, cpu_decode_kernel: Optional[PagedDecodeKernel] = None) -> None:
        self.cpu_decode_kernel = cpu_decode_kernel

    def build_metadata(self, common: CommonAttentionMetadata) -> AttentionMetadata:
        device = common.slot_mapping.device
        to_device = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)  # noqa: E731
        num_decodes = common.num_decodes
        dense_decode: Optional[DenseDecodeStep] = common.extra
        # Decode block tables serve the gather path and the CPU kernel, the decode mask only
        # the gather path; with the dense copy both stay empty.
        num_gathered = num_decodes if dense_decode is None else 0
        decode_lens = common.seq_lens_host[:num_gathered].astype(np.int64)
        decode_tables = _trimmed(common.block_tables_host[:num_gathered], decode_lens,
                                 common.block_size)
        prefill_lens = common.seq_lens_host[num_decodes:].astype(np.int64)
        prefill_tables = _trimmed(common.block_tables_host[num_decodes:], prefill_lens,
                                  common.block_size)
        query_lens = [int(n) for n in common.query_lens[num_decodes:]]
        max_query = max(query_lens, default=1)
        token_index = np.zeros((len(query_lens), max_query), dtype=np.int64)
        query_mask = np.zeros((len(query_lens), max_query), dtype=bool)
        offset = 0
        for i, query_len in enumerate(query_lens):
            token_index[i, :query_len] = np.arange(offset, offset + query_len)
            query_mask[i, :query_len] = True
            offset += query_len
        decode_seq_lens = to_device(decode_lens)
        decode_block_tables = to_device(decode_tables)
        masked_lens = decode_seq_lens[:0] if self.cpu_decode_kernel else decode_seq_lens
        prefill_seq_lens = to_device(prefill_lens)
        prefill_query_mask = to_device(query_mask)
        max_prefill_len = int(prefill_lens.max(initial=0))
        return AttentionMetadata(
            slot_mapping=common.slot_mapping.long(),
            block_size=common.block_size,
            num_decode_tokens=num_decodes,
            decode_block_tables=decode_block_tables,
            decode_seq_lens=decode_seq_lens,
            decode_mask=build_decode_mask(masked_lens,
                                          decode_block_tables.shape[1] * common.block_size),
            prefill_query_lens=query_lens,
            prefill_block_tables=to_device(prefill_tables),
            prefill_seq_lens=prefill_seq_lens,
            prefill_max_query_len=max_query,
            prefill_max_seq_len=max_prefill_len,
            prefill_token_index=to_device(token_index),
            prefill_query_mask=prefill_query_mask,
            prefill_mask=build_prefill_mask(prefill_seq_lens, prefill_query_mask,
                                            max_prefill_len),
            dense_decode=dense_decode,
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float,
                kv_written: bool = False) -> torch.Tensor:
        if not kv_written:
            write_kv(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)  # (T, Hq, D)
        num_decode = metadata.num_decode_tokens
        if num_decode and metadata.dense_decode is not None:
            out[:num_decode] = dense_decode_attention(
                q[:num_decode], k[:num_decode], v[:num_decode], metadata.dense_decode,
                kv_cache.layer_index, scale)
        elif num_decode and self.cpu_decode_kernel is not None \
                and self.cpu_decode_kernel.supports(q):
            self.cpu_decode_kernel(q[:num_decode], kv_cache.stacked, metadata.decode_block_tables,
                                   metadata.decode_seq_lens, out[:num_decode], scale)
        elif num_decode:
            max_len = metadata.decode_mask.shape[-1]
            keys, values = gather_context(kv_cache, metadata.decode_block_tables, max_len,
                                          q.dtype)
            num_kv_heads = keys.shape[1]
            # The query heads sharing a KV head become that head's query rows, so attention
            # runs on the KV heads as they are, without expanding them to Hq heads.
            grouped_q = q[:num_decode].reshape(num_decode, num_kv_heads, -1, q.shape[-1])
            attn = F.scaled_dot_product_attention(
                grouped_q,  # (Bd, Hkv, Hq / Hkv, D)
                keys, values, attn_mask=metadata.decode_mask, scale=scale,
            )  # (Bd, Hkv, Hq / Hkv, D)
            out[:num_decode] = attn.reshape(num_decode, -1, q.shape[-1])
        if metadata.num_prefills:
            keys, values = gather_context(kv_cache, metadata.prefill_block_tables,
                                          metadata.prefill_max_seq_len, q.dtype)
            index = metadata.prefill_token_index  # (Bp, Q)
            query_mask = metadata.prefill_query_mask  # (Bp, Q)
            q_padded = q[num_decode:][index].transpose(1, 2)  # (Bp, Hq, Q, D)
            attn = F.scaled_dot_product_attention(
                q_padded, keys, values, attn_mask=metadata.prefill_mask, scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)  # (Bp, Q, Hq, D)
            out[num_decode:][index[query_mask]] = attn[query_mask]
        return out
