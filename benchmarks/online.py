"""Online serving benchmark: a load generator for a running endpoint (used by `lmfleet bench`).

Targets: `http` (an OpenAI endpoint, streaming POST /v1/completions) and `grpc` (one
worker's Generate directly, to measure what the router adds).
Both get the same workload: synthetic prompts of random token ids (so no tokenizer and no
prefix sharing: every (run, round) draws fresh ids) with `ignore_eos` and `max_tokens`,
greedy, so every output is exactly the requested length. Arrivals are Poisson at
`request_rate` (inf: all at once), optionally capped at `max_concurrency` in flight.

Per request: TTFT (send -> first token), ITL (gaps between streamed chunks: HTTP frames
with text, gRPC chunks), TPOT ((E2E - TTFT) / (output tokens - 1)), E2E. A run reports
mean/p50/p90/p99 of each, request and token throughput, and goodput under an SLO
(requests/s with TTFT <= slo_ttft_ms and TPOT <= slo_tpot_ms, as in DistServe).

Use: `benchmark([TargetSpec("http", URL)], Workload(), [1, 8])`; online_report writes it.
Two targets run back to back per concurrency, alternating (ABBA.. over `rounds`) so a
drifting load hits both alike; `comparisons` gives their differences and ratios."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import platform
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

RESULTS_DIR = Path(__file__).resolve().parent / "results"
PERCENTILES = (50, 90, 99)


@dataclass(frozen=True)
class Workload:
    """Request count, arrival process and lengths. Lengths are uniform integers in
    [mean - range, mean + range]; token ids are uniform in [token_id_low, token_id_high)
    (ordinary vocabulary tokens for Llama-family models of vocab >= token_id_high)."""

    num_requests: int = 32
    request_rate: float = math.inf
    input_len_mean: int = 128
    input_len_range: int = 0
    output_len_mean: int = 32
    output_len_range: int = 0
    seed: int = 0
    token_id_low: int = 1000
    token_id_high: int = 10000

    def __post_init__(self) -> None:
        if self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        if not self.request_rate > 0:
            raise ValueError(f"request_rate must be > 0 (inf: all at once), got "
                             f"{self.request_rate}")
        for name in ("input_len", "output_len"):
            mean, spread = getattr(self, f"{name}_mean"), getattr(self, f"{name}_range")
            if spread < 0 or mean - spread < 1:
                raise ValueError(f"{name}: mean - range must be >= 1 and range >= 0 "
                                 f"(got mean {mean}, range {spread})")
        if not 0 <= self.token_id_low < self.token_id_high:
            raise ValueError("need 0 <= token_id_low < token_id_high")


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: tuple[int, ...]
    output_len: int
    arrival_s: float  # offset from the start of the run


def make_requests(workload: Workload, salt: int = 0) -> list[BenchRequest]:
    """Lengths and arrival times depend on the seed only; token ids also on `salt`, so
    runs with different salts are the same shape without sharing a prefix."""
    shape = random.Random(workload.seed)
    ids = random.Random(f"{workload.seed}/{salt}")
    requests, arrival = [], 0.0
    for _ in range(workload.num_requests):
        input_len = shape.randint(workload.input_len_mean - workload.input_len_range,
                                  workload.input_len_mean + workload.input_len_range)
        output_len = shape.randint(workload.output_len_mean - workload.output_len_range,
                                   workload.output_len_mean + workload.output_len_range)
        prompt = tuple(ids.randrange(workload.token_id_low, workload.token_id_high)
                       for _ in range(input_len))
        requests.append(BenchRequest(prompt, output_len, arrival))
        if math.isfinite(workload.request_rate):
            arrival += shape.expovariate(workload.request_rate)
    return requests


@dataclass
class RequestResult:
    ok: bool
    prompt_len: int
    output_len: int = 0
    ttft_s: Optional[float] = None
    e2e_s: Optional[float] = None
    itl_s: list[float] = field(default_factory=list)
    error: Optional[str] = None

    @property
    def tpot_s(self) -> Optional[float]:
        if not self.ok or self.output_len < 2 or self.ttft_s is None or self.e2e_s is None:
            return None
        return (self.e2e_s - self.ttft_s) / (self.output_len - 1)


class TokenTimer:
    """Collects the arrival times of streamed pieces of one request."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.ttft: Optional[float] = None
        self.last = self.start
        self.itl: list[float] = []

    def piece(self) -> None:
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft = now - self.start
        else:
            self.itl.append(now - self.last)
        self.last = now

    def result(self, request: BenchRequest, output_len: int) -> RequestResult:
        return RequestResult(ok=True, prompt_len=len(request.prompt_token_ids),
                             output_len=output_len, ttft_s=self.ttft,
                             e2e_s=time.perf_counter() - self.start, itl_s=self.itl)


def _failed(request: BenchRequest, error: str) -> RequestResult:
    return RequestResult(ok=False, prompt_len=len(request.prompt_token_ids), error=error)


@dataclass(frozen=True)
class TargetSpec:
    """kind "http": `address` is the base URL; kind "grpc": a worker's HOST:PORT."""

    kind: str
    address: str
    model: Optional[str] = None
    api_key: Optional[str] = None

    def __post_init__(self) -> None:
        if self.kind not in ("http", "grpc"):
            raise ValueError(f"unknown target kind {self.kind!r}: use http or grpc")

    @property
    def name(self) -> str:
        return "router (http)" if self.kind == "http" else "worker (grpc)"


class HttpTarget:
    """Streaming /v1/completions with a token-id prompt."""

    def __init__(self, spec: TargetSpec, max_connections: int) -> None:
        import httpx

        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else {}
        self.model = spec.model
        self.client = httpx.AsyncClient(
            base_url=spec.address.rstrip("/"), headers=headers,
            timeout=httpx.Timeout(None, connect=30.0),
            limits=httpx.Limits(max_connections=max_connections,
                                max_keepalive_connections=max_connections))

    async def close(self) -> None:
        await self.client.aclose()

    async def send(self, request: BenchRequest) -> RequestResult:
        import httpx

        body = {"prompt": list(request.prompt_token_ids), "max_tokens": request.output_len,
                "ignore_eos": True, "temperature": 0.0, "stream": True,
                "stream_options": {"include_usage": True}}
        if self.model:
            body["model"] = self.model
        timer, usage = TokenTimer(), None
        try:
            async with self.client.stream("POST", "/v1/completions", json=body) as response:
                if response.status_code != 200:
                    text = (await response.aread()).decode(errors="replace")
                    return _failed(request, f"HTTP {response.status_code}: {text[:200]}")
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        break
                    event = json.loads(data)
                    if "error" in event:
                        return _failed(request, str(event["error"].get("message")))
                    usage = event.get("usage") or usage
                    if any(choice.get("text") for choice in event.get("choices", [])):
                        timer.piece()
        except httpx.HTTPError as error:
            return _failed(request, f"{type(error).__name__}: {error}")
        if usage is None:
            return _failed(request, "the stream ended without a usage chunk")
        return timer.result(request, int(usage["completion_tokens"]))


class GrpcTarget:
    """lmfleet.v1.Worker/Generate on one worker (token ids in, token ids out)."""

    def __init__(self, spec: TargetSpec, max_connections: int) -> None:
        import grpc

        from lmfleet.proto.v1 import worker_pb2_grpc
        from lmfleet.worker.auth import client_interceptors, worker_token_from_env
        self.channel = grpc.aio.insecure_channel(  # the worker token, when one is set
            spec.address, interceptors=client_interceptors(worker_token_from_env()))
        self.stub = worker_pb2_grpc.WorkerStub(self.channel)

    async def close(self) -> None:
        await self.channel.close()

    async def send(self, request: BenchRequest) -> RequestResult:
        import grpc

        from lmfleet.proto.v1 import worker_pb2

        message = worker_pb2.GenerateRequest(
            request_id=f"bench-{uuid.uuid4().hex}", prompt_token_ids=request.prompt_token_ids,
            sampling_params=worker_pb2.SamplingParams(
                max_tokens=request.output_len, temperature=0.0, ignore_eos=True))
        timer = TokenTimer()
        try:
            async for response in self.stub.Generate(message):
                kind = response.WhichOneof("response")
                if kind == "chunk" and response.chunk.token_ids:
                    timer.piece()
                elif kind == "complete":
                    return timer.result(request, response.complete.completion_tokens)
                elif kind == "error":
                    return _failed(request, response.error.message)
        except grpc.aio.AioRpcError as error:
            return _failed(request, f"{error.code().name}: {error.details()}")
        return _failed(request, "the stream ended without a complete event")


def open_target(spec: TargetSpec, max_connections: int = 256):
    return (HttpTarget if spec.kind == "http" else GrpcTarget)(spec, max_connections)


async def run_load(target, requests: list[BenchRequest], max_concurrency: Optional[int],
                   progress: bool = True, desc: str = "") -> tuple[list[RequestResult], float]:
    """Send `requests` at their arrival times (at most `max_concurrency` in flight);
    returns the results in request order and the run's wall time in seconds."""
    from tqdm import tqdm

    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(requests), desc=desc, disable=not progress, file=sys.stderr,
               unit="req", leave=False)
    start = time.perf_counter()

    async def one(request: BenchRequest) -> RequestResult:
        await asyncio.sleep(max(start + request.arrival_s - time.perf_counter(), 0.0))
        async with limit or contextlib.nullcontext():
            result = await target.send(request)
        bar.update(1)
        return result

    try:
        results = await asyncio.gather(*(one(r) for r in requests))
    finally:
        bar.close()
    return list(results), time.perf_counter() - start


def _stats(values_s: list[float]) -> Optional[dict[str, float]]:
    import numpy as np

    if not values_s:
        return None
    ms = np.asarray(values_s) * 1000.0
    stats = {"mean": float(ms.mean())}
    stats.update({f"p{p}": float(np.percentile(ms, p)) for p in PERCENTILES})
    stats.update({"min": float(ms.min()), "max": float(ms.max())})
    return stats


def summarize(results: list[RequestResult], duration_s: float,
              slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None) -> dict:
    """The metrics of one run (see the module doc); latencies in milliseconds."""
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tpot = [r.tpot_s for r in ok if r.tpot_s is not None]
    e2e = [r.e2e_s for r in ok if r.e2e_s is not None]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_len for r in ok)
    report = {
        "num_requests": len(results), "num_succeeded": len(ok),
        "num_failed": len(results) - len(ok),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration_s,
        "total_input_tokens": input_tokens, "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration_s,
        "output_token_throughput": output_tokens / duration_s,
        "total_token_throughput": (input_tokens + output_tokens) / duration_s,
        "ttft_ms": _stats(ttft), "tpot_ms": _stats(tpot),
        "itl_ms": _stats([gap for r in ok for gap in r.itl_s]), "e2e_ms": _stats(e2e),
        "goodput": None,
        "samples_ms": {"ttft": [t * 1000 for t in ttft], "tpot": [t * 1000 for t in tpot],
                       "e2e": [t * 1000 for t in e2e]},
    }
    if slo_ttft_ms is not None or slo_tpot_ms is not None:
        def meets(r: RequestResult) -> bool:
            return ((slo_ttft_ms is None or r.ttft_s * 1000 <= slo_ttft_ms)
                    and (slo_tpot_ms is None or r.tpot_s is None
                         or r.tpot_s * 1000 <= slo_tpot_ms))
        good = sum(1 for r in ok if r.ttft_s is not None and meets(r))
        report["goodput"] = {"slo_ttft_ms": slo_ttft_ms, "slo_tpot_ms": slo_tpot_ms,
                             "num_good": good, "fraction": good / len(results),
                             "request_goodput": good / duration_s}
    return report


def _compare(a: dict, b: dict) -> dict:
    """How run `a` differs from run `b`: differences (a - b, ms) and ratios (a / b)."""
    out: dict = {}
    for metric in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        if a[metric] and b[metric]:
            for stat in ("mean", "p50", "p90", "p99"):
                out[f"{metric}_{stat}_diff"] = a[metric][stat] - b[metric][stat]
                out[f"{metric}_{stat}_ratio"] = a[metric][stat] / b[metric][stat]
    for metric in ("request_throughput", "output_token_throughput"):
        out[f"{metric}_ratio"] = a[metric] / b[metric] if b[metric] else None
    return out


async def benchmark(targets: list[TargetSpec], workload: Workload,
                    concurrencies: list[Optional[int]], rounds: int = 1, warmup: int = 1,
                    slo_ttft_ms: Optional[float] = None, slo_tpot_ms: Optional[float] = None,
                    progress: bool = True) -> dict:
    """Run `workload` against every target at every concurrency (None: no cap); with
    `rounds` > 1 the workload runs that many times per target, alternating the order."""
    if not targets or rounds < 1 or warmup < 0:
        raise ValueError("need at least one target, rounds >= 1 and warmup >= 0")
    if any(c is not None and c < 1 for c in concurrencies):
        raise ValueError("max_concurrency must be >= 1")
    load_before = os.getloadavg()
    started = time.time()
    runs, comparisons, salt = [], [], 0
    for concurrency in concurrencies:
        collected: dict[int, tuple[list[RequestResult], float]] = {
            i: ([], 0.0) for i in range(len(targets))}
        for round_index in range(rounds):
            order = list(range(len(targets)))
            if round_index % 2:
                order.reverse()
            for i in order:
                target = open_target(targets[i], max(concurrency or workload.num_requests, 1))
                try:
                    salt += 1
                    if warmup:
                        warm = make_requests(replace(workload, num_requests=warmup,
                                                     request_rate=math.inf), salt=-salt)
                        await run_load(target, warm, None, progress=False)
                    results, duration = await run_load(
                        target, make_requests(workload, salt=salt), concurrency, progress,
                        desc=f"{targets[i].name} c={concurrency or 'inf'} r{round_index + 1}")
                finally:
                    await target.close()
                previous, total = collected[i]
                collected[i] = (previous + results, total + duration)
        level = []
        for i, spec in enumerate(targets):
            results, duration = collected[i]
            run = {"target": spec.name, "kind": spec.kind, "address": spec.address,
                   "max_concurrency": concurrency, "rounds": rounds,
                   **summarize(results, duration, slo_ttft_ms, slo_tpot_ms)}
            runs.append(run)
            level.append(run)
        if len(level) == 2 and level[0]["num_succeeded"] and level[1]["num_succeeded"]:
            comparisons.append({"max_concurrency": concurrency, "a": level[0]["target"],
                                "b": level[1]["target"], **_compare(level[0], level[1])})
    return {
        "benchmark": "online",
        "workload": asdict(workload) | {"request_rate": str(workload.request_rate)},
        "concurrencies": concurrencies, "rounds": rounds, "warmup": warmup,
        "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms},
        "environment": {"platform": platform.platform(), "python": platform.python_version(),
                        "cpu_count": os.cpu_count(), "loadavg_before": load_before,
                        "loadavg_after": os.getloadavg(),
                        "started": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
                        "wall_s": time.time() - started},
        "runs": runs, "comparisons": comparisons,
    }


if __name__ == "__main__":  # the same as `lmfleet bench ...`
    from lmfleet.cli.main import main

    sys.exit(main(["bench", *sys.argv[1:]]))
