"""The engine on CUDA: same greedy tokens as on CPU (float32), and a working bf16 path.

Run on the device machine; skipped where CUDA is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_tiny_model
from tests.lane_probe import tick_clock_and_watch_lane

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("cuda") / "llama", "llama", **TINY)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(2, TINY["vocab_size"]) for _ in range(rng.randrange(3, 90))]
            for _ in range(12)]


# A round-robin last queue with a microsecond quantum reorders the jobs every step; 4
# running at most and 14 device blocks force eviction to the 64 MiB host tier.
SQUEEZE = dict(policy="mlfq", mlfq_base_quantum_s=1e-6, mlfq_num_queues=3,
               mlfq_starvation_s=1e9, mlfq_queue_order="arrival",
               mlfq_last_queue="round_robin", max_num_seqs=4, num_kv_blocks=14,
               kv_headroom_blocks=2, host_kv_memory_bytes=64 << 20)


def run_engine(model_dir, prompts, max_tokens: int, prepare=None, **options
               ) -> list[list[int]]:
    """Greedy tokens per prompt; `prepare(engine)` runs before the first request."""
    engine = LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)
    if prepare is not None:
        prepare(engine)
    # min_tokens = max_tokens: EOS suppressed, as HF min_new_tokens does.
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    for index, ids in enumerate(prompts):
        engine.add_request(Request(str(index), ids, params))
    results: dict[str, list[int]] = {}
    try:
        while engine.has_work():
            for output in engine.step():
                if output.finished:
                    results[output.request_id] = output.output_token_ids
    finally:
        engine.close()  # the other parallel ranks, if any
    if options.get("host_kv_memory_bytes"):
        # The run must really have swapped, or the test proves nothing.
        assert engine.kv_manager.swap_stats.num_swap_in_blocks > 0
    return [results[str(i)] for i in range(len(prompts))]


def test_cuda_float32_equals_cpu_and_hf(model_dir, prompts):
    cpu = run_engine(model_dir, prompts, 16, device="cpu", dtype="float32")
    # The default: Triton kernels, decode steps as CUDA graphs.
    cuda = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32")
    assert cuda == cpu
    eager = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32",
                       enforce_eager=True)
    assert eager == cpu
    step_by_step = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32",
                              overlap_steps=False)
    assert step_by_step == cpu
    # The torch backend on CUDA: gathering, and the dense decode copy.
    for dense in (False, True):
        torch_path = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32",
                                attention_backend="torch", dense_decode_cache=dense)
        assert torch_path == cpu, f"torch backend, dense_decode_cache={dense}"
    # Preemption and chunking on CUDA too, with small blocks (many per request).
    squeezed = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32",
                          num_kv_blocks=48, block_size=4, max_num_batched_tokens=24)
    assert squeezed == cpu
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert [hf_greedy(hf, ids, 16, min_new_tokens=16) for ids in prompts[:4]] == cpu[:4]


def test_cuda_prefix_hits_equal_cpu(model_dir, prompts):
    """Prompts sharing long prefixes, run one after another so later ones hit the prefix
    cache: the Triton prefill kernel reads the cached history in place."""
    shared = prompts[0] * 3 + prompts[1]
    family = [shared + tail for tail in prompts[2:6]]
    cpu = run_engine(model_dir, family, 12, device="cpu", dtype="float32")
    engine = LLMEngine(EngineConfig.from_options(str(model_dir), device="cuda",
                                                 dtype="float32", block_size=16),
                       model_dir=model_dir)
    params = SamplingParams(max_tokens=12, min_tokens=12, temperature=0)
    outputs, cached = [], []
    for index, ids in enumerate(family):  # one at a time: each later one hits the cache
        engine.add_request(Request(str(index), ids, params))
        while engine.has_work():
            for output in engine.step():
                if output.finished:
                    outputs.append(output.output_token_ids)
                    cached.append(output.num_cached_tokens)
    assert outputs == cpu
    assert all(n >= 16 for n in cached[1:]), cached


def test_cuda_graph_buckets_pad_batches_exactly(model_dir, prompts):
    """Batch sizes that are not buckets (3, 5, 11 running) decode in a padded graph: the
    padding rows must neither write the cache nor change the real rows."""
    cpu = run_engine(model_dir, prompts[:11], 10, device="cpu", dtype="float32")
    for count in (3, 5, 11):
        cuda = run_engine(model_dir, prompts[:count], 10, device="cuda", dtype="float32",
                          max_num_seqs=16)
        assert cuda == cpu[:count], f"{count} requests"


@pytest.mark.parametrize("codec", ["int8", "fp8"])
def test_cuda_encoded_kv_decodes_in_graphs_as_eagerly(model_dir, prompts, codec):
    """An int8 or fp8 cache under CUDA graphs: padded buckets (11 running) write their
    padding rows to the spare block, so the tokens are the eager engine's."""
    def graphs_captured(engine):
        if engine.runner.graphs is None:
            raise AssertionError("no CUDA graphs with an encoded cache")

    options = dict(device="cuda", dtype="float32", kv_cache_dtype=codec, max_num_seqs=16)
    eager = run_engine(model_dir, prompts[:11], 10, enforce_eager=True, **options)
    graphs = run_engine(model_dir, prompts[:11], 10, prepare=graphs_captured, **options)
    assert graphs == eager


def test_cuda_bfloat16_runs_and_mostly_agrees(model_dir, prompts):
    fp32 = run_engine(model_dir, prompts, 8, device="cuda", dtype="float32")
    bf16 = run_engine(model_dir, prompts, 8, device="cuda", dtype="bfloat16")
    assert all(len(tokens) == 8 for tokens in bf16)
    assert all(0 <= t < TINY["vocab_size"] for tokens in bf16 for t in tokens)
    # bf16 rounding may flip a near-tie, but the first greedy token rarely moves.
    agree = sum(a[0] == b[0] for a, b in zip(fp32, bf16, strict=True))
    assert agree >= len(prompts) * 3 // 4, f"only {agree}/{len(prompts)} first tokens agree"


def test_cuda_mlfq_with_swapping_equals_cpu(model_dir, prompts):
    """Constant MLFQ preemption with KV swapped to pinned host memory and back, on the
    side stream (overlapped) and synchronously: tokens equal the plain CPU run."""
    cpu = run_engine(model_dir, prompts, 16, device="cpu", dtype="float32")
    for overlap in (True, False):
        engine_outputs = run_engine(model_dir, prompts, 16, device="cuda", dtype="float32",
                                    swap_overlap=overlap, **SQUEEZE)
        assert engine_outputs == cpu, f"swap_overlap={overlap}"


def test_cuda_mlfq_deadline_lane_with_swapping_equals_cpu(model_dir, prompts):
    """The same squeeze with the deadline lane moving urgent jobs ahead (on a tick clock:
    urgent from 100 ticks, dropped back at 400), overlapped copies: tokens equal CPU's."""
    cpu = run_engine(model_dir, prompts, 16, device="cpu", dtype="float32")
    probes: list[list[bool]] = []  # the lane probe's per-order "reordered" flags
    engine_outputs = run_engine(
        model_dir, prompts, 16, device="cuda", dtype="float32", mlfq_deadline_s=400.0,
        prepare=lambda engine: probes.append(tick_clock_and_watch_lane(engine.scheduler)),
        **SQUEEZE)
    assert any(probes[0]), "the lane never reordered jobs"
    assert engine_outputs == cpu
