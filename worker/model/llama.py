"""The Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over flattened tokens.

The model sees one flat batch of T tokens from many requests (`input_ids`, `positions`)
and leaves everything about requests to the attention backend's metadata. It names the
parallel layer each projection is (parallel_linear.py) and nothing else about ranks: under
tensor parallelism each rank builds its heads (num_heads / tp) and its MLP slice.

Under pipeline parallelism a stage builds only its layers (the others are `MissingLayer`
placeholders, so parameter names stay the checkpoint's). Stage 0 holds the embedding and
the LM head; the last stage holds the final norm. A stage that is not the last returns
the residual stream and its last layer's output stacked (2, T, H), for the next stage to
go on exactly where it stopped.
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
from lmfleet.worker.parallel.stages import PipelineStage, pipeline_stage


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        # q, k and v fused into one matmul, split by heads across ranks; its loader fills
        # the three slices.
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim, arch.num_heads,
                                          arch.num_kv_heads, bias=arch.qkv_bias,
                                          quant=arch.quantization)
        self.num_heads = self.qkv_proj.num_heads  # this rank's
        self.num_kv_heads = self.qkv_proj.num_kv_heads  # this rank's
        self.head_dim = arch.head_dim
        self.q_size = self.num_heads * arch.head_dim
        self.kv_size = self.num_kv_heads * arch.head_dim
        self.scale = arch.head_dim**-0.5
        self.o_proj = RowParallelLinear(arch.num_heads * arch.head_dim, arch.hidden_size,
                                        bias=arch.o_bias, what="num_attention_heads * head_dim",
                                        quant=arch.quantization)
        self.fused_ops = None  # the device's fused kernels, set by attach_fused_ops
        # False when the cache stores something else than k and v as computed (int8 KV):
        # the backend then stores them itself.
        self.fused_kv_store = True

    def forward(self, x: torch.Tensor, rope: RopeStep, kv_cache: KVCache, metadata: Any,
                backend: AttentionBackend) -> torch.Tensor:  # x (T, H)
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)  # (T, q_size + 2 kv_size)
        fused = (self.fused_kv_store and self.fused_ops is not None
                 and self.fused_ops.supports(qkv))
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
        self.mlp = GatedMLP(arch.hidden_size, arch.intermediate_size, arch.mlp_bias,
                            arch.quantization)

    def forward(self, x, delta, rope, kv_cache, metadata, backend) -> torch.Tensor:
        """x (T, H) is the residual stream, this model's own tensor, updated in place; delta
        (T, H) or None is what the previous layer adds to it. Each add is done by the norm
        that follows it; returns this layer's MLP output, the next delta."""
        attn = self.self_attn(self.input_layernorm(x, delta), rope, kv_cache, metadata,
                              backend)  # (T, H)
        return self.mlp(self.post_attention_layernorm(x, attn))  # (T, H)


class MissingLayer(nn.Module):
    """A layer another pipeline stage holds: no parameters, never called."""

    def forward(self, *args: Any) -> None:
        raise RuntimeError("this layer is held by another pipeline stage")


class LlamaModel(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int, stage: PipelineStage) -> None:
        super().__init__()
        self.embed_tokens = (VocabParallelEmbedding(arch.vocab_size, arch.hidden_size)
                             if stage.is_first else None)
        self.layers = nn.ModuleList(
            DecoderLayer(arch) if stage.holds_layer(i) else MissingLayer()
            for i in range(arch.num_layers))
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps) if stage.is_last else None
        self.rotary = RotaryEmbedding(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig, max_positions: int,
                 stage: PipelineStage | None = None) -> None:
        super().__init__()
        self.arch = arch
        self.stage = stage or pipeline_stage(arch.num_layers)
        self.model = LlamaModel(arch, max_positions, self.stage)
        self.lm_head = (ParallelLMHead(arch.vocab_size, arch.hidden_size)
                        if self.stage.is_first else None)
        if arch.tie_word_embeddings and self.stage.is_first:
            self.lm_head.weight = self.model.embed_tokens.weight

    def holds_weight(self, name: str) -> bool:
        """Whether checkpoint tensor `name` belongs to this pipeline stage."""
        if name.startswith("model.layers."):
            return self.stage.holds_layer(int(name.split(".")[2]))
        if name.startswith(("model.embed_tokens.", "lm_head.")):
            return self.stage.is_first
        if name.startswith("model.norm."):
            return self.stage.is_last
        return True

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                kv_caches: list[KVCache], metadata: Any, backend: AttentionBackend,
                hidden: torch.Tensor | None = None,
                image_rows: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        """input_ids, positions (T,) -> final hidden states (T, H) on the last stage, else
        (2, T, H) for the next one. `hidden` (2, T, H) is the previous stage's output
        (None on stage 0). `metadata` is the backend's own, built for this step.
        `image_rows` (token rows (K,), their vectors (K, H)) replace those rows' embeddings:
        a vision-language prompt's image positions."""
        if hidden is None:
            x, delta = self.model.embed_tokens(input_ids), None  # (T, H)
            if image_rows is not None:
                x.index_copy_(0, image_rows[0], image_rows[1].to(x.dtype))
        else:
            x, delta = hidden[0], hidden[1]  # (T, H) each
        rope = RopeStep(self.model.rotary, positions, x.dtype)
        layers = self.model.layers[self.stage.start:self.stage.end]
        for layer, kv_cache in zip(layers, kv_caches, strict=True):
            delta = layer(x, delta, rope, kv_cache, metadata, backend)
        if not self.stage.is_last:
            return torch.stack((x, delta))  # (2, T, H)
        return self.model.norm(x, delta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (N, H) -> float32 logits (N, V) (gathered from every rank's vocab shard);
        only rows that sample are passed."""
        return self.lm_head(hidden).float()
