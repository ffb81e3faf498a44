"""Scheduling: a short request sent while a long prompt is being prefilled.

Scenario: a --long-len token prompt (random ids) starts prefilling; --delay-s later a
--short-len token prompt arrives; both generate exactly --output-len greedy tokens. With
FCFS the short one waits for the long prefill (each step's token budget goes to it
first). With skip-join MLFQ the short one joins the top queue and runs at once, but
without a bound every one of its steps also carries a full chunk of the long prefill, so
its JCT still follows the long prompt; with `mlfq_bounded_prefill` (the default) the long
chunk is cut to what fits in the short job's quantum while it runs.

Variants, one engine each, one after another on the same prompts (default model, CPU,
engine defaults otherwise): fcfs; mlfq-unbounded-prefill (mlfq_bounded_prefill off); mlfq.
Measured per variant, each from its request's arrival (the short one arrives at --delay-s,
during a step, and is added when that step ends): the short request's TTFT and JCT,
the long one's TTFT and JCT. Writes OUT/scheduling_long_prefill.json and .png, prints a
table. `python benchmarks/scheduling_long_prefill.py [--out benchmarks/results]`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = {
    "fcfs": {"policy": "fcfs"},
    "mlfq-unbounded-prefill": {"policy": "mlfq", "mlfq_bounded_prefill": False},
    "mlfq": {"policy": "mlfq"},
}


def run_variant(model: str, options: dict, long_ids: list[int], short_ids: list[int],
                output_len: int, delay_s: float) -> dict:
    from lmfleet.worker import LLM, SamplingParams
    from lmfleet.worker.request import Request

    params = SamplingParams(max_tokens=output_len, min_tokens=output_len, temperature=0,
                            ignore_eos=True)
    with LLM(model, **options) as llm:
        llm.generate([short_ids], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        engine = llm.engine
        added: dict[str, float] = {}
        first: dict[str, float] = {}
        done: dict[str, float] = {}
        steps = 0
        engine.add_request(Request("long", list(long_ids), params))
        added["long"] = time.perf_counter()
        while len(done) < 2:
            if "short" not in added and time.perf_counter() - added["long"] >= delay_s:
                # It arrived at delay_s, during a step: as in a server, it waits for the
                # step to end, and its clock runs from its arrival.
                engine.add_request(Request("short", list(short_ids), params))
                added["short"] = added["long"] + delay_s
            outputs = engine.step()
            steps += 1
            now = time.perf_counter()
            for output in outputs:
                if output.new_token_ids:
                    first.setdefault(output.request_id, now)
                if output.finished:
                    done[output.request_id] = now
        return {"options": options, "steps": steps,
                **{f"{rid}_{name}_s": times[rid] - added[rid]
                   for rid in ("short", "long")
                   for name, times in (("ttft", first), ("jct", done))}}


def table(result: dict) -> str:
    lines = ["| variant | short TTFT s | short JCT s | long TTFT s | long JCT s |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for name, run in result["variants"].items():
        lines.append(f"| {name} | {run['short_ttft_s']:.2f} | {run['short_jct_s']:.2f} | "
                     f"{run['long_ttft_s']:.2f} | {run['long_jct_s']:.2f} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    metrics = [("short_ttft_s", "short TTFT"), ("short_jct_s", "short JCT"),
               ("long_jct_s", "long JCT")]
    fig, axis = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [result["variants"][name][key] for key, _ in metrics]
        bars = axis.bar([x + i * width for x in range(len(metrics))], values, width,
                        label=name)
        axis.bar_label(bars, fmt="%.1f", fontsize=7)
    axis.set_xticks([x + width for x in range(len(metrics))], [label for _, label in metrics])
    axis.set_ylabel("seconds from the request's arrival")
    workload = result["workload"]
    axis.set_title(f"{workload['short_len']}-token request {workload['delay_s']} s after a "
                   f"{workload['long_len']}-token prompt ({workload['output_len']} tokens "
                   "out each)", fontsize=10)
    axis.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    parser.add_argument("--model", default="default")
    parser.add_argument("--long-len", type=int, default=8000)
    parser.add_argument("--short-len", type=int, default=4)
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--delay-s", type=float, default=1.5)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option for every variant (repeatable)")
    args = parser.parse_args()
    names = [v for v in args.variants.split(",") if v]
    unknown = [v for v in names if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    from benchmarks.gpu_throughput_report import parse_options

    extra = parse_options(args.option)
    rng = random.Random(0)
    long_ids = [rng.randrange(1000, 40000) for _ in range(args.long_len)]
    short_ids = [rng.randrange(1000, 40000) for _ in range(args.short_len)]
    started = time.time()
    result = {"benchmark": "scheduling_long_prefill", "model": args.model,
              "workload": {"long_len": args.long_len, "short_len": args.short_len,
                           "output_len": args.output_len, "delay_s": args.delay_s},
              "environment": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                              "loadavg_before": os.getloadavg()},
              "variants": {}}
    for name in names:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        result["variants"][name] = run_variant(args.model, {**VARIANTS[name], **extra},
                                               long_ids, short_ids, args.output_len,
                                               args.delay_s)
    result["environment"]["loadavg_after"] = os.getloadavg()
    result["wall_s"] = time.time() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "scheduling_long_prefill.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "scheduling_long_prefill.png")
    print(table(result))


if __name__ == "__main__":
    main()
