"""Cost of KV offload: swap time as a share of step time, with and without overlap.

A decode batch of B requests (context C each) runs step after step; alongside each
step, S blocks of other (idle) requests are swapped out to host memory and S blocks
swapped back in, the traffic a busy MLFQ worker generates. Measured per step (mean of
N steps after warm-up), all in one run on one model:
  compute only | compute + synchronous swaps | compute + side-stream (overlapped) swaps
  | swaps alone.
Share of step time spent in swaps = (t_with_swaps - t_compute) / t_with_swaps.
The model is a random-weight Llama-3-shaped directory written under --workdir.

Example (device machine): python benchmarks/offload_cost.py --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

SHAPES = {
    # Llama-3.2-1B-like and Llama-3-8B (the yardstick) shapes.
    "llama3-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                      num_attention_heads=32, num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2, vocab_size=1024),
}


def write_random_model(directory: Path, shape: dict, dtype: torch.dtype, device: str) -> Path:
    from safetensors.torch import save_file

    if (directory / "config.json").is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    config = dict(architectures=["LlamaForCausalLM"], model_type="llama", rms_norm_eps=1e-5,
                  rope_theta=500000.0, max_position_embeddings=8192, hidden_act="silu",
                  tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, **shape)
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    hidden, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * head_dim
    generator = torch.Generator(device=device).manual_seed(0)

    def rand(*dims):
        return (torch.randn(*dims, device=device, generator=generator) * 0.02).to(dtype).cpu()

    tensors = {"model.embed_tokens.weight": rand(shape["vocab_size"], hidden),
               "model.norm.weight": torch.ones(hidden, dtype=dtype),
               "lm_head.weight": rand(shape["vocab_size"], hidden)}
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update({
            p + "input_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "post_attention_layernorm.weight": torch.ones(hidden, dtype=dtype),
            p + "self_attn.q_proj.weight": rand(hidden, hidden),
            p + "self_attn.k_proj.weight": rand(kv, hidden),
            p + "self_attn.v_proj.weight": rand(kv, hidden),
            p + "self_attn.o_proj.weight": rand(hidden, hidden),
            p + "mlp.gate_proj.weight": rand(inter, hidden),
            p + "mlp.up_proj.weight": rand(inter, hidden),
            p + "mlp.down_proj.weight": rand(hidden, inter),
        })
    save_file(tensors, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", default="llama3-1b", choices=sorted(SHAPES))
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--swap-blocks", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--workdir", default="/tmp/lmfleet-offload-model")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    from lmfleet.worker.config import EngineConfig, parse_dtype
    from lmfleet.worker.kv.swapper import KVSwapper
    from lmfleet.worker.request import Request
    from lmfleet.worker.runner.model_runner import ModelRunner
    from lmfleet.worker.sampling_params import SamplingParams
    from lmfleet.worker.scheduler.base import ScheduledRequest

    dtype = parse_dtype(args.dtype)
    model_dir = write_random_model(Path(args.workdir) / args.shape, SHAPES[args.shape], dtype,
                                   args.device)
    block_size = 16
    blocks_per_request = -(-(args.context + 1) // block_size)
    max_swap = max(args.swap_blocks)
    num_blocks = args.batch * blocks_per_request + 2 * max_swap
    config = EngineConfig.from_options(str(model_dir), device=args.device, dtype=args.dtype,
                                       num_kv_blocks=num_blocks, block_size=block_size)
    runner = ModelRunner(config, model_dir)
    host = torch.zeros((2 * max_swap, *runner.kv_storage[:, :, 0].shape), dtype=dtype,
                       pin_memory=args.device == "cuda")
    swappers = {"sync": KVSwapper(runner.kv_storage, host, overlap=False),
                "overlap": KVSwapper(runner.kv_storage, host, overlap=True)}
    batch = []
    for index in range(args.batch):
        request = Request(f"d{index}", [5] * args.context, SamplingParams(max_tokens=1 << 20))
        request.block_ids = list(range(index * blocks_per_request,
                                       (index + 1) * blocks_per_request))
        request.num_computed_tokens = args.context - 1
        batch.append(ScheduledRequest(request, 1))
    idle_first = args.batch * blocks_per_request
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    def timed_once(fn) -> float:
        for _ in range(3):
            fn()
        sync()
        start = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        return (time.perf_counter() - start) / args.steps

    def timed(fn) -> float:
        # Best of three rounds: the shared machine's clocks and neighbours add noise.
        return min(timed_once(fn) for _ in range(3))

    compute = lambda: runner.execute(batch, eos_token_ids=())  # noqa: E731
    result = {"benchmark": "offload_cost", "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
              "shape": args.shape, "dtype": args.dtype, "batch": args.batch,
              "context": args.context, "block_bytes": swappers["sync"].block_bytes,
              "compute_step_s": timed(compute), "swaps": []}
    for num_swap in args.swap_blocks:
        out_pairs = [(idle_first + i, i) for i in range(num_swap)]
        in_pairs = [(max_swap + i, idle_first + max_swap + i) for i in range(num_swap)]
        row = {"swap_blocks_each_way": num_swap,
               "swap_bytes_per_step": 2 * num_swap * swappers["sync"].block_bytes}
        # The compute-only baseline is re-measured next to each row (same clocks).
        row["compute_step_s"] = timed(compute)
        for name, swapper in swappers.items():
            def step(swapper=swapper, out_pairs=out_pairs, in_pairs=in_pairs):
                # As in the engine: nothing waits for the device->host copies to land;
                # only the next swap-in of the same blocks is ordered after them.
                swapper.swap(out_pairs, in_pairs)
                compute()

            def swap_only(swapper=swapper, out_pairs=out_pairs, in_pairs=in_pairs):
                swapper.swap(out_pairs, in_pairs)
                swapper.finish_pending()

            row[f"{name}_step_s"] = timed(step)
            row[f"{name}_swap_only_s"] = timed(swap_only)
            row[f"{name}_swap_share"] = max(0.0, 1 - row["compute_step_s"]
                                            / row[f"{name}_step_s"])
        row["swap_bandwidth_bytes_per_s"] = row["swap_bytes_per_step"] / row["sync_swap_only_s"]
        result["swaps"].append(row)
        print(f"S={num_swap:4d} blocks each way ({row['swap_bytes_per_step'] / 1e6:.1f} MB): "
              f"compute {row['compute_step_s'] * 1e3:.2f} ms | +sync swaps "
              f"{row['sync_step_s'] * 1e3:.2f} ms (share {row['sync_swap_share']:.1%}) | "
              f"+overlapped {row['overlap_step_s'] * 1e3:.2f} ms "
              f"(share {row['overlap_swap_share']:.1%}) | swaps alone "
              f"{row['sync_swap_only_s'] * 1e3:.2f} ms", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"offload_cost_{args.device}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
