"""Tensor parallelism on CPU over gloo: greedy outputs with tensor_parallel_size=2 and 4
equal the single-rank engine's and Hugging Face transformers', through chunked prefill,
prefix-cache hits and preemption with swap; a split that does not divide is refused by name.

Tiny random models (tests/conftest.py make_tiny_model), and the default model at tp=3.
The tp=2 model has biases on every projection (Llama attention_bias and mlp_bias,
randomized), so the row-parallel layers' "bias once, after the all-reduce" is checked;
the tp=4 model has tied embeddings and a vocabulary of 510, not a multiple of 4, so the
last vocab shard carries padding rows.

Row-parallel layers sum partial products in a different order than one matmul does, so
hidden states differ from tp=1 by fp32 rounding (~1e-6 relative). The tiny models' logits
are sharpened (make_tiny_model) so no greedy choice here sits within that of a tie, and
the token lists are compared exactly; `test_tp_logits_agree_to_fp32_rounding` shows the size
of the difference.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.llm import LLM
from lmfleet.worker.sampling_params import SamplingParams
from tests.conftest import make_tiny_model
from tests.model.test_tiny_models import (
    GREEDY,
    PROMPTS,
    hf_reference,
    randomize_biases,
    run_engine,
)

pytestmark = pytest.mark.model


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One thread per rank: the ranks share this machine's cores (see test_tiny_models)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def biased_model(tmp_path_factory) -> Path:
    """4 heads, 2 KV heads, biases on q/k/v, o, gate/up and down: divides by tp=2."""
    model_dir = make_tiny_model(tmp_path_factory.mktemp("tp") / "biased", "llama",
                                attention_bias=True, mlp_bias=True)
    assert randomize_biases(model_dir) == 2 * (4 + 3)  # q k v o gate up down, 2 layers
    return model_dir


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    """4 heads, 4 KV heads, tied embeddings, vocab 510: divides by tp=4 (vocab padded)."""
    return make_tiny_model(tmp_path_factory.mktemp("tp") / "tied", "llama",
                           num_key_value_heads=4, tie_word_embeddings=True, vocab_size=510)


def make_engine(model_dir: Path, tp: int, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 64, "tensor_parallel_size": tp, **options}
    return LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)


def prefix_prompts() -> list[list[int]]:
    shared = PROMPTS[-1][:24]  # 3 blocks of 8
    return [shared + [3, 4, 5], shared + [6], shared + PROMPTS[2]]


def run_workload(engine: LLMEngine) -> list[list[int]]:
    """PROMPTS as one batch, then three prompts sharing a 24-token prefix (the first one
    alone, so the other two hit its cached blocks)."""
    outputs = run_engine(engine, PROMPTS)
    shared = prefix_prompts()
    outputs += run_engine(engine, shared[:1])
    hits_before = engine.kv_manager.prefix_stats.hits
    outputs += run_engine(engine, shared[1:])
    assert engine.kv_manager.prefix_stats.hits - hits_before >= 2 * 24
    return outputs


def test_tp2_greedy_equals_tp1_and_hf_with_chunked_prefill_and_prefix_hits(biased_model):
    expected = hf_reference(biased_model, PROMPTS + prefix_prompts())
    outputs = {}
    for tp in (1, 2):
        # A 6-token budget splits the 8-, 9-, 23-, 27- and 40-token prompts into chunks.
        engine = make_engine(biased_model, tp, max_num_batched_tokens=6)
        try:
            outputs[tp] = run_workload(engine)
            assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
        finally:
            engine.close()
    assert outputs[1] == expected
    assert outputs[2] == expected


def test_tp2_torch_ops_and_dense_decode_cache_equal_hf(biased_model):
    """Without the C kernels: the torch ops, and the dense decode cache, which each rank
    keeps for its own KV heads (fed from the step message's block ids)."""
    expected = hf_reference(biased_model, PROMPTS)
    engine = make_engine(biased_model, 2, cpu_kernels=False, max_num_batched_tokens=6)
    try:
        assert engine.runner.dense_decode is not None
        assert run_engine(engine, PROMPTS) == expected
    finally:
        engine.close()


def test_tp2_preemption_with_swap_keeps_greedy_equal_to_hf(biased_model):
    expected = hf_reference(biased_model, PROMPTS)
    # 16 blocks of 4 tokens: the 6 requests need 41 blocks at their longest; a host tier
    # takes the preempted KV (each rank swaps its own heads' share of the same blocks).
    engine = make_engine(biased_model, 2, block_size=4, num_kv_blocks=16,
                         host_kv_memory_bytes=1 << 20)
    swaps = []
    local_swap = engine.runner.swap

    def counting_swap(swap_out, swap_in):
        swaps.extend(swap_out)
        local_swap(swap_out, swap_in)

    engine.runner.swap = counting_swap
    try:
        assert run_engine(engine, PROMPTS) == expected
        assert engine.scheduler.num_preemptions > 0 and swaps
    finally:
        engine.close()


def test_tp4_tied_padded_vocab_greedy_equals_tp1_and_hf(tied_model):
    rng = random.Random(1)
    prompts = [[rng.randrange(2, 510) for _ in range(n)] for n in (1, 7, 17, 33)]
    expected = hf_reference(tied_model, prompts)
    for tp in (1, 4):
        engine = make_engine(tied_model, tp, max_num_batched_tokens=16)
        try:
            assert run_engine(engine, prompts) == expected, f"tp={tp}"
        finally:
            engine.close()


def sampled_logits(engine: LLMEngine) -> torch.Tensor:
    """Every sampled row's logits (rank 0's) over the PROMPTS workload: (steps x rows, V).
    Closes the engine."""
    model = getattr(engine.runner, "runner", engine.runner).model
    captured = []
    compute_logits = model.compute_logits

    def capture(hidden):
        out = compute_logits(hidden)  # (N, V)
        captured.append(out.clone())
        return out

    model.compute_logits = capture
    try:
        run_engine(engine, PROMPTS)
    finally:
        engine.close()
    return torch.cat(captured)


def test_tp_logits_agree_to_fp32_rounding(biased_model):
    """Every sampled row's logits over the PROMPTS workload, tp=2 vs tp=1 (rank 0 holds the
    gathered logits): equal up to fp32 rounding of their scale, as the row-parallel sums
    only reorder the additions."""
    logits = {tp: sampled_logits(make_engine(biased_model, tp)) for tp in (1, 2)}
    scale = logits[1].abs().max().item()
    assert logits[2].shape == logits[1].shape
    torch.testing.assert_close(logits[2], logits[1], rtol=0, atol=scale * 1e-5)


def test_indivisible_kv_heads_are_refused_by_name_and_ranks_exit(biased_model):
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"num_key_value_heads=2 is not divisible by "
                                         r"tensor_parallel_size=4"):
        make_engine(biased_model, 4)
    assert time.monotonic() - start < 30


def test_llm_close_stops_the_ranks(biased_model, default_model_dir, tmp_path):
    """LLM(tensor_parallel_size=2) as a context manager: its rank process ends on exit."""
    import shutil

    model_dir = tmp_path / "with-tokenizer"
    shutil.copytree(biased_model, model_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, model_dir / name)
    with LLM(str(model_dir), tensor_parallel_size=2, num_kv_blocks=64) as llm:
        processes = llm.engine.runner.ranks.processes
        outputs = llm.generate([PROMPTS[3]], GREEDY, use_tqdm=False)
        assert outputs[0].output_token_ids == hf_reference(model_dir, [PROMPTS[3]])[0]
    assert all(not process.is_alive() for process in processes)
    assert [process.exitcode for process in processes] == [0]


def test_a_rank_that_dies_is_named_instead_of_hanging(biased_model):
    engine = make_engine(biased_model, 2, parallel_timeout_s=20)
    try:
        assert run_engine(engine, PROMPTS[:2])
        process = engine.runner.ranks.processes[0]
        process.kill()
        process.join(10)
        start = time.monotonic()
        with pytest.raises(RuntimeError, match=r"parallel rank 1 \(exit code -9\) died"):
            run_engine(engine, PROMPTS[:2])
        assert time.monotonic() - start < 25
    finally:
        engine.close()


def test_default_model_tp3_equals_one_rank(default_model_dir):
    """The default model (9 heads, 3 KV heads, intermediate 1536, vocab 49152: all divide by
    3) through the offline API, with chunked prefill (8-token budget) and prefix hits."""
    story = "Once upon a time, in a land far away, there lived a king who had three daughters"
    first = [story]
    second = [story + " and", story + ". The youngest", "def fibonacci(n):", "The capital of"]
    params = SamplingParams(max_tokens=10, temperature=0)
    outputs = {}
    for tp in (1, 3):
        with LLM(str(default_model_dir), tensor_parallel_size=tp, max_num_batched_tokens=8,
                 num_kv_blocks=64, block_size=8) as llm:
            runs = llm.generate(first, params, use_tqdm=False)
            hits_before = llm.engine.kv_manager.prefix_stats.hits
            runs += llm.generate(second, params, use_tqdm=False)
            assert llm.engine.kv_manager.prefix_stats.hits - hits_before >= 2 * 8
            outputs[tp] = [run.output_token_ids for run in runs]
    assert outputs[3] == outputs[1]
