"""Shared fixtures: the embedded model, a Hugging Face reference, tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.triton_interpreter import enable_without_cuda

enable_without_cuda()


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from lmfleet.worker.model.default_model import resolve_model_path

    return resolve_model_path("default", progress=False)


@pytest.fixture(scope="session")
def hf_model(default_model_dir):
    """transformers' own Llama on the same converted weights, float32, CPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    from lmfleet.worker.tokenizer import load_tokenizer

    return load_tokenizer(default_model_dir)


def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, **kwargs) -> list[int]:
    """Greedy continuation by transformers, one prompt at a time (no padding effects)."""
    with torch.no_grad():
        out = model.generate(
            torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                                                  dtype=torch.long),
            max_new_tokens=max_new_tokens, do_sample=False, **kwargs)
    return out[0, len(prompt_ids):].tolist()


def make_tiny_model(directory: Path, architecture: str = "llama", seed: int = 0,
                    **overrides) -> Path:
    """Write a small random-weight model directory that transformers and lmfleet both load."""
    import transformers

    config_classes = {
        "llama": transformers.LlamaConfig,
        "mistral": transformers.MistralConfig,
        "qwen2": transformers.Qwen2Config,
    }
    model_classes = {
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "qwen2": transformers.Qwen2ForCausalLM,
    }
    settings = dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                    max_position_embeddings=512, eos_token_id=1, bos_token_id=0,
                    tie_word_embeddings=False)
    settings.update(overrides)
    config = config_classes[architecture](**settings)
    torch.manual_seed(seed)
    model = model_classes[architecture](config).to(torch.float32)
    # Random init gives near-uniform logits; sharper ones make greedy text less tie-prone.
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(4.0 if param.dim() > 1 else 1.0)
    model.save_pretrained(str(directory))
    return directory


@pytest.fixture
def tiny_model_factory(tmp_path):
    def factory(architecture: str = "llama", **overrides) -> Path:
        name = f"{architecture}-{abs(hash(json.dumps(overrides, sort_keys=True, default=str)))}"
        return make_tiny_model(tmp_path / name, architecture, **overrides)

    return factory
