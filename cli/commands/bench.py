"""`lmfleet bench`: load a running endpoint and report TTFT, ITL/TPOT, E2E percentiles,
throughput and goodput (the load generator is benchmarks/online.py; see its doc; the
report is written by benchmarks/online_report.py).

Writes `<out>/<name>.json` (fields: workload, concurrencies, rounds, slo, environment,
runs[] with num_requests/num_succeeded/num_failed/errors, duration_s, request_throughput,
output_token_throughput, total_token_throughput, ttft_ms/tpot_ms/itl_ms/e2e_ms as
{mean,p50,p90,p99,min,max}, goodput, samples_ms; comparisons[] when two targets are
given) and `<out>/<name>.png` (latency CDFs and throughput bars), prints a summary table
on stdout; progress bars go to stderr. Exit 0 when every request succeeded, 1 otherwise.

`--url` and `--grpc` together run the same workload through the router and straight to
one worker, back to back per concurrency level (alternating order over --rounds), which
measures the router's added latency.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
import os
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark a running endpoint: latency percentiles, throughput, goodput",
        description="Send synthetic requests (random token-id prompts, exact output lengths "
        "via ignore_eos) to an OpenAI endpoint (--url) and/or one worker's gRPC Generate "
        "(--grpc); report TTFT, ITL, TPOT and E2E percentiles, throughput and goodput; write "
        "JSON and PNG.",
    )
    p.add_argument("--url", default=None, help="the endpoint's base URL, e.g. http://127.0.0.1:8000")
    p.add_argument("--grpc", default=None, metavar="HOST:PORT",
                   help="a worker's gRPC address: drive lmfleet.v1.Worker/Generate directly")
    p.add_argument("--model", default=None, help="model name (default: the only one served)")
    p.add_argument("--api-key", default=None, help="API key (default: $LMFLEET_API_KEY)")
    p.add_argument("--num-requests", type=int, default=32, metavar="N")
    p.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="Poisson arrivals per second (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, nargs="+", default=[None], metavar="C",
                   help="requests in flight at most; several values run one after another "
                   "(default: no cap)")
    p.add_argument("--input-len-mean", type=int, default=128, metavar="N")
    p.add_argument("--input-len-range", type=int, default=0, metavar="N",
                   help="prompt lengths are uniform in [mean - range, mean + range]")
    p.add_argument("--output-len-mean", type=int, default=32, metavar="N")
    p.add_argument("--output-len-range", type=int, default=0, metavar="N")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ttft-ms", type=float, default=None, metavar="X",
                   help="goodput counts requests with TTFT <= X ms ...")
    p.add_argument("--slo-tpot-ms", type=float, default=None, metavar="Y",
                   help="... and TPOT <= Y ms")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the workload per target and concurrency, alternating the "
                   "target order (default 1)")
    p.add_argument("--warmup", type=int, default=1, metavar="N",
                   help="unrecorded requests sent before each run (default 1)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output directory (default: benchmarks/results of the checkout)")
    p.add_argument("--name", default="online", help="output file stem (default 'online')")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_benchmark_module(name: str):
    """benchmarks/<name>.py of this checkout (benchmarks/ is not an installed package)."""
    import lmfleet.cluster

    path = Path(lmfleet.cluster.__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: lmfleet bench needs a source checkout "
                                "(pip install -e .)")
    module_name = f"lmfleet_benchmarks_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


def _row(run: dict) -> str:
    def stat(metric: str, key: str) -> str:
        return f"{run[metric][key]:8.1f}" if run[metric] else "       -"

    return (f"{run['target']:<14} {str(run['max_concurrency'] or 'inf'):>4} "
            f"{run['num_succeeded']:>4}/{run['num_requests']:<4} "
            f"{run['request_throughput']:7.2f} {run['output_token_throughput']:8.1f} "
            f"{stat('ttft_ms', 'mean')} {stat('ttft_ms', 'p50')} {stat('ttft_ms', 'p99')} "
            f"{stat('tpot_ms', 'mean')} {stat('tpot_ms', 'p50')} {stat('tpot_ms', 'p99')}")


def run(args: argparse.Namespace) -> int:
    import asyncio

    if args.url is None and args.grpc is None:
        raise ValueError("give --url (an OpenAI endpoint) and/or --grpc (a worker)")
    if args.grpc is not None and args.grpc.rpartition(":")[2].isdigit() is False:
        raise ValueError(f"--grpc {args.grpc!r} is not HOST:PORT")
    online = load_benchmark_module("online")
    workload = online.Workload(
        num_requests=args.num_requests, request_rate=args.request_rate,
        input_len_mean=args.input_len_mean, input_len_range=args.input_len_range,
        output_len_mean=args.output_len_mean, output_len_range=args.output_len_range,
        seed=args.seed)
    api_key = args.api_key or os.environ.get("LMFLEET_API_KEY")
    targets = []
    if args.url is not None:
        targets.append(online.TargetSpec("http", args.url, args.model, api_key))
    if args.grpc is not None:
        targets.append(online.TargetSpec("grpc", args.grpc))
    report = asyncio.run(online.benchmark(
        targets, workload, list(args.max_concurrency), rounds=args.rounds,
        warmup=args.warmup, slo_ttft_ms=args.slo_ttft_ms, slo_tpot_ms=args.slo_tpot_ms,
        progress=not args.no_progress))
    out = Path(args.out) if args.out else online.RESULTS_DIR
    json_path, png_path = load_benchmark_module("online_report").write_report(
        report, out, args.name)
    print(f"{'target':<14} {'conc':>4} {'ok/total':>9} {'req/s':>7} {'tok/s':>8} "
          f"{'TTFTmean':>8} {'TTFTp50':>8} {'TTFTp99':>8} {'TPOTmean':>8} {'TPOTp50':>8} "
          f"{'TPOTp99':>8}   (ms)")
    for entry in report["runs"]:
        print(_row(entry))
        for error in entry["errors"]:
            print(f"  error: {error}")
    for c in report["comparisons"]:
        def get(key: str, c: dict = c) -> float:
            value = c.get(key)
            return math.nan if value is None else value

        print(f"c={c['max_concurrency'] or 'inf'}: {c['a']} - {c['b']}: "
              f"TTFT mean {get('ttft_ms_mean_diff'):+.1f} ms (x{get('ttft_ms_mean_ratio'):.2f}), "
              f"p50 {get('ttft_ms_p50_diff'):+.1f} ms; "
              f"TPOT mean {get('tpot_ms_mean_diff'):+.2f} ms (x{get('tpot_ms_mean_ratio'):.2f}), "
              f"p50 {get('tpot_ms_p50_diff'):+.2f} ms; "
              f"throughput x{get('output_token_throughput_ratio'):.2f}")
    print(f"wrote {json_path} and {png_path}")
    return 0 if all(r["num_failed"] == 0 for r in report["runs"]) else 1
