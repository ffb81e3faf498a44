"""Tensor parallelism on CPU: what TP = 3 costs against one rank, and how much of it is the
collectives (gloo). On a 2-core machine this shows the overhead, not a speed-up.

Workload: --num-prompts prompts of --prompt-len random token ids -> exactly --output-len
greedy tokens each (ignore_eos), the default model in float32, one `LLM.generate` call per
configuration after an untimed warm-up; the same prompts for every --tp value.
Collectives are timed in rank 0's process (the engine's own), by wrapping the parallel
state's all_reduce / all_gather (inside the layers) and broadcast_message (each step's
inputs to the other ranks): the time rank 0 spends in them, waiting for the other ranks
included, as a share of the generate call's wall time.

Writes OUT/tensor_parallel_cpu.json and .png; prints a table.
`python benchmarks/tensor_parallel_cost.py [--out benchmarks/results]`.
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


def timed_collectives(seconds: dict[str, float], calls: dict[str, int]) -> None:
    """Wrap the parallel state's collectives in this process to add up their time."""
    from lmfleet.worker.parallel import state

    for name in COLLECTIVES:
        original = getattr(state, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            start = time.perf_counter()
            try:
                return _original(*args, **kwargs)
            finally:
                seconds[_name] += time.perf_counter() - start
                calls[_name] += 1

        setattr(state, name, wrapper)


def run(tp: int, prompts: list[list[int]], output_len: int) -> dict:
    import torch

    from lmfleet.worker import LLM, SamplingParams

    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0,
                            ignore_eos=True)
    seconds: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)
    with LLM("default", tensor_parallel_size=tp, max_model_len=1024) as llm:
        llm.generate(prompts[:2], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        if tp > 1:
            timed_collectives(seconds, calls)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - start
    tokens = sum(len(o.output_token_ids) for o in outputs)
    collective_s = sum(seconds.values())
    return {"tp": tp, "wall_s": wall, "output_tokens": tokens, "output_tok_s": tokens / wall,
            "torch_threads_rank0": torch.get_num_threads(),
            "collective_s": collective_s, "collective_share": collective_s / wall,
            "collectives": {n: {"seconds": seconds[n], "calls": calls[n]}
                            for n in COLLECTIVES},
            "token_ids": [o.output_token_ids for o in outputs]}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"tp={r['tp']}" for r in runs]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    bars = left.bar(labels, [r["output_tok_s"] for r in runs], color="#2f5fd0")
    left.bar_label(bars, fmt="%.1f")
    left.set_title("output tokens/s")
    compute = [r["wall_s"] - r["collective_s"] for r in runs]
    right.bar(labels, compute, label="the rest", color="#98a2b3")
    right.bar(labels, [r["collective_s"] for r in runs], bottom=compute,
              label="collectives (rank 0)", color="#d92d20")
    right.set_title("generate wall time (s)")
    right.legend(fontsize=8)
    fig.suptitle(f"Tensor parallelism on CPU ({result['environment']['cpu_count']} cores, "
                 "gloo, default model fp32)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--tp", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--num-prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    rng = random.Random(0)
    prompts = [[rng.randrange(1000, 40000) for _ in range(args.prompt_len)]
               for _ in range(args.num_prompts)]
    result = {"benchmark": "tensor_parallel_cpu", "model": "default",
              "workload": {"num_prompts": args.num_prompts, "prompt_len": args.prompt_len,
                           "output_len": args.output_len},
              "environment": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "loadavg_before": os.getloadavg()},
              "runs": []}
    for tp in args.tp:
        print(f"tp={tp} ...", file=sys.stderr, flush=True)
        result["runs"].append(run(tp, prompts, args.output_len))
    base = result["runs"][0]
    base_tokens = base["token_ids"]
    for run_ in result["runs"]:
        run_["tok_s_vs_first"] = run_["output_tok_s"] / base["output_tok_s"]
        run_["same_tokens_as_first"] = run_.pop("token_ids") == base_tokens
    result["environment"]["loadavg_after"] = os.getloadavg()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "tensor_parallel_cpu.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "tensor_parallel_cpu.png")
    print("| tp | output tok/s | vs first | collectives share (rank 0) | same tokens |")
    print("| ---: | ---: | ---: | ---: | --- |")
    for r in result["runs"]:
        print(f"| {r['tp']} | {r['output_tok_s']:.1f} | {r['tok_s_vs_first']:.2f}x | "
              f"{r['collective_share']:.0%} | {r['same_tokens_as_first']} |")


if __name__ == "__main__":
    main()
