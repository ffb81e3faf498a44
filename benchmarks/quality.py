"""Quantization quality on the default model: perplexity on a held-out text and greedy
agreement with float32, for float32, the int8 and fp8 KV caches, the GGUF blocks kept packed, and
AWQ (group 64 and 32; the model's 576 hidden features do not divide by 128), plain
round-to-nearest and with the activation-aware scale and clipping search on `lmfleet
quantize`'s default calibration text.

- Perplexity: `benchmarks/data/heldout.txt` (shipped with the project; original prose,
  not seen in any training set we know of), scored by lmfleet's own model runner: the text
  is prefilled in chunks of 64 tokens through the engine's attention and KV cache (so an
  int8 cache is written and read as in serving), and every position's logits are kept.
- Greedy agreement: lmfleet's own engine on each directory, 8 prompts x 32 tokens: the
  share of tokens equal to float32's at the same position, and the mean length of the
  common prefix.
The default model's float32 weights are its publisher's Q4_1 GGUF blocks expanded, so
float32 here already is Q4_1's quality; AWQ is quantized again on top of it.

Writes OUT/quality.json and .png; prints a table.
`python benchmarks/quality.py [--out benchmarks/results]`
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
TEXT = ROOT / "benchmarks" / "data" / "heldout.txt"
PROMPTS = ["The capital of France is", "Write a short poem about the sea.",
           "def fibonacci(n):", "Explain why the sky is blue.", "1, 2, 3, 4, 5,",
           "The best way to learn a language is", "Once upon a time, in a small village,",
           "Q: What is the boiling point of water?\nA:"]
GROUPS = (64, 32)


def perplexity(model: str, ids: list[int], chunk: int = 64, **options) -> dict:
    """Mean negative log-likelihood of ids[1:] given the tokens before, from the engine's
    runner (prefill chunks through its attention backend and KV cache)."""
    import torch

    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.engine import LLMEngine
    from lmfleet.worker.request import Request
    from lmfleet.worker.sampling_params import SamplingParams
    from lmfleet.worker.scheduler.base import ScheduledRequest

    engine = LLMEngine(EngineConfig.from_options(model, max_model_len=1024, **options))
    runner = engine.runner
    request = Request("score", list(ids), SamplingParams(max_tokens=1))
    request.block_ids = list(range(-(-len(ids) // runner.block_size)))
    total = 0.0
    with torch.inference_mode():
        for start in range(0, len(ids) - 1, chunk):
            count = min(chunk, len(ids) - 1 - start)
            request.num_computed_tokens = start
            batch = runner.inputs.prepare([ScheduledRequest(request, count)], 0)
            hidden = runner._eager_forward(batch)  # (count, H)
            logits = runner.model.compute_logits(hidden)  # (count, V) float32
            targets = torch.tensor(ids[start + 1:start + 1 + count])  # (count,)
            total -= logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
    engine.close()
    nll = total / (len(ids) - 1)
    return {"tokens": len(ids), "nll": nll, "perplexity": math.exp(nll)}


def greedy(model: str, **options) -> list[list[int]]:
    from lmfleet.worker import LLM, SamplingParams

    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    with LLM(str(model), max_model_len=512, **options) as llm:
        return [o.outputs[0].output_token_ids
                for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> dict:
    same = total = prefix = 0
    for got, want in zip(tokens, reference, strict=True):
        same += sum(a == b for a, b in zip(got, want, strict=True))
        total += len(want)
        pairs = enumerate(zip(got, want, strict=True))
        common = next((i for i, (a, b) in pairs if a != b), len(want))
        prefix += common
    return {"token_agreement": same / total, "mean_common_prefix": prefix / len(reference)}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["variants"])
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.2))
    bars = left.bar(names, [result["variants"][n]["perplexity"] for n in names],
                    color="#2f5fd0")
    left.bar_label(bars, fmt="%.2f")
    left.set_title("perplexity, held-out text (lower is better)")
    bars = right.bar(names, [result["variants"][n]["token_agreement"] for n in names],
                     color="#12b76a")
    right.bar_label(bars, fmt="%.2f")
    right.set_ylim(0, 1.05)
    right.set_title("greedy tokens equal to float32's")
    for axis in (left, right):
        axis.tick_params(axis="x", labelsize=7, labelrotation=30)
    fig.suptitle("Quantization quality, default model (SmolLM2-135M)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    from lmfleet.worker.model.default_model import resolve_model_path
    from lmfleet.worker.quant.awq_search import DEFAULT_CALIBRATION, calibration_ids
    from lmfleet.worker.quant.awq_writer import write_awq_checkpoint

    base = resolve_model_path("default", progress=False)
    calibration = calibration_ids(base, DEFAULT_CALIBRATION.read_text())
    result = {"benchmark": "quality", "model": "default", "text": str(TEXT.relative_to(ROOT)),
              "prompts": PROMPTS, "max_tokens": 32,
              "environment": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
              "variants": {}}
    import transformers

    ids = transformers.AutoTokenizer.from_pretrained(str(base))(TEXT.read_text()).input_ids
    reference = greedy(str(base))
    result["variants"]["float32"] = {**perplexity(str(base), ids),
                                     **agreement(reference, reference)}
    for name, options in (("kv-int8", {"kv_cache_dtype": "int8"}),
                          ("kv-fp8", {"kv_cache_dtype": "fp8"}),
                          ("gguf-packed-q4_1", {"quantization": "gguf"})):
        model = "default" if "quantization" in options else str(base)
        print(f"{name} ...", file=sys.stderr, flush=True)
        result["variants"][name] = {**perplexity(model, ids, **options),
                                    **agreement(greedy(model, **options), reference)}
    with tempfile.TemporaryDirectory() as scratch:
        for mode, group in itertools.product(("rtn", "search"), GROUPS):
            name = f"awq-{mode}-g{group}"
            print(f"{name} ...", file=sys.stderr, flush=True)
            awq = write_awq_checkpoint(base, Path(scratch) / name, group,
                                       calibration=calibration if mode == "search" else None)
            result["variants"][name] = {**perplexity(str(awq), ids),
                                        **agreement(greedy(str(awq)), reference)}
    fp32 = result["variants"]["float32"]["perplexity"]
    for variant in result["variants"].values():
        variant["perplexity_vs_float32"] = variant["perplexity"] / fp32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "quality.png")
    print("| variant | perplexity | vs float32 | greedy tokens equal | common prefix |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, v in result["variants"].items():
        print(f"| {name} | {v['perplexity']:.3f} | {v['perplexity_vs_float32']:.3f}x | "
              f"{v['token_agreement']:.2f} | {v['mean_common_prefix']:.1f} |")


if __name__ == "__main__":
    main()
