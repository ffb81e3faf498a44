"""Ray overhead benchmark: the same load through a Ray-placed replica (`lmfleet serve`) and
through a plain `lmfleet worker` behind `lmfleet router`.

The yardstick: Ray Serve LLM is reported to cost ~20 ms mean TTFT over bare vLLM; we aim
for less than 5 ms. Two setups, each started, measured and stopped on its own (only one
runs at a time), in ABBA order over --rounds (ray, plain | plain, ray | ...) so a drifting
machine load hits both alike:
  ray:   `lmfleet serve --config` with one model, replicas 1, cpus_per_rank --cpus-per-rank
  plain: `lmfleet worker --model M --model-name default --port 0` and
         `lmfleet router --worker HOST:PORT --port 0 --grpc-port 0`
Both get the same engine flags (--max-num-seqs, --num-kv-blocks). Ray sets a replica's
OMP_NUM_THREADS to its actor's CPUs while a plain worker's torch uses every core, so
--cpus-per-rank defaults to os.cpu_count() to give both the same threads.

Per setup run and --concurrencies value: --warmup requests, then online.py's Workload
(--num-requests requests of --input-len random token ids and exactly --output-len output
tokens, `ignore_eos`, all queued at once and capped at that many in flight) with a fresh
salt, through the OpenAI HTTP API (streaming /v1/completions, client-side timing).

Reported per setup and concurrency (rounds pooled): TTFT mean/p50/p99, TPOT mean, output
tokens/s, each round's TTFT mean; ray - plain differences (TTFT mean/p50/p99 in ms, TTFT
mean ratio, TPOT mean, the paired per-round TTFT mean differences); start-up times and
loadavg before/after. Writes ray_overhead.json and .png (TTFT mean bars with the difference
annotated; TPOT mean bars) to --out (default benchmarks/results).
Run on a quiet machine: `.venv/bin/python benchmarks/ray_overhead.py`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from autoscale import environment  # also puts the repository root on sys.path
from online import TargetSpec, Workload, make_requests, open_target, run_load, summarize

from tests.integration.serve_process import start_serve
from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import worker_process

SETUPS = ("ray", "plain")
START_TIMEOUT_S = 400.0
STOP_TIMEOUT_S = 60.0


@contextlib.contextmanager
def start_setup(setup: str, args: argparse.Namespace, tmp: Path) -> Iterator[str]:
    """Start one setup; yield its base URL once it serves; stop it at the end."""
    if setup == "ray":
        import yaml

        config = tmp / "fleet.yaml"
        config.write_text(yaml.safe_dump({"models": [{
            "name": "default", "path": args.model, "replicas": 1,
            "cpus_per_rank": args.cpus_per_rank,
            "engine": {"max_num_seqs": args.max_num_seqs,
                       "num_kv_blocks": args.num_kv_blocks}}]}))
        with start_serve(["--config", str(config)]) as serve:
            yield serve.base_url
    else:
        flags = ["--model-name", "default", "--max-num-seqs", str(args.max_num_seqs),
                 "--num-kv-blocks", str(args.num_kv_blocks)]
        with worker_process(args.model, flags, START_TIMEOUT_S, STOP_TIMEOUT_S) as worker, \
                start_router([worker.address]) as router:
            yield router.base_url


async def measure(url: str, workload: Workload, concurrencies: list[int], warmup: int,
                  salt: int) -> dict[int, tuple[list, float]]:
    """One setup run: per concurrency, warm-up requests then the workload (fresh salts
    from `salt` on). Returns {concurrency: (results, wall seconds)}."""
    out = {}
    for i, concurrency in enumerate(concurrencies):
        target = open_target(TargetSpec("http", url, model="default"), concurrency)
        try:
            if warmup:
                warm = replace(workload, num_requests=warmup, request_rate=math.inf)
                await run_load(target, make_requests(warm, salt=-(salt + i)), None, False)
            out[concurrency] = await run_load(target, make_requests(workload, salt=salt + i),
                                              concurrency, progress=False)
        finally:
            await target.close()
    return out


def compact(report: dict) -> dict:
    report = dict(report)
    report.pop("samples_ms")
    report.pop("goodput")
    return report


def compare(ray: dict, plain: dict) -> dict:
    """ray - plain (ms) and ray / plain; paired: the per-round TTFT mean differences."""
    out = {f"ttft_{s}_diff_ms": ray["ttft_ms"][s] - plain["ttft_ms"][s]
           for s in ("mean", "p50", "p99")}
    out["ttft_mean_ratio"] = ray["ttft_ms"]["mean"] / plain["ttft_ms"]["mean"]
    out["tpot_mean_diff_ms"] = ray["tpot_ms"]["mean"] - plain["tpot_ms"]["mean"]
    out["output_token_throughput_ratio"] = (ray["output_token_throughput"]
                                            / plain["output_token_throughput"])
    paired = [a - b for a, b in zip(ray["round_ttft_mean_ms"], plain["round_ttft_mean_ms"],
                                    strict=True)]
    out["paired_ttft_mean_diff_ms"] = paired
    out["paired_ttft_mean_diff_stdev_ms"] = statistics.stdev(paired) if len(paired) > 1 \
        else None
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    concurrencies = result["concurrencies"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, metric, title in ((axes[0], "ttft_ms", "TTFT mean"),
                              (axes[1], "tpot_ms", "TPOT mean")):
        for k, setup in enumerate(SETUPS):
            runs = [result["runs"][setup][str(c)] for c in concurrencies]
            means = [r[metric]["mean"] if r[metric] else math.nan for r in runs]
            spread = [statistics.stdev(r["round_ttft_mean_ms"])
                      if metric == "ttft_ms" and len(r["round_ttft_mean_ms"]) > 1 else 0.0
                      for r in runs]
            xs = [i + (k - 0.5) * 0.38 for i in range(len(concurrencies))]
            ax.bar(xs, means, width=0.38, yerr=spread, capsize=3, label=setup)
        ax.set_xticks(range(len(concurrencies)), [f"c={c}" for c in concurrencies])
        ax.set(ylabel=f"{title} (ms)", title=title)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    for i, c in enumerate(concurrencies):
        diff = result["comparisons"].get(str(c))
        if diff:
            top = max(result["runs"][s][str(c)]["ttft_ms"]["mean"] for s in SETUPS)
            axes[0].annotate(f"ray - plain\n{diff['ttft_mean_diff_ms']:+.1f} ms "
                             f"(x{diff['ttft_mean_ratio']:.3f})", (i, top), ha="center",
                             va="bottom", fontsize=8, xytext=(0, 8), textcoords="offset points")
    axes[0].margins(y=0.25)
    w = result["workload"]
    fig.suptitle(f"Ray replica vs plain worker: {w['num_requests']} req x {result['rounds']} "
                 f"round(s), in {w['input_len_mean']} / out {w['output_len_mean']} tokens "
                 f"(error bars: stdev of the round means)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--concurrencies", default="1,4", help="max in flight, comma-separated")
    parser.add_argument("--warmup", type=int, default=2, help="requests before each run")
    parser.add_argument("--max-num-seqs", type=int, default=4)
    parser.add_argument("--num-kv-blocks", type=int, default=256)
    parser.add_argument("--cpus-per-rank", type=float, default=float(os.cpu_count() or 1),
                        help="the Ray replica's CPUs (and so its OMP_NUM_THREADS)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="ray_overhead", help="output file stem")
    args = parser.parse_args()
    try:
        concurrencies = [int(c) for c in args.concurrencies.split(",")]
    except ValueError:
        raise ValueError(f"--concurrencies: integers, comma-separated, got "
                         f"{args.concurrencies!r}") from None
    if args.rounds < 1 or args.warmup < 0 or min(concurrencies) < 1:
        raise ValueError("need --rounds >= 1, --warmup >= 0 and concurrencies >= 1")
    workload = Workload(num_requests=args.num_requests, input_len_mean=args.input_len,
                        output_len_mean=args.output_len, seed=args.seed)
    load_before, started = os.getloadavg(), time.time()
    collected = {(s, c): ([], 0.0, []) for s in SETUPS for c in concurrencies}
    startups: dict[str, list[float]] = {s: [] for s in SETUPS}
    salt = 0
    with tempfile.TemporaryDirectory(prefix="lmfleet-ray-overhead-") as tmp:
        for round_index in range(args.rounds):
            order = SETUPS if round_index % 2 == 0 else SETUPS[::-1]
            for setup in order:
                begun = time.perf_counter()
                with start_setup(setup, args, Path(tmp)) as url:
                    startups[setup].append(time.perf_counter() - begun)
                    runs = asyncio.run(measure(url, workload, concurrencies, args.warmup,
                                               salt))
                salt += len(concurrencies)
                for c, (results, duration) in runs.items():
                    pooled, total, means = collected[setup, c]
                    ttft = [r.ttft_s for r in results if r.ok and r.ttft_s is not None]
                    means.append(statistics.fmean(ttft) * 1000 if ttft else math.nan)
                    collected[setup, c] = (pooled + results, total + duration, means)
                    print(f"round {round_index + 1} {setup:5s} c={c}: TTFT mean "
                          f"{means[-1]:.1f} ms, {sum(not r.ok for r in results)} failed",
                          file=sys.stderr, flush=True)
    runs = {s: {str(c): compact(summarize(collected[s, c][0], collected[s, c][1]))
                | {"round_ttft_mean_ms": collected[s, c][2]} for c in concurrencies}
            for s in SETUPS}
    comparisons = {str(c): compare(runs["ray"][str(c)], runs["plain"][str(c)])
                   for c in concurrencies
                   if runs["ray"][str(c)]["ttft_ms"] and runs["plain"][str(c)]["ttft_ms"]}
    result = {"benchmark": "ray_overhead", "args": vars(args), "workload": asdict(workload)
              | {"request_rate": str(workload.request_rate)}, "concurrencies": concurrencies,
              "rounds": args.rounds, "startup_s": startups, "runs": runs,
              "comparisons": comparisons, "environment": environment(load_before, started)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.name}.png")
    for c in concurrencies:
        for s in SETUPS:
            r = runs[s][str(c)]
            if r["ttft_ms"]:
                print(f"c={c} {s:5s}: TTFT mean {r['ttft_ms']['mean']:.1f} p50 "
                      f"{r['ttft_ms']['p50']:.1f} p99 {r['ttft_ms']['p99']:.1f} ms, TPOT mean "
                      f"{r['tpot_ms']['mean']:.1f} ms, {r['output_token_throughput']:.1f} "
                      f"tok/s, {r['num_failed']} failed")
        if str(c) in comparisons:
            d = comparisons[str(c)]
            print(f"c={c} ray - plain: TTFT mean {d['ttft_mean_diff_ms']:+.1f} ms "
                  f"(x{d['ttft_mean_ratio']:.3f}), p99 {d['ttft_p99_diff_ms']:+.1f} ms")
    print(f"wrote {out / args.name}.json and .png")


if __name__ == "__main__":
    main()
