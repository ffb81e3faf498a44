"""MLFQScheduler queue mechanics and KV placement, on a fake clock, with no model.

Times are in fake seconds chosen so every comparison is exact: prefill costs 1 s per
token, the base quantum is 4 s, so with 4 queues the quanta are 4, 8, 16 and 32 s and a
prompt of n tokens joins Q0 for n <= 4, Q1 for n <= 8, Q2 for n <= 16, else Q3.
`run_step` plays the engine's part: scheduled tokens are computed, full blocks registered,
a request that caught up samples a fake token (7), the clock advances by the step's time
and every scheduled job is charged it.
"""

from __future__ import annotations

import pytest

from lmfleet.worker.config import SchedulerConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.request import Request, RequestStatus
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import SchedulerOutput
from lmfleet.worker.scheduler.cost_model import CostModel
from lmfleet.worker.scheduler.mlfq import MLFQScheduler

BLOCK_SIZE = 4
FAKE_TOKEN = 7
COST = CostModel(prefill_base_s=0.0, prefill_per_token_s=1.0, decode_base_s=0.5,
                 decode_per_seq_s=0.25, decode_per_ctx_token_s=0.0)


def make_scheduler(num_blocks: int = 16, num_host_blocks: int = 0, max_num_seqs: int = 8,
                   max_num_batched_tokens: int = 64, headroom: int = 0,
                   base_quantum_s: float | None = 4.0, starvation_s: float = 100.0,
                   cost_model: CostModel = COST) -> tuple[MLFQScheduler, list[float]]:
    """A scheduler on a fake clock; set `now[0]` to move time."""
    config = SchedulerConfig(policy="mlfq", max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens,
                             mlfq_num_queues=4, mlfq_base_quantum_s=base_quantum_s,
                             mlfq_starvation_s=starvation_s, kv_headroom_blocks=headroom)
    now = [0.0]
    kv = KVCacheManager(num_blocks, BLOCK_SIZE, num_host_blocks=num_host_blocks)
    return MLFQScheduler(config, kv, cost_model, clock=lambda: now[0]), now


def make_request(request_id: str, num_prompt_tokens: int, priority: int = 0) -> Request:
    # Prompts differ by request id, so no two requests share a prefix unless a test says so.
    first = 1000 * sum(map(ord, request_id))
    prompt = list(range(first, first + num_prompt_tokens))
    return Request(request_id, prompt, SamplingParams(), priority=priority)


def run_step(scheduler: MLFQScheduler, now: list[float], elapsed_s: float) -> SchedulerOutput:
    output = scheduler.schedule()
    for item in output.scheduled:
        request = item.request
        request.num_computed_tokens += item.num_new_tokens
        scheduler.kv_manager.cache_computed_blocks(request)
        if request.num_computed_tokens == request.num_tokens:
            request.append_output_token(FAKE_TOKEN, None)
    now[0] += elapsed_s
    scheduler.on_step_finished(output, elapsed_s)
    return output


def plan(output: SchedulerOutput) -> list[tuple[str, int]]:
    return [(s.request.request_id, s.num_new_tokens) for s in output.scheduled]


def ids(requests: list[Request]) -> list[str]:
    return [r.request_id for r in requests]


def level(scheduler: MLFQScheduler, request_id: str) -> int:
    return scheduler.entries[request_id].level


# ---- skip-join and priority ----------------------------------------------------------------


@pytest.mark.parametrize("num_tokens, expected", [
    (1, 0), (4, 0), (5, 1), (8, 1), (9, 2), (16, 2), (17, 3), (500, 3)])
def test_skip_join_starts_in_the_first_queue_whose_quantum_covers_the_prefill(
        num_tokens, expected):
    scheduler, _ = make_scheduler()
    request = make_request("a", num_tokens)
    assert scheduler.initial_level(request) == expected
    scheduler.add(request)
    assert level(scheduler, "a") == expected


def test_skip_join_counts_the_fixed_prefill_cost():
    cost = CostModel(prefill_base_s=3.0, prefill_per_token_s=1.0)
    scheduler, _ = make_scheduler(cost_model=cost)
    # 3 + 1 = 4 s fits Q0's quantum; 3 + 2 = 5 s does not.
    assert scheduler.initial_level(make_request("a", 1)) == 0
    assert scheduler.initial_level(make_request("b", 2)) == 1


def test_skip_join_estimates_only_the_tokens_not_computed_yet():
    scheduler, _ = make_scheduler()
    request = make_request("a", 14)
    request.num_computed_tokens = 12
    assert scheduler.initial_level(request) == 0


@pytest.mark.parametrize("priority, expected", [(0, 2), (1, 1), (2, 0), (5, 0), (-1, 3), (-9, 3)])
def test_priority_shifts_the_starting_queue_and_is_clamped(priority, expected):
    scheduler, _ = make_scheduler()
    scheduler.add(make_request("a", 10, priority=priority))  # 10 s of prefill: Q2
    assert level(scheduler, "a") == expected


def test_base_quantum_defaults_to_a_decode_step_of_a_half_full_batch():
    scheduler, _ = make_scheduler(base_quantum_s=None, max_num_seqs=8)
    # decode_base 0.5 + 4 sequences * 0.25 = 1.5 s
    assert [scheduler.quantum(i) for i in range(4)] == [1.5, 3.0, 6.0, 12.0]


# ---- demotion, round-robin, starvation, order --------------------------------------------------


def test_a_job_is_demoted_exactly_when_its_quantum_is_spent():
    scheduler, _ = make_scheduler()
    a = make_request("a", 3)
    scheduler.add(a)
    levels = []
    for seconds in (3, 1, 7, 1, 15, 1):
        scheduler.charge(a, seconds)
        levels.append(level(scheduler, "a"))
    # Q0 4 s: 3, then 4 -> Q1; Q1 8 s: 7, then 8 -> Q2; Q2 16 s: 15, then 16 -> Q3.
    assert levels == [0, 1, 1, 2, 2, 3]


def test_demotion_moves_one_queue_and_drops_the_excess_service():
    scheduler, _ = make_scheduler()
    a = make_request("a", 3)
    scheduler.add(a)
    scheduler.charge(a, 30)
    assert (level(scheduler, "a"), scheduler.entries["a"].service_s) == (1, 0.0)


def test_a_demoted_job_goes_to_the_back_of_the_next_queue():
    scheduler, _ = make_scheduler()
    a, b, c = make_request("a", 3), make_request("b", 5), make_request("c", 6)
    for request in (a, b, c):
        scheduler.add(request)
    assert ids(scheduler.priority_order()) == ["a", "b", "c"]
    scheduler.charge(a, 4)
    assert ids(scheduler.priority_order()) == ["b", "c", "a"]
    assert level(scheduler, "a") == 1


def test_the_last_queue_is_round_robin():
    scheduler, _ = make_scheduler()
    x, y = make_request("x", 20), make_request("y", 30)
    scheduler.add(x)
    scheduler.add(y)
    assert (level(scheduler, "x"), level(scheduler, "y")) == (3, 3)
    scheduler.charge(x, 31)
    assert ids(scheduler.priority_order()) == ["x", "y"]
    scheduler.charge(x, 1)  # Q3's 32 s spent: to the back of Q3
    assert ids(scheduler.priority_order()) == ["y", "x"]
    scheduler.charge(y, 32)
    assert ids(scheduler.priority_order()) == ["x", "y"]
    assert (level(scheduler, "x"), level(scheduler, "y")) == (3, 3)


def test_priority_order_is_by_queue_then_position():
    scheduler, _ = make_scheduler()
    for request_id, num_tokens in (("q", 2), ("s", 10), ("r", 3), ("t", 6), ("u", 1)):
        scheduler.add(make_request(request_id, num_tokens))
    assert ids(scheduler.priority_order()) == ["q", "r", "u", "t", "s"]


def test_a_starved_job_is_promoted_to_the_front_of_q0_at_the_bound_not_before():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s, q = make_request("s", 10), make_request("q", 2)
    scheduler.add(s)  # Q2, at t=0
    now[0] = 50.0
    scheduler.add(q)  # Q0, at t=50
    now[0] = 99.5
    assert scheduler.promote_starved() == []
    assert ids(scheduler.priority_order()) == ["q", "s"]
    now[0] = 100.0
    assert scheduler.promote_starved() == [s]
    assert level(scheduler, "s") == 0
    assert ids(scheduler.priority_order()) == ["s", "q"]


def test_a_job_waiting_in_q0_is_protected_from_starvation_too():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s, q = make_request("s", 10), make_request("q", 2)
    scheduler.add(s)  # Q2, at t=0
    now[0] = 50.0
    scheduler.add(q)  # Q0, at t=50
    now[0] = 100.0
    scheduler.promote_starved()  # s goes ahead of q
    now[0] = 150.0
    # q has not run for 100 s although it sits in Q0: it goes to the front in turn.
    assert scheduler.promote_starved() == [q]
    assert ids(scheduler.priority_order()) == ["q", "s"]


def test_running_restarts_the_starvation_clock():
    scheduler, now = make_scheduler(starvation_s=100.0)
    s = make_request("s", 10)
    scheduler.add(s)
    now[0] = 50.0
    scheduler.charge(s, 1.0)  # ran at t=50; 1 s of Q2's 16 s
    now[0] = 149.0
    assert scheduler.promote_starved() == []
    now[0] = 150.0
    assert scheduler.promote_starved() == [s]


def test_jobs_starved_together_are_promoted_longest_waiting_first():
    scheduler, now = make_scheduler(starvation_s=100.0)
    a = make_request("a", 10)
    scheduler.add(a)  # last ran (arrived) at t=0
    now[0] = 10.0
    b = make_request("b", 6)
    scheduler.add(b)  # t=10
    now[0] = 110.0
    scheduler.promote_starved()
    assert ids(scheduler.priority_order()) == ["a", "b"]
    assert (level(scheduler, "a"), level(scheduler, "b")) == (0, 0)


def test_schedule_promotes_starved_jobs_before_choosing():
    scheduler, now = make_scheduler(max_num_seqs=1, starvation_s=100.0)
    scheduler.add(make_request("s", 10))  # Q2
    scheduler.add(make_request("q", 2))  # Q0
    assert plan(run_step(scheduler, now, 1.0)) == [("q", 2)]
    now[0] = 100.0
    assert plan(run_step(scheduler, now, 1.0)) == [("s", 10)]


def test_queue_sizes_count_running_and_waiting_per_queue():
    scheduler, now = make_scheduler(max_num_seqs=1)
    for request_id, num_tokens in (("q", 2), ("r", 3), ("s", 10)):
        scheduler.add(make_request(request_id, num_tokens))
    scheduler.schedule()
    assert scheduler.queue_sizes() == [(1, 1), (0, 0), (0, 1), (0, 0)]
    assert (scheduler.num_running, scheduler.num_waiting, scheduler.num_swapped) == (1, 2, 0)


def test_only_jobs_still_known_are_charged():
    scheduler, now = make_scheduler()
    a, b = make_request("a", 2), make_request("b", 3)
    scheduler.add(a)
    scheduler.add(b)
    output = scheduler.schedule()
    scheduler.finish(a)  # the engine finishes requests before charging the step
    scheduler.on_step_finished(output, 4.0)
    assert "a" not in scheduler.entries
    assert level(scheduler, "b") == 1


# ---- schedule(): limits and strict priority ----------------------------------------------------


def test_schedule_respects_max_num_seqs():
    scheduler, now = make_scheduler(max_num_seqs=2)
    for request_id in "abc":
        scheduler.add(make_request(request_id, 2))
    assert plan(run_step(scheduler, now, 1.0)) == [("a", 2), ("b", 2)]
    assert scheduler.jobs["c"].status is RequestStatus.WAITING
    assert scheduler.jobs["a"].status is RequestStatus.RUNNING


def test_schedule_shares_the_token_budget_in_priority_order_and_chunks_the_rest():
    scheduler, now = make_scheduler(max_num_batched_tokens=8)
    scheduler.add(make_request("a", 6))  # Q1
    scheduler.add(make_request("b", 6))  # Q1, behind a
    assert plan(run_step(scheduler, now, 1.0)) == [("a", 6), ("b", 2)]
    assert plan(run_step(scheduler, now, 1.0)) == [("a", 1), ("b", 4)]
    assert plan(run_step(scheduler, now, 1.0)) == [("a", 1), ("b", 1)]


def test_a_job_that_cannot_fit_blocks_the_jobs_below_it():
    # A huge quantum puts every job in Q0, in arrival order.
    scheduler, now = make_scheduler(num_blocks=4, base_quantum_s=1000.0)
    a, b, c = make_request("a", 8), make_request("b", 12), make_request("c", 4)
    for request in (a, b, c):
        scheduler.add(request)
    output = run_step(scheduler, now, 1.0)
    # b needs 3 blocks, 2 are free and nothing may be evicted (a is chosen); c would fit in
    # one block but may not overtake b.
    assert plan(output) == [("a", 8)]
    assert (b.block_ids, c.block_ids) == ([], [])
    assert scheduler.kv_manager.num_free_blocks == 2
    assert (output.preempted, output.swapped_out, scheduler.num_preemptions) == ([], [], 0)


def test_a_prefix_hit_schedules_only_the_uncached_tokens():
    scheduler, now = make_scheduler()
    a = make_request("a", 10)
    scheduler.add(a)
    run_step(scheduler, now, 1.0)
    b = Request("b", list(a.prompt_token_ids), SamplingParams())
    scheduler.add(b)
    output = run_step(scheduler, now, 1.0)
    # Two full blocks (8 tokens) are cached: b computes the last 2 prompt tokens.
    assert plan(output) == [("a", 1), ("b", 2)]
    assert (b.num_cached_tokens, b.num_computed_tokens) == (8, 10)
    assert b.block_ids[:2] == a.block_ids[:2]


# ---- eviction, swap and recompute ----------------------------------------------------------


def _two_running_then_a_big_arrival(num_host_blocks: int):
    """6 blocks. Step 1 runs a (blocks 0-1) and x (blocks 2-3), 8 s each: both are demoted
    to Q2, a ahead of x. Then y arrives (12 tokens, priority 1: Q1) needing 3 blocks."""
    scheduler, now = make_scheduler(num_blocks=6, num_host_blocks=num_host_blocks)
    a, x = make_request("a", 8), make_request("x", 8)
    scheduler.add(a)
    scheduler.add(x)
    assert plan(run_step(scheduler, now, 8.0)) == [("a", 8), ("x", 8)]
    assert (a.block_ids, x.block_ids) == ([0, 1], [2, 3])
    assert ids(scheduler.priority_order()) == ["a", "x"]
    y = make_request("y", 12, priority=1)
    scheduler.add(y)
    return scheduler, now, a, x, y


def test_eviction_swaps_the_lowest_priority_unchosen_job_to_host():
    scheduler, now, a, x, y = _two_running_then_a_big_arrival(num_host_blocks=4)
    output = run_step(scheduler, now, 8.0)
    # y needs 3 blocks with 2 free: x (last in the order) goes to host blocks 0-1; its
    # freed blocks (3 then 2) join the back of the free queue, after 4 and 5.
    assert output.swap_out_blocks == [(2, 0), (3, 1)]
    assert output.swapped_out == [x] and output.preempted == []
    assert (x.block_ids, x.host_block_ids, x.num_computed_tokens) == ([], [0, 1], 8)
    assert plan(output) == [("y", 12), ("a", 1)]
    assert (y.block_ids, a.block_ids) == ([4, 5, 3], [0, 1, 2])
    assert (x.num_preemptions, scheduler.num_preemptions) == (1, 1)
    assert (scheduler.num_running, scheduler.num_waiting, scheduler.num_swapped) == (2, 0, 1)
    assert scheduler.kv_manager.num_free_host_blocks == 2


def test_eviction_recomputes_when_there_is_no_host_tier():
    scheduler, now, a, x, y = _two_running_then_a_big_arrival(num_host_blocks=0)
    output = run_step(scheduler, now, 8.0)
    assert output.preempted == [x] and output.swapped_out == []
    assert output.swap_out_blocks == []
    assert (x.block_ids, x.host_block_ids, x.num_computed_tokens) == ([], [], 0)
    assert plan(output) == [("y", 12), ("a", 1)]
    assert scheduler.num_swapped == 0


def test_a_swapped_job_is_swapped_in_when_chosen_and_a_full_host_means_recompute():
    scheduler, now, a, x, y = _two_running_then_a_big_arrival(num_host_blocks=4)
    run_step(scheduler, now, 8.0)  # x swapped out; y is demoted behind x
    assert ids(scheduler.priority_order()) == ["a", "x", "y"]
    output = run_step(scheduler, now, 1.0)
    # x needs its 2 blocks back plus one for its next token; the only victim, y, holds 3
    # computed blocks and the host has 2 free: y is recomputed. Its blocks were freed
    # last-first (3, 5, 4): x's KV comes back into 3 and 5, and its new block is 4.
    assert output.preempted == [y] and output.swapped_out == []
    assert (y.block_ids, y.num_computed_tokens) == ([], 0)
    assert output.swap_in_blocks == [(0, 3), (1, 5)]
    assert output.swapped_in == [x]
    assert (x.block_ids, x.host_block_ids) == ([3, 5, 4], [])
    assert plan(output) == [("a", 1), ("x", 1)]
    kv = scheduler.kv_manager
    # Host blocks 0-1 are read by this step's copies: free again from the next step on.
    assert (kv.num_free_host_blocks, kv.num_used_host_blocks) == (2, 0)
    kv.begin_step()
    assert kv.num_free_host_blocks == 4


@pytest.mark.parametrize("num_host_blocks", [4, 0])
def test_no_job_is_evicted_when_evicting_cannot_make_room(num_host_blocks):
    # A huge quantum keeps a and r in Q0; x starts in Q3 (priority -3).
    scheduler, now = make_scheduler(num_blocks=4, num_host_blocks=num_host_blocks,
                                    base_quantum_s=1000.0)
    a, x = make_request("a", 8), make_request("x", 4, priority=-3)
    scheduler.add(a)
    scheduler.add(x)
    assert plan(run_step(scheduler, now, 1.0)) == [("a", 8), ("x", 4)]  # a: 0-1, x: 2
    r = make_request("r", 12)  # behind a, ahead of x; needs 3 blocks
    scheduler.add(r)
    for _ in range(2):
        output = run_step(scheduler, now, 1.0)
        # a takes the last free block; even without x's block r would not fit, so x keeps
        # its KV (no swap out and prefetch back every step, no discarded KV).
        assert plan(output) == [("a", 1)]
        assert (output.swap_out_blocks, output.swap_in_blocks, output.preempted) == ([], [], [])
        assert (x.block_ids, x.num_computed_tokens) == ([2], 4)
    assert scheduler.num_preemptions == 0


@pytest.mark.parametrize("headroom, swapped", [(0, False), (1, False), (2, True), (4, True)])
def test_unchosen_jobs_are_swapped_out_to_keep_the_headroom(headroom, swapped):
    scheduler, now = make_scheduler(num_blocks=7, num_host_blocks=4, max_num_seqs=2,
                                    headroom=headroom)
    a, x = make_request("a", 8), make_request("x", 8)
    scheduler.add(a)
    scheduler.add(x)
    first = run_step(scheduler, now, 8.0)  # both chosen: nothing may go, even below headroom
    assert first.swap_out_blocks == []
    assert scheduler.kv_manager.num_free_blocks == 3
    b = make_request("b", 4)  # Q0
    scheduler.add(b)
    output = run_step(scheduler, now, 1.0)
    assert plan(output) == [("b", 4), ("a", 1)]  # max_num_seqs=2 leaves x out; 1 block free
    assert output.preempted == []
    if swapped:
        # Only x is unchosen: it goes even when that does not reach the headroom (4).
        assert output.swap_out_blocks == [(2, 0), (3, 1)]
        assert output.swapped_out == [x]
        assert (x.block_ids, x.host_block_ids) == ([], [0, 1])
        assert scheduler.kv_manager.num_free_blocks == 3
    else:
        assert output.swap_out_blocks == [] and output.swapped_out == []
        assert x.block_ids == [2, 3]
        assert scheduler.kv_manager.num_free_blocks == 1


@pytest.mark.parametrize("headroom, prefetched", [(1, True), (2, False)])
def test_a_swapped_job_that_comes_next_is_prefetched_while_room_beyond_headroom_lasts(
        headroom, prefetched):
    scheduler, now = make_scheduler(num_blocks=4, num_host_blocks=4, max_num_seqs=1,
                                    headroom=headroom)
    x = make_request("x", 8)
    scheduler.add(x)
    run_step(scheduler, now, 8.0)  # x: blocks 0-1, demoted to Q2
    y = make_request("y", 12, priority=1)  # Q1, 3 blocks
    scheduler.add(y)
    output = run_step(scheduler, now, 1.0)
    assert output.swap_out_blocks == [(0, 0), (1, 1)]
    assert output.swap_in_blocks == []  # 1 block free: no room to bring x back
    scheduler.abort("y")  # frees blocks 2, 3, 1 (free queue: 0, 1, 3, 2)
    scheduler.add(make_request("z", 4))  # Q0
    output = run_step(scheduler, now, 1.0)
    assert plan(output) == [("z", 4)]  # max_num_seqs=1: x does not run this step
    if prefetched:
        # 3 free blocks - 2 for x leaves 1 >= headroom: x comes back ahead of need.
        assert output.swap_in_blocks == [(0, 1), (1, 3)]
        assert output.swapped_in == [x]
        assert (x.block_ids, x.host_block_ids) == ([1, 3], [])
    else:
        assert output.swap_in_blocks == [] and output.swapped_in == []
        assert x.host_block_ids == [0, 1]
    scheduler.abort("z")
    output = run_step(scheduler, now, 1.0)
    assert plan(output) == [("x", 1)]
    # A prefetched job runs without a second copy; otherwise it is swapped in now.
    assert (output.swap_in_blocks == []) is prefetched


def test_abort_frees_device_blocks():
    scheduler, now = make_scheduler()
    scheduler.add(make_request("a", 10))
    run_step(scheduler, now, 1.0)
    assert scheduler.kv_manager.num_free_blocks == 13
    aborted = scheduler.abort("a")
    assert aborted is not None and aborted.request_id == "a"
    assert aborted.block_ids == []
    assert scheduler.kv_manager.num_free_blocks == 16
    assert (scheduler.jobs, scheduler.entries) == ({}, {})
    assert not scheduler.has_work()
    assert scheduler.abort("a") is None


def test_abort_frees_host_blocks_of_a_swapped_job():
    scheduler, now, a, x, y = _two_running_then_a_big_arrival(num_host_blocks=4)
    run_step(scheduler, now, 8.0)
    assert scheduler.kv_manager.num_free_host_blocks == 2
    assert scheduler.abort("x") is x
    assert x.host_block_ids == []
    assert scheduler.kv_manager.num_free_host_blocks == 4
    assert scheduler.num_swapped == 0
