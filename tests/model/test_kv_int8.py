"""The int8 KV cache (`kv_cache_dtype="int8"`, kv/int8_codec.py): each token's K and V per
head as int8 codes with their float32 scale and zero in the same row, so swaps, prefix
hits and parked sessions carry them. Greedy tokens under preemption with swap and under
prefix-cache hits equal the int8 engine's own undisturbed run (the codes are stored once
and copied byte for byte); against float32 KV they mostly agree; the same memory holds
3.5x the blocks of a float32 cache at head_dim 64."""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.kv import int8_codec
from tests.model.test_tiny_models import PROMPTS, hf_reference, run_engine

pytestmark = pytest.mark.model


def make_engine(model_dir, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 64, "kv_cache_dtype": "int8", **options}
    return LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)


def test_codec_round_trips_within_half_a_step():
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * 5  # (T, H, D)
    encoded = int8_codec.encode(x)
    assert encoded.dtype == torch.int8 and encoded.shape == (7, 3, 72)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255
    assert ((int8_codec.decode(encoded, torch.float32) - x).abs() <= step / 2 + 1e-6).all()
    constant = torch.full((2, 64), 3.0)  # a zero range still decodes to the value
    assert torch.allclose(int8_codec.decode(int8_codec.encode(constant), torch.float32),
                          constant)


def test_the_same_memory_holds_three_and_a_half_times_the_blocks(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    blocks = {}
    for kv in ("auto", "int8"):
        engine = make_engine(model_dir, num_kv_blocks=None, kv_cache_memory_bytes=4 << 20,
                             kv_cache_dtype=kv)
        blocks[kv] = engine.runner.num_blocks
        assert engine.runner.kv_storage.dtype == (torch.int8 if kv == "int8" else torch.float32)
    # head_dim 16 here: 16 + 8 bytes against 4 x 16.
    assert blocks["int8"] == pytest.approx(blocks["auto"] * 64 / 24, rel=0.02)


def test_swapped_and_prefix_hit_kv_keep_the_int8_engines_tokens(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    undisturbed = run_engine(make_engine(model_dir, enable_prefix_caching=False), PROMPTS)
    squeezed = make_engine(model_dir, block_size=4, num_kv_blocks=16,
                           host_kv_memory_bytes=1 << 20, enable_prefix_caching=False)
    assert run_engine(squeezed, PROMPTS) == undisturbed
    assert squeezed.kv_manager.swap_stats.num_swap_in_blocks > 0
    cached = make_engine(model_dir)
    run_engine(cached, PROMPTS)
    hits = cached.kv_manager.prefix_stats.hits
    assert run_engine(cached, PROMPTS) == undisturbed
    assert cached.kv_manager.prefix_stats.hits - hits > 0


def test_int8_greedy_mostly_agrees_with_float32_and_hf(tiny_model_factory):
    model_dir = tiny_model_factory("llama")
    expected = hf_reference(model_dir, PROMPTS)
    got = run_engine(make_engine(model_dir), PROMPTS)
    same = sum(a == b for e, g in zip(expected, got, strict=True)
               for a, b in zip(e, g, strict=True))
    assert same >= 0.8 * sum(len(e) for e in expected)


def test_int8_refuses_the_dense_decode_copy(tiny_model_factory):
    with pytest.raises(ValueError, match="dense_decode_cache"):
        make_engine(tiny_model_factory("llama"), dense_decode_cache=True)
