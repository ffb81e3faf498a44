"""The encoded KV caches (`kv_cache_dtype="int8"` / `"fp8"`, kv/kv_codecs.py): each token's
K and V per head as codes followed by their float32 scale (and zero) in the same row, so
swaps, prefix hits and parked sessions carry them. Greedy tokens under preemption with swap
and under prefix-cache hits equal the encoded engine's own undisturbed run (the codes are
stored once and copied byte for byte); against float32 KV they mostly agree; the same
memory holds 2.7x (int8) and 3.2x (fp8) the blocks of a float32 cache at head_dim 16."""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.kv.kv_codecs import CODECS
from tests.model.test_tiny_models import PROMPTS, hf_reference, run_engine

pytestmark = pytest.mark.model
CODEC_NAMES = sorted(CODECS)


def make_engine(model_dir, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 64, "kv_cache_dtype": "int8", **options}
    return LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)


def test_int8_codec_round_trips_within_half_a_step():
    codec = CODECS["int8"]
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(0)) * 5  # (T, H, D)
    encoded = codec.encode(x)
    assert encoded.dtype == torch.int8 and encoded.shape == (7, 3, 72)
    step = (x.amax(-1, keepdim=True) - x.amin(-1, keepdim=True)) / 255
    assert ((codec.decode(encoded, torch.float32) - x).abs() <= step / 2 + 1e-6).all()
    constant = torch.full((2, 64), 3.0)  # a zero range still decodes to the value
    assert torch.allclose(codec.decode(codec.encode(constant), torch.float32), constant)


def test_fp8_codec_keeps_e4m3s_precision():
    codec = CODECS["fp8"]
    x = torch.randn(7, 3, 64, generator=torch.Generator().manual_seed(1)) * 5
    encoded = codec.encode(x)
    assert encoded.dtype == torch.uint8 and encoded.shape == (7, 3, 68)
    decoded = codec.decode(encoded, torch.float32)
    scale = x.abs().amax(-1, keepdim=True) / 448
    # e4m3: 3 mantissa bits (half an ulp: 1/16 relative), subnormals below 2^-6 * scale.
    assert ((decoded - x).abs() <= x.abs() / 16 + scale * 2**-9 + 1e-7).all()
    # The largest magnitude maps to e4m3's largest value, 448: exact up to float32 rounding.
    torch.testing.assert_close(decoded.abs().amax(-1), x.abs().amax(-1), rtol=1e-6, atol=0)


@pytest.mark.parametrize("codec,ratio", [("int8", 64 / 24), ("fp8", 64 / 20)])
def test_the_same_memory_holds_more_blocks(tiny_model_factory, codec, ratio):
    model_dir = tiny_model_factory("llama")
    blocks = {}
    for kv in ("auto", codec):
        engine = make_engine(model_dir, num_kv_blocks=None, kv_cache_memory_bytes=4 << 20,
                             kv_cache_dtype=kv)
        blocks[kv] = engine.runner.num_blocks
    # head_dim 16 here: 16 + 8 (int8) or 16 + 4 (fp8) bytes against 4 x 16.
    assert blocks[codec] == pytest.approx(blocks["auto"] * ratio, rel=0.02)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_swapped_and_prefix_hit_kv_keep_the_encoded_engines_tokens(tiny_model_factory, codec):
    model_dir = tiny_model_factory("llama")
    undisturbed = run_engine(make_engine(model_dir, enable_prefix_caching=False,
                                         kv_cache_dtype=codec), PROMPTS)
    squeezed = make_engine(model_dir, block_size=4, num_kv_blocks=16, kv_cache_dtype=codec,
                           host_kv_memory_bytes=1 << 20, enable_prefix_caching=False)
    assert run_engine(squeezed, PROMPTS) == undisturbed
    assert squeezed.kv_manager.swap_stats.num_swap_in_blocks > 0
    cached = make_engine(model_dir, kv_cache_dtype=codec)
    run_engine(cached, PROMPTS)
    hits = cached.kv_manager.prefix_stats.hits
    assert run_engine(cached, PROMPTS) == undisturbed
    assert cached.kv_manager.prefix_stats.hits - hits > 0


@pytest.mark.parametrize("codec,share", [("int8", 0.8), ("fp8", 0.6)])
def test_encoded_greedy_mostly_agrees_with_hf(tiny_model_factory, codec, share):
    model_dir = tiny_model_factory("llama")
    expected = hf_reference(model_dir, PROMPTS)
    got = run_engine(make_engine(model_dir, kv_cache_dtype=codec), PROMPTS)
    same = sum(a == b for e, g in zip(expected, got, strict=True)
               for a, b in zip(e, g, strict=True))
    assert same >= share * sum(len(e) for e in expected)


def test_encoded_caches_refuse_the_dense_decode_copy(tiny_model_factory):
    with pytest.raises(ValueError, match="dense_decode_cache"):
        make_engine(tiny_model_factory("llama"), dense_decode_cache=True)


@pytest.mark.parametrize("codec", CODEC_NAMES)
def test_rows_without_a_slot_land_in_the_spare_block(tiny_model_factory, codec):
    """CUDA-graph padding rows carry slot -1: an encoded cache writes them to its one spare
    block past the allocator's, never into a block a request holds."""
    from lmfleet.worker.model.attention.torch_ref import write_kv

    engine = make_engine(tiny_model_factory("llama"), kv_cache_dtype=codec)
    runner = engine.runner
    storage = runner.kv_storage  # (L, 2, blocks + 1, block_size, Hkv, W)
    assert storage.shape[2] == runner.num_blocks + 1 == engine.kv_manager.pool.num_blocks + 1
    cache = runner.kv_caches[0]
    k = torch.randn(3, runner.num_kv_heads, runner.arch.head_dim)  # (T, Hkv, D)
    write_kv(k, -k, cache, torch.tensor([5, -1, -1]))
    written = cache.stacked.flatten(1, 2)  # (2, slots, Hkv, W)
    assert written[:, 5].any() and written[:, -1].any()
    untouched = torch.ones(written.shape[1], dtype=torch.bool)
    untouched[[5, -1]] = False
    assert not written[:, untouched].any()
