"""MLFQ step selection and KV placement on a fake clock: limits, strict priority,
eviction, swap, recompute, headroom, prefetch, abort (set-up in scheduler_helpers.py).

The expected orders here are worked out with jobs in arrival order within a queue
(`mlfq_queue_order="arrival"`); placement does not depend on how the order came about.
"""

from __future__ import annotations

import functools

import pytest

from lmfleet.worker.request import Request, RequestStatus
from lmfleet.worker.sampling_params import SamplingParams
from tests.unit import scheduler_helpers
from tests.unit.scheduler_helpers import ids, make_request, plan, run_step

make_scheduler = functools.partial(scheduler_helpers.make_scheduler, queue_order="arrival")

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


@pytest.mark.parametrize("bounded", [True, False])
def test_a_lower_queue_prefill_may_add_at_most_the_higher_queues_step_time(bounded):
    # Cost model: a step of n sequences and t tokens takes 0.5 + 0.25 n + (t - n) s.
    # s joins Q0, the long prompt L is in Q3.
    scheduler, now = make_scheduler(max_num_batched_tokens=8, bounded_prefill=bounded)
    scheduler.add(make_request("L", 30))
    assert plan(run_step(scheduler, now, 1.0)) == [("L", 8)]  # alone: a full chunk
    scheduler.add(make_request("s", 2))
    # s's prefill step takes 1.75 s: L may add 1 token (1 s); s's decode takes 0.75 s,
    # less than one of L's tokens: L waits. Without the bound L takes the rest of the
    # token budget, and every step of s takes 7-8 s more.
    expected = [[("s", 2), ("L", 1)], [("s", 1)]] if bounded else \
        [[("s", 2), ("L", 6)], [("s", 1), ("L", 7)]]
    assert [plan(run_step(scheduler, now, 1.0)) for _ in range(2)] == expected
    if bounded:
        assert scheduler.jobs["L"].status is RequestStatus.WAITING


def test_lower_queue_decodes_are_not_bounded_and_count_as_higher_work():
    scheduler, now = make_scheduler()
    scheduler.add(make_request("D", 20))  # Q3
    assert plan(run_step(scheduler, now, 1.0)) == [("D", 20)]  # now decoding
    scheduler.add(make_request("L", 30))  # Q3, behind D
    scheduler.add(make_request("s", 4))  # Q0
    # s (4 tokens) and D (1): 2 sequences, 5 tokens, 4 s; L may add 4 tokens. Then s and
    # D decode: 1 s, 1 token of L.
    assert plan(run_step(scheduler, now, 1.0)) == [("s", 4), ("D", 1), ("L", 4)]
    assert plan(run_step(scheduler, now, 1.0)) == [("s", 1), ("D", 1), ("L", 1)]


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
