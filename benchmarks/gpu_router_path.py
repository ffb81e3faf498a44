"""Router path on the GPU: what `lmfleet serve` (router + Ray-placed replica + worker gRPC)
adds to TTFT and TPOT over the offline engine, on one GPU, same model, same workload.

Workload (online.py's Workload): --input-len random token ids -> exactly --output-len
greedy tokens (ignore_eos), all queued at once, at most C in flight, for each C in
--concurrencies with --num-requests-per-stream * C requests (at least --min-requests).
Three setups, one after another, each request set with its own salt (no prefix-cache hits):
  offline: the engine alone, in a subprocess of this script (`--run-offline`), built from
           the same worker flags as the replica (`lmfleet worker`'s build_engine) and
           driven by hand: add up to C requests, step(), time each request's tokens as
           step() returns them (the clock starts when the request is added);
  worker:  `lmfleet serve --device cuda` started with those flags; its replica's
           lmfleet.v1.Worker/Generate straight over gRPC (the replica is a Ray actor);
  router:  the same serve's OpenAI HTTP API (streaming /v1/completions through the router).
The worker and router setups run back to back per C (online.benchmark), after the offline
one has exited and released the GPU.

Reported per setup and C: TTFT / TPOT / ITL (mean, p50, p90, p99), output tok/s; per C the
differences worker - offline and router - offline. Writes OUT/gpu_router_path.json and .png
and prints a markdown table last.

Example (device machine; the fleet's wheels on PYTHONPATH, the model written beforehand by
benchmarks/gpu_throughput.py or --peer-bench):
  python3 benchmarks/gpu_router_path.py --out $OUT --model-dir /tmp/anchor_llama3_8b_random
CPU smoke run (tests/unit/test_gpu_router_path.py): --device cpu --dtype float32
  --model-dir TINY_DIR --concurrencies 1 2 --output-len 3 --token-id-high VOCAB
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from collections import deque
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.integration.serve_process, benchmarks.*

from benchmarks import gpu_throughput  # noqa: E402
from benchmarks.online import (  # noqa: E402
    RequestResult,
    TargetSpec,
    TokenTimer,
    Workload,
    benchmark,
    make_requests,
    summarize,
)

SETUPS = ("offline", "worker", "router")
SERVED_NAME = "bench"


def engine_flags(args: argparse.Namespace) -> list[str]:
    """The worker flags both the offline engine and the served replica get."""
    return ["--device", args.device, "--dtype", args.dtype, *args.engine_flag]


def workloads(args: argparse.Namespace) -> dict[int, Workload]:
    return {c: Workload(num_requests=max(args.num_requests_per_stream * c, args.min_requests),
                        input_len_mean=args.input_len, output_len_mean=args.output_len,
                        seed=args.seed, token_id_low=args.token_id_low,
                        token_id_high=args.token_id_high)
            for c in args.concurrencies}


# ---- offline: the engine alone ------------------------------------------------------------
def drive(engine, requests, concurrency: int, tag: str) -> tuple[list[RequestResult], float]:
    """Run `requests` through `engine` with at most `concurrency` in flight."""
    from lmfleet.worker import SamplingParams
    from lmfleet.worker.request import Request

    waiting = deque(enumerate(requests))
    running: dict[str, tuple[int, TokenTimer]] = {}
    results: list[RequestResult] = [None] * len(requests)  # type: ignore[list-item]
    start = time.perf_counter()
    while waiting or running:
        while waiting and len(running) < concurrency:
            index, request = waiting.popleft()
            request_id = f"{tag}-{index}"
            running[request_id] = (index, TokenTimer())
            params = SamplingParams(max_tokens=request.output_len, min_tokens=request.output_len,
                                    ignore_eos=True, temperature=0)
            engine.add_request(Request(request_id, list(request.prompt_token_ids), params))
        for output in engine.step():
            index, timer = running[output.request_id]
            for _ in output.new_token_ids:
                timer.piece()
            if output.finished:
                del running[output.request_id]
                results[index] = timer.result(requests[index], len(output.output_token_ids))
    return results, time.perf_counter() - start


def run_offline(args: argparse.Namespace) -> int:
    gpu_throughput.ensure_lmfleet_importable()
    from lmfleet.cli.commands.worker import build_engine, parse_worker_argv

    started = time.perf_counter()
    engine, _ = build_engine(parse_worker_argv(["--model", args.model_dir, "--port", "0",
                                                *engine_flags(args)]))
    runs = []
    record = {"startup_s": time.perf_counter() - started, "runs": runs}
    for concurrency, workload in workloads(args).items():
        warm = make_requests(replace(workload, num_requests=min(concurrency, 8)), salt=-1)
        drive(engine, warm, concurrency, f"warm{concurrency}")
        results, duration = drive(engine, make_requests(workload, salt=0), concurrency,
                                  f"c{concurrency}")
        runs.append({"target": "offline", "max_concurrency": concurrency,
                     **summarize(results, duration)})
        print(f"offline c={concurrency}: {runs[-1]['ttft_ms']['mean']:.1f} ms TTFT, "
              f"{runs[-1]['tpot_ms']['mean']:.2f} ms TPOT", flush=True)
    Path(args.result_file).write_text(json.dumps(record))
    engine.close()
    return 0


# ---- worker and router: lmfleet serve -------------------------------------------------------
def run_served(args: argparse.Namespace) -> dict:
    from tests.integration.serve_process import WORKER_TOKEN, start_serve

    os.environ["LMFLEET_WORKER_TOKEN"] = WORKER_TOKEN  # the token serve's replicas get
    started = time.perf_counter()
    with start_serve(["--model", args.model_dir, "--model-name", SERVED_NAME,
                      "--start-timeout", "500", *engine_flags(args)]) as serve:
        startup_s = time.perf_counter() - started
        targets = [TargetSpec("grpc", serve.worker_addresses[0], SERVED_NAME),
                   TargetSpec("http", serve.base_url, SERVED_NAME)]
        runs = []
        for concurrency, workload in workloads(args).items():
            measured = asyncio.run(benchmark(targets, workload, [concurrency], warmup=2,
                                             progress=False))
            for run in measured["runs"]:
                run["target"] = "worker" if run["kind"] == "grpc" else "router"
                runs.append(run)
                print(f"{run['target']} c={concurrency}: {run['ttft_ms']['mean']:.1f} ms TTFT,"
                      f" {run['tpot_ms']['mean']:.2f} ms TPOT", flush=True)
    return {"startup_s": startup_s, "runs": runs}


# ---- report ---------------------------------------------------------------------------------
def added(runs: list[dict]) -> list[dict]:
    """Per concurrency: worker - offline and router - offline, in ms."""
    by = {(r["target"], r["max_concurrency"]): r for r in runs if r.get("num_succeeded")}
    rows = []
    for concurrency in sorted({c for _, c in by}):
        base = by.get(("offline", concurrency))
        for target in ("worker", "router"):
            other = by.get((target, concurrency))
            if base is None or other is None:
                continue
            row = {"target": target, "max_concurrency": concurrency}
            for metric in ("ttft_ms", "tpot_ms", "itl_ms"):
                for stat in ("mean", "p50", "p99"):
                    row[f"{metric}_{stat}_added"] = other[metric][stat] - base[metric][stat]
            row["output_tok_s_ratio"] = (other["output_token_throughput"]
                                         / base["output_token_throughput"])
            rows.append(row)
    return rows


def table(result: dict) -> str:
    lines = ["| setup | C | TTFT mean ms | TTFT p99 ms | TPOT mean ms | out tok/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for run in sorted(result["runs"], key=lambda r: (r["max_concurrency"],
                                                      SETUPS.index(r["target"]))):
        if run.get("num_succeeded"):
            lines.append(f"| {run['target']} | {run['max_concurrency']} | "
                         f"{run['ttft_ms']['mean']:.1f} | {run['ttft_ms']['p99']:.1f} | "
                         f"{run['tpot_ms']['mean']:.2f} | {run['output_token_throughput']:,.0f} |")
    lines += ["", "| added over offline | C | TTFT mean ms | TTFT p50 ms | TPOT mean ms |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for row in result["added"]:
        lines.append(f"| {row['target']} | {row['max_concurrency']} | "
                     f"{row['ttft_ms_mean_added']:+.1f} | {row['ttft_ms_p50_added']:+.1f} | "
                     f"{row['tpot_ms_mean_added']:+.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = sorted({r["max_concurrency"] for r in result["runs"]})
    by = {(r["target"], r["max_concurrency"]): r for r in result["runs"]
          if r.get("num_succeeded")}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(SETUPS)
    for axis, metric, title in ((axes[0], "ttft_ms", "TTFT mean (ms)"),
                                (axes[1], "tpot_ms", "TPOT mean (ms)")):
        for i, setup in enumerate(SETUPS):
            values = [by[(setup, c)][metric]["mean"] if (setup, c) in by else 0.0
                      for c in levels]
            bars = axis.bar([x + i * width for x in range(len(levels))], values, width,
                            label=setup)
            axis.bar_label(bars, fmt="%.1f", fontsize=7)
        axis.set_xticks([x + width for x in range(len(levels))],
                        [f"{c} stream{'s' if c > 1 else ''}" for c in levels])
        axis.set_title(title)
    axes[0].legend()
    fig.suptitle(f"lmfleet on {result.get('device') or '?'}: offline engine vs worker gRPC "
                 "vs router (Ray replica)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_router_path_out"))
    parser.add_argument("--model-dir", default=gpu_throughput.MODEL_DIR)
    parser.add_argument("--peer-bench", help="writes the model directory when it is absent")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--engine-flag", action="append", default=[], metavar="FLAG",
                        help="another worker flag for both setups (repeatable; --engine-flag="
                        "--max-num-seqs=64)")
    parser.add_argument("--concurrencies", type=int, nargs="+", default=[1, 64])
    parser.add_argument("--num-requests-per-stream", type=int, default=3)
    parser.add_argument("--min-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--token-id-low", type=int, default=1000)
    parser.add_argument("--token-id-high", type=int, default=100000,
                        help="prompt ids are uniform in [low, high): keep high <= the vocabulary")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--commit-to", help="also copy the JSON and PNG into this directory")
    parser.add_argument("--run-offline", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if any(c < 1 for c in args.concurrencies):
        raise SystemExit("--concurrencies must be >= 1")
    if args.run_offline:
        sys.exit(run_offline(args))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not gpu_throughput.model_ready(Path(args.model_dir)):
        if not args.peer_bench:
            raise SystemExit(f"no model in {args.model_dir}: give --peer-bench to write it")
        subprocess.run([sys.executable, args.peer_bench, "make-model", "--model-dir",
                        args.model_dir, "--out", str(out)], check=True)
    started = time.time()
    result = {"benchmark": "gpu_router_path", "device": None, "config": {
        "model": Path(args.model_dir).name, "engine_flags": engine_flags(args),
        "workloads": {c: asdict(w) | {"request_rate": "inf"}
                      for c, w in workloads(args).items()}}, "runs": [], "errors": []}
    offline_file = out / "offline.json"
    offline = subprocess.run([sys.executable, "-u", __file__, "--run-offline", "--result-file",
                              str(offline_file), *sys.argv[1:]])
    if offline.returncode == 0:
        record = json.loads(offline_file.read_text())
        result["offline_startup_s"] = record["startup_s"]
        result["runs"] += record["runs"]
    else:
        result["errors"].append(f"offline: exit {offline.returncode}")
    try:
        served = run_served(args)
        result["serve_startup_s"] = served["startup_s"]
        result["runs"] += served["runs"]
    except Exception as error:  # the offline numbers are still worth writing
        result["errors"].append(f"serve: {error!r}")
    if args.device.startswith("cuda"):
        import torch

        result["device"] = torch.cuda.get_device_name(0)
    result["added"] = added(result["runs"])
    result["wall_s"] = time.time() - started
    for run in result["runs"]:
        run.pop("samples_ms", None)  # keeps the JSON small; the percentiles stay
    (out / "gpu_router_path.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "gpu_router_path.png")
    if args.commit_to:
        target = Path(args.commit_to)
        target.mkdir(parents=True, exist_ok=True)
        for name in ("gpu_router_path.json", "gpu_router_path.png"):
            (target / name).write_bytes((out / name).read_bytes())
    print(table(result), flush=True)
    sys.exit(1 if result["errors"] else 0)


if __name__ == "__main__":
    main()
