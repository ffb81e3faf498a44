"""The virtual FCFS queue the deadline lane learns from: exact JCTs on a tiny example."""

from __future__ import annotations

import pytest

from lmfleet.worker.scheduler.fcfs_replay import FCFSReplay


def _four_jobs() -> FCFSReplay:
    """Two servers; a arrives at 0 (10 s of service), b at 1 (4 s), c at 2 (3 s), d at 3
    (1 s). FCFS: a 0-10 and b 1-5 on the two servers, c 5-8 and d 8-9 after b."""
    replay = FCFSReplay(num_servers=2)
    for job_id, arrived_s in (("a", 0.0), ("b", 1.0), ("c", 2.0), ("d", 3.0)):
        replay.arrived(job_id, arrived_s)
    return replay


def test_jobs_are_placed_in_arrival_order_once_all_before_them_have_ended():
    replay = _four_jobs()
    # Finishing out of arrival order (as under MLFQ) places nobody while a is unfinished.
    assert replay.finished("d", 1.0) == []
    assert replay.finished("b", 4.0) == []
    assert replay.finished("c", 3.0) == []
    assert replay.num_unplaced == 4
    # a's end places all four: JCTs 10, 5 - 1, 8 - 2, 9 - 3, in arrival order.
    assert replay.finished("a", 10.0) == [10.0, 4.0, 6.0, 6.0]
    assert replay.num_unplaced == 0


def test_a_dropped_job_takes_no_server_time_and_unblocks_those_after_it():
    replay = _four_jobs()
    assert replay.finished("a", 10.0) == [10.0]
    assert replay.finished("c", 3.0) == []  # b, before c, has not ended
    assert replay.dropped("b") == [3.0]  # c runs 2-5 on the free server
    assert replay.finished("d", 1.0) == [3.0]  # d: 5-6


def test_a_later_arrival_does_not_start_before_it_arrives():
    replay = FCFSReplay(num_servers=1)
    replay.arrived("first", 0.0)
    replay.arrived("later", 100.0)
    assert replay.finished("first", 5.0) == [5.0]
    assert replay.finished("later", 5.0) == [5.0]  # the server was idle from 5 to 100


def test_unknown_or_repeated_ends_and_a_repeated_arrival_change_nothing():
    replay = FCFSReplay(num_servers=1)
    assert replay.finished("never-arrived", 1.0) == []
    replay.arrived("x", 0.0)
    replay.arrived("x", 50.0)  # still waiting: the first arrival stands
    assert replay.finished("x", 2.0) == [2.0]
    assert replay.finished("x", 2.0) == []
    assert replay.dropped("x") == []


def test_at_least_one_server():
    with pytest.raises(ValueError, match="num_servers"):
        FCFSReplay(num_servers=0)


def test_past_max_unplaced_the_oldest_unfinished_job_is_given_up():
    replay = FCFSReplay(num_servers=1, max_unplaced=2)
    assert replay.arrived("stuck", 0.0) == []
    assert replay.arrived("b", 1.0) == []
    assert replay.finished("b", 3.0) == []  # behind the unfinished "stuck"
    # A third waiting job: "stuck" is given up (no server time), so b runs 1-4.
    assert replay.arrived("c", 2.0) == [3.0]
    assert replay.num_unplaced == 1
    assert replay.finished("stuck", 100.0) == []  # already given up
    assert replay.finished("c", 1.0) == [3.0]  # 4-5
