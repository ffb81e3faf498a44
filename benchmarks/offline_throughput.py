"""Offline throughput: lmfleet's engine vs Hugging Face `generate`, same weights, same run.

Workload: N prompts (varied lengths) x M generated tokens each (EOS suppressed on both
sides so every engine does the same work), greedy, float32. Engines:
  - lmfleet `LLM.generate` (continuous batching, paged KV; on CPU with its C kernels),
  - the same with torch ops only (`cpu_kernels=False`), to show what the kernels add,
  - HF `generate` batched with left padding (all prompts in one batch),
  - HF `generate` one prompt at a time (a subset, since it is slow; reported as a rate).
Also measured in the same run: memory copy bandwidth and matmul rate, giving the decode
floor (weight bytes / bandwidth per step) for the hardware-floor ratio.

Writes benchmarks/results/offline_throughput_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

TOPICS = ["the ocean", "a robot learning to paint", "the history of Rome", "quantum computers",
          "a small village in the mountains", "how bread is made", "the life of bees",
          "a journey to Mars"]
STYLES = ["Write a short story about {}.", "Explain {} to a child.",
          "List five surprising facts about {}, with one sentence of detail for each fact.",
          "Describe {} in the style of a nineteenth-century newspaper article, including a "
          "headline, a dateline and quotes from two imaginary witnesses.",
          "Q: What do you know about {}?\nA:", "{}:", "Compose a poem about {}.",
          "Give a detailed, step by step plan for a documentary film about {}."]


# Every engine first runs its batch for this many tokens, untimed: the first pass over a
# batch touches memory a process has not used yet, which on a VM can cost more than the
# arithmetic (lmfleet's first 64-prompt prefill: 0.92 s, the next ones 0.45 s).
WARMUP_TOKENS = 2


def make_prompts(num_prompts: int) -> list[str]:
    return [STYLES[i % len(STYLES)].format(TOPICS[(i // len(STYLES) + i) % len(TOPICS)])
            for i in range(num_prompts)]


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written per second) and float32 matmul rate."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    src = torch.empty(256 << 20 if device == "cuda" else 64 << 20, dtype=torch.uint8,
                      device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    sync()
    repeats = 10
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    sync()
    bandwidth = 2 * src.numel() * repeats / (time.perf_counter() - start)
    n = 2048 if device == "cpu" else 8192
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    a @ b
    sync()
    start = time.perf_counter()
    for _ in range(3):
        a @ b
    sync()
    flops = 3 * 2 * n**3 / (time.perf_counter() - start)
    return {"copy_bandwidth_bytes_per_s": bandwidth, "fp32_matmul_flops": flops}


def run_lmfleet(model_dir: str, prompt_ids: list[list[int]], max_tokens: int, device: str,
                **options):
    from lmfleet.worker import LLM, SamplingParams

    llm = LLM(model_dir, device=device, dtype="float32", **options)
    cpu_kernels = llm.engine.runner.backend.cpu_decode_kernel is not None
    # min_tokens = max_tokens suppresses EOS exactly as HF's min_new_tokens does, so both
    # engines generate the same tokens (ignore_eos would let EOS be sampled and go on).
    params = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0)
    # Warm-up, untimed, as for HF below: the same batch for WARMUP_TOKENS tokens.
    llm.generate(prompt_ids, SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0),
                 use_tqdm=False)
    start = time.perf_counter()
    outputs = llm.generate(prompt_ids, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.output_token_ids) for o in outputs)
    return {"seconds": elapsed, "output_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "cpu_kernels": cpu_kernels, "outputs": [o.output_token_ids for o in outputs]}


def run_hf_batched(model, tokenizer, prompts: list[str], max_tokens: int, device: str):
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    batch = tokenizer(prompts, return_tensors="pt", padding=True).to(device)
    with torch.no_grad():  # warm-up, untimed
        model.generate(**batch, max_new_tokens=WARMUP_TOKENS, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id)
    elapsed = time.perf_counter() - start
    tokens = (out.shape[1] - batch["input_ids"].shape[1]) * out.shape[0]
    return {"seconds": elapsed, "output_tokens": int(tokens), "tokens_per_s": tokens / elapsed}


def run_hf_single(model, prompt_ids: list[list[int]], max_tokens: int, device: str):
    with torch.no_grad():  # warm-up, untimed
        model.generate(torch.tensor([prompt_ids[0]], device=device),
                       attention_mask=torch.ones(1, len(prompt_ids[0]), dtype=torch.int64,
                                                 device=device),
                       max_new_tokens=WARMUP_TOKENS, do_sample=False,
                       pad_token_id=model.config.eos_token_id)
    outputs, start = [], time.perf_counter()
    with torch.no_grad():
        for ids in prompt_ids:
            input_ids = torch.tensor([ids], device=device)
            out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                                 do_sample=False, pad_token_id=model.config.eos_token_id)
            outputs.append(out[0, len(ids):].tolist())
    elapsed = time.perf_counter() - start
    tokens = sum(len(o) for o in outputs)
    return {"seconds": elapsed, "output_tokens": tokens, "tokens_per_s": tokens / elapsed,
            "num_prompts": len(prompt_ids), "outputs": outputs}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = ["lmfleet", "lmfleet\ntorch ops only", "HF batched", "HF one-at-a-time"]
    keys = ["lmfleet", "lmfleet_torch_ops", "hf_batched", "hf_single"]
    values = [result[k]["tokens_per_s"] for k in keys]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    bars = ax.bar(names, values, color=["#2a7", "#8c8", "#888", "#bbb"])
    for bar, value in zip(bars, values, strict=True):
        ax.annotate(f"{value:.0f}", (bar.get_x() + bar.get_width() / 2, value),
                    ha="center", va="bottom")
    cfg = result["config"]
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"{cfg['num_prompts']} prompts x {cfg['max_tokens']} tokens, "
                 f"{cfg['model']}, {cfg['device']} fp32")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="default")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--single-prompts", type=int, default=8,
                        help="how many prompts HF runs one at a time (a rate is reported)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from lmfleet.worker.model.default_model import resolve_model_path
    from lmfleet.worker.tokenizer import load_tokenizer

    model_dir = str(resolve_model_path(args.model, progress=True))
    tokenizer = load_tokenizer(Path(model_dir))
    prompts = make_prompts(args.num_prompts)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    ceilings = measure_ceilings(args.device)
    print(f"ceilings: {ceilings}", flush=True)

    # HF batched runs first: on a VM, memory a process touches for the first time late in
    # its life can fault in several times slower, and HF allocates as it decodes.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(args.device)
    model.eval()
    hf_batched = run_hf_batched(model, tokenizer, prompts, args.max_tokens, args.device)
    print(f"HF batched: {hf_batched['tokens_per_s']:.1f} tok/s", flush=True)
    ours = run_lmfleet(model_dir, prompt_ids, args.max_tokens, args.device)
    print(f"lmfleet: {ours['tokens_per_s']:.1f} tok/s", flush=True)
    # The same engine with torch ops only (no C kernels): what the kernels are worth.
    torch_ops = run_lmfleet(model_dir, prompt_ids, args.max_tokens, args.device,
                            cpu_kernels=False)
    print(f"lmfleet, torch ops only: {torch_ops['tokens_per_s']:.1f} tok/s", flush=True)
    hf_single = run_hf_single(model, prompt_ids[: args.single_prompts], args.max_tokens,
                              args.device)
    print(f"HF one-at-a-time: {hf_single['tokens_per_s']:.1f} tok/s", flush=True)

    # Greedy agreement on the prompts HF ran one at a time (the exactness check).
    agree = sum(a == b for a, b in zip(ours["outputs"], hf_single["outputs"], strict=False))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    num_steps = args.max_tokens  # every request decodes max_tokens tokens in lockstep
    decode_floor_s = num_steps * weight_bytes / ceilings["copy_bandwidth_bytes_per_s"] * 2
    result = {
        "benchmark": "offline_throughput",
        "config": {"model": Path(model_dir).name, "num_prompts": args.num_prompts,
                   "max_tokens": args.max_tokens, "device": args.device,
                   "threads": torch.get_num_threads(), "torch": torch.__version__,
                   "machine": platform.machine(), "prompt_tokens_total":
                   sum(len(p) for p in prompt_ids)},
        "ceilings": ceilings,
        "lmfleet": {k: v for k, v in ours.items() if k != "outputs"},
        "lmfleet_torch_ops": {k: v for k, v in torch_ops.items() if k != "outputs"},
        "hf_batched": hf_batched,
        "hf_single": {k: v for k, v in hf_single.items() if k != "outputs"},
        "ratios": {
            "lmfleet_vs_hf_batched": ours["tokens_per_s"] / hf_batched["tokens_per_s"],
            "lmfleet_vs_hf_single": ours["tokens_per_s"] / hf_single["tokens_per_s"],
            "lmfleet_torch_ops_vs_hf_batched":
                torch_ops["tokens_per_s"] / hf_batched["tokens_per_s"],
            # Reading every weight once per step is the floor of a decode step; the copy
            # bandwidth counts read + write, hence the factor 2 above.
            "decode_floor_s_vs_lmfleet_s": decode_floor_s / ours["seconds"],
        },
        "greedy_identical_to_hf_single": f"{agree}/{len(hf_single['outputs'])}",
        "greedy_identical_kernels_vs_torch_ops":
            f"{sum(a == b for a, b in zip(ours['outputs'], torch_ops['outputs'], strict=True))}"
            f"/{len(ours['outputs'])}",
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"offline_throughput_{args.device}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(json.dumps(result["ratios"], indent=2))
    print(f"greedy identical to HF one-at-a-time: {result['greedy_identical_to_hf_single']}")


if __name__ == "__main__":
    main()
