"""`lmfleet quantize`: write a 4-bit AWQ checkpoint (AutoAWQ's GEMM format) from a local
model, which lmfleet (and vLLM or LMDeploy: the same files) then serves with its weights
packed. Round-to-nearest with zero points per group of input features; the projections of
the decoder layers are quantized, the embedding, norms and LM head are kept.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a 4-bit AWQ checkpoint from a local model",
        description="Quantize a Llama-family Hugging Face directory (or 'default') to 4-bit "
        "weights in AutoAWQ's GEMM format (round-to-nearest, zero points, per group of "
        "input features). Prints the output directory on stdout; progress goes to stderr.",
    )
    p.add_argument("model", help="a Hugging Face model directory, or 'default'")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--method", choices=("awq",), default="awq",
                   help="the checkpoint format (default awq)")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="input features sharing one scale and zero point (default 128)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmfleet.worker.model.default_model import resolve_model_path
    from lmfleet.worker.quant.awq_writer import write_awq_checkpoint

    if args.group_size < 8:
        raise ValueError(f"--group-size must be at least 8, got {args.group_size}")
    model_dir = (resolve_model_path(args.model, progress=not args.quiet)
                 if args.model == "default" else Path(args.model).expanduser())
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"not a Hugging Face model directory: {model_dir}")
    out = Path(args.out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not empty")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        bar = tqdm(desc="quantizing", unit=" tensors", file=sys.stderr)
    created = not out.exists()
    try:
        write_awq_checkpoint(model_dir, out, args.group_size,
                             on_tensor=None if bar is None else lambda _: bar.update())
    except BaseException:
        if created and out.exists():  # no half-written checkpoint left behind
            shutil.rmtree(out)
        raise
    finally:
        if bar is not None:
            bar.close()
    print(out)
    return 0
