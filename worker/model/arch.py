"""The architecture of a Llama-family checkpoint, read from its config.json.

Llama 2/3, Mistral, Qwen2 and SmolLM share one computation (pre-norm decoder, RoPE,
GQA, SwiGLU MLP); they differ only in the knobs collected here. Anything outside that
family is refused with an error that names the architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from lmfleet.worker.model.vision.vision_info import is_vision_config
from lmfleet.worker.quant.config import WeightQuantization

SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}


class UnsupportedModelError(ValueError):
    """The checkpoint is not a model this engine can run."""


@dataclass(frozen=True)
class ArchConfig:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict[str, Any]]
    max_position_embeddings: int
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_window: Optional[int]
    eos_token_ids: tuple[int, ...]
    bos_token_id: Optional[int]
    # The decoder layers' projections' quantization (None: plain weights).
    quantization: Optional[WeightQuantization] = None

    @property
    def kv_bytes_per_token(self) -> int:
        """K and V of every layer for one token, per byte of element size."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim

    @classmethod
    def from_model_dir(cls, model_dir: Path) -> ArchConfig:
        config_path = Path(model_dir) / "config.json"
        if not config_path.is_file():
            raise UnsupportedModelError(f"not a Hugging Face model directory: {model_dir}")
        config = json.loads(config_path.read_text())
        generation_path = Path(model_dir) / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.is_file() else {}
        return cls.from_dict(config, generation)

    @classmethod
    def from_dict(cls, config: dict[str, Any], generation: dict[str, Any] | None = None):
        config = language_model_config(config)
        architectures = config.get("architectures") or []
        architecture = architectures[0] if architectures else config.get("model_type", "?")
        family = SUPPORTED_ARCHITECTURES.get(architecture)
        if family is None:
            raise UnsupportedModelError(
                f"unsupported architecture {architecture!r}; supported: "
                f"{', '.join(sorted(SUPPORTED_ARCHITECTURES))}"
            )
        if config.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"unsupported hidden_act {config['hidden_act']!r}")
        # transformers >= 5 moves rope settings under rope_parameters; older files keep
        # rope_theta and rope_scaling at the top level.
        rope = dict(config.get("rope_parameters") or {})
        rope_theta = rope.pop("rope_theta", config.get("rope_theta", 10000.0))
        rope_scaling = config.get("rope_scaling") or (rope if rope else None)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) == "default":
            rope_scaling = None
        num_heads = config["num_attention_heads"]
        hidden_size = config["hidden_size"]
        sliding_window = config.get("sliding_window")
        if family == "qwen2" and not config.get("use_sliding_window", False):
            sliding_window = None
        eos = _token_ids(generation.get("eos_token_id") if generation else None)
        eos = eos or _token_ids(config.get("eos_token_id"))
        try:
            quantization = WeightQuantization.from_config(config)
        except ValueError as error:
            raise UnsupportedModelError(str(error)) from None
        return cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=config["intermediate_size"],
            num_layers=config["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden_size // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            # Qwen2 always has a bias on q/k/v (and none on o); Llama has attention_bias.
            qkv_bias=family == "qwen2" or bool(config.get("attention_bias", False)),
            o_bias=family != "qwen2" and bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_window=sliding_window,
            eos_token_ids=eos,
            bos_token_id=config.get("bos_token_id"),
            quantization=quantization,
        )


# A vision-language checkpoint's language model, by its text_config's model_type.
_TEXT_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM"}


def language_model_config(config: dict[str, Any]) -> dict[str, Any]:
    """A LLaVA config.json -> its language model's config (the engine runs that model, with
    image rows in place of the image tokens' embeddings); any other config as it is."""
    if not is_vision_config(config):
        return config
    text = dict(config.get("text_config") or {})
    model_type = text.get("model_type", "llama")
    if model_type not in _TEXT_MODEL_TYPES:
        raise UnsupportedModelError(f"unsupported LLaVA language model {model_type!r}; "
                                    f"supported: {', '.join(sorted(_TEXT_MODEL_TYPES))}")
    text["architectures"] = [_TEXT_MODEL_TYPES[model_type]]
    for key in ("quantization_config", "tie_word_embeddings"):
        if key in config and key not in text:
            text[key] = config[key]
    return text


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
