"""The size-blind variants of benchmarks/sim/variants.py on a fake clock (set-up in
scheduler_helpers.py: prefill 1 s per token, base quantum 4 s, quanta 4/8/16/32 s), and the
variants benchmark end to end on a few hundred simulated requests."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.sim.variants import (
    AgingScheduler,
    FullBoostMLFQ,
    MostAttainedLaneMLFQ,
    OwnCostMLFQ,
    ServiceDeadlineMLFQ,
)
from tests.unit.scheduler_helpers import ids, level, make_request, make_scheduler, run_step

ROOT = Path(__file__).resolve().parents[2]


def test_own_cost_charges_a_decode_one_base_quantum_whatever_the_step_took():
    scheduler, now = make_scheduler(scheduler_class=OwnCostMLFQ)
    scheduler.add(make_request("a", 2))  # Q0
    run_step(scheduler, now, elapsed_s=50.0)  # prefill of 2 tokens: charged 2 s, not 50
    assert (level(scheduler, "a"), scheduler.entries["a"].service_s) == (0, 2.0)
    run_step(scheduler, now, elapsed_s=50.0)  # a decode: 4 s more spends Q0's 4 s quantum
    assert (level(scheduler, "a"), scheduler.entries["a"].service_s) == (1, 0.0)


def test_ageing_orders_by_attained_steps_minus_rate_times_age():
    scheduler, now = make_scheduler(scheduler_class=AgingScheduler, param=0.5)
    old = make_request("old", 2)
    scheduler.add(old)
    for _ in range(5):  # a 2 s prefill (0.5 nominal steps), then 4 decodes: 4.5 steps
        run_step(scheduler, now, elapsed_s=1.0)
    assert scheduler.attained_steps["old"] == 4.5
    scheduler.add(make_request("new", 2))  # at t=5: key 0; old's key 4.5 - 0.5 * 5 = 2
    assert ids(scheduler.priority_order()) == ["new", "old"]
    now[0] = 14.0  # old's key 4.5 - 7 = -2.5; new's key 0 - 0.5 * 9 = -4.5
    assert ids(scheduler.priority_order()) == ["new", "old"]
    scheduler.attained_steps["new"] = 2.5  # new's key -2: old has fallen behind it now
    assert ids(scheduler.priority_order()) == ["old", "new"]
    assert scheduler.promote_starved() == []


def test_full_boost_lasts_its_share_of_the_home_quantum_then_demotes_from_home():
    scheduler, now = make_scheduler(scheduler_class=FullBoostMLFQ, param=0.5,
                                    starvation_s=100.0)
    x, y = make_request("x", 10), make_request("y", 11)
    for request in (x, y):
        scheduler.add(request)  # both Q2 (16 s quantum), x ahead
    now[0] = 100.0
    scheduler.promote_starved()
    assert ids(scheduler.priority_order()) == ["x", "y"]  # both boosted, x waited as long
    scheduler.charge(y, 7.0)
    assert level(scheduler, "y") == 0  # MLFQ would end the boost at Q0's 4 s
    scheduler.charge(y, 1.0)  # 8 s = half of Q2's quantum: back home, demoted to Q3
    assert level(scheduler, "y") == 3
    assert scheduler.entries["y"].home is None and scheduler.entries["y"].service_s == 0.0
    assert scheduler.entries["y"].attained_s == 8.0  # boosted service counts as service
    scheduler.charge(x, 3.0)  # still boosted; its home service was untouched
    assert level(scheduler, "x") == 0


def test_the_lane_puts_the_long_jobs_furthest_along_first():
    scheduler, now = make_scheduler(scheduler_class=MostAttainedLaneMLFQ, param=1)
    for request_id in ("a", "b", "c"):
        scheduler.add(make_request(request_id, 20))  # all Q3, in this order
    scheduler.attained_steps.update(a=70.0, b=90.0, c=10.0)
    # b is the furthest along of those past 64 steps; the rest keep MLFQ's order.
    assert ids(scheduler.priority_order()) == ["b", "a", "c"]
    scheduler.attained_steps["b"] = 60.0  # nobody but a is surely long now
    assert ids(scheduler.priority_order()) == ["a", "b", "c"]
    scheduler.attained_steps["a"] = 63.0
    assert ids(scheduler.priority_order()) == ["a", "b", "c"]  # plain MLFQ order


def test_the_previous_lane_learns_its_deadline_from_finished_service_alone():
    scheduler, _ = make_scheduler(starvation_s=1e6, scheduler_class=ServiceDeadlineMLFQ,
                                  param=1.5)
    scheduler.add(make_request("early", 2))  # unfinished: would block an FCFS replay
    for index in range(100):
        request = make_request(f"r{index}", 2)
        scheduler.add(request)
        scheduler.entries[request.request_id].attained_s = float(index + 1)
        scheduler.finish(request)
    # Service 1..100 s: nearest-rank p99 99 s, times the slack.
    assert scheduler.deadline_lane.deadline_s == 1.5 * 99.0
    assert scheduler.deadline_lane.history == 1000


def test_variants_benchmark_reports_every_variant_against_fcfs(tmp_path, monkeypatch):
    # The benchmark scripts import their siblings as top-level modules (run as scripts).
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    variant_runs = importlib.import_module("scheduling_variants").VARIANT_RUNS
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "scheduling_variants.py"),
         "--sim-requests", "200", "--seeds", "0,1", "--workers", "1", "--out", str(tmp_path),
         "--name", "tiny"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "tiny.json").read_text())
    assert (tmp_path / "tiny.png").stat().st_size > 0
    variants = report["variants"]
    assert list(variants) == [run[0] for run in variant_runs] and report["seeds"] == [0, 1]
    for label, variant in variants.items():
        assert sorted(variant["per_seed"]) == ["seed 0", "seed 1"], label
        assert variant["met"] == (variant["mean_2x"] and variant["p99_no_worse"]
                                  and variant["stall_bounded"])
    fcfs = variants["FCFS"]["per_seed"]["seed 0"]
    assert fcfs["mean_jct_ratio"] == fcfs["p99_jct_ratio"] == 1.0
    # The variants differ in order only: every one finishes every job of the same list, and
    # the shipped MLFQ starts jobs sooner than FCFS on average.
    assert variant_runs[1][1:] == ("mlfq", {})  # MLFQ with the shipped defaults
    shipped = variants[variant_runs[1][0]]["per_seed"]["seed 0"]
    assert shipped["ttft_mean_s"] < fcfs["ttft_mean_s"]
    assert "FCFS" in result.stdout and "SRPT oracle" in result.stdout


def test_variants_benchmark_only_runs_fcfs_and_the_variants_named(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    labels = [run[0] for run in importlib.import_module("scheduling_variants").VARIANT_RUNS]
    script = [sys.executable, str(ROOT / "benchmarks" / "scheduling_variants.py"),
              "--sim-requests", "100", "--seeds", "0", "--workers", "1", "--out", str(tmp_path)]
    result = subprocess.run(script + ["--only", "as shipped,SRPT", "--name", "only"],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    variants = json.loads((tmp_path / "only.json").read_text())["variants"]
    assert list(variants) == ["FCFS"] + [label for label in labels
                                         if "as shipped" in label or "SRPT" in label]
    assert len(variants) == 3
    # A part that names no variant is a usage error, before any simulation runs.
    result = subprocess.run(script + ["--only", "SRPT,no such variant"], capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 2
    assert "no variant label contains ['no such variant']" in result.stderr
