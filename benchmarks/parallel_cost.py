"""Tensor and pipeline parallelism on CPU: what TP = 3, PP = 2 and TP x PP = 3 x 2 cost
against one rank, and how much of it is communication (gloo). On a 2-core machine this
shows the overhead, not a speed-up.

Workload: --num-prompts prompts of --prompt-len random token ids -> exactly --output-len
greedy tokens each (ignore_eos), the default model in float32, one `LLM.generate` call per
layout after an untimed warm-up; the same prompts for every layout.
Communication is timed in rank 0's process (the engine's own), by wrapping the parallel
state's all_reduce / all_gather (inside the layers) and broadcast_message (each step's
inputs to stage 0's other ranks), and the pipeline link's sends and its wait for the last
stage's rows: the time rank 0 spends in them, waiting for the other ranks included, as a
share of the generate call's wall time.

Writes OUT/parallel_cpu.json and .png; prints a table.
`python benchmarks/parallel_cost.py [--out benchmarks/results] [--layouts 1x1 3x1 1x2]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

COLLECTIVES = ("all_reduce", "all_gather", "broadcast_message")
PIPELINE = ("send_message", "send_hidden", "recv_from_last")


def timed_collectives(seconds: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap the parallel state's collectives and the pipeline link's transfers in this
    process to add up their time."""
    from lmfleet.worker.parallel import pipeline, state

    for owner, name in ([(state, n) for n in COLLECTIVES]
                        + [(pipeline.PipelineLink, n) for n in PIPELINE]):
        original = getattr(owner, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start
                calls[_name] += 1

        setattr(owner, name, wrapper)


def run(tp: int, pp: int, prompts: list[list[int]], output_len: int) -> dict:
    import torch

    from lmfleet.worker import LLM, SamplingParams

    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0,
                            ignore_eos=True)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    with LLM("default", tensor_parallel_size=tp, pipeline_parallel_size=pp,
             max_model_len=1024) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        if tp * pp > 1:
            timed_collectives(seconds, calls)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    tokens = sum(len(o.output_token_ids) for o in outputs)
    collective_s = sum(seconds.values())
    return {"tp": tp, "pp": pp, "wall_s": wall, "output_tokens": tokens,
            "output_tok_s": tokens / wall,
            "torch_threads_rank0": torch.get_num_threads(),
            "collective_s": collective_s, "collective_share": collective_s / wall,
            "collectives": {n: {"seconds": seconds[n], "calls": calls[n]}
                            for n in COLLECTIVES + PIPELINE},
            "token_ids": [o.output_token_ids for o in outputs]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"tp={r['tp']} pp={r['pp']}" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(labels, [r["output_tok_s"] for r in runs], color="#2f5fd0")
    left.bar_label(bars, fmt="%.1f")
    left.set_title("output tokens/s")
    compute = [r["wall_s"] - r["collective_s"] for r in runs]
    right.bar(labels, compute, label="the rest", color="#98a2b3")
    right.bar(labels, [r["collective_s"] for r in runs], bottom=compute,
              label="communication (rank 0)", color="#d92d20")
    right.set_title("generate wall time (s)")
    right.legend(fontsize=8)
    fig.suptitle(f"Parallel ranks on CPU ({result['environment']['cpu_count']} cores, "
                 "gloo, default model fp32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--layouts", nargs="+", default=["1x1", "3x1", "1x2", "3x2"],
                        help="TPxPP layouts, the first is the baseline")
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
               for _ in range(args.num_prompts)]
    result = {"benchmark": "parallel_cpu", "model": "default",
              "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                           "output_len": args.output_len},
              "environment": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "loadavg_before": os.getloadavg()},
              "runs": []}
    for layout in args.layouts:
        tp, pp = (int(n) for n in layout.split("x"))
        print(f"tp={tp} pp={pp} ...", file=sys.stderr, flush=True)
        result["runs"].append(run(tp, pp, prompts, args.output_len))
    base = result["runs"][0]
    base_tokens = base["token_ids"]
    for run_ in result["runs"]:
        run_["tok_s_vs_first"] = run_["output_tok_s"] / base["output_tok_s"]
        run_["same_tokens_as_first"] = run_.pop("token_ids") == base_tokens
    result["environment"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "parallel_cpu.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "parallel_cpu.png")
    print("| tp | pp | output tok/s | vs first | communication share (rank 0) | same tokens |")
    print("| ---: | ---: | ---: | ---: | ---: | --- |")
    for r in result["runs"]:
        print(f"| {r['tp']} | {r['pp']} | {r['output_tok_s']:.1f} | {r['tok_s_vs_first']:.2f}x | "
              f"{r['collective_share']:.0%} | {r['same_tokens_as_first']} |")


if __name__ == "__main__":
    main()
