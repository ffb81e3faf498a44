"""HTTP latency of the router on a reused (keep-alive) connection versus fresh connections.

Why: a response written in two segments (headers, then body) on a socket without
TCP_NODELAY waits for the client's delayed ACK (~40 ms on Linux) before its second
segment leaves (Nagle). Fresh connections hide it (the kernel ACKs at once early in a
connection), so it shows on reused connections only, which is what SDKs use.

Setup, as the other benchmarks start servers: `lmfleet worker --model M --model-name
default` and `lmfleet router --worker HOST:PORT --port 0 --grpc-port 0` (real processes).
Measured sequentially from one client (httpx, which sets TCP_NODELAY on its own side):
  health_reused       GET /health, --requests times on one connection
  health_fresh        GET /health, a new connection each time
  completion_reused   POST /v1/completions (1 greedy token) on one connection
  completion_fresh    the same, a new connection each time
Each after --warmup unmeasured requests. Reported per series: mean/p50/p90/p99/max ms.

Writes the run under `runs[--label]` of benchmarks/results/http_latency.json (other
labels kept), e.g. `--label before` on the old code and `--label after` on the new:
    .venv/bin/python benchmarks/http_latency.py --label after
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from autoscale import environment  # also puts the repository root on sys.path

from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import worker_process

RESULTS = Path(__file__).resolve().parent / "results" / "http_latency.json"
START_TIMEOUT_S = 400.0
STOP_TIMEOUT_S = 60.0
COMPLETION = {"model": "default", "prompt": "Hello", "max_tokens": 1, "temperature": 0}


def stats_ms(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(s * 1000 for s in samples_s)

    def pct(p: float) -> float:
        return ms[min(len(ms) - 1, round(p / 100 * (len(ms) - 1)))]

    return {"mean": statistics.fmean(ms), "p50": pct(50), "p90": pct(90), "p99": pct(99),
            "max": ms[-1], "n": len(ms)}


def timed(send: Callable[[], object], count: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        send()
    samples = []
    for _ in range(count):
        start = time.perf_counter()
        send()
        samples.append(time.perf_counter() - start)
    return samples


def measure(base_url: str, count: int, warmup: int) -> dict[str, dict[str, float]]:
    import httpx

    def ok(response: httpx.Response) -> httpx.Response:
        response.raise_for_status()
        return response

    out = {}
    with httpx.Client(base_url=base_url, timeout=60) as client:  # one kept-alive connection
        out["health_reused"] = stats_ms(timed(lambda: ok(client.get("/health")), count,
                                              warmup))
        out["completion_reused"] = stats_ms(timed(
            lambda: ok(client.post("/v1/completions", json=COMPLETION)), count, warmup))

    def fresh(method: str, path: str, **kwargs) -> Callable[[], object]:
        def send() -> object:
            with httpx.Client(base_url=base_url, timeout=60) as client:
                return ok(client.request(method, path, **kwargs))
        return send

    out["health_fresh"] = stats_ms(timed(fresh("GET", "/health"), count, warmup))
    out["completion_fresh"] = stats_ms(timed(fresh("POST", "/v1/completions",
                                                   json=COMPLETION), count, warmup))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--label", required=True, help="name of this run (before, after)")
    parser.add_argument("--model", default="default", help="model for the worker")
    parser.add_argument("--requests", type=int, default=50, help="measured per series")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured per series")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON file to update")
    args = parser.parse_args()
    if args.requests < 1 or args.warmup < 0:
        parser.error("--requests must be >= 1 and --warmup >= 0")
    started, load_before = time.time(), os.getloadavg()
    flags = ["--model-name", "default", "--max-model-len", "512"]
    with worker_process(args.model, flags, START_TIMEOUT_S, STOP_TIMEOUT_S) as worker, \
            start_router([worker.address]) as router:
        series = measure(router.base_url, args.requests, args.warmup)
    report = json.loads(args.out.read_text()) if args.out.exists() else {}
    report["description"] = __doc__.split("\n\n")[0]
    report.setdefault("runs", {})[args.label] = {
        "series_ms": series, "requests": args.requests, "warmup": args.warmup,
        "environment": environment(load_before, started)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, values in series.items():
        print(f"{args.label:>8} {name:<18} mean {values['mean']:7.2f} ms  "
              f"p50 {values['p50']:7.2f}  p99 {values['p99']:7.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
