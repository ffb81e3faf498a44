"""The image encoder's share of time to first token on a LLaVA-1.5-7B-shaped model (random
bf16 weights: CLIP ViT-L/14 at 336 px, 576 image positions, a Llama-2-7B language model),
lmfleet beside LMDeploy's PyTorch engine on the same directory, in one call on the GPU.

Prompts: 40 text ids, one 640x480 image (576 positions), 40 text ids; and a text-only prompt
of the same 656 positions. TTFT = one request alone, max_tokens 1, prefix caching off, each
time a new image (nothing reused); medians of 5 after 2 warm-ups. The encoder alone is timed
as the engine runs it: the checkpoint's image processor (CPU) and the tower + projector (GPU).

  python3 benchmarks/vision_ttft.py --out $OUT            # make-model, lmfleet, lmdeploy
  python3 benchmarks/vision_ttft.py --step lmfleet ...    # one step (each runs in its own
                                                          # process; the script calls itself)
  python3 benchmarks/vision_ttft.py --plot OUT/vision_ttft.json chart.png
Writes OUT/vision_ttft.json and prints a table. LMDeploy's wheels must be importable in the
`lmdeploy` step (PYTHONPATH set by the caller with --peer-path).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL_DIR = Path("/tmp/llava15_7b_random")
VISION = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
TEXT = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
            max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)
IMAGE_TOKEN, PAD_TOKEN, IMAGE_POSITIONS, TEXT_EACH_SIDE = 32000, 32001, 576, 40
WARMUP, REPEATS = 2, 5
# --tiny: the same steps on a small model (a CPU smoke run of this script).
TINY_VISION = dict(VISION, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4)
TINY_TEXT = dict(TEXT, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=4)


def use_tiny() -> None:
    global MODEL_DIR, VISION, TEXT
    MODEL_DIR, VISION, TEXT = Path("/tmp/llava_tiny_random"), TINY_VISION, TINY_TEXT


def device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def image(seed: int) -> bytes:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (480, 640, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def checkpoint_name(name: str) -> str:
    """transformers' in-memory names -> the llava-hf file layout both engines read."""
    for old, new in (("model.language_model.", "language_model.model."),
                     ("lm_head.", "language_model.lm_head."),
                     ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.vision_tower.", "vision_tower.")):
        if name.startswith(old):
            name = new + name[len(old):]
            break
    if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
        name = "vision_tower.vision_model." + name[len("vision_tower."):]
    return name


def make_model() -> dict:
    import torch
    import transformers
    from safetensors.torch import save_file

    start = time.time()
    MODEL_DIR.mkdir(parents=True, exist_ok=True)
    config = transformers.LlavaConfig(
        vision_config=transformers.CLIPVisionConfig(**VISION),
        text_config=transformers.LlamaConfig(**TEXT), image_token_index=IMAGE_TOKEN,
        image_seq_length=IMAGE_POSITIONS, vision_feature_layer=-2,
        vision_feature_select_strategy="default", projector_hidden_act="gelu")
    config.architectures = ["LlavaForConditionalGeneration"]
    # llava-hf checkpoints name their language model's class too; LMDeploy picks its model
    # by it and fails on a text_config without one.
    config.text_config.architectures = ["LlamaForCausalLM"]
    config.pad_token_id = PAD_TOKEN  # as llava-hf's; LMDeploy marks image positions with it
    config.save_pretrained(str(MODEL_DIR))
    with torch.device("meta"):
        shapes = {checkpoint_name(k): v.shape for k, v in
                  transformers.LlavaForConditionalGeneration(config).state_dict().items()}
    generator = torch.Generator(device=device()).manual_seed(0)
    shard, shards, weight_map, total = {}, 0, {}, 0

    def flush():
        nonlocal shard, shards
        shards += 1
        name = f"model-{shards:05d}.safetensors"
        save_file(shard, str(MODEL_DIR / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in shard})
        shard = {}

    for name, shape in shapes.items():
        if len(shape) == 1:  # norms 1, biases 0
            value = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            tensor = torch.full(tuple(shape), value, dtype=torch.bfloat16)
        else:
            tensor = torch.empty(tuple(shape), dtype=torch.bfloat16, device=device()).normal_(
                0.0, 0.02, generator=generator).cpu()
        shard[name] = tensor
        total += tensor.numel() * 2
        if sum(t.numel() for t in shard.values()) * 2 > 4 << 30:
            flush()
    if shard:
        flush()
    (MODEL_DIR / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}))
    sys.path.insert(0, str(ROOT))
    from tests.vision_model import word_tokenizer

    tokenizer = word_tokenizer(IMAGE_TOKEN)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.save_pretrained(str(MODEL_DIR))
    transformers.CLIPImageProcessor(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}
    ).save_pretrained(str(MODEL_DIR))
    return {"bytes": total, "seconds": time.time() - start}


def prompts() -> tuple[list[int], list[int]]:
    text = [(7 * i) % 31000 + 3 for i in range(2 * TEXT_EACH_SIDE + IMAGE_POSITIONS)]
    with_image = (text[:TEXT_EACH_SIDE] + [IMAGE_TOKEN] * IMAGE_POSITIONS
                  + text[TEXT_EACH_SIDE:2 * TEXT_EACH_SIDE])
    return with_image, text


def median_ms(run, count: int) -> float:
    times = []
    for index in range(WARMUP + count):
        start = time.perf_counter()
        run(index)
        times.append(time.perf_counter() - start)
    return statistics.median(times[WARMUP:]) * 1e3


def bench_lmfleet() -> dict:
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_throughput import ensure_lmfleet_importable

    ensure_lmfleet_importable()
    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.engine import LLMEngine
    from lmfleet.worker.request import Request
    from lmfleet.worker.sampling_params import SamplingParams

    start = time.time()
    dtype = "bfloat16" if device() == "cuda" else "float32"
    engine = LLMEngine(EngineConfig.from_options(
        str(MODEL_DIR), device=device(), dtype=dtype, enable_prefix_caching=False,
        max_model_len=2048), model_dir=MODEL_DIR)
    startup_s = time.time() - start
    once = SamplingParams(max_tokens=1, temperature=0)
    with_image, text = prompts()

    def ttft(ids, images):
        def run(index):
            engine.add_request(Request(f"r{len(engine.requests)}-{time.time()}", ids, once,
                                       images=tuple(images(index))))
            while engine.has_work():
                engine.step()
        return run

    images = engine.runner.images
    pixels = images.processor([image(0)])
    fresh = [image(100 + i) for i in range(WARMUP + REPEATS)]  # encoded outside the timing

    def tower(_):
        with torch.inference_mode():
            images.vision(pixels.to(device()))
        if device() == "cuda":
            torch.cuda.synchronize()

    return {
        "startup_s": startup_s,
        "ttft_image_ms": median_ms(ttft(with_image, lambda i: [fresh[i]]), REPEATS),
        "ttft_text_ms": median_ms(ttft(text, lambda i: []), REPEATS),
        "preprocess_ms": median_ms(lambda i: images.processor([fresh[i]]), REPEATS),
        "tower_ms": median_ms(tower, REPEATS),
        "device": torch.cuda.get_device_name() if device() == "cuda" else "cpu",
        "versions": {"torch": torch.__version__},
        "image_processor": type(images.processor.processor).__name__,
    }


def bench_lmdeploy() -> dict:
    import lmdeploy
    from lmdeploy import GenerationConfig, PytorchEngineConfig, pipeline
    from PIL import Image
    from transformers.models.auto import image_processing_auto

    # LMDeploy 0.18's LLaVA preprocessor passes PIL images with input_data_format=
    # "channels_last", which only transformers' PIL image processors accept; transformers 5
    # picks the torchvision one where torchvision is installed, and every image then fails.
    image_processing_auto.is_torchvision_available = lambda: False
    start = time.time()
    pipe = pipeline(str(MODEL_DIR), backend_config=PytorchEngineConfig(
        session_len=2048, cache_max_entry_count=0.5, enable_prefix_caching=False),
        log_level="WARNING")
    startup_s = time.time() - start
    once = GenerationConfig(max_new_tokens=1, ignore_eos=True)
    with_image, text = prompts()
    # The same token ids as lmfleet's (no chat template on either side): LMDeploy takes ids
    # as a message's text and widens its image placeholder (the pad id) into the image's 576
    # positions.
    vision = getattr(pipe, "async_engine", pipe).vl_encoder.model
    placeholder = vision.image_token_id
    one_image = (with_image[:TEXT_EACH_SIDE] + [placeholder]
                 + with_image[TEXT_EACH_SIDE + IMAGE_POSITIONS:])
    fresh = [Image.open(io.BytesIO(image(100 + i))).convert("RGB")
             for i in range(WARMUP + REPEATS)]

    positions = {}

    def ask(name: str, prompt, least: int) -> None:
        answer = pipe(prompt, gen_config=once)
        answer = answer[0] if isinstance(answer, list) else answer
        if answer.generate_token_len != 1 or answer.input_token_len < least:
            raise RuntimeError(f"LMDeploy did not answer a {least}-position prompt as one: "
                               f"{answer}")
        positions[name] = answer.input_token_len

    def with_image_run(index):
        ask("image_prompt_positions", [{"role": "user", "content": [
            {"type": "text", "text": one_image},
            {"type": "image_data", "image_data": {"data": fresh[index]}}]}], len(with_image))

    # A text-only message does not take ids: the same ids as words ("t<id>", which the
    # word tokenizer maps back to them), through LMDeploy's chat template (a few positions
    # more, counted in text_prompt_positions).
    words = " ".join(f"t{token}" for token in text)
    result = {"startup_s": startup_s, "version": lmdeploy.__version__,
              "image_processor": type(vision.processor).__name__}
    for name, run in (("ttft_image_ms", with_image_run),
                      ("ttft_text_ms", lambda _: ask("text_prompt_positions", words, len(text)))):
        try:
            result[name] = median_ms(run, REPEATS)
        except RuntimeError as error:
            result[name.replace("_ms", "_error")] = str(error)[:300]
    result.update(positions)
    pipe.close()
    return result


def plot(json_path: str, png_path: str) -> None:
    """TTFT with an image and text-only per engine, beside lmfleet's encoder time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = json.loads(Path(json_path).read_text())
    ours = result.get("lmfleet", {})
    names = [n for n in ("lmfleet", "lmdeploy") if "ttft_image_ms" in result.get(n, {})]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    width = 0.27
    encoder = "tower_ms" in ours and "lmfleet" in names
    for i, name in enumerate(names):
        r = result[name]
        left = i - width if name == "lmfleet" and encoder else i - width / 2
        bars = [(left, r["ttft_image_ms"], "with image", "tab:blue"),
                (left + width, r.get("ttft_text_ms", float("nan")), "text only", "tab:gray")]
        # a prompt of other positions than lmfleet's (LMDeploy's templated text) says so
        text_positions = r.get("text_prompt_positions")
        for x, value, label, color in bars:
            ax.bar(x, value, width, color=color, label=label if i == 0 else None)
            note = (f"\n({text_positions} pos.)" if label == "text only" and text_positions
                    else "")
            ax.text(x, value, f"{value:.0f}{note}", ha="center", va="bottom", fontsize=8)
    if encoder:
        x, pre, tower = width, ours["preprocess_ms"], ours["tower_ms"]
        ax.bar(x, pre, width, color="tab:orange", label="lmfleet image processor (CPU)")
        ax.bar(x, tower, width, bottom=pre, color="tab:green",
               label="lmfleet tower + projector")
        share = ours.get("encoder_share_of_ttft", (pre + tower) / ours["ttft_image_ms"])
        ax.text(x, pre + tower, f"{pre + tower:.0f}\n({share:.0%})", ha="center",
                va="bottom", fontsize=8)
    skipped = [f"{n}: {s}" for n, s in result.get("status", {}).items() if s != "ok"]
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("ms (median of 5, one request alone)")
    ax.set_title(f"LLaVA-1.5-7B-shaped TTFT, 576 image + 80 text positions\n"
                 f"{ours.get('device', '?')}" + (f"; {', '.join(skipped)}" if skipped else ""),
                 fontsize=10)
    ax.set_ylim(0, ax.get_ylim()[1] * 1.3)
    ax.legend(fontsize=8, ncol=2, loc="upper center")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="folder for the results (required unless --plot)")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"),
                        help="draw OUT/vision_ttft.json as a bar chart and stop")
    parser.add_argument("--step", choices=["make-model", "lmfleet", "lmdeploy"])
    parser.add_argument("--peer-path", default=None, help="PYTHONPATH for the lmdeploy step")
    parser.add_argument("--limit-s", type=float, default=240.0)
    parser.add_argument("--tiny", action="store_true", help="a small model (CPU smoke run)")
    args = parser.parse_args()
    if args.plot:
        plot(*args.plot)
        return
    if not args.out:
        parser.error("--out is required (unless --plot is given)")
    if args.tiny:
        use_tiny()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.step:
        step = {"make-model": make_model, "lmfleet": bench_lmfleet,
                "lmdeploy": bench_lmdeploy}[args.step]
        (out / f"{args.step}.json").write_text(json.dumps(step(), indent=1))
        return
    result: dict = {"benchmark": "vision_ttft", "status": {}}
    for step in ("make-model", "lmfleet", "lmdeploy"):
        if step == "make-model" and (MODEL_DIR / "model.safetensors.index.json").is_file():
            continue
        env = dict(os.environ)
        if step == "lmdeploy" and args.peer_path:
            env["PYTHONPATH"] = args.peer_path
        try:
            command = [sys.executable, __file__, "--out", str(out), "--step", step]
            done = subprocess.run(command + (["--tiny"] if args.tiny else []), env=env,
                                  timeout=args.limit_s)
            result["status"][step] = "ok" if done.returncode == 0 else f"rc={done.returncode}"
        except subprocess.TimeoutExpired:
            result["status"][step] = f"timeout after {args.limit_s:.0f} s"
        path = out / f"{step}.json"
        if path.is_file():
            result[step] = json.loads(path.read_text())
    ours = result.get("lmfleet", {})
    if "tower_ms" in ours:
        encode = ours["preprocess_ms"] + ours["tower_ms"]
        ours["encoder_share_of_ttft"] = encode / ours["ttft_image_ms"]
    (out / "vision_ttft.json").write_text(json.dumps(result, indent=1))
    print("| engine | TTFT image ms | TTFT text ms | image - text ms | status |")
    print("| --- | ---: | ---: | ---: | --- |")
    for name in ("lmfleet", "lmdeploy"):
        r = result.get(name, {})
        image_ms, text_ms = r.get("ttft_image_ms", float("nan")), r.get("ttft_text_ms",
                                                                           float("nan"))
        print(f"| {name} | {image_ms:.1f} | {text_ms:.1f} | {image_ms - text_ms:.1f} | "
              f"{result['status'].get(name)} |")
    print("lmfleet encoder:", {k: ours.get(k) for k in ("preprocess_ms", "tower_ms",
                                                        "encoder_share_of_ttft")})


if __name__ == "__main__":
    main()
