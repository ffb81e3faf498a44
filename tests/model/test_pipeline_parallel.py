"""Pipeline parallelism on CPU over gloo: each stage holds its layers and their KV; greedy
outputs with pipeline_parallel_size=2 and 3, and with tensor x pipeline parallelism,
equal the single-rank engine's and Hugging Face transformers', through chunked prefill,
prefix-cache hits and preemption with swap; up to pp steps are in flight at once.

Stages only split the sequence of layers, so unlike tensor parallelism (which reorders the
row-parallel sums) pp alone computes exactly the single-rank arithmetic: its logits are
compared bit for bit.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from tests.conftest import make_tiny_model
from tests.model.test_tensor_parallel import (  # noqa: F401  (fixtures used here)
    biased_model,
    prefix_prompts,
    run_workload,
    sampled_logits,
    single_thread,
)
from tests.model.test_tiny_models import GREEDY, PROMPTS, hf_reference, run_engine

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def five_layer_model(tmp_path_factory) -> Path:
    """Five layers: three stages hold 1, 2 and 2 of them."""
    return make_tiny_model(tmp_path_factory.mktemp("pp") / "five", "llama", num_hidden_layers=5)


def make_engine(model_dir: Path, tp: int = 1, pp: int = 1, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 64, "tensor_parallel_size": tp,
               "pipeline_parallel_size": pp, "parallel_timeout_s": 60, **options}
    return LLMEngine(EngineConfig.from_options(str(model_dir), **options), model_dir=model_dir)


def record_steps_in_flight(engine: LLMEngine) -> list[int]:
    """How many steps were still in flight each time the engine launched another."""
    seen: list[int] = []
    launch = engine.runner.launch

    def recording_launch(scheduled, eos_token_ids, in_flight=None):
        if scheduled:
            seen.append(len(engine._in_flight))
        return launch(scheduled, eos_token_ids, in_flight)

    engine.runner.launch = recording_launch
    return seen


def test_pp2_greedy_equals_hf_with_chunked_prefill_prefix_hits_and_two_steps_in_flight(
        biased_model):  # noqa: F811
    expected = hf_reference(biased_model, PROMPTS + prefix_prompts())
    engine = make_engine(biased_model, pp=2, max_num_batched_tokens=6)
    try:
        assert [r.stage.num_layers for r in [engine.runner.runner]] == [1]
        in_flight = record_steps_in_flight(engine)
        assert run_workload(engine) == expected
        assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
        # Stage 0 started a step while stage 1 still ran the one before.
        assert max(in_flight) == 1
    finally:
        engine.close()


def test_pp3_uneven_stages_and_tp2_pp2_equal_hf(five_layer_model, biased_model):  # noqa: F811
    for model_dir, tp, pp in ((five_layer_model, 1, 3), (biased_model, 2, 2)):
        expected = hf_reference(model_dir, PROMPTS)
        engine = make_engine(model_dir, tp, pp, max_num_batched_tokens=16)
        try:
            in_flight = record_steps_in_flight(engine)
            assert run_engine(engine, PROMPTS) == expected, (tp, pp)
            assert max(in_flight) == pp - 1
        finally:
            engine.close()


def test_pp2_preemption_with_swap_keeps_greedy_equal_to_hf(biased_model):  # noqa: F811
    expected = hf_reference(biased_model, PROMPTS)
    # 16 blocks of 4 tokens for requests that need 41 at their longest: each stage swaps
    # its own layers' share of the same blocks, in the order rank 0 decided.
    engine = make_engine(biased_model, pp=2, block_size=4, num_kv_blocks=16,
                         host_kv_memory_bytes=1 << 20)
    try:
        assert run_engine(engine, PROMPTS) == expected
        assert engine.scheduler.num_preemptions > 0
        assert engine.kv_manager.swap_stats.num_swap_in_blocks > 0
    finally:
        engine.close()


def test_pp2_logits_are_bitwise_equal_to_one_rank(five_layer_model):
    logits = {pp: sampled_logits(make_engine(five_layer_model, pp=pp)) for pp in (1, 2)}
    assert torch.equal(logits[2], logits[1])


def test_more_stages_than_layers_is_refused_by_name(biased_model):  # noqa: F811
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"pipeline_parallel_size=3 is more than the "
                                         r"model's 2 layers"):
        make_engine(biased_model, pp=3)
    assert time.monotonic() - start < 30


def test_idle_replica_outlives_the_collective_timeout(biased_model):  # noqa: F811
    """Ranks wait for the next step message without a deadline; tensor collectives keep
    theirs (parallel_timeout_s), so a replica idle for longer still serves."""
    engine = make_engine(biased_model, 2, 2, parallel_timeout_s=8)
    try:
        assert run_engine(engine, PROMPTS[:1]) == hf_reference(biased_model, PROMPTS[:1])
        time.sleep(10)
        assert run_engine(engine, PROMPTS[1:2]) == hf_reference(biased_model, PROMPTS[1:2])
    finally:
        engine.close()


RANK0 = """
import sys, time
from pathlib import Path
from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
if __name__ == "__main__":
    model = Path(sys.argv[1])
    config = EngineConfig.from_options(str(model), pipeline_parallel_size=2, num_kv_blocks=16)
    engine = LLMEngine(config, model_dir=model)
    print(" ".join(str(p.pid) for p in engine.runner.ranks.processes), flush=True)
    time.sleep(600)
"""


def test_ranks_leave_when_rank0_is_killed(biased_model, tmp_path):  # noqa: F811
    script = tmp_path / "rank0.py"
    script.write_text(RANK0)
    rank0 = subprocess.Popen([sys.executable, str(script), str(biased_model)],
                             stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(pid) for pid in rank0.stdout.readline().split()]
        assert len(pids) == 1
        os.kill(rank0.pid, signal.SIGKILL)
        rank0.wait(10)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and _alive(pids[0]):
            time.sleep(0.2)
        assert not _alive(pids[0])
    finally:
        rank0.kill()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split()[2] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_default_model_tp3_pp2_and_3x2_equal_one_rank(default_model_dir):
    """The default model (30 layers, 9 heads, 3 KV heads): chunked prefill, a prefix hit
    and preemption with swap, at tp=3, pp=2 and tp=3 x pp=2, equal to one rank."""
    shared = list(range(100, 132))  # 4 blocks of 8
    prompts = [shared + [7, 8, 9], list(range(300, 305)), shared + [11],
               list(range(500, 537))]
    params = GREEDY.__class__(max_tokens=16, temperature=0, ignore_eos=True)
    outputs = {}
    for tp, pp in ((1, 1), (3, 1), (1, 2), (3, 2)):
        engine = make_engine(default_model_dir, tp, pp, block_size=8, num_kv_blocks=12,
                             host_kv_memory_bytes=64 << 20, max_num_batched_tokens=24,
                             max_model_len=256)
        try:
            got = run_engine(engine, prompts[:1], params)
            got += run_engine(engine, prompts[1:], params)
            assert engine.kv_manager.prefix_stats.hits > 0
            assert engine.scheduler.num_preemptions > 0
            outputs[(tp, pp)] = got
        finally:
            engine.close()
    assert outputs[(3, 1)] == outputs[(1, 1)]
    assert outputs[(1, 2)] == outputs[(1, 1)]
    assert outputs[(3, 2)] == outputs[(1, 1)]

