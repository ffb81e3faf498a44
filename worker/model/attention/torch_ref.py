"""Reference attention over the paged KV cache in plain PyTorch (CPU and CUDA).

Per layer: scatter the step's K/V into the cache, gather each request's context blocks
into a padded (B, L, kv_heads, D) tensor, and run scaled-dot-product attention with a
mask; decodes and prefills are two batched groups, so there is no loop over requests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lmfleet.worker.model.attention.base import AttentionBackend, AttentionMetadata, KVCache


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache, slot_mapping: torch.Tensor):
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    kv_cache.key.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    kv_cache.value.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def gather_context(cache: torch.Tensor, block_tables: torch.Tensor, max_len: int) -> torch.Tensor:
    """cache (N, bs, Hkv, D), block_tables (B, nb) -> (B, Hkv, max_len, D)."""
    batch, num_table_blocks = block_tables.shape
    gathered = cache[block_tables]  # (B, nb, bs, Hkv, D)
    gathered = gathered.view(batch, num_table_blocks * cache.shape[1], *cache.shape[2:])
    return gathered[:, :max_len].transpose(1, 2)  # (B, Hkv, L, D)


class TorchAttention(AttentionBackend):
    name = "torch"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVCache,
                metadata: AttentionMetadata, scale: float) -> torch.Tensor:
        write_kv(k, v, kv_cache, metadata.slot_mapping)
        out = torch.empty_like(q)  # (T, Hq, D)
        num_decode = metadata.num_decode_tokens
        if num_decode:
            out[:num_decode] = self._decode(q[:num_decode], kv_cache, metadata, scale)
        if metadata.num_prefills:
            self._prefill(q[num_decode:], kv_cache, metadata, scale, out[num_decode:])
        return out

    @staticmethod
    def _decode(q: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata,
                scale: float) -> torch.Tensor:
        seq_lens = metadata.decode_seq_lens  # (Bd,)
        max_len = int(metadata.decode_block_tables.shape[1] * metadata.block_size)
        keys = gather_context(kv_cache.key, metadata.decode_block_tables, max_len)
        values = gather_context(kv_cache.value, metadata.decode_block_tables, max_len)
        positions = torch.arange(max_len, device=q.device)  # (L,)
        mask = positions[None, :] < seq_lens[:, None]  # (Bd, L)
        out = F.scaled_dot_product_attention(
            q[:, :, None, :],  # (Bd, Hq, 1, D)
            keys,
            values,
            attn_mask=mask[:, None, None, :],  # (Bd, 1, 1, L)
            scale=scale,
            enable_gqa=True,
        )  # (Bd, Hq, 1, D)
        return out[:, :, 0, :]

    @staticmethod
    def _prefill(q: torch.Tensor, kv_cache: KVCache, metadata: AttentionMetadata,
                 scale: float, out: torch.Tensor) -> None:
        max_len = metadata.prefill_max_seq_len
        keys = gather_context(kv_cache.key, metadata.prefill_block_tables, max_len)
        values = gather_context(kv_cache.value, metadata.prefill_block_tables, max_len)
        index = metadata.prefill_token_index  # (Bp, Q)
        query_mask = metadata.prefill_query_mask  # (Bp, Q)
        q_padded = q[index].transpose(1, 2)  # (Bp, Hq, Q, D)
        seq_lens = metadata.prefill_seq_lens  # (Bp,)
        query_lens = query_mask.sum(dim=1)  # (Bp,)
        # Absolute position of each query row: the new tokens are the last ones.
        query_pos = (seq_lens - query_lens)[:, None] + torch.arange(
            index.shape[1], device=q.device)[None, :]  # (Bp, Q)
        key_pos = torch.arange(max_len, device=q.device)  # (L,)
        mask = key_pos[None, None, :] <= query_pos[:, :, None]  # (Bp, Q, L)
        # Padding rows would see nothing (NaN from softmax); let them see key 0.
        mask = mask & query_mask[:, :, None] | (key_pos == 0)[None, None, :]
        attn = F.scaled_dot_product_attention(
            q_padded, keys, values, attn_mask=mask[:, None], scale=scale, enable_gqa=True
        )  # (Bp, Hq, Q, D)
        attn = attn.transpose(1, 2)  # (Bp, Q, Hq, D)
        out[index[query_mask]] = attn[query_mask]
