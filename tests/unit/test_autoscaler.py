"""Autoscaler (cluster/autoscaler.py): scaling decisions on a fake clock."""

from __future__ import annotations

import math

import pytest

from lmfleet.cluster.autoscaler import (
    Autoscaler,
    AutoscalingConfig,
    ReplicaLoad,
    ScalingDecision,
)


def make(**config) -> tuple[Autoscaler, list[float]]:
    now = [0.0]
    return Autoscaler("m", AutoscalingConfig(**config), clock=lambda: now[0]), now


def ready(*loads: int, kv: float = 0.1) -> list[ReplicaLoad]:
    """One ready replica per load, all of it running."""
    return [ReplicaLoad(f"r{i}", load, 0, kv) for i, load in enumerate(loads)]


@pytest.mark.parametrize(("fields", "field", "shown"), [
    ({"min_replicas": -1}, "min_replicas", "-1"),
    ({"max_replicas": 0, "min_replicas": 0}, "max_replicas", "0"),
    ({"min_replicas": 3, "max_replicas": 2}, "max_replicas", "2"),
    ({"target_load_per_replica": 0}, "target_load_per_replica", "0.0"),
    ({"target_load_per_replica": math.nan}, "target_load_per_replica", "nan"),
    ({"target_load_per_replica": math.inf}, "target_load_per_replica", "inf"),
    ({"target_kv_usage": 0.0}, "target_kv_usage", "0.0"),
    ({"target_kv_usage": 1.5}, "target_kv_usage", "1.5"),
    ({"upscale_delay_s": -0.1}, "upscale_delay_s", "-0.1"),
    ({"downscale_delay_s": math.nan}, "downscale_delay_s", "nan"),
    ({"max_starting": 0}, "max_starting", "0"),
    ({"max_replicas": True}, "max_replicas", "True"),
    ({"min_replicas": 1.0}, "min_replicas", "1.0"),
    ({"target_kv_usage": "0.5"}, "target_kv_usage", "'0.5'"),
    ({"upscale_delay_s": False}, "upscale_delay_s", "False"),
])
def test_config_rejects_bad_values_naming_the_field(fields, field, shown):
    with pytest.raises(ValueError, match=rf"AutoscalingConfig\.{field} .*got {shown}$"):
        AutoscalingConfig(**fields)


def test_config_defaults_and_int_floats_are_stored_as_floats():
    cfg = AutoscalingConfig(max_replicas=3, target_load_per_replica=4, target_kv_usage=1,
                            upscale_delay_s=0, downscale_delay_s=math.inf)
    assert (cfg.min_replicas, cfg.max_replicas, cfg.max_starting) == (1, 3, 2)
    assert type(cfg.target_load_per_replica) is float
    assert (cfg.target_load_per_replica, cfg.target_kv_usage, cfg.upscale_delay_s) == (
        4.0, 1.0, 0.0)
    assert AutoscalingConfig(min_replicas=0).min_replicas == 0


@pytest.mark.parametrize("args", [
    ("", 1, 0, 0.1), ("r", -1, 0, 0.1), ("r", 1, 2.0, 0.1), ("r", True, 0, 0.1),
    ("r", 1, 0, 1.01), ("r", 1, 0, math.nan), ("r", 1, 0, None),
])
def test_replica_load_rejects_bad_values(args):
    with pytest.raises(ValueError, match=r"ReplicaLoad\."):
        ReplicaLoad(*args)


def test_decide_rejects_bad_input():
    scaler, _ = make(max_replicas=3)
    with pytest.raises(ValueError, match="num_starting"):
        scaler.decide(ready(1), -1)
    with pytest.raises(ValueError, match="num_starting"):
        scaler.decide(ready(1), True)
    with pytest.raises(ValueError, match="'r0' appears twice"):
        scaler.decide(ready(1) + ready(2), 0)
    with pytest.raises(ValueError, match="ReplicaLoad"):
        scaler.decide([("r0", 1, 0, 0.1)], 0)


def test_raw_desired_is_load_over_target_rounded_up_and_clamped():
    scaler, _ = make(min_replicas=2, max_replicas=10, upscale_delay_s=5)
    loads = [ReplicaLoad("a", 3, 2, 0.5), ReplicaLoad("b", 4, 0, 0.3), ready(4)[0]]
    d = scaler.decide(loads, 0)
    assert (d.num_ready, d.current, d.total_load, d.raw_desired) == (3, 3, 13, 4)
    assert d.mean_kv_usage == pytest.approx(0.3)
    assert (d.desired, d.num_to_start, d.num_to_stop) == (3, 0, 0)
    assert make(max_replicas=3)[0].decide(loads, 0).raw_desired == 3
    assert make(min_replicas=2, max_replicas=5)[0].decide(ready(0, 0), 0).raw_desired == 2
    assert make(max_replicas=5)[0].decide(ready(4, 4), 0).raw_desired == 2


def test_kv_usage_above_target_asks_for_one_more_replica():
    scaler, _ = make(max_replicas=5, upscale_delay_s=0)
    d = scaler.decide(ready(1, 1, kv=0.95), 0)
    assert (d.raw_desired, d.desired, d.num_to_start) == (3, 3, 1)
    assert d.reason == "kv usage 0.95 > 0.9 for 0.0 s: 2 -> 3"
    assert make(max_replicas=5)[0].decide(ready(1, 1, kv=0.9), 0).raw_desired == 1
    assert make(max_replicas=2)[0].decide(ready(1, 1, kv=0.95), 0).raw_desired == 2
    # The load asks for more than the KV rule does: the load wins.
    assert make(max_replicas=9)[0].decide(ready(20, 0, kv=0.95), 0).raw_desired == 5


def test_upscale_waits_exactly_its_delay():
    scaler, now = make(max_replicas=10, upscale_delay_s=2.0)
    loads = ready(5, 4, 4)     # 13 at 4.0 per replica: 4
    for t in (0.0, 1.0, 1.99):
        now[0] = t
        d = scaler.decide(loads, 0)
        assert (d.raw_desired, d.desired, d.num_to_start) == (4, 3, 0)
        if t == 1.0:
            assert d.reason == "load 13 > 3 x 4.0 for 1.0 s of 2.0 s: holding 3"
    now[0] = 2.0
    d = scaler.decide(loads, 0)
    assert (d.desired, d.num_to_start, d.num_to_stop) == (4, 1, 0)
    assert d.reason == "load 13 > 3 x 4.0 for 2.0 s: 3 -> 4"


def test_upscale_timer_resets_when_load_dips():
    scaler, now = make(max_replicas=10, upscale_delay_s=2.0)
    high, low = ready(5, 4, 4), ready(4, 4, 4)
    now[0] = 0.0
    assert scaler.decide(high, 0).num_to_start == 0
    now[0] = 1.5
    assert scaler.decide(low, 0).raw_desired == 3
    for t in (2.0, 3.99):
        now[0] = t
        assert scaler.decide(high, 0).num_to_start == 0
    now[0] = 4.0
    assert scaler.decide(high, 0).num_to_start == 1


def test_max_starting_caps_starts_and_a_capped_upscale_goes_on_when_starts_finish():
    scaler, now = make(max_replicas=10, upscale_delay_s=2.0, max_starting=2)
    now[0] = 2.0
    assert scaler.decide(ready(8, 8, 8), 1).num_to_start == 0   # 24: 6 > 4, timer at 2.0
    now[0] = 4.0
    d = scaler.decide(ready(8, 8, 8), 2)
    assert (d.current, d.raw_desired, d.desired, d.num_to_start) == (5, 6, 6, 0)
    assert d.reason.endswith("(starting 0 now, 2 already starting, max_starting 2)")
    now[0] = 4.5    # both became ready: the timer kept running, no new delay
    d = scaler.decide(ready(5, 5, 5, 5, 4), 0)
    assert (d.current, d.raw_desired, d.desired, d.num_to_start) == (5, 6, 6, 1)
    scaler, _ = make(max_replicas=10, upscale_delay_s=0, max_starting=2)
    d = scaler.decide(ready(8, 8, 8), 1)
    assert (d.current, d.desired, d.num_to_start) == (4, 6, 1)


def test_downscale_waits_its_delay_and_keeps_the_largest_raw_of_the_window():
    scaler, now = make(max_replicas=10, downscale_delay_s=30.0)
    for t, loads in ((0.0, ready(1, 0, 0, 0)), (10.0, ready(4, 4, 3, 0)),
                     (20.0, ready(2, 2, 2, 2)), (29.9, ready(0, 0, 0, 0))):
        now[0] = t
        d = scaler.decide(loads, 0)
        assert (d.desired, d.num_to_stop) == (4, 0)
    assert d.reason == "load 0 <= 1 x 4.0 for 29.9 s of 30.0 s: holding 4"
    now[0] = 30.0
    d = scaler.decide(ready(0, 0, 0, 0), 0)
    assert (d.raw_desired, d.desired, d.num_to_stop, d.num_to_start) == (1, 3, 1, 0)
    assert d.reason == "load 0 <= 3 x 4.0 for 30.0 s: 4 -> 3"


def test_downscale_timer_resets_when_load_comes_back():
    scaler, now = make(max_replicas=10, downscale_delay_s=30.0)
    scaler.decide(ready(0, 0, 0), 0)
    now[0] = 20.0
    assert scaler.decide(ready(4, 4, 4), 0).raw_desired == 3
    for t in (21.0, 30.0, 50.9):
        now[0] = t
        assert scaler.decide(ready(0, 0, 0), 0).num_to_stop == 0
    now[0] = 51.0
    assert scaler.decide(ready(0, 0, 0), 0).num_to_stop == 2


def test_no_downscale_while_replicas_start_but_the_timer_keeps_running():
    scaler, now = make(max_replicas=10, downscale_delay_s=30.0)
    for t in (0.0, 30.0, 60.0):
        now[0] = t
        d = scaler.decide(ready(0, 0, 0), 1)
        assert (d.current, d.raw_desired, d.desired, d.num_to_stop) == (4, 1, 4, 0)
    assert d.reason == "waiting for 1 starting before 4 -> 1"
    now[0] = 60.5
    d = scaler.decide(ready(0, 0, 0, 0), 0)
    assert (d.desired, d.num_to_stop) == (1, 3)


def test_below_min_starts_at_once_capped_by_max_starting():
    scaler, _ = make(min_replicas=1, max_replicas=3, upscale_delay_s=60.0)
    d = scaler.decide([], 0)    # the only replica died
    assert (d.current, d.raw_desired, d.desired, d.num_to_start) == (0, 1, 1, 1)
    assert d.reason == "below min_replicas: 0 -> 1"
    scaler, _ = make(min_replicas=5, max_replicas=5, max_starting=2)
    d = scaler.decide(ready(0), 0)
    assert (d.desired, d.num_to_start) == (5, 2)
    d = scaler.decide(ready(0), 2)
    assert (d.current, d.desired, d.num_to_start) == (3, 5, 0)


def test_above_max_stops_at_once_even_while_starting():
    scaler, _ = make(min_replicas=1, max_replicas=2, downscale_delay_s=60.0)
    d = scaler.decide(ready(9, 9, 9), 1)
    assert (d.current, d.raw_desired, d.desired, d.num_to_stop, d.num_to_start) == (
        4, 2, 2, 2, 0)
    assert d.reason == "above max_replicas: 4 -> 2"


def test_no_ready_replica_keeps_current():
    scaler, now = make(min_replicas=1, max_replicas=5, upscale_delay_s=0,
                       downscale_delay_s=0)
    for t in (0.0, 100.0):
        now[0] = t
        d = scaler.decide([], 3)
        assert (d.current, d.raw_desired, d.desired, d.num_to_start, d.num_to_stop) == (
            3, 3, 3, 0, 0)
        assert (d.total_load, d.mean_kv_usage) == (0, 0.0)
    assert d.reason == "no ready replica, load unknown: holding 3"
    assert make(max_replicas=2)[0].decide([], 4).num_to_stop == 2


def test_timers_reset_after_an_action():
    scaler, now = make(max_replicas=10, upscale_delay_s=2.0, downscale_delay_s=30.0)
    scaler.decide(ready(8, 8), 0)           # 16: 4 > 2
    now[0] = 2.0
    assert scaler.decide(ready(8, 8), 0).num_to_start == 2
    now[0] = 2.5                           # 24: 6 > 4 again, but a new delay
    assert scaler.decide(ready(8, 8, 8), 1).num_to_start == 0
    now[0] = 4.4
    assert scaler.decide(ready(8, 8, 8, 0), 0).num_to_start == 0
    now[0] = 4.5
    assert scaler.decide(ready(8, 8, 8, 0), 0).num_to_start == 2
    now[0] = 10.0
    scaler.decide(ready(0, 0, 0, 0, 0, 0), 0)
    now[0] = 40.0
    assert scaler.decide(ready(0, 0, 0, 0, 0, 0), 0).num_to_stop == 5
    now[0] = 40.5
    assert scaler.decide(ready(0, 0, 0, 0, 0), 0).num_to_stop == 0
    now[0] = 70.4
    assert scaler.decide(ready(0, 0, 0, 0, 0), 0).num_to_stop == 0
    now[0] = 70.5
    assert scaler.decide(ready(0, 0, 0, 0, 0), 0).num_to_stop == 4


def test_zero_delays_act_in_the_same_round():
    scaler, _ = make(max_replicas=10, upscale_delay_s=0, downscale_delay_s=0)
    assert scaler.decide(ready(8, 8), 0).num_to_start == 2
    d = scaler.decide(ready(0, 0, 0, 0), 0)
    assert (d.desired, d.num_to_stop) == (1, 3)


def test_as_log_fields_has_the_model_and_numbers():
    scaler, _ = make(max_replicas=4, upscale_delay_s=0)
    d = scaler.decide([ReplicaLoad("a", 5, 3, 0.5)], 1)
    assert isinstance(d, ScalingDecision)
    assert d.as_log_fields() == {
        "model": "m", "num_ready": 1, "num_starting": 1, "current": 2, "raw_desired": 2,
        "desired": 2, "num_to_start": 0, "num_to_stop": 0, "total_load": 8,
        "mean_kv_usage": 0.5}
