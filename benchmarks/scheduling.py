"""Scheduling benchmark: FCFS vs skip-join MLFQ on a heavy-tailed workload, same run.

Workload (sim/workload.py): Poisson arrivals, prompts of 16-160 tokens, 80% of outputs
8-24 tokens and 20% 128-256 tokens, enforced with min_tokens = max_tokens (greedy), so
lengths are exact; the scheduler is never told them.

(a) Real engine, default model on CPU: the engine's cost model is calibrated first
    (`profile_cost_model`), capacity (requests/s at a full batch) derived from it, and
    the same job list (arrivals at `--real-load` x capacity) is replayed on an FCFS engine
    and then an MLFQ engine, each driven from this thread: requests are added once their
    arrival time has passed (wall clock), then `step()`. JCT and TTFT count from the
    arrival time. The two policies must also produce identical tokens.
(b) Discrete-event simulation (sim/simulator.py) with the real scheduler classes on a fake
    clock and step times from the same calibrated cost model: `--sim-requests` jobs at
    each of `--loads` x capacity, for FCFS, MLFQ and a yardstick that knows the output
    lengths (shortest remaining output first, sim/oracle.py: what any reordering could
    win), plus MLFQ with other starvation bounds at the highest load.

The target checked at the highest load: MLFQ's mean JCT at least 2x better than FCFS's,
its p99 JCT no worse, and no request stalled longer than twice the starvation bound.

Writes benchmarks/results/scheduling.json and scheduling.png; prints a table. Run it as a
script from anywhere: `python benchmarks/scheduling.py` (benchmarks/ goes on sys.path).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import platform
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

from sim.metrics import JobRecord, summarize
from sim.simulator import ORACLE, SimConfig, simulate
from sim.workload import Job, WorkloadSpec, capacity_per_s, make_jobs

from lmfleet.worker.scheduler.cost_model import CostModel

POLICIES = ("fcfs", "mlfq")
SIM_POLICIES = (*POLICIES, ORACLE)
# MLFQ starvation bounds tried at the highest load besides --mlfq-starvation-s (1e9: none).
STARVATION_SWEEP = (1.0, 10.0, 1e9)
METRICS = (("jct_mean_s", "JCT mean"), ("jct_p99_s", "JCT p99"), ("ttft_mean_s", "TTFT mean"),
           ("ttft_p99_s", "TTFT p99"), ("max_stall_s", "max stall"))


# ---- (a) the real engine ----------------------------------------------------------------------


def engine_options(args: argparse.Namespace, policy: str, base_quantum_s: float) -> dict:
    options = dict(scheduler=policy, max_num_seqs=args.max_num_seqs,
                   num_kv_blocks=args.num_kv_blocks, host_kv_memory_bytes=args.host_kv_mib << 20)
    if policy == "mlfq":
        options.update(mlfq_starvation_s=args.mlfq_starvation_s,
                       mlfq_base_quantum_s=base_quantum_s)
    return options


def base_quantum(args: argparse.Namespace, cost: CostModel) -> float:
    """The engine's default rule (one decode step of a half-full batch) on the benchmark's
    calibration, so the real MLFQ engine and the simulation use the same quanta."""
    if args.mlfq_base_quantum_s is not None:
        return args.mlfq_base_quantum_s
    return cost.decode_step_time(max(1, args.max_num_seqs // 2), 0)


def calibrate(runner, num_profiles: int = 3) -> tuple[CostModel, list[dict]]:
    """Field-wise median of several profiles: one profile on a shared, busy machine can be
    far off (a single slow step bends the least-squares line)."""
    import statistics

    from lmfleet.worker.model.profiler import profile_cost_model

    profiles = [profile_cost_model(runner).as_dict() for _ in range(num_profiles)]
    median = {key: statistics.median(p[key] for p in profiles) for key in profiles[0]}
    return CostModel(**median), profiles


def make_prompts(jobs: list[Job], vocab_size: int, seed: int) -> dict[str, list[int]]:
    # Random ids: no two prompts share a prefix, so prefix caching plays no part.
    rng = random.Random(seed)
    return {j.job_id: [rng.randrange(100, vocab_size) for _ in range(j.prompt_len)]
            for j in jobs}


def replay(engine, jobs: list[Job], prompts: dict[str, list[int]], timeout_s: float) -> dict:
    """Feed `jobs` to the engine at their arrival times (wall clock) and step until all
    finish; returns the summary, the tokens per request and engine counters."""
    from lmfleet.worker.request import Request
    from lmfleet.worker.sampling_params import SamplingParams

    records = {j.job_id: JobRecord(j.job_id, j.arrival_s, j.output_len, j.is_long)
               for j in jobs}
    tokens: dict[str, list[int]] = {}
    pending = sorted(jobs, key=lambda j: j.arrival_s)
    index, num_steps, busy_s = 0, 0, 0.0
    start = time.perf_counter()
    while index < len(pending) or engine.has_work():
        now = time.perf_counter() - start
        if now > timeout_s:
            raise RuntimeError(f"real-engine run exceeded {timeout_s:.0f} s")
        while index < len(pending) and pending[index].arrival_s <= now:
            job = pending[index]
            params = SamplingParams(max_tokens=job.output_len, min_tokens=job.output_len,
                                    temperature=0)
            engine.add_request(Request(job.job_id, prompts[job.job_id], params))
            index += 1
        if not engine.has_work():
            time.sleep(min(pending[index].arrival_s - now, 0.05))
            continue
        step_start = time.perf_counter()
        outputs = engine.step()
        step_end = time.perf_counter()
        num_steps += 1
        busy_s += step_end - step_start
        for output in outputs:
            record = records[output.request_id]
            record.on_tokens(step_end - start, len(output.new_token_ids))
            if output.finished:
                record.finish_s = step_end - start
                tokens[output.request_id] = list(output.output_token_ids)
    makespan = time.perf_counter() - start
    summary = summarize(list(records.values()))
    # Compare mean_step_s with the calibrated full-batch decode step: a machine busier than
    # at calibration time runs the workload at a higher load than the one asked for.
    summary.update(num_steps=num_steps, busy_s=busy_s, makespan_s=makespan,
                   busy_fraction=busy_s / makespan, mean_step_s=busy_s / max(num_steps, 1),
                   num_preemptions=engine.scheduler.num_preemptions,
                   swap_out_blocks=engine.kv_manager.swap_stats.num_swap_out_blocks)
    return {"summary": summary, "tokens": tokens}


def run_real(args: argparse.Namespace, spec: WorkloadSpec) -> tuple[CostModel, dict]:
    import gc

    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.engine import LLMEngine

    result: dict = {}
    jobs = prompts = None
    cost = None
    for policy in POLICIES:
        options = engine_options(args, policy, base_quantum(args, cost) if cost else 0.0)
        engine = LLMEngine(EngineConfig.from_options(args.model, **options))
        if cost is None:
            # Calibrate on the first engine (FCFS), before any request: it sets the load for
            # both policies, MLFQ's quanta and the simulation's step times.
            cost, profiles = calibrate(engine.runner)
            result["profiles"] = profiles
            capacity = capacity_per_s(cost, spec, args.max_num_seqs)
            rate = args.real_load * capacity
            jobs = make_jobs(spec, args.real_requests, rate, args.seed)
            prompts = make_prompts(jobs, engine.arch.vocab_size, args.seed)
            result.update(cost_model=cost.as_dict(), capacity_req_per_s=capacity,
                          mlfq_base_quantum_s=base_quantum(args, cost),
                          full_batch_step_s=cost.decode_step_time(args.max_num_seqs, 0),
                          rate_req_per_s=rate, load=args.real_load, num_requests=len(jobs),
                          arrival_span_s=jobs[-1].arrival_s)
            print(f"calibrated: {cost}\ncapacity {capacity:.2f} req/s -> rate {rate:.2f} req/s, "
                  f"{len(jobs)} requests over {jobs[-1].arrival_s:.0f} s", flush=True)
        if engine.cost_model is not None:  # MLFQ's own start-up profile (skip-join uses it)
            result[f"{policy}_engine_cost_model"] = engine.cost_model.as_dict()
        print(f"real engine, {policy}: replaying ...", flush=True)
        run = replay(engine, jobs, prompts, args.real_timeout_s)
        result[policy] = run["summary"]
        result.setdefault("_tokens", {})[policy] = run["tokens"]
        print(f"  {format_row(policy, run['summary'])}", flush=True)
        del engine
        gc.collect()
    tokens = result.pop("_tokens")
    result["num_requests_with_different_tokens"] = sum(
        tokens["fcfs"][j.job_id] != tokens["mlfq"][j.job_id] for j in jobs)
    return cost, result


# ---- (b) the simulation -----------------------------------------------------------------------


def _simulate_one(task: tuple) -> dict:
    load, spec, num_jobs, seed, config, cost = task
    capacity = capacity_per_s(cost, spec, config.max_num_seqs)
    jobs = make_jobs(spec, num_jobs, load * capacity, seed)
    return simulate(jobs, config, cost)


def run_sim(args: argparse.Namespace, spec: WorkloadSpec, cost: CostModel) -> dict:
    base = SimConfig(policy="fcfs", max_num_seqs=args.max_num_seqs,
                     num_kv_blocks=args.num_kv_blocks, num_host_blocks=args.sim_host_blocks,
                     mlfq_base_quantum_s=base_quantum(args, cost),
                     mlfq_starvation_s=args.mlfq_starvation_s)
    top = max(args.loads)
    # (key, load, config): every policy at every load, then MLFQ's starvation sweep.
    runs = [((f"{load:g}", policy), load, replace(base, policy=policy))
            for load in args.loads for policy in SIM_POLICIES]
    runs += [((f"{bound:g}",), top, replace(base, policy="mlfq", mlfq_starvation_s=bound))
             for bound in STARVATION_SWEEP if bound != args.mlfq_starvation_s]
    tasks = [(load, spec, args.sim_requests, args.seed, config, cost) for _, load, config in runs]
    # spawn: the parent has torch's thread pools running; the children need none of it.
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(_simulate_one, tasks)
    by_load: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    for (key, _, _), summary in zip(runs, results, strict=True):
        if len(key) == 2:
            by_load.setdefault(key[0], {})[key[1]] = summary
        else:
            sweep[key[0]] = summary
    sweep[f"{args.mlfq_starvation_s:g}"] = by_load[f"{top:g}"]["mlfq"]
    return {"config": asdict(base) | {"policy": list(SIM_POLICIES)},
            "capacity_req_per_s": capacity_per_s(cost, spec, args.max_num_seqs),
            "num_requests": args.sim_requests, "by_load": by_load,
            "mlfq_starvation_sweep": {"load": top, "by_starvation_s": sweep}}


# ---- report --------------------------------------------------------------------------------


def format_row(label: str, s: dict) -> str:
    return " ".join([f"{label:<14}"] + [f"{s[key]:>9.2f}" for key, _ in METRICS]
                    + [f"{s.get('jct_mean_short_s', float('nan')):>9.2f}",
                       f"{s.get('jct_mean_long_s', float('nan')):>9.2f}"])


def table(result: dict) -> str:
    header = " ".join([f"{'':<14}"] + [f"{name:>9}" for _, name in METRICS]
                      + [f"{'short JCT':>9}", f"{'long JCT':>9}"])
    lines = []
    real = result.get("real_engine")
    if real:
        lines += [f"real engine ({real['num_requests']} requests, load {real['load']:g} of "
                  f"{real['capacity_req_per_s']:.2f} req/s; seconds)", header]
        lines += [format_row(p, real[p]) for p in POLICIES]
        lines.append(f"requests whose tokens differ between policies: "
                     f"{real['num_requests_with_different_tokens']}")
    sim = result["simulation"]
    lines += ["", f"simulation ({sim['num_requests']} requests per run; seconds)", header]
    for load, runs in sim["by_load"].items():
        lines += [format_row(f"{p[:6]} @ {load}", runs[p]) for p in SIM_POLICIES]
        f, m, o = runs["fcfs"], runs["mlfq"], runs[ORACLE]
        lines.append(f"{'':<14} FCFS/MLFQ: mean JCT {f['jct_mean_s'] / m['jct_mean_s']:.2f}x, "
                     f"p99 JCT {f['jct_p99_s'] / m['jct_p99_s']:.2f}x, "
                     f"TTFT mean {f['ttft_mean_s'] / m['ttft_mean_s']:.1f}x; "
                     f"FCFS/oracle mean JCT {f['jct_mean_s'] / o['jct_mean_s']:.2f}x")
    sweep = sim["mlfq_starvation_sweep"]
    lines += ["", f"MLFQ starvation bound at load {sweep['load']:g}", header]
    for bound, summary in sorted(sweep["by_starvation_s"].items(), key=lambda kv: float(kv[0])):
        lines.append(format_row(f"starve {bound}", summary))
    verdict = result["target"]
    lines += ["", f"target at load {verdict['load']}: mean JCT ratio "
              f"{verdict['mean_jct_ratio']:.2f} (>= 2: {verdict['mean_2x']}), p99 no worse: "
              f"{verdict['p99_no_worse']}, max stall bounded (<= {verdict['stall_bound_s']:g} s):"
              f" {verdict['stall_bounded']} -> met: {verdict['met']}"]
    return "\n".join(lines)


def check_target(sim: dict, starvation_s: float) -> dict:
    load = max(sim["by_load"], key=float)
    f, m = sim["by_load"][load]["fcfs"], sim["by_load"][load]["mlfq"]
    # "No starving request": no stall longer than the starvation bound plus a few steps
    # (a promoted job still waits for the step in progress and its turn in Q0).
    bound = 2 * starvation_s
    verdict = {"load": load, "mean_jct_ratio": f["jct_mean_s"] / m["jct_mean_s"],
               "p99_jct_ratio": f["jct_p99_s"] / m["jct_p99_s"],
               "mean_2x": f["jct_mean_s"] >= 2 * m["jct_mean_s"],
               "p99_no_worse": m["jct_p99_s"] <= f["jct_p99_s"],
               "stall_bound_s": bound, "stall_bounded": m["max_stall_s"] <= bound}
    verdict["met"] = verdict["mean_2x"] and verdict["p99_no_worse"] and verdict["stall_bounded"]
    return verdict


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sim = result["simulation"]
    loads = sorted(sim["by_load"], key=float)
    x = [float(load) for load in loads]
    real = result.get("real_engine")
    fig, axes = plt.subplots(1, 3 if real else 2, figsize=(15 if real else 10, 4))
    colors = {"fcfs": "#888", "mlfq": "#2a7", ORACLE: "#c84"}
    for ax, key, title in ((axes[0], "jct_mean_s", "mean JCT"), (axes[1], "jct_p99_s", "p99 JCT")):
        for policy in SIM_POLICIES:
            ax.plot(x, [sim["by_load"][load][policy][key] for load in loads],
                    "o--" if policy == ORACLE else "o-", color=colors[policy],
                    label=policy.upper() if policy != ORACLE else "SRPT oracle (knows lengths)")
        ax.set_xlabel("load (fraction of capacity)")
        ax.set_ylabel("seconds")
        ax.set_ylim(bottom=0)
        ax.set_title(f"simulation: {title} ({sim['num_requests']} requests)")
        ax.legend()
    if real:
        ax = axes[2]
        width = 0.38
        for offset, policy in ((-width / 2, "fcfs"), (width / 2, "mlfq")):
            values = [real[policy][key] for key, _ in METRICS]
            ax.bar([i + offset for i in range(len(METRICS))], values, width,
                   color=colors[policy], label=policy.upper())
        ax.set_xticks(range(len(METRICS)), [name for _, name in METRICS])
        ax.set_ylabel("seconds")
        ax.set_title(f"real engine, CPU: {real['num_requests']} requests at load "
                     f"{real['load']:g}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--host-kv-mib", type=int, default=256,
                        help="host KV tier of the real engines (both policies)")
    parser.add_argument("--mlfq-starvation-s", type=float, default=3.0)
    parser.add_argument("--mlfq-base-quantum-s", type=float, default=None,
                        help="default: the engine's (one decode step of a half-full batch)")
    parser.add_argument("--real-requests", type=int, default=80)
    parser.add_argument("--real-load", type=float, default=0.9)
    parser.add_argument("--real-timeout-s", type=float, default=300.0,
                        help="give up on a policy's real run after this long")
    parser.add_argument("--skip-real", action="store_true",
                        help="simulation only, with --cost-model-json's cost model")
    parser.add_argument("--cost-model-json", default=None,
                        help="a scheduling.json whose calibrated cost model to reuse")
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--sim-host-blocks", type=int, default=4096)
    parser.add_argument("--loads", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.5, 0.7, 0.85, 0.95])
    parser.add_argument("--workers", type=int, default=2, help="simulation processes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="scheduling", help="output file stem")
    args = parser.parse_args()

    spec = WorkloadSpec()
    result: dict = {"workload": spec.as_dict(), "machine": platform.platform(),
                    "args": {k: v for k, v in vars(args).items()}}
    started = time.perf_counter()
    if args.skip_real:
        if not args.cost_model_json:
            parser.error("--skip-real needs --cost-model-json")
        saved = json.loads(Path(args.cost_model_json).read_text())
        cost = CostModel(**saved["real_engine"]["cost_model"])
    else:
        import torch

        result["torch_threads"] = torch.get_num_threads()
        cost, result["real_engine"] = run_real(args, spec)
    result["cost_model"] = cost.as_dict()
    print("simulating ...", flush=True)
    result["simulation"] = run_sim(args, spec, cost)
    result["target"] = check_target(result["simulation"], args.mlfq_starvation_s)
    result["wall_s"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{args.name}.png")
    print(table(result))
    print(f"wrote {out / args.name}.json and .png ({result['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
