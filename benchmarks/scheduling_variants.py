"""Size-blind scheduling variants against the MLFQ target (mean and p99 JCT), simulated.

The scheduling benchmark's target asks MLFQ for a mean JCT at least 2x better than FCFS's
at the highest load with a p99 JCT no worse and no starving request. Without its deadline
lane MLFQ met the mean and the stall bound but not the p99. This runs FCFS, the shipped
MLFQ (with the lane, its deadline learnt or fixed at several values), MLFQ without the lane,
the variants of sim/variants.py and the SRPT oracle (which knows output lengths) on the same
job lists (`--seeds`) at `--load`, with the cost model, base quantum and workload that a
scheduling benchmark run calibrated (`--cost-model-json`), and reports each one's
FCFS/variant ratios of mean and p99 JCT per seed and its longest stall.

Writes benchmarks/results/scheduling_variants.json and .png (mean ratio against p99 ratio,
one point per variant and seed, the target's corner shaded). Run as a script:
`python benchmarks/scheduling_variants.py`.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import time
from dataclasses import asdict, replace
from pathlib import Path

from scheduling import simulate_at_load
from scheduling_report import write_report
from sim.simulator import ORACLE, SimConfig
from sim.workload import WorkloadSpec

from lmfleet.worker.scheduler.cost_model import CostModel

SHIPPED_STARVATION_S = 3.0
NO_BOOST = 1e9
NO_LANE = {"mlfq_deadline_slack": 0.0}
ARRIVAL = {"mlfq_queue_order": "arrival", **NO_LANE}
# (label, SimConfig.policy, SimConfig overrides). The variants measured before the deadline
# lane run without it (NO_LANE), and those built on MLFQ's queues keep jobs in arrival
# order within a queue, as they were first measured, unless a label says "least attained".
VARIANT_RUNS: tuple[tuple[str, str, dict], ...] = (
    ("FCFS", "fcfs", {}),
    ("MLFQ as shipped (least attained, 3 s boost, deadline: FCFS's p99 JCT replayed)", "mlfq",
     {}),
    ("the same, prefill chunks not bounded", "mlfq", {"mlfq_bounded_prefill": False}),
    ("the same, deadline 0.8x FCFS's p99", "mlfq", {"mlfq_deadline_slack": 0.8}),
    ("the same, deadline 0.9x FCFS's p99", "mlfq", {"mlfq_deadline_slack": 0.9}),
    ("the same, deadline 1.2x FCFS's p99", "mlfq", {"mlfq_deadline_slack": 1.2}),
    ("previous lane: deadline 1.5x p99 service of the last 1000 jobs",
     "mlfq-service-deadline", {"variant_param": 1.5}),
    ("the same, fixed deadline 80 s", "mlfq", {"mlfq_deadline_s": 80.0}),
    ("the same, fixed deadline 100 s", "mlfq", {"mlfq_deadline_s": 100.0}),
    ("the same, fixed deadline 130 s", "mlfq", {"mlfq_deadline_s": 130.0}),
    ("the same, fixed deadline 160 s", "mlfq", {"mlfq_deadline_s": 160.0}),
    ("the same, fixed deadline 200 s", "mlfq", {"mlfq_deadline_s": 200.0}),
    ("MLFQ without the deadline lane (least attained)", "mlfq", NO_LANE),
    ("the same, 10 s boost", "mlfq", {"mlfq_starvation_s": 10.0, **NO_LANE}),
    ("MLFQ, arrival order within a queue (earlier default)", "mlfq", ARRIVAL),
    ("MLFQ, 8 queues, arrival order", "mlfq", {"mlfq_num_queues": 8, **ARRIVAL}),
    ("MLFQ, quanta spent by own work", "mlfq-own-cost", ARRIVAL),
    ("two classes: own-work quanta, 6 queues, no boost", "mlfq-own-cost",
     {"mlfq_num_queues": 6, "mlfq_starvation_s": NO_BOOST, **ARRIVAL}),
    ("ageing, 0.5 steps/s", "mlfq-aging", {"variant_param": 0.5}),
    ("ageing, 2 steps/s", "mlfq-aging", {"variant_param": 2.0}),
    ("ageing, 8 steps/s", "mlfq-aging", {"variant_param": 8.0}),
    ("boost for the home quantum, 3 s", "mlfq-full-boost", {"variant_param": 1.0, **ARRIVAL}),
    ("boost for 1/4 home quantum, 3 s", "mlfq-full-boost",
     {"variant_param": 0.25, **ARRIVAL}),
    ("boost for the home quantum, 10 s", "mlfq-full-boost",
     {"variant_param": 1.0, "mlfq_starvation_s": 10.0, **ARRIVAL}),
    ("lane: the long job furthest along never preempted", "mlfq-lane",
     {"variant_param": 1, **ARRIVAL}),
    ("lane: the 2 long jobs furthest along", "mlfq-lane", {"variant_param": 2, **ARRIVAL}),
    ("SRPT oracle (knows lengths)", ORACLE, {}),
)
KEPT = ("jct_mean_s", "jct_p99_s", "jct_p99_long_s", "ttft_mean_s", "max_stall_s")


def stall_bound_s(config: SimConfig) -> float:
    """The benchmark's "no starving request" bound: twice the starvation bound; variants
    without a boost are held to the shipped one."""
    bound = config.mlfq_starvation_s
    return 2 * (bound if bound < NO_BOOST else SHIPPED_STARVATION_S)


def run(args: argparse.Namespace) -> dict:
    saved = json.loads(Path(args.cost_model_json).read_text())
    cost = CostModel(**saved["real_engine"]["cost_model"])
    spec = WorkloadSpec(**{k: tuple(v) if isinstance(v, list) else v
                           for k, v in saved["workload"].items()})
    sim_args = saved["args"]
    base = SimConfig(policy="fcfs", max_num_seqs=sim_args["max_num_seqs"],
                     num_kv_blocks=sim_args["num_kv_blocks"],
                     num_host_blocks=sim_args["sim_host_blocks"],
                     mlfq_base_quantum_s=saved["real_engine"]["mlfq_base_quantum_s"],
                     mlfq_starvation_s=SHIPPED_STARVATION_S,
                     mlfq_num_queues=sim_args["mlfq_num_queues"])
    configs = {label: replace(base, policy=policy, **overrides)
               for label, policy, overrides in VARIANT_RUNS
               if label == "FCFS" or not args.only or any(part in label for part in args.only)}
    tasks = [(args.load, spec, args.sim_requests, seed, config, cost)
             for config in configs.values() for seed in args.seeds]
    print(f"{len(tasks)} simulations of {args.sim_requests} requests ...", flush=True)
    # spawn: children need none of the parent's torch thread pools.
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        summaries = pool.map(simulate_at_load, tasks)
    by_variant: dict[str, dict] = {}
    for (_, _, _, seed, _, _), label, summary in zip(
            tasks, [label for label in configs for _ in args.seeds], summaries, strict=True):
        by_variant.setdefault(label, {})[f"seed {seed}"] = {key: summary[key] for key in KEPT}
    variants = {}
    for label, config in configs.items():
        per_seed = {}
        for seed, s in by_variant[label].items():
            fcfs = by_variant["FCFS"][seed]
            per_seed[seed] = s | {"mean_jct_ratio": fcfs["jct_mean_s"] / s["jct_mean_s"],
                                  "p99_jct_ratio": fcfs["jct_p99_s"] / s["jct_p99_s"]}
        bound = stall_bound_s(config)
        variants[label] = {
            "config": {"policy": config.policy, "mlfq_num_queues": config.mlfq_num_queues,
                       "mlfq_starvation_s": config.mlfq_starvation_s,
                       "mlfq_queue_order": config.mlfq_queue_order,
                       "mlfq_deadline_s": config.mlfq_deadline_s,
                       "mlfq_deadline_slack": config.mlfq_deadline_slack,
                       "variant_param": config.variant_param},
            "per_seed": per_seed,
            "mean_2x": all(v["mean_jct_ratio"] >= 2 for v in per_seed.values()),
            "p99_no_worse": all(v["p99_jct_ratio"] >= 1 for v in per_seed.values()),
            "stall_bound_s": bound,
            "stall_bounded": all(v["max_stall_s"] <= bound for v in per_seed.values()),
        }
        variants[label]["met"] = (variants[label]["mean_2x"] and variants[label]["p99_no_worse"]
                                  and variants[label]["stall_bounded"])
    return {"load": args.load, "seeds": args.seeds, "num_requests": args.sim_requests,
            "workload": spec.as_dict(), "cost_model": cost.as_dict(),
            "base_config": asdict(base), "cost_model_json": str(args.cost_model_json),
            "variants": variants}


def table(result: dict) -> str:
    seeds = [f"seed {seed}" for seed in result["seeds"]]
    lines = [f"load {result['load']:g}, {result['num_requests']} requests per run; FCFS/variant "
             "ratios per seed (>1: the variant is better)",
             f"{'variant':<74} {'mean JCT ratio':<24} {'p99 JCT ratio':<24} "
             f"{'stall max':>9} met"]
    for label, v in result["variants"].items():
        means = " ".join(f"{v['per_seed'][s]['mean_jct_ratio']:5.2f}" for s in seeds)
        p99s = " ".join(f"{v['per_seed'][s]['p99_jct_ratio']:5.2f}" for s in seeds)
        stall = max(v["per_seed"][s]["max_stall_s"] for s in seeds)
        lines.append(f"{label:<74} {means:<24} {p99s:<24} {stall:>8.1f}s "
                     f"{'yes' if v['met'] else 'no'}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(15, 8))
    markers = "osD^v<>phX*P8d"
    colors = plt.get_cmap("tab20").colors
    for index, (label, v) in enumerate(result["variants"].items()):
        if label == "FCFS":
            continue
        points = list(v["per_seed"].values())
        ax.scatter([p["mean_jct_ratio"] for p in points], [p["p99_jct_ratio"] for p in points],
                   marker=markers[index % len(markers)], color=colors[index % len(colors)],
                   s=45, label=label)
    points = [p for v in result["variants"].values() for p in v["per_seed"].values()]
    x_max = max(p["mean_jct_ratio"] for p in points) * 1.05
    y_max = max(p["p99_jct_ratio"] for p in points) * 1.05
    ax.fill_between([2, x_max], 1, y_max, color="#2a7", alpha=0.12, label="target: mean >= 2x, "
                    "p99 >= 1x")
    ax.axhline(1, color="#888", lw=0.8)
    ax.axvline(2, color="#888", lw=0.8)
    ax.set_xlim(0.8, x_max)
    ax.set_ylim(min(p["p99_jct_ratio"] for p in points) * 0.95, y_max)
    ax.set_xlabel("FCFS mean JCT / variant mean JCT")
    ax.set_ylabel("FCFS p99 JCT / variant p99 JCT")
    ax.set_title(f"size-blind variants, simulation at load {result['load']:g}, "
                 f"{result['num_requests']} requests per run: one point per job list "
                 f"(seeds {', '.join(map(str, result['seeds']))})")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")  # the legend sits outside the axes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    results = Path(__file__).parent / "results"
    parser.add_argument("--cost-model-json", default=str(results / "scheduling.json"),
                        help="a scheduling.json with a real-engine calibration")
    parser.add_argument("--load", type=float, default=0.95)
    parser.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")],
                        default=[0, 1, 2, 3])
    parser.add_argument("--sim-requests", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2, help="simulation processes")
    parser.add_argument("--only", type=lambda s: [v for v in s.split(",") if v], default=[],
                        help="comma-separated parts of labels: run only the variants whose "
                             "label contains one (FCFS, the baseline, always runs)")
    parser.add_argument("--out", default=str(results))
    parser.add_argument("--name", default="scheduling_variants", help="output file stem")
    args = parser.parse_args()
    if not 0 < args.load < 1:
        parser.error("--load must be in (0, 1)")
    unmatched = [part for part in args.only
                 if not any(part in label for label, _, _ in VARIANT_RUNS)]
    if unmatched:
        parser.error(f"--only: no variant label contains {unmatched}")
    started = time.perf_counter()
    result = run(args)
    result["wall_s"] = time.perf_counter() - started
    write_report(result, Path(args.out), args.name, plot, table)


if __name__ == "__main__":
    main()
