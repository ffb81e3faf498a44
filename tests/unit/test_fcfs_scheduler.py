"""FCFSScheduler with a real KVCacheManager and no model.

`run_step` plays the engine's part: every scheduled request's `num_computed_tokens`
advances by its `num_new_tokens`, its full blocks are registered, and a request that
caught up with its tokens gets a fake sampled token (7).
"""

from __future__ import annotations

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.request import Request, RequestStatus
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import SchedulerOutput
from lmfleet.worker.scheduler.fcfs import FCFSScheduler
from tests.unit.scheduler_helpers import FAKE_TOKEN, ids, plan, play_step

BLOCK_SIZE = 4


def make_scheduler(num_blocks: int = 16, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64) -> FCFSScheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens)
    return FCFSScheduler(config, KVCacheManager(num_blocks, BLOCK_SIZE))


def make_request(request_id: str, num_prompt_tokens: int, arrival_time: float,
                 priority: int = 0, first_token: int = 100) -> Request:
    prompt = list(range(first_token, first_token + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(), arrival_time=arrival_time,
                   priority=priority)


def run_step(scheduler: FCFSScheduler) -> SchedulerOutput:
    return play_step(scheduler)


# ---- token budget and chunked prefill ------------------------------------------------------


def test_long_prompt_is_prefilled_in_budget_sized_chunks_then_decoded():
    scheduler = make_scheduler(max_num_batched_tokens=5)
    scheduler.add(make_request("a", 12, arrival_time=0))
    assert [plan(run_step(scheduler)) for _ in range(4)] == [
        [("a", 5)], [("a", 5)], [("a", 2)], [("a", 1)]]


def test_only_the_chunk_that_completes_the_prompt_samples():
    scheduler = make_scheduler(max_num_batched_tokens=5)
    a = make_request("a", 7, arrival_time=0)
    scheduler.add(a)
    run_step(scheduler)
    assert (a.num_computed_tokens, a.num_output_tokens) == (5, 0)
    run_step(scheduler)
    assert (a.num_computed_tokens, a.output_token_ids) == (7, [FAKE_TOKEN])


def test_budget_is_shared_oldest_first_and_the_rest_is_chunked():
    scheduler = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("a", 6, arrival_time=0))
    scheduler.add(make_request("b", 6, arrival_time=1))
    assert plan(run_step(scheduler)) == [("a", 6), ("b", 2)]
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 4)]
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 1)]


def test_decodes_are_scheduled_before_new_prefills():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add(make_request("a", 3, arrival_time=0))
    run_step(scheduler)  # a prefilled; decodes from now on
    scheduler.add(make_request("b", 10, arrival_time=1))
    output = run_step(scheduler)
    assert plan(output) == [("a", 1), ("b", 3)]
    assert [s.is_decode for s in output.scheduled] == [True, False]


def test_a_waiting_request_whose_prompt_exceeds_the_remaining_budget_gets_a_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add(make_request("a", 2, arrival_time=0))
    scheduler.add(make_request("b", 9, arrival_time=1))
    assert plan(run_step(scheduler)) == [("a", 2), ("b", 2)]


def test_max_num_seqs_caps_the_running_requests():
    scheduler = make_scheduler(max_num_seqs=2)
    for index, request_id in enumerate("abc"):
        scheduler.add(make_request(request_id, 3, arrival_time=index, first_token=10 * index))
    assert plan(run_step(scheduler)) == [("a", 3), ("b", 3)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 1)]
    a = scheduler.running[0]
    scheduler.finish(a)
    assert plan(run_step(scheduler)) == [("b", 1), ("c", 3)]


def test_waiting_queue_is_ordered_by_priority_then_arrival():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add(make_request("late", 3, arrival_time=2))
    scheduler.add(make_request("early", 3, arrival_time=1))
    scheduler.add(make_request("urgent", 3, arrival_time=3, priority=1))
    assert ids(scheduler.waiting) == ["urgent", "early", "late"]
    assert plan(run_step(scheduler)) == [("urgent", 3)]


def test_nothing_to_do_gives_an_empty_output():
    scheduler = make_scheduler()
    output = scheduler.schedule()
    assert output.is_empty
    assert not scheduler.has_work()


def test_prefix_hit_shortens_the_first_chunk():
    scheduler = make_scheduler()
    a = make_request("a", 10, arrival_time=0)
    scheduler.add(a)
    run_step(scheduler)
    scheduler.finish(a)
    # Same first 8 tokens (2 full blocks) as a: only the remaining 3 tokens are computed.
    b = Request("b", list(range(100, 108)) + [1, 2, 3], SamplingParams(), arrival_time=1)
    scheduler.add(b)
    assert plan(run_step(scheduler)) == [("b", 3)]
    assert b.num_cached_tokens == 8


# ---- preemption ------------------------------------------------------------------------------


def test_preemption_picks_the_latest_arrival_and_admits_nothing_in_that_step():
    # 4 blocks of 4 tokens. a and b have 7-token prompts: 2 blocks each, full after the
    # first sampled token; the next token of each needs a third block.
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", 7, arrival_time=0, first_token=100)
    b = make_request("b", 7, arrival_time=1, first_token=200)
    scheduler.add(a)
    scheduler.add(b)
    assert plan(run_step(scheduler)) == [("a", 7), ("b", 7)]
    assert (a.block_ids, b.block_ids) == ([0, 1], [2, 3])
    assert plan(run_step(scheduler)) == [("a", 1), ("b", 1)]
    scheduler.add(make_request("c", 1, arrival_time=2, first_token=300))
    output = run_step(scheduler)
    assert ids(output.preempted) == ["b"]
    assert plan(output) == [("a", 1)]  # c is not admitted although a slot is free
    assert ids(scheduler.waiting) == ["b", "c"]
    assert scheduler.num_preemptions == 1


def test_preempted_request_returns_to_waiting_with_nothing_computed_and_no_blocks():
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", 7, arrival_time=0, first_token=100)
    b = make_request("b", 7, arrival_time=1, first_token=200)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        run_step(scheduler)
    assert b.status is RequestStatus.WAITING
    assert b.num_computed_tokens == 0
    assert b.block_ids == []
    assert b.num_preemptions == 1
    assert b.output_token_ids == [FAKE_TOKEN, FAKE_TOKEN]  # generated tokens are kept
    assert a.block_ids == [0, 1, 3]  # b's tail block (3) was evicted first
    assert ids(scheduler.running) == ["a"]


def test_lower_priority_is_preempted_before_a_later_arrival():
    scheduler = make_scheduler(num_blocks=4)
    low = make_request("low", 7, arrival_time=0, priority=0, first_token=100)
    high = make_request("high", 7, arrival_time=1, priority=1, first_token=200)
    scheduler.add(low)
    scheduler.add(high)
    assert plan(run_step(scheduler)) == [("high", 7), ("low", 7)]
    run_step(scheduler)
    output = run_step(scheduler)
    assert ids(output.preempted) == ["low"]
    assert plan(output) == [("high", 1)]


def test_the_latest_arrival_preempts_itself_when_it_is_the_one_short_of_blocks():
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", 5, arrival_time=0, first_token=100)  # room for 3 more tokens
    b = make_request("b", 7, arrival_time=1, first_token=200)  # room for 1 more token
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    run_step(scheduler)
    output = run_step(scheduler)
    assert ids(output.preempted) == ["b"]
    assert plan(output) == [("a", 1)]
    assert a.block_ids == [0, 1]  # a never needed a third block


def test_preempted_request_resumes_with_prefix_hits_on_its_own_freed_blocks():
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", 7, arrival_time=0, first_token=100)
    b = make_request("b", 7, arrival_time=1, first_token=200)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        run_step(scheduler)  # b preempted in the third step
    hits_before = scheduler.kv_manager.prefix_stats.hits
    scheduler.finish(a)
    output = run_step(scheduler)
    # b has 9 tokens (7 + 2 sampled). Its first block (2) survived in the cache; its second
    # (3) was reused by a. So 4 tokens come from the cache and 5 are recomputed.
    assert plan(output) == [("b", 5)]
    assert b.block_ids[0] == 2
    assert b.block_ids == [2, 3, 1]
    assert b.status is RequestStatus.RUNNING
    assert scheduler.kv_manager.prefix_stats.hits - hits_before == 4
    assert b.output_token_ids == [FAKE_TOKEN, FAKE_TOKEN, FAKE_TOKEN]


def test_a_victim_already_scheduled_in_this_step_is_taken_out_of_it():
    # low runs first (admitted first) and its decode fits; then high needs a third block,
    # and the victim is low, already in this step's plan: it must leave the plan.
    scheduler = make_scheduler(num_blocks=4)
    low = make_request("low", 5, arrival_time=0, priority=0, first_token=100)
    high = make_request("high", 7, arrival_time=1, priority=1, first_token=200)
    scheduler.add(low)
    run_step(scheduler)
    scheduler.add(high)
    assert plan(run_step(scheduler)) == [("low", 1), ("high", 7)]
    assert plan(run_step(scheduler)) == [("low", 1), ("high", 1)]
    output = run_step(scheduler)
    assert ids(output.preempted) == ["low"]
    assert plan(output) == [("high", 1)]
    # low's blocks were freed tail first (1, 0): high takes block 1.
    assert high.block_ids == [2, 3, 1]
    assert low.block_ids == []


# ---- abort -----------------------------------------------------------------------------------


def test_abort_of_waiting_and_running_requests_frees_every_block():
    scheduler = make_scheduler(num_blocks=8, max_num_seqs=1)
    a = make_request("a", 6, arrival_time=0, first_token=100)
    b = make_request("b", 6, arrival_time=1, first_token=200)
    scheduler.add(a)
    scheduler.add(b)
    run_step(scheduler)
    assert (ids(scheduler.running), ids(scheduler.waiting)) == (["a"], ["b"])
    assert scheduler.kv_manager.num_free_blocks == 6
    assert scheduler.abort("b") is b
    assert scheduler.num_waiting == 0
    assert scheduler.abort("a") is a
    assert scheduler.num_running == 0
    assert a.block_ids == []
    assert scheduler.kv_manager.num_free_blocks == 8
    assert not scheduler.has_work()


def test_abort_of_a_preempted_request_frees_nothing_twice():
    scheduler = make_scheduler(num_blocks=4)
    a = make_request("a", 7, arrival_time=0, first_token=100)
    b = make_request("b", 7, arrival_time=1, first_token=200)
    scheduler.add(a)
    scheduler.add(b)
    for _ in range(3):
        run_step(scheduler)
    assert scheduler.abort("b") is b  # waiting again after preemption, holding no blocks
    assert scheduler.abort("a") is a
    assert scheduler.kv_manager.num_free_blocks == 4
    assert scheduler.kv_manager.pool.ref_counts == [0, 0, 0, 0]


def test_abort_of_an_unknown_request_returns_none():
    scheduler = make_scheduler()
    scheduler.add(make_request("a", 3, arrival_time=0))
    assert scheduler.abort("nope") is None
    assert scheduler.num_waiting == 1
