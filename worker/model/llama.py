"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over flattened tokens.

The model sees one flat batch of T tokens from many requests (`input_ids`, `positions`)
and leaves everything about requests to the attention backend's metadata. It names the
parallel layer each projection is (parallel_linear.py) and nothing else about ranks: under
tensor parallelism each rank builds its heads (num_heads / tp) and its MLP slice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lmfleet.worker.model.arch import ArchConfig
from lmfleet.worker.model.attention.base import AttentionBackend, KVCache
from lmfleet.worker.model.layers import (
    GatedMLP,
    RMSNorm,
    RopeStep,
    RotaryEmbedding,
    apply_rotary,
)
from lmfleet.worker.model.parallel_linear import (
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        # q, k and v fused into one matmul, split by heads across ranks; its loader fills
        # the three slices.
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads,
                                          arch.num_kv_heads, bias=arch.qkv_bias)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * arch.head_dim
        self.kv_size = self.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                        bias=arch.o_bias, what="num_attention_heads * head_dim")
        self.fused_ops = None  # the device's fused kernels, set by attach_fused_ops

    def forward(self, x: torch.Tensor, rope: RopeStep, kv_cache: KVCache, metadata: Any,
                backend: AttentionBackend) -> torch.Tensor:  # x (T, H)
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q_size + 2 kv_size)
        fused = self.fused_ops is not None and self.fused_ops.supports(qkv)
        if fused:  # rotates q, k in place and stores k, v in the cache, in one pass
            self.fused_ops.rotary_store_kv(qkv, rope, self.num_heads, self.num_kv_heads,
                                           kv_cache.stacked, metadata.slot_mapping)
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(num_tokens, self.num_heads + self.num_kv_heads,
                     self.head_dim)  # (T, Hq + Hkv, D)
        if not fused:
            # q and k rotate in one call: the rotation is per head, so stacking is exact.
            qk = apply_rotary(qk, *rope.cos_sin())  # (T, Hq + Hkv, D)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = backend.forward(q, k, v, kv_cache, metadata, self.scale,
                              kv_written=fused)  # (T, Hq, D)
        return self.o_proj(out.reshape(num_tokens, self.q_size))  # (T, H)


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = Attention(arch)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias)

    def forward(self, x, delta, rope, kv_cache, metadata, backend) -> torch.Tensor:
        """x (T, H) is the residual stream, this model's own tensor, updated in place; delta
        (T, H) or None is what the previous layer adds to it. Each add is done by the norm
        that follows it; returns this layer's MLP output, the next delta."""
        attn = self.self_attn(self.input_layernorm(x, delta), rope, kv_cache, metadata,
                              backend)  # (T, H)
        return self.mlp(self.post_attention_layernorm(x, attn))  # (T, H)


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(arch) for _ in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int) -> None:
        super().__init__()
        self.arch = arch
        self.model = LlamaModel(arch, max_positions)
        self.lm_head = ParallelLMHead(arch.vocab_size, arch.hidden_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: Any,
                backend: AttentionBackend) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, H). `metadata` is the
        backend's own, built by its builder for this step."""
        x = self.model.embed_tokens(input_ids)  # (T, H)
        rope = RopeStep(self.model.rotary, positions, x.dtype)
        delta = None
        for layer, kv_cache in zip(self.model.layers, kv_caches, strict=True):
            delta = layer(x, delta, rope, kv_cache, metadata, backend)
        return self.model.norm(x, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> float32 logits (N, V) (gathered from every rank's vocab shard);
        only rows that sample are passed."""
        return self.lm_head(hidden).float()
