"""The vision encoders LLaVA checkpoints use: CLIP's and SigLIP's ViT, as far as the layer
LLaVA reads its features from.

Both cut the image into patches (a strided convolution), add learned position embeddings and
run pre-norm transformer layers (LayerNorm, multi-head attention with biases, a two-layer MLP).
CLIP prepends a class token and normalizes before the first layer; SigLIP does neither.
Checkpoint names follow transformers' CLIPVisionModel / SiglipVisionModel below
`vision_model.`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass(frozen=True)
class VisionTowerConfig:
    kind: str  # "clip" | "siglip"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    num_channels: int
    layer_norm_eps: float
    hidden_act: str

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> VisionTowerConfig:
        model_type = config.get("model_type", "clip_vision_model")
        kinds = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
        if model_type not in kinds:
            raise ValueError(f"unsupported vision tower {model_type!r}; supported: "
                             f"{sorted(kinds)}")
        kind = kinds[model_type]
        return cls(
            kind=kind, hidden_size=config["hidden_size"],
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"], num_heads=config["num_attention_heads"],
            image_size=config["image_size"], patch_size=config["patch_size"],
            num_channels=config.get("num_channels", 3),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5 if kind == "clip" else 1e-6),
            hidden_act=config.get("hidden_act",
                                  "quick_gelu" if kind == "clip" else "gelu_pytorch_tanh"))

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def has_class_token(self) -> bool:
        return self.kind == "clip"


class VisionEmbeddings(nn.Module):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.patch_embedding = nn.Conv2d(config.num_channels, hidden, config.patch_size,
                                         stride=config.patch_size,
                                         bias=not config.has_class_token)
        positions = config.num_patches + (1 if config.has_class_token else 0)
        self.position_embedding = nn.Embedding(positions, hidden)
        if config.has_class_token:
            self.class_embedding = nn.Parameter(torch.empty(hidden))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:  # pixels (B, C, S, S)
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype))
        x = patches.flatten(2).transpose(1, 2)  # (B, P, H)
        if self.config.has_class_token:
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (B, 1, H)
            x = torch.cat((cls, x), dim=1)  # (B, 1 + P, H)
        return x + self.position_embedding.weight  # (B, N, H)


class VisionAttention(nn.Module):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = hidden // config.num_heads
        self.q_proj = nn.Linear(hidden, hidden)
        self.k_proj = nn.Linear(hidden, hidden)
        self.v_proj = nn.Linear(hidden, hidden)
        self.out_proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, H)
        batch, length, hidden = x.shape

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, N, H) -> (B, heads, N, D)
            return t.view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, D): every patch sees all
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, hidden))  # (B, N, H)


class VisionMLP(nn.Module):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, config: VisionTowerConfig) -> None:
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = VisionAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = VisionMLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x (B, N, H)
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class VisionTower(nn.Module):
    """Holds the layers up to the deepest one read (`num_layers_kept`); the rest of the
    checkpoint's tower (later layers, post-norm, pooling head) is never computed."""

    def __init__(self, config: VisionTowerConfig, num_layers_kept: int) -> None:
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        if config.has_class_token:
            # (sic) transformers' spelling of CLIP's pre-norm.
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList(VisionLayer(config) for _ in range(num_layers_kept))

    def hidden_states(self, pixels: torch.Tensor) -> list[torch.Tensor]:
        """pixels (B, C, S, S) -> transformers' hidden_states: the layers' input, then each
        kept layer's output, (B, N, H) each."""
        x = self.embeddings(pixels)  # (B, N, H)
        if self.config.has_class_token:
            x = self.pre_layrnorm(x)
        states = [x]
        for layer in self.encoder.layers:
            x = layer(x)
            states.append(x)
        return states
