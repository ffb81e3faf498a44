"""Tables and the plot of a scheduling benchmark result (benchmarks/scheduling.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from sim.simulator import ORACLE

POLICIES = ("fcfs", "mlfq")
SIM_POLICIES = (*POLICIES, ORACLE)
METRICS = (("jct_mean_s", "JCT mean"), ("jct_p99_s", "JCT p99"), ("ttft_mean_s", "TTFT mean"),
           ("ttft_p99_s", "TTFT p99"), ("max_stall_s", "max stall"))


def format_row(label: str, s: dict) -> str:
    return " ".join([f"{label:<24}"] + [f"{s[key]:>9.2f}" for key, _ in METRICS]
                    + [f"{s.get('jct_mean_short_s', float('nan')):>9.2f}",
                       f"{s.get('jct_mean_long_s', float('nan')):>9.2f}"])


HEADER = " ".join([f"{'':<24}"] + [f"{name:>9}" for _, name in METRICS]
                  + [f"{'short JCT':>9}", f"{'long JCT':>9}"])


def table_real(real: dict) -> str:
    lines = [f"real engine ({real['num_requests']} requests, load {real['load']:g} of "
             f"{real['capacity_req_per_s']:.2f} req/s; seconds)", HEADER]
    lines += [format_row(p, real[p]) for p in POLICIES]
    lines.append(f"requests whose tokens differ between policies: "
                 f"{real['num_requests_with_different_tokens']}")
    return "\n".join(lines)


def table(result: dict) -> str:
    lines = [table_real(result["real_engine"])] if result.get("real_engine") else []
    sim = result["simulation"]
    lines += ["", f"simulation ({sim['num_requests']} requests per run; seconds)", HEADER]
    for load, runs in sim["by_load"].items():
        lines += [format_row(f"{p[:6]} @ {load}", runs[p]) for p in SIM_POLICIES]
        f, m, o = runs["fcfs"], runs["mlfq"], runs[ORACLE]
        lines.append(f"{'':<24} FCFS/MLFQ: mean JCT {f['jct_mean_s'] / m['jct_mean_s']:.2f}x, "
                     f"p99 JCT {f['jct_p99_s'] / m['jct_p99_s']:.2f}x, "
                     f"TTFT mean {f['ttft_mean_s'] / m['ttft_mean_s']:.1f}x; "
                     f"FCFS/oracle mean JCT {f['jct_mean_s'] / o['jct_mean_s']:.2f}x")
    sweep = sim["mlfq_starvation_sweep"]
    lines += ["", f"MLFQ starvation bound at load {sweep['load']:g}", HEADER]
    for bound, summary in sorted(sweep["by_starvation_s"].items(),
                                 key=lambda kv: (len(kv[0].split()), float(kv[0].split()[0]))):
        lines.append(format_row(f"starve {bound}"[:24], summary))
    verdict = result["target"]
    lines += ["", f"target at load {verdict['load']:g} (FCFS/MLFQ per seed's job list):"]
    lines += [f"  {seed}: mean JCT {v['mean_jct_ratio']:.2f}x, p99 JCT {v['p99_jct_ratio']:.2f}x,"
              f" MLFQ's longest stall {v['mlfq_max_stall_s']:.1f} s"
              for seed, v in verdict["per_seed"].items()]
    lines.append(f"  every seed: mean >= 2x: {verdict['mean_2x']}, p99 no worse: "
                 f"{verdict['p99_no_worse']}, stall <= {verdict['stall_bound_s']:g} s: "
                 f"{verdict['stall_bounded']} -> met: {verdict['met']}")
    return "\n".join(lines)


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


def write_report(result: dict, out: Path, name: str, plot: Callable[[dict, Path], None],
                 table: Callable[[dict], str]) -> None:
    """`<out>/<name>.json` and `.png`, then the table and where they went on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / f"{name}.png")
    print(table(result))
    print(f"wrote {out / name}.json and .png ({result['wall_s']:.0f} s)")
