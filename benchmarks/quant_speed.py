"""Quantization speed on the GPU, in one call: the Llama-3-8B-shaped random model in bf16,
with an int8 and an fp8 KV cache, its AWQ copy (round-to-nearest, group 128, written by
`write_awq_checkpoint`), and LMDeploy's PyTorch engine on the same AWQ directory where it
loads it.

Each engine runs gpu_throughput.py's workload in its own process (`--run-variant
default`): Test A (256 x 512 -> 256 tokens, throughput) and Test B (batch 1, TPOT).
Target: W4A16 batch-1 TPOT <= 0.45 x bf16 (4-bit weights are a quarter of the bytes).

  python3 benchmarks/quant_speed.py --out $OUT [--peer-bench .peer/peer_bench.py]
Writes OUT/quant_speed.json; prints a table. `--plot JSON PNG` draws it (no GPU needed).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BF16_DIR = "/tmp/anchor_llama3_8b_random"
AWQ_DIR = "/tmp/anchor_llama3_8b_awq"
# name -> (model, engine options, environment); "-no-pdl": the decode kernels launched
# without programmatic dependent launch (worker/kernels/triton_pdl.py), to measure it
LMFLEET_RUNS = {"lmfleet-bf16": (BF16_DIR, [], {}), "lmfleet-awq": (AWQ_DIR, [], {}),
                "lmfleet-bf16-no-pdl": (BF16_DIR, [], {"LMFLEET_PDL": "0"}),
                "lmfleet-awq-no-pdl": (AWQ_DIR, [], {"LMFLEET_PDL": "0"}),
                "lmfleet-kv-int8": (BF16_DIR, ["kv_cache_dtype=int8"], {}),
                "lmfleet-kv-fp8": (BF16_DIR, ["kv_cache_dtype=fp8"], {})}
ENGINES = (*LMFLEET_RUNS, "lmdeploy-awq")


def run(cmd: list[str], limit: float, env: dict[str, str] | None = None) -> str:
    print("==", " ".join(cmd), env or "", flush=True)
    try:
        completed = subprocess.run(cmd, timeout=limit, env={**os.environ, **(env or {})})
        return "ok" if completed.returncode == 0 else f"rc={completed.returncode}"
    except subprocess.TimeoutExpired:
        return f"timeout after {limit:.0f} s"


def lmdeploy_numbers(records: list[dict]) -> dict:
    """The peer's results.jsonl records -> the lmfleet run's keys, where it has them."""
    numbers = {}
    for record in records:
        if record.get("step") == "lmdeploy-A":
            numbers["test_a_out_tok_s"] = record["out_tok_s"]
        if record.get("step") == "lmdeploy-B":
            numbers["test_b_tpot_ms"] = record["tpot_ms"]
            numbers["test_b_ttft_ms"] = record["ttft_ms"]
    return numbers


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # one colour per call: engines compare only within the call that ran them
    calls = {"main call (runs)": result["runs"],
             **{name: call["runs"] for name, call in result.get("calls", {}).items()}}
    bars_of = [(call, name, lmdeploy_numbers(run) if isinstance(run, list) else run)
               for call, runs in calls.items() for name, run in runs.items()]
    colours = dict(zip(calls, ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"),
                       strict=False))
    figure, (left, right) = plt.subplots(1, 2, figsize=(4 + 0.9 * len(bars_of), 4.2))
    for axis, key, label in ((left, "test_a_out_tok_s", "Test A output tokens/s"),
                             (right, "test_b_tpot_ms", "Test B batch-1 TPOT ms")):
        labelled = set()
        for i, (call, _, run) in enumerate(bars_of):
            bars = axis.bar([i], [run.get(key, 0.0)], color=colours.get(call, "tab:gray"),
                            label=None if call in labelled else call)
            labelled.add(call)
            axis.bar_label(bars, fmt="%.4g", fontsize=7)
        axis.set_xticks(range(len(bars_of)), [name for _, name, _ in bars_of], rotation=30,
                        ha="right", fontsize=7)
        axis.set_title(label)
        axis.set_ylim(top=axis.get_ylim()[1] * 1.3)  # room for the legend above the bars
    left.legend(fontsize=7, ncol=2)
    device = next((run.get("device") for _, _, run in bars_of if run.get("device")), "GPU")
    figure.suptitle(f"Quantization speed, Llama-3-8B-shaped random weights, {device}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"))
    parser.add_argument("--peer-bench", default=None)
    parser.add_argument("--limit-s", type=float, default=150.0, help="per engine run")
    parser.add_argument("--engines", default=",".join(ENGINES),
                        help=f"comma-separated, of: {', '.join(ENGINES)}")
    args = parser.parse_args()
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return
    if not args.out:
        parser.error("--out is needed to run the engines")
    engines = args.engines.split(",")
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"benchmark": "quant_speed", "runs": {}, "status": {}}
    if not (Path(BF16_DIR) / "config.json").is_file():
        result["status"]["make-model"] = run(
            [sys.executable, args.peer_bench, "make-model", "--model-dir", BF16_DIR,
             "--out", str(out / "peer")], 300)
    start = time.time()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_throughput import ensure_lmfleet_importable

    ensure_lmfleet_importable()
    from lmfleet.worker.quant.awq_writer import write_awq_checkpoint

    if not (Path(AWQ_DIR) / "config.json").is_file():
        write_awq_checkpoint(Path(BF16_DIR), Path(AWQ_DIR), 128, device="cuda")
    result["quantize_s"] = time.time() - start
    print(f"quantized in {result['quantize_s']:.1f} s", flush=True)
    for name, (model_dir, options, env) in LMFLEET_RUNS.items():
        if name not in engines:
            continue
        result_file = out / f"{name}.json"
        flags = [flag for option in options for flag in ("--option", option)]
        result["status"][name] = run(
            [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--run-variant",
             "default", "--model-dir", model_dir, "--device", "cuda", "--result-file",
             str(result_file), *flags], args.limit_s, env)
        if result_file.is_file():
            result["runs"][name] = json.loads(result_file.read_text())
    if args.peer_bench and "lmdeploy-awq" in engines:
        peer_out = out / "peer-awq"
        result["status"]["lmdeploy-awq"] = run(
            [sys.executable, args.peer_bench, "lmdeploy", "--model-dir", AWQ_DIR, "--out",
             str(peer_out), "--results", str(peer_out / "results.jsonl")], args.limit_s + 60)
        results = peer_out / "results.jsonl"
        if results.is_file():
            result["runs"]["lmdeploy-awq"] = [json.loads(line) for line in
                                              results.read_text().splitlines() if line]
    bf16, awq = result["runs"].get("lmfleet-bf16", {}), result["runs"].get("lmfleet-awq", {})
    if "test_b_tpot_ms" in bf16 and "test_b_tpot_ms" in awq:
        result["tpot_ratio_awq_vs_bf16"] = awq["test_b_tpot_ms"] / bf16["test_b_tpot_ms"]
    (out / "quant_speed.json").write_text(json.dumps(result, indent=1, default=str))
    print("| engine | Test A out tok/s | Test B TPOT ms | TTFT ms | status |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in ENGINES:
        r = result["runs"].get(name, {})
        r = lmdeploy_numbers(r) if isinstance(r, list) else r
        print(f"| {name} | {r.get('test_a_out_tok_s', float('nan')):.0f} | "
              f"{r.get('test_b_tpot_ms', float('nan')):.2f} | "
              f"{r.get('test_b_ttft_ms', float('nan')):.1f} | {result['status'].get(name)} |")
    print("tpot ratio awq/bf16:", result.get("tpot_ratio_awq_vs_bf16"))


if __name__ == "__main__":
    main()
