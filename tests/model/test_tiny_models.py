"""Greedy outputs of tiny random Llama-family models equal Hugging Face transformers'.

Each variant exercises one architecture knob (tied embeddings, Qwen2's q/k/v bias,
Mistral, Llama 3 and linear RoPE scaling). Prompts are token ids, so no tokenizer is
needed. EOS (id 1) is suppressed on both sides for all 12 tokens: `min_tokens` in the
engine, `min_new_tokens` in transformers, which mask the same logit the same way (with
`ignore_eos` instead, the engine could emit EOS where transformers picks the runner-up).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.model.layers import rope_inv_freq
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.model

MAX_NEW_TOKENS = 12
VOCAB_SIZE = 512  # make_tiny_model's default
_rng = random.Random(0)
# Varied lengths: one token, under a block, exactly one 8-token block, just past it, long.
PROMPTS = [[_rng.randrange(2, VOCAB_SIZE) for _ in range(n)] for n in (1, 5, 8, 9, 23, 40)]
GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, min_tokens=MAX_NEW_TOKENS, temperature=0)

LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
LINEAR_ROPE = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0}

VARIANTS = {
    "llama-untied": ("llama", {"tie_word_embeddings": False}),
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "qwen2-qkv-bias": ("qwen2", {}),
    "mistral": ("mistral", {}),
    # transformers 5 keeps rope settings (theta included) under `rope_parameters`.
    "llama3-rope": ("llama", {"rope_parameters": LLAMA3_ROPE}),
    "linear-rope": ("llama", {"rope_parameters": LINEAR_ROPE}),
}


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny matmuls gain nothing from threads; on a busy machine extra threads only wait
    for each other (measured here: ~30x slower with 2 threads than with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def randomize_biases(model_dir: Path, seed: int = 1) -> int:
    """Random init leaves biases at zero, where a loader that drops them goes unnoticed."""
    path = model_dir / "model.safetensors"
    tensors = load_file(str(path))
    generator = torch.Generator().manual_seed(seed)
    names = [name for name in tensors if name.endswith(".bias")]
    for name in names:
        tensors[name] = torch.randn(tensors[name].shape, generator=generator)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return len(names)


def make_variant(tiny_model_factory, variant: str) -> Path:
    architecture, overrides = VARIANTS[variant]
    model_dir = tiny_model_factory(architecture, **overrides)
    if architecture == "qwen2":
        assert randomize_biases(model_dir) == 3 * 2  # q, k, v in each of 2 layers
    return model_dir


def hf_reference(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return [hf_greedy(model, ids, MAX_NEW_TOKENS, min_new_tokens=MAX_NEW_TOKENS)
            for ids in prompts]


def make_engine(model_dir: Path, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 64, **options}
    return LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)


def run_engine(engine: LLMEngine, prompts: list[list[int]],
               params: SamplingParams = GREEDY) -> list[list[int]]:
    for index, ids in enumerate(prompts):
        engine.add_request(Request(str(index), list(ids), params))
    finished = {}
    while engine.has_work():
        for output in engine.step():
            if output.finished:
                finished[output.request_id] = output
    assert all(o.finish_reason == "length" for o in finished.values())
    return [finished[str(index)].output_token_ids for index in range(len(prompts))]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_batched_greedy_equals_hf(tiny_model_factory, variant):
    model_dir = make_variant(tiny_model_factory, variant)
    expected = hf_reference(model_dir, PROMPTS)
    engine = make_engine(model_dir)
    assert run_engine(engine, PROMPTS) == expected
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_tied_checkpoint_has_no_lm_head_and_untied_one_has_its_own(tiny_model_factory):
    tied = load_file(str(make_variant(tiny_model_factory, "llama-tied") / "model.safetensors"))
    untied = load_file(str(make_variant(tiny_model_factory, "llama-untied")
                           / "model.safetensors"))
    assert "lm_head.weight" not in tied
    assert not torch.equal(untied["lm_head.weight"], untied["model.embed_tokens.weight"])


@pytest.mark.parametrize("variant", ["llama3-rope", "linear-rope"])
def test_rope_scaling_is_read_and_matches_hf_tables(tiny_model_factory, variant):
    from transformers import AutoModelForCausalLM

    model_dir = make_variant(tiny_model_factory, variant)
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["rope_parameters"]["rope_type"] == VARIANTS[variant][1]["rope_parameters"][
        "rope_type"]
    engine = make_engine(model_dir)
    arch = engine.arch
    assert arch.rope_scaling is not None
    # The scaling must matter, or the equality with transformers below proves nothing.
    assert not torch.allclose(rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling),
                              rope_inv_freq(arch.head_dim, arch.rope_theta, None))
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    positions = torch.arange(100)[None, :]
    hf_cos, hf_sin = hf.model.rotary_emb(torch.zeros(1, dtype=torch.float32), positions)
    rotary = engine.runner.model.model.rotary
    torch.testing.assert_close(rotary.cos_table[:100], hf_cos[0], rtol=0, atol=1e-6)
    torch.testing.assert_close(rotary.sin_table[:100], hf_sin[0], rtol=0, atol=1e-6)


def test_preemption_keeps_greedy_equal_to_hf(tiny_model_factory):
    model_dir = make_variant(tiny_model_factory, "llama-untied")
    expected = hf_reference(model_dir, PROMPTS)
    # 16 blocks of 4 tokens: the 6 requests need 41 blocks at their longest.
    engine = make_engine(model_dir, block_size=4, num_kv_blocks=16)
    assert run_engine(engine, PROMPTS) == expected
    assert engine.scheduler.num_preemptions > 0
    assert engine.kv_manager.num_free_blocks == 16


def test_chunked_prefill_keeps_greedy_equal_to_hf(tiny_model_factory):
    model_dir = make_variant(tiny_model_factory, "qwen2-qkv-bias")
    expected = hf_reference(model_dir, PROMPTS)
    # A 6-token budget splits the 8-, 9-, 23- and 40-token prompts into chunks.
    engine = make_engine(model_dir, max_num_batched_tokens=6)
    assert run_engine(engine, PROMPTS) == expected


def test_prefix_cache_hits_keep_greedy_equal_to_hf(tiny_model_factory):
    model_dir = make_variant(tiny_model_factory, "mistral")
    shared = PROMPTS[-1][:24]  # 3 blocks of 8
    prompts = [shared + [3, 4, 5], shared + [6], shared + PROMPTS[2]]
    expected = hf_reference(model_dir, prompts)
    engine = make_engine(model_dir)
    first = run_engine(engine, prompts[:1])
    hits_before = engine.kv_manager.prefix_stats.hits
    assert first + run_engine(engine, prompts[1:]) == expected
    assert engine.kv_manager.prefix_stats.hits - hits_before >= 2 * 24


def test_unsupported_architecture_is_refused_by_name(tmp_path):
    config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": 512,
              "n_embd": 64, "n_layer": 2, "n_head": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported architecture 'GPT2LMHeadModel'"):
        make_engine(tmp_path)


def test_directory_without_config_json_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        make_engine(tmp_path)


def test_model_path_without_config_json_is_refused_when_resolving(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        LLMEngine(EngineConfig.from_options(str(tmp_path)))
