"""`lmfleet quantize`: write a 4-bit AWQ checkpoint (AutoAWQ's GEMM format) from a local
model, which lmfleet (and vLLM or LMDeploy: the same files) then serves with its weights
packed. The decoder layers' projections are quantized (the embedding, norms and LM head
are kept): by default after AWQ's activation-aware scale search on a calibration text (a
built-in one, or --calibration FILE), then rounded to nearest with zero points per group
of input features; --rtn rounds the weights as they are.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "quantize",
        help="write a 4-bit AWQ checkpoint from a local model",
        description="Quantize a Llama-family Hugging Face directory (or 'default') to 4-bit "
        "weights in AutoAWQ's GEMM format: activation-aware scales searched on a calibration "
        "text, then round-to-nearest with zero points per group of input features. Prints "
        "the output directory on stdout; progress goes to stderr.",
    )
    p.add_argument("model", help="a Hugging Face model directory, or 'default'")
    p.add_argument("--out", required=True, metavar="DIR", help="the directory to write")
    p.add_argument("--method", choices=("awq",), default="awq",
                   help="the checkpoint format (default awq)")
    p.add_argument("--group-size", type=int, default=128, metavar="G",
                   help="input features sharing one scale and zero point (default 128)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="calibration text for the scale search (default: a built-in text of "
                   "varied English prose, code and dialogue)")
    p.add_argument("--rtn", action="store_true",
                   help="plain round-to-nearest: no calibration, no scale search")
    p.add_argument("--device", default=None,
                   help="where the search and rounding run (default: cuda if available)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from lmfleet.worker.model.default_model import resolve_model_path
    from lmfleet.worker.quant.awq_search import DEFAULT_CALIBRATION, calibration_ids
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
    if args.rtn and args.calibration:
        raise ValueError("--rtn takes no calibration text")
    calibration = None
    if not args.rtn:
        text_file = Path(args.calibration).expanduser() if args.calibration else DEFAULT_CALIBRATION
        if not text_file.is_file():
            raise FileNotFoundError(f"calibration text not found: {text_file}")
        calibration = calibration_ids(model_dir, text_file.read_text())
        if len(calibration) < 16:
            raise ValueError(f"{text_file} holds {len(calibration)} tokens; the search needs "
                             "at least 16")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    bar = None
    if not args.quiet:
        from tqdm import tqdm

        layers = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
        bar = tqdm(desc="searching scales" if calibration else "quantizing",
                   total=layers if calibration else None, unit=" layers" if calibration
                   else " tensors", file=sys.stderr)

    def on_tensor(_name: str) -> None:
        if bar is not None and calibration is None:
            bar.update()

    def on_layer(_index: int) -> None:
        if bar is not None:
            bar.update()

    created = not out.exists()
    try:
        write_awq_checkpoint(model_dir, out, args.group_size, on_tensor=on_tensor,
                             device=device, calibration=calibration, on_layer=on_layer)
    except BaseException:
        if created and out.exists():  # no half-written checkpoint left behind
            shutil.rmtree(out)
        raise
    finally:
        if bar is not None:
            bar.close()
    print(out)
    return 0
