"""Scheduling benchmark: FCFS vs skip-join MLFQ on a heavy-tailed workload, same run.

Workload (sim/workload.py): Poisson arrivals, prompts of 16-160 tokens, 80% of outputs
4-16 tokens and 20% long ones, 64-2048 tokens from a bounded Pareto (shape 1.1: most long
jobs are a few hundred tokens, a few run to thousands). Flags change all of it;
`--long-dist uniform --long-output 256,768` is the bimodal workload of earlier runs.
Lengths are enforced with min_tokens = max_tokens (greedy), so they are exact; the
scheduler is never told them.

(a) Real engine, default model on CPU: an FCFS engine and an MLFQ engine, each in its own
    process with one thread (sim/replay.py), at the same time so that a CPU shared with
    other work slows both alike. They are calibrated (sim/calibrate.py: the start-up
    profile, then a step-time model fitted on a saturating burst of this workload, which
    gives the capacity in requests/s), then both replay the same job list (arrivals at
    `--real-load` x capacity), each driven from one thread: requests are added once their
    arrival time has passed (wall clock), then `step()`. JCT and TTFT count from the
    arrival time. Both policies' tokens are compared.
(b) Discrete-event simulation (sim/simulator.py) with the real scheduler classes on a fake
    clock and step times from the same calibrated cost model: `--sim-requests` jobs at
    each of `--loads` x capacity, for FCFS, MLFQ and a yardstick that knows the output
    lengths (shortest remaining output first, sim/oracle.py: what any reordering could
    win), plus MLFQ with other starvation bounds, arrival order within queues (with a
    round-robin last queue too), 8 queues and no deadline lane at the highest load.

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
import time
from dataclasses import asdict, replace
from pathlib import Path

from scheduling_report import POLICIES, SIM_POLICIES, plot, table, table_real, write_report
from sim.calibrate import fit_cost_model, probe_summary
from sim.replay import engine_worker, make_prompts
from sim.simulator import SimConfig, simulate
from sim.workload import LONG_DISTRIBUTIONS, WorkloadSpec, capacity_per_s, make_jobs

from lmfleet.worker.config import MLFQ_QUEUE_ORDERS, SchedulerConfig
from lmfleet.worker.scheduler.cost_model import CostModel

# MLFQ starvation bounds tried at the highest load besides --mlfq-starvation-s (1e9: none).
STARVATION_SWEEP = (1.0, 10.0, 1e9)


# ---- (a) the real engine ----------------------------------------------------------------------


def engine_options(args: argparse.Namespace, policy: str) -> dict:
    options = dict(scheduler=policy, max_num_seqs=args.max_num_seqs,
                   num_kv_blocks=args.num_kv_blocks, host_kv_memory_bytes=args.host_kv_mib << 20)
    if policy == "mlfq":
        options.update(mlfq_starvation_s=args.mlfq_starvation_s,
                       mlfq_num_queues=args.mlfq_num_queues,
                       mlfq_queue_order=args.mlfq_queue_order,
                       mlfq_deadline_s=args.mlfq_deadline_s,
                       mlfq_deadline_slack=args.mlfq_deadline_slack)
        if args.mlfq_base_quantum_s is not None:
            options.update(mlfq_base_quantum_s=args.mlfq_base_quantum_s)
    return options


def _receive(conn, timeout_s: float, what: str) -> dict:
    if not conn.poll(timeout_s):
        raise RuntimeError(f"{what}: no answer within {timeout_s:.0f} s")
    message = conn.recv()
    if "error" in message:
        raise RuntimeError(f"{what} failed:\n{message['error']}")
    return message


def run_real(args: argparse.Namespace, spec: WorkloadSpec) -> tuple[CostModel, float, dict]:
    """Both engines calibrate and probe at the same time, then replay the same jobs at the
    same time (sim/replay.py). Returns the fitted cost model, MLFQ's base quantum and the
    results."""
    context = multiprocessing.get_context("spawn")
    probe_jobs = make_jobs(spec, args.probe_requests, 1.0, args.seed + 1)
    workers = {}
    try:
        for policy in POLICIES:
            conn, child_conn = context.Pipe()
            process = context.Process(target=engine_worker, args=(
                child_conn, args.model, engine_options(args, policy), args.threads, probe_jobs,
                args.seed + 1))
            process.start()
            child_conn.close()
            workers[policy] = (process, conn)
        print(f"engines calibrating; probing with {len(probe_jobs)} requests at once ...",
              flush=True)
        probes = {p: _receive(conn, args.real_timeout_s, f"{p} engine start")
                  for p, (_, conn) in workers.items()}
        steps = probes["fcfs"]["steps"]
        profiled = CostModel(**probes["fcfs"]["profiled"])
        cost = fit_cost_model(steps, profiled.prefill_base_s)
        probe = probe_summary(steps, cost, spec, args.max_num_seqs)
        # The load is what the FCFS engine was measured to complete at a full batch (robust);
        # the fitted model shapes the simulation's steps.
        capacity = probe["measured_full_batch_req_per_s"]
        rate = args.real_load * capacity
        jobs = make_jobs(spec, args.real_requests, rate, args.seed)
        prompts = make_prompts(jobs, probes["fcfs"]["vocab_size"], args.seed)
        base_quantum_s = probes["mlfq"]["base_quantum_s"]
        print(f"profiled: {profiled}\nfitted on the probe: {cost}\n"
              f"capacity {capacity:.2f} req/s measured at a full batch (the fitted model says "
              f"{probe['fitted_capacity_req_per_s']:.2f}) -> rate {rate:.2f} req/s, "
              f"{len(jobs)} requests over {jobs[-1].arrival_s:.0f} s; MLFQ base quantum "
              f"{base_quantum_s * 1e3:.0f} ms\nreal engines replaying ...", flush=True)
        for _, conn in workers.values():
            conn.send((jobs, prompts, args.real_timeout_s))
        runs = {p: _receive(conn, args.real_timeout_s + 60, f"{p} replay")
                for p, (_, conn) in workers.items()}
    finally:
        for process, conn in workers.values():
            conn.close()
            process.join(timeout=30)
            if process.is_alive():
                process.terminate()
    result = {
        "profiles": probes["fcfs"]["profiles"], "profiled_cost_model": profiled.as_dict(),
        "probe": probe,
        "mlfq_probe_measured_full_batch_req_per_s": probe_summary(
            probes["mlfq"]["steps"], cost, spec, args.max_num_seqs)[
                "measured_full_batch_req_per_s"],
        "mlfq_engine_cost_model": probes["mlfq"]["engine_cost_model"],
        "torch_threads": probes["fcfs"]["torch_threads"],
        "cost_model": cost.as_dict(), "capacity_req_per_s": capacity,
        "mlfq_base_quantum_s": base_quantum_s,
        "full_batch_step_s": cost.decode_step_time(args.max_num_seqs, 0),
        "rate_req_per_s": rate, "load": args.real_load, "num_requests": len(jobs),
        "arrival_span_s": jobs[-1].arrival_s,
    }
    for policy in POLICIES:
        result[policy] = runs[policy]["summary"]
    result["num_requests_with_different_tokens"] = sum(
        runs["fcfs"]["tokens"][j.job_id] != runs["mlfq"]["tokens"][j.job_id] for j in jobs)
    return cost, base_quantum_s, result


# ---- (b) the simulation -----------------------------------------------------------------------


def simulate_at_load(task: tuple) -> dict:
    load, spec, num_jobs, seed, config, cost = task
    capacity = capacity_per_s(cost, spec, config.max_num_seqs)
    jobs = make_jobs(spec, num_jobs, load * capacity, seed)
    return simulate(jobs, config, cost)


def run_sim(args: argparse.Namespace, spec: WorkloadSpec, cost: CostModel,
            base_quantum_s: float) -> dict:
    base = SimConfig(policy="fcfs", max_num_seqs=args.max_num_seqs,
                     num_kv_blocks=args.num_kv_blocks, num_host_blocks=args.sim_host_blocks,
                     mlfq_base_quantum_s=base_quantum_s,
                     mlfq_starvation_s=args.mlfq_starvation_s,
                     mlfq_num_queues=args.mlfq_num_queues,
                     mlfq_queue_order=args.mlfq_queue_order,
                     mlfq_deadline_s=args.mlfq_deadline_s,
                     mlfq_deadline_slack=args.mlfq_deadline_slack)
    top = max(args.loads)
    # (key, load, config[, seed]): every policy at every load, then MLFQ variants at the
    # highest load, then FCFS and MLFQ at the highest load on other seeds' job lists.
    runs = [((f"{load:g}", policy), load, replace(base, policy=policy))
            for load in args.loads for policy in SIM_POLICIES]
    runs += [((f"{bound:g}",), top, replace(base, policy="mlfq", mlfq_starvation_s=bound))
             for bound in STARVATION_SWEEP if bound != args.mlfq_starvation_s]
    runs += [((f"{bound:g} round_robin",), top, replace(
        base, policy="mlfq", mlfq_starvation_s=bound, mlfq_queue_order="arrival",
        mlfq_last_queue="round_robin")) for bound in (args.mlfq_starvation_s, 1e9)]
    if args.mlfq_queue_order != "arrival":
        runs.append(((f"{args.mlfq_starvation_s:g} arrival_order",), top,
                     replace(base, policy="mlfq", mlfq_queue_order="arrival")))
    if args.mlfq_deadline_s is not None or args.mlfq_deadline_slack:
        runs.append(((f"{args.mlfq_starvation_s:g} no_deadline_lane",), top, replace(
            base, policy="mlfq", mlfq_deadline_s=None, mlfq_deadline_slack=0.0)))
    runs += [((f"{args.mlfq_starvation_s:g} {queues}_queues",), top, replace(
        base, policy="mlfq", mlfq_num_queues=queues))
        for queues in (8,) if queues != args.mlfq_num_queues]
    seeds = range(args.seed + 1, args.seed + 1 + args.extra_seeds)
    runs += [((f"seed {seed}", policy), top, replace(base, policy=policy), seed)
             for seed in seeds for policy in POLICIES]
    tasks = [(run[1], spec, args.sim_requests, run[3] if len(run) > 3 else args.seed, run[2],
              cost) for run in runs]
    # spawn: the parent has torch's thread pools running; the children need none of it.
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        results = pool.map(simulate_at_load, tasks)
    by_load: dict[str, dict] = {}
    sweep: dict[str, dict] = {}
    by_seed: dict[str, dict] = {f"seed {args.seed}": by_load}
    for run, summary in zip(runs, results, strict=True):
        key = run[0]
        if len(run) > 3:
            by_seed.setdefault(key[0], {})[key[1]] = summary
        elif len(key) == 2:
            by_load.setdefault(key[0], {})[key[1]] = summary
        else:
            sweep[key[0]] = summary
    by_seed[f"seed {args.seed}"] = {p: by_load[f"{top:g}"][p] for p in POLICIES}
    sweep[f"{args.mlfq_starvation_s:g}"] = by_load[f"{top:g}"]["mlfq"]
    return {"config": asdict(base) | {"policy": list(SIM_POLICIES)},
            "capacity_req_per_s": capacity_per_s(cost, spec, args.max_num_seqs),
            "num_requests": args.sim_requests, "by_load": by_load,
            "seed_sweep": {"load": top, "by_seed": by_seed},
            "mlfq_starvation_sweep": {"load": top, "by_starvation_s": sweep}}


# ---- the target ------------------------------------------------------------------------------


def check_target(sim: dict, starvation_s: float) -> dict:
    """The target at the highest load, on every seed's job list (a heavy tail makes one
    list's p99 a matter of where its few giant jobs happen to land)."""
    seeds = sim["seed_sweep"]["by_seed"]
    # "No starving request": no stall longer than the starvation bound plus a few steps
    # (a promoted job still waits for the step in progress and its turn in Q0).
    bound = 2 * starvation_s
    per_seed = {seed: {"mean_jct_ratio": r["fcfs"]["jct_mean_s"] / r["mlfq"]["jct_mean_s"],
                       "p99_jct_ratio": r["fcfs"]["jct_p99_s"] / r["mlfq"]["jct_p99_s"],
                       "mlfq_max_stall_s": r["mlfq"]["max_stall_s"]}
                for seed, r in seeds.items()}
    verdict = {"load": sim["seed_sweep"]["load"], "per_seed": per_seed,
               "mean_2x": all(v["mean_jct_ratio"] >= 2 for v in per_seed.values()),
               "p99_no_worse": all(v["p99_jct_ratio"] >= 1 for v in per_seed.values()),
               "stall_bound_s": bound,
               "stall_bounded": all(v["mlfq_max_stall_s"] <= bound for v in per_seed.values())}
    verdict["met"] = verdict["mean_2x"] and verdict["p99_no_worse"] and verdict["stall_bounded"]
    return verdict


def _length_range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    if not (low.isdigit() and high.isdigit() and 0 < int(low) <= int(high)):
        raise argparse.ArgumentTypeError(f"expected LO,HI with 0 < LO <= HI, got {text!r}")
    return int(low), int(high)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--num-kv-blocks", type=int, default=1024)
    parser.add_argument("--host-kv-mib", type=int, default=256,
                        help="host KV tier of the real engines (both policies)")
    parser.add_argument("--mlfq-starvation-s", type=float, default=3.0)
    parser.add_argument("--mlfq-num-queues", type=int,
                        default=SchedulerConfig.mlfq_num_queues)
    parser.add_argument("--mlfq-queue-order", choices=MLFQ_QUEUE_ORDERS,
                        default=SchedulerConfig.mlfq_queue_order)
    parser.add_argument("--mlfq-deadline-s", type=float,
                        default=SchedulerConfig.mlfq_deadline_s,
                        help="MLFQ's deadline lane: a fixed deadline (default: learnt)")
    parser.add_argument("--mlfq-deadline-slack", type=float,
                        default=SchedulerConfig.mlfq_deadline_slack,
                        help="learnt deadline = this x the p99 JCT FCFS would have given "
                             "the finished jobs (0: no deadline lane)")
    parser.add_argument("--mlfq-base-quantum-s", type=float, default=None,
                        help="default: the engine's (one decode step of a half-full batch)")
    parser.add_argument("--real-requests", type=int, default=80)
    parser.add_argument("--probe-requests", type=int, default=40,
                        help="saturating burst that fits the step-time model and capacity")
    parser.add_argument("--real-load", type=float, default=0.9)
    parser.add_argument("--real-timeout-s", type=float, default=600.0,
                        help="give up on an engine's start-up or replay after this long")
    parser.add_argument("--skip-real", action="store_true",
                        help="simulation only, with --cost-model-json's cost model")
    parser.add_argument("--cost-model-json", default=None,
                        help="a scheduling.json whose calibrated cost model to reuse")
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--sim-host-blocks", type=int, default=4096)
    parser.add_argument("--loads", type=lambda s: [float(v) for v in s.split(",")],
                        default=[0.5, 0.7, 0.85, 0.95])
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of the real engines (0: torch's default); one "
                             "thread keeps step times steadier on a CPU shared with others")
    parser.add_argument("--workers", type=int, default=2, help="simulation processes")
    parser.add_argument("--extra-seeds", type=int, default=3,
                        help="other job lists (seeds) FCFS and MLFQ also run at the top load")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--name", default="scheduling", help="output file stem")
    parser.add_argument("--short-fraction", type=float, default=WorkloadSpec.short_fraction)
    parser.add_argument("--short-output", type=_length_range, default=WorkloadSpec.short_output,
                        help="LO,HI output tokens of short jobs")
    parser.add_argument("--long-output", type=_length_range, default=WorkloadSpec.long_output,
                        help="LO,HI output tokens of long jobs")
    parser.add_argument("--long-dist", choices=LONG_DISTRIBUTIONS,
                        default=WorkloadSpec.long_distribution,
                        help="distribution of long output lengths")
    parser.add_argument("--pareto-alpha", type=float, default=WorkloadSpec.pareto_alpha,
                        help="shape of the Pareto long outputs (smaller: heavier tail)")
    args = parser.parse_args()

    spec = WorkloadSpec(short_fraction=args.short_fraction, short_output=args.short_output,
                        long_output=args.long_output, long_distribution=args.long_dist,
                        pareto_alpha=args.pareto_alpha)
    result: dict = {"workload": spec.as_dict(), "machine": platform.platform(),
                    "args": {k: v for k, v in vars(args).items()}}
    started = time.perf_counter()
    if args.skip_real:
        if not args.cost_model_json:
            parser.error("--skip-real needs --cost-model-json")
        saved = json.loads(Path(args.cost_model_json).read_text())["real_engine"]
        cost = CostModel(**saved["cost_model"])
        base_quantum_s = args.mlfq_base_quantum_s or saved["mlfq_base_quantum_s"]
    else:
        cost, base_quantum_s, result["real_engine"] = run_real(args, spec)
        print(table_real(result["real_engine"]), flush=True)
    result["cost_model"] = cost.as_dict()
    print("simulating ...", flush=True)
    result["simulation"] = run_sim(args, spec, cost, base_quantum_s)
    result["target"] = check_target(result["simulation"], args.mlfq_starvation_s)
    result["wall_s"] = time.perf_counter() - started
    write_report(result, Path(args.out), args.name, plot, table)


if __name__ == "__main__":
    main()
