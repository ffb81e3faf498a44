"""Writing an online benchmark report (benchmarks/online.py's `benchmark()` result):
`<name>.json` and `<name>.png` (TTFT and TPOT CDFs per run, output-token throughput bars).
"""

from __future__ import annotations

import json
from pathlib import Path


def plot(report: dict, path: Path) -> None:
    """Latency CDFs (TTFT, TPOT) per run and output-token throughput bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for run in report["runs"]:
        label = f"{run['target']} c={run['max_concurrency'] or 'inf'}"
        for ax, key in ((axes[0], "ttft"), (axes[1], "tpot")):
            values = np.sort(run["samples_ms"][key])
            if len(values):
                ax.step(values, np.arange(1, len(values) + 1) / len(values), where="post",
                        label=label)
    for ax, title in ((axes[0], "TTFT"), (axes[1], "TPOT")):
        ax.set(xlabel=f"{title} (ms)", ylabel="fraction of requests", title=f"{title} CDF")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    labels = [f"{r['target']}\nc={r['max_concurrency'] or 'inf'}" for r in report["runs"]]
    axes[2].bar(range(len(labels)), [r["output_token_throughput"] for r in report["runs"]],
                color=["C0" if r["kind"] == "http" else "C1" for r in report["runs"]])
    axes[2].set_xticks(range(len(labels)), labels, fontsize=7)
    axes[2].set(ylabel="output tokens/s", title="throughput")
    w = report["workload"]
    fig.suptitle(f"online benchmark: {w['num_requests']} req x {report['rounds']} round(s), in "
                 f"{w['input_len_mean']}±{w['input_len_range']} / out "
                 f"{w['output_len_mean']}±{w['output_len_range']} tokens, rate "
                 f"{w['request_rate']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, out_dir: Path, name: str) -> tuple[Path, Path]:
    """Write `<out_dir>/<name>.json` and `.png`; returns both paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, png_path = out_dir / f"{name}.json", out_dir / f"{name}.png"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, png_path)
    return json_path, png_path
