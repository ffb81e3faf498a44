"""Autoscaling benchmark: a traffic spike against `lmfleet serve`, as a timeline.

Starts `lmfleet serve` on free ports (tests/integration/serve_process.py's start_serve, which
SIGTERMs it at the end whatever happens) with one model autoscaled between --min-replicas
and --max-replicas, and offers three phases of Poisson arrivals of streaming
/v1/completions requests (random token-id prompts, `ignore_eos`, so lengths are exact):
--low-rate for --low-s, --spike-rate for --spike-s, --after-rate for --after-s. Each
request's send time, TTFT, E2E and success are recorded client-side (online.py's
HttpTarget). A sampler polls GET /metrics every --sample-interval-s: replicas by state, the
autoscaler's desired replicas and total load, vllm:num_requests_waiting/running (sum and
per replica). After the load it waits for every request, then samples on until the fleet
is back at min_replicas (at most --tail-s).

Reported: time_to_scale_up_s (spike start -> first sample with max_replicas ready),
time_to_scale_down_s (spike end -> first sample back at min_replicas after the last one
above it; also from the last request's completion), failures, per-phase latency, p99 TTFT
per --window-s window of send times, the controller's decisions (serve's stderr). Client
and replicas share the CPUs: on a small machine TTFT includes that contention.
Writes benchmarks/results/autoscale.json and .png (--out, --name).
Run: `.venv/bin/python benchmarks/autoscale.py` (a few minutes with the defaults).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import random
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Optional

from autoscale_report import fmt_seconds, plot
from online import BenchRequest, TargetSpec, open_target, summarize

# The repository root, for tests/integration's process helpers.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from tests.integration.serve_process import start_serve  # noqa: E402

LOG_TIME = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}")  # logging's asctime
# Serve's stderr lines worth keeping with the results: the controller's decisions.
EVENT_WORDS = ("autoscaler model=", "starting replica", "ready on", "draining replica",
               "drained and stopped", "died", "failed", "unhealthy", "removed", "ERROR",
               "Traceback")
MAX_EVENTS = 300


def environment(load_before: tuple, started: float) -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(),
            "cpu_count": os.cpu_count(), "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
            "wall_s": time.time() - started}


@dataclass(frozen=True)
class Phase:
    name: str
    rate: float  # requests/s
    duration_s: float
    start_s: float = 0.0


def make_phases(args: argparse.Namespace) -> list[Phase]:
    phases: list[Phase] = []
    for name in ("low", "spike", "after"):
        rate, duration = getattr(args, f"{name}_rate"), getattr(args, f"{name}_s")
        if not (rate > 0 and duration > 0):
            raise ValueError(f"--{name}-rate and --{name}-s must be > 0")
        phases.append(Phase(name, rate, duration, sum(p.duration_s for p in phases)))
    return phases


def make_schedule(phases: list[Phase], input_len: int, output_len: int,
                  seed: int) -> list[tuple[str, BenchRequest]]:
    """Poisson arrivals per phase (memoryless, so each phase simply starts afresh at its
    boundary); prompts of random token ids, fresh per request (no prefix sharing)."""
    rng = random.Random(seed)
    schedule = []
    for phase in phases:
        t = phase.start_s + rng.expovariate(phase.rate)
        while t < phase.start_s + phase.duration_s:
            prompt = tuple(rng.randrange(1000, 10000) for _ in range(input_len))
            schedule.append((phase.name, BenchRequest(prompt, output_len, t)))
            t += rng.expovariate(phase.rate)
    return schedule


async def drive(target, schedule: list[tuple[str, BenchRequest]], t0: float,
                deadline_s: float) -> list[dict]:
    """Send each request at its arrival time; one record per request. Requests still
    running at `deadline_s` (from t0) are cancelled and count as failed."""
    async def one(phase: str, request: BenchRequest) -> dict:
        record = {"phase": phase, "sent_s": request.arrival_s, "ok": False, "ttft_ms": None,
                  "e2e_ms": None, "output_len": 0, "error": "timed out"}
        try:
            await asyncio.sleep(max(0.0, t0 + request.arrival_s - time.perf_counter()))
            record["sent_s"] = time.perf_counter() - t0
            result = await target.send(request)
        except asyncio.CancelledError:  # the deadline passed: a failure, not our end
            return record
        record.update(ok=result.ok, output_len=result.output_len, error=result.error,
                      ttft_ms=None if result.ttft_s is None else result.ttft_s * 1000,
                      e2e_ms=None if result.e2e_s is None else result.e2e_s * 1000)
        record["result"] = result
        return record

    tasks = [asyncio.ensure_future(one(p, r)) for p, r in schedule]
    await asyncio.wait(tasks, timeout=max(0.0, t0 + deadline_s - time.perf_counter()))
    for task in tasks:
        task.cancel()
    return list(await asyncio.gather(*tasks))


def parse_metrics(text: str, model: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {"ready": 0, "starting": 0, "draining": 0, "desired": None, "load_desired": None,
           "total_load": None, "waiting": 0.0, "running": 0.0, "waiting_by_replica": {}}
    names = {"lmfleet:autoscaler_desired_replicas": "desired",
             "lmfleet:autoscaler_load_desired_replicas": "load_desired",
             "lmfleet:autoscaler_total_load": "total_load"}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("model_name") != model:
                continue
            if sample.name == "lmfleet:fleet_replicas":
                out[sample.labels["state"]] = int(sample.value)
            elif sample.name in names:
                out[names[sample.name]] = sample.value
            elif sample.name == "vllm:num_requests_waiting":
                out["waiting"] += sample.value
                out["waiting_by_replica"][sample.labels["replica"]] = sample.value
            elif sample.name == "vllm:num_requests_running":
                out["running"] += sample.value
    return out


async def sample(base_url: str, model: str, t0: float, interval_s: float,
                 samples: list[dict], stop: asyncio.Event) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=base_url, timeout=5.0) as client:
        while not stop.is_set():
            began = time.perf_counter()
            try:
                response = await client.get("/metrics")
                samples.append({"t": began - t0, **parse_metrics(response.text, model)})
            except httpx.HTTPError as error:  # a missed sample is a gap, not the end
                samples.append({"t": began - t0, "error": f"{type(error).__name__}"})
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, began + interval_s
                                                        - time.perf_counter()))


def windows(records: list[dict], end_s: float, width_s: float) -> list[dict]:
    """Per window of send times: offered rate, requests, failures, TTFT p99 (ms) of the
    successful ones (with few requests in a window p99 is close to the max)."""
    import numpy as np

    out = []
    for i in range(math.ceil(end_s / width_s)):
        lo, hi = i * width_s, (i + 1) * width_s
        inside = [r for r in records if lo <= r["sent_s"] < hi]
        ttft = [r["ttft_ms"] for r in inside if r["ok"] and r["ttft_ms"] is not None]
        out.append({"start_s": lo, "offered_rps": len(inside) / width_s,
                    "requests": len(inside), "failed": sum(not r["ok"] for r in inside),
                    "ttft_p99_ms": float(np.percentile(ttft, 99)) if ttft else None})
    return out


def scaling_times(samples: list[dict], records: list[dict], spike: Phase, low: int,
                  high: int) -> dict:
    good = [s for s in samples if "ready" in s]
    done = max((r["sent_s"] + r["e2e_ms"] / 1000 for r in records if r["ok"]), default=None)
    spike_end = spike.start_s + spike.duration_s
    up = next((s["t"] for s in good if s["t"] >= spike.start_s and s["ready"] >= high), None)
    above = [s["t"] for s in good if s["t"] >= spike.start_s and s["ready"] > low]
    down = None
    if above:
        down = next((s["t"] for s in good if s["t"] > above[-1] and s["ready"] <= low), None)
    return {"time_to_scale_up_s": None if up is None else up - spike.start_s,
            "time_to_scale_down_s": None if down is None else down - spike_end,
            "last_request_done_s": done,
            "min_replicas_after_last_request_s": None if down is None or done is None
            else down - done,
            "max_ready": max((s["ready"] for s in good), default=None),
            "max_desired": max((s["desired"] for s in good if s["desired"] is not None),
                               default=None)}


def _log_time(line: str) -> float:
    return datetime.strptime(LOG_TIME.search(line)[0], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def fleet(args: argparse.Namespace) -> dict:
    return {"controller": {"reconcile_interval_s": args.reconcile_interval_s},
            "models": [{
                "name": "default", "path": args.model, "min_replicas": args.min_replicas,
                "max_replicas": args.max_replicas, "cpus_per_rank": args.cpus_per_rank,
                "engine": {"max_num_seqs": args.max_num_seqs,
                           "num_kv_blocks": args.num_kv_blocks},
                "autoscaling": {"target_load_per_replica": args.target_load,
                                "upscale_delay_s": args.upscale_delay_s,
                                "downscale_delay_s": args.downscale_delay_s,
                                "max_starting": args.max_starting}}]}


async def measure(base_url: str, args: argparse.Namespace, phases: list[Phase],
                  schedule: list) -> tuple[float, list[dict], list[dict]]:
    """Offer the load while sampling /metrics; then sample on until the fleet is back at
    min_replicas (bounded by --tail-s). Returns (load start as time.time(), records,
    samples); times in records and samples count from the load start."""
    load_end = phases[-1].start_s + phases[-1].duration_s
    stop, samples = asyncio.Event(), []
    target = open_target(TargetSpec("http", base_url, model="default"), 4096)
    t0, t0_wall = time.perf_counter(), time.time()
    sampler = asyncio.create_task(sample(base_url, "default", t0, args.sample_interval_s,
                                         samples, stop))
    try:
        records = await drive(target, schedule, t0, load_end + args.finish_timeout_s)
        print(f"load done at {time.perf_counter() - t0:.0f} s; waiting for min_replicas",
              file=sys.stderr, flush=True)
        tail_end = time.perf_counter() + args.tail_s
        while time.perf_counter() < tail_end:
            last = samples[-1] if samples else {}
            if (last.get("ready", math.inf) <= args.min_replicas and not last.get("starting")
                    and not last.get("draining")):
                break
            await asyncio.sleep(args.sample_interval_s)
        await asyncio.sleep(2.0)  # a few samples of the settled state for the plot
    finally:
        stop.set()
        await sampler
        await target.close()
    return t0_wall, records, samples


# (flag, type, default, help): the fleet's and the workload's knobs.
FLAGS = (
    ("--model", str, "default", None), ("--min-replicas", int, 1, None),
    ("--max-replicas", int, 3, None), ("--cpus-per-rank", float, 1.0, None),
    ("--max-num-seqs", int, 4, None), ("--num-kv-blocks", int, 256, None),
    ("--target-load", float, 4.0, "autoscaling target_load_per_replica"),
    ("--upscale-delay-s", float, 1.0, None), ("--downscale-delay-s", float, 10.0, None),
    ("--max-starting", int, 2, None), ("--reconcile-interval-s", float, 0.5, None),
    ("--low-rate", float, 0.5, "req/s before the spike"), ("--low-s", float, 20.0, None),
    ("--spike-rate", float, 2.5, None), ("--spike-s", float, 40.0, None),
    ("--after-rate", float, 0.5, "req/s after the spike"), ("--after-s", float, 40.0, None),
    ("--input-len", int, 64, None), ("--output-len", int, 32, None), ("--seed", int, 0, None),
    ("--sample-interval-s", float, 0.5, None), ("--window-s", float, 5.0, None),
    ("--finish-timeout-s", float, 300.0, "after the load, requests running this long fail"),
    ("--tail-s", float, 90.0, "after the load, wait at most this long for min_replicas"),
    ("--serve-log", str, None, "also write serve's stderr here"),
    ("--out", str, str(Path(__file__).parent / "results"), None),
    ("--name", str, "autoscale", "output file stem"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for flag, kind, default, text in FLAGS:
        parser.add_argument(flag, type=kind, default=default, help=text)
    parser.add_argument("--log-level", default="info", choices=["info", "warning"],
                        help="serve's; info logs the controller's decisions")
    args = parser.parse_args()
    if not 1 <= args.min_replicas <= args.max_replicas:
        raise ValueError("need 1 <= --min-replicas <= --max-replicas")
    if args.input_len < 1 or args.output_len < 1:
        raise ValueError("--input-len and --output-len must be >= 1")
    if args.sample_interval_s <= 0 or args.window_s <= 0:
        raise ValueError("--sample-interval-s and --window-s must be > 0")
    return args


def phase_summary(records: list[dict], phase: Phase) -> Optional[dict]:
    results = [r["result"] for r in records if r["phase"] == phase.name and "result" in r]
    if not results:
        return None
    report = summarize(results, phase.duration_s)
    report.pop("samples_ms")  # every request is in `records` already
    return report


def main() -> None:
    args = parse_args()
    phases = make_phases(args)
    schedule = make_schedule(phases, args.input_len, args.output_len, args.seed)
    load_before, started = os.getloadavg(), time.time()
    with tempfile.TemporaryDirectory(prefix="lmfleet-autoscale-") as tmp:
        import yaml

        config_path = Path(tmp) / "fleet.yaml"
        config_path.write_text(yaml.safe_dump(fleet(args), sort_keys=False))
        begun = time.perf_counter()
        # start_serve copies serve's stderr to ours; it SIGTERMs serve when the block ends.
        with start_serve(["--config", str(config_path), "--log-level", args.log_level]) as serve:
            startup_s = time.perf_counter() - begun
            print(f"serve ready at {serve.base_url} after {startup_s:.1f} s; sending "
                  f"{len(schedule)} requests", file=sys.stderr, flush=True)
            t0_wall, records, samples = asyncio.run(measure(serve.base_url, args, phases,
                                                            schedule))
    exit_code = serve.process.returncode
    if args.serve_log:
        Path(args.serve_log).write_text("\n".join(serve.stderr_lines) + "\n")
    events = [{"t": _log_time(line) - t0_wall, "line": line} for line in serve.stderr_lines
              if LOG_TIME.search(line) and any(word in line for word in EVENT_WORDS)]
    by_phase = {phase.name: phase_summary(records, phase) for phase in phases}
    for record in records:
        record.pop("result", None)
    spike = next(p for p in phases if p.name == "spike")
    end_s = max([s["t"] for s in samples] + [r["sent_s"] for r in records])
    result = {
        "benchmark": "autoscale", "config": vars(args) | {"fleet": fleet(args)},
        "phases": [asdict(p) for p in phases],
        "scaling": scaling_times(samples, records, spike, args.min_replicas,
                                 args.max_replicas),
        "num_requests": len(records), "num_failed": sum(not r["ok"] for r in records),
        "errors": sorted({r["error"] for r in records if r["error"]})[:5],
        "by_phase": by_phase, "windows": windows(records, end_s, args.window_s),
        "serve": {"startup_s": startup_s, "exit_code": exit_code},
        "environment": environment(load_before, started),
        "controller_events": events[:MAX_EVENTS], "samples": samples, "records": records,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.name}.png")
    s = result["scaling"]
    print(f"scale-up {fmt_seconds(s['time_to_scale_up_s'])}, scale-down "
          f"{fmt_seconds(s['time_to_scale_down_s'])} (after the last request: "
          f"{fmt_seconds(s['min_replicas_after_last_request_s'])}), max ready {s['max_ready']}; "
          f"{result['num_failed']} of {result['num_requests']} failed; serve exit {exit_code}")
    for name, r in by_phase.items():
        ttft = r and r["ttft_ms"]
        print(f"  {name:5s}: " + (f"{r['num_requests']} req, TTFT p50 {ttft['p50']:.0f} ms, "
                                  f"p99 {ttft['p99']:.0f} ms" if ttft else "no TTFT"))
    print(f"wrote {out / args.name}.json and .png")


if __name__ == "__main__":
    main()
