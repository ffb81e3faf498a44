"""Exactness under MLFQ: constant preemption with KV swapped to host memory and back."""

from __future__ import annotations

import pytest

from lmfleet.worker import LLM, SamplingParams
from tests.conftest import hf_greedy
from tests.lane_probe import tick_clock_and_watch_lane
from tests.model.test_hf_equivalence import MAX_NEW_TOKENS, PROMPTS

pytestmark = pytest.mark.model

GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0)


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return [tokenizer.encode(p) for p in PROMPTS[:10]]


@pytest.fixture(scope="module")
def reference(hf_model, prompt_ids):
    return [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompt_ids]


def _mlfq_llm(model_dir, **options) -> LLM:
    # A quantum of a microsecond demotes every job after each step (and rotates the last
    # queue round-robin), so the priority order changes every step; 4 running at most and
    # 12 device blocks force eviction. No starvation promotion: the run is then
    # independent of wall-clock time.
    settings = dict(scheduler="mlfq", mlfq_base_quantum_s=1e-6, mlfq_num_queues=3,
                    mlfq_starvation_s=1e9, mlfq_queue_order="arrival",
                    mlfq_last_queue="round_robin", max_num_seqs=4, num_kv_blocks=12,
                    kv_headroom_blocks=2)
    settings.update(options)
    return LLM(str(model_dir), **settings)


def test_mlfq_with_swapping_equals_hf(default_model_dir, prompt_ids, reference):
    llm = _mlfq_llm(default_model_dir, host_kv_memory_bytes=64 << 20)
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    kv = llm.engine.kv_manager
    assert kv.swap_stats.num_swap_out_blocks > 0
    assert kv.swap_stats.num_swap_in_blocks > 0
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.output_token_ids for o in outputs] == reference
    assert kv.num_free_blocks == kv.num_blocks
    assert kv.num_used_host_blocks == 0


def test_mlfq_recompute_when_host_tier_is_tiny(default_model_dir, prompt_ids, reference):
    # One host block: most evictions cannot swap and fall back to recompute.
    llm = _mlfq_llm(default_model_dir)
    block_bytes = llm.engine.runner.kv_block_bytes
    llm = _mlfq_llm(default_model_dir, host_kv_memory_bytes=block_bytes)
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    assert [o.output_token_ids for o in outputs] == reference


def test_mlfq_deadline_lane_reordering_with_swapping_equals_hf(default_model_dir, prompt_ids,
                                                              reference):
    llm = _mlfq_llm(default_model_dir, host_kv_memory_bytes=64 << 20, mlfq_deadline_s=400.0)
    # Jobs turn urgent at 100 ticks of the scheduler's clock and drop back at 400.
    reordered = tick_clock_and_watch_lane(llm.engine.scheduler)
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert any(reordered)
    assert llm.engine.kv_manager.swap_stats.num_swap_out_blocks > 0
    assert [o.output_token_ids for o in outputs] == reference
