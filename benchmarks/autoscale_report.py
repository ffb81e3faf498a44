"""The timeline plot of benchmarks/autoscale.py's result (three panels sharing the time
axis: offered load with ready/desired/starting replicas; queue lengths; TTFT per request
with the p99 per window)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = [s for s in result["samples"] if "ready" in s]
    win = result["windows"]
    width = result["config"]["window_s"]
    fig, axes = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    ax = axes[0]
    ax.bar([w["start_s"] for w in win], [w["offered_rps"] for w in win], width=width,
           align="edge", color="C7", alpha=0.5, label="offered (req/s)")
    ax.set_ylabel("offered load (req/s)")
    right = ax.twinx()
    t = [s["t"] for s in samples]
    for key, color, style in (("ready", "C0", "-"), ("desired", "C3", "--"),
                              ("starting", "C2", ":")):
        right.step(t, [s[key] for s in samples], where="post", color=color, ls=style,
                   label=key)
    right.set_ylabel("replicas")
    right.set_ylim(0, result["config"]["max_replicas"] + 0.5)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles, [h.get_label() for h in handles], loc="upper right", fontsize=8)
    axes[1].plot(t, [s["waiting"] for s in samples], color="C1", label="waiting (all)")
    axes[1].plot(t, [s["running"] for s in samples], color="C4", alpha=0.6, label="running")
    for replica in sorted({r for s in samples for r in s["waiting_by_replica"]}):
        axes[1].plot(t, [s["waiting_by_replica"].get(replica, math.nan) for s in samples],
                     lw=0.8, ls="--", label=f"waiting on {replica}")
    axes[1].set_ylabel("requests on replicas")
    axes[1].legend(loc="upper right", fontsize=8)
    ax = axes[2]
    ok = [r for r in result["records"] if r["ok"]]
    ax.scatter([r["sent_s"] for r in ok], [r["ttft_ms"] for r in ok], s=4, color="C7",
               alpha=0.5, label="each request")
    p99 = [w["ttft_p99_ms"] if w["ttft_p99_ms"] is not None else math.nan for w in win]
    ax.stairs(p99, [w["start_s"] for w in win] + [win[-1]["start_s"] + width], color="C3",
              baseline=None, label=f"p99 per {width:g} s")
    failed = [r["sent_s"] for r in result["records"] if not r["ok"]]
    if failed:
        ax.scatter(failed, [ax.get_ylim()[1]] * len(failed), marker="x", color="red",
                   label="failed")
    ax.set(yscale="log", ylabel="TTFT (ms)", xlabel="time since load start (s), by send time")
    ax.legend(loc="upper right", fontsize=8)
    for ax in axes:
        for phase in result["phases"]:
            if phase["name"] == "spike":
                ax.axvspan(phase["start_s"], phase["start_s"] + phase["duration_s"],
                           color="C3", alpha=0.07)
        ax.grid(alpha=0.3)
    s = result["scaling"]
    fig.suptitle(f"autoscaling under a spike: scale-up {fmt_seconds(s['time_to_scale_up_s'])}, "
                 f"scale-down {fmt_seconds(s['time_to_scale_down_s'])}, "
                 f"{result['num_failed']} failed of {len(result['records'])}", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def fmt_seconds(seconds: Optional[float]) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"
