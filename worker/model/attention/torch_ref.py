"""Reference attention over the paged KV cache in plain PyTorch (CPU and CUDA).

Per layer: scatter the step's K/V into the cache, gather each request's context blocks
into a padded (B, L, kv_heads, D) tensor, and run scaled-dot-product attention with a
mask; decodes and prefills are two batched groups, so there is no loop over requests.
Decode rows take one of two shortcuts when set up: the dense copy of their contexts
(dense_decode.py) or, on CPU float32, the C kernel reading the paged cache in place
(cpu_kernel.py).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from lmfleet.worker.model.attention.base import AttentionBackend, AttentionMetadata, KVCache
from lmfleet.worker.model.attention.cpu_kernel import PagedDecodeKernel
from lmfleet.worker.model.attention.dense_decode import DenseDecodeStep


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor):
    """Store the step's k, v (T, Hkv, D) at their slots, both in one indexed copy."""
    two, num_blocks, block_size, num_kv_heads, head_dim = kv_cache.stacked.shape
    slots = kv_cache.stacked.view(two, num_blocks * block_size, num_kv_heads, head_dim)
    slots.index_copy_(1, slot_mapping, torch.stack((k, v)))  # (2, T, Hkv, D)


def gather_context(kv_cache: KVCache, block_tables: torch.Tensor, max_len: int):
    """block_tables (B, nb) -> keys, values (B, Hkv, max_len, D), gathered in one op."""
    batch, num_table_blocks = block_tables.shape
    stacked = kv_cache.stacked
    gathered = stacked[:, block_tables]  # (2, B, nb, bs, Hkv, D)
    gathered = gathered.view(2, batch, num_table_blocks * stacked.shape[2], *stacked.shape[3:])
    gathered = gathered[:, :, :max_len].transpose(2, 3)  # (2, B, Hkv, L, D)
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

    def __init__(self, cpu_decode_kernel: Optional[PagedDecodeKernel] = None) -> None:
        self.cpu_decode_kernel = cpu_decode_kernel

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
            keys, values = gather_context(kv_cache, metadata.decode_block_tables, max_len)
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
                                          metadata.prefill_max_seq_len)
            index = metadata.prefill_token_index  # (Bp, Q)
            query_mask = metadata.prefill_query_mask  # (Bp, Q)
            q_padded = q[num_decode:][index].transpose(1, 2)  # (Bp, Hq, Q, D)
            attn = F.scaled_dot_product_attention(
                q_padded, keys, values, attn_mask=metadata.prefill_mask, scale=scale,
                enable_gqa=True,
            ).transpose(1, 2)  # (Bp, Q, Hq, D)
            out[num_decode:][index[query_mask]] = attn[query_mask]
        return out
