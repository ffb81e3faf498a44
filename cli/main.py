"""The `lmfleet` command (console script `lmfleet = lmfleet.cli.main:main`).

One small `_cmd_<name>(args) -> int` function per subcommand, all registered in
`build_parser()`. Heavy modules (torch, transformers) are imported inside the commands so
`lmfleet --help` stays instant.

Exit codes: 0 success; 2 bad input (unknown option, missing file, unsupported model):
one line `error: ...` on stderr, no traceback; 1 other failures (disk full, ...);
130 interrupted.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn, Optional

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class _UsageError(Exception):
    """Bad command-line input detected after parsing; reported as `error: ...`, exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: <message> (see 'lmfleet convert --help')`."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see '{self.prog} --help')\n")


# ---- convert ------------------------------------------------------------------------


def _cmd_convert(args: argparse.Namespace) -> int:
    from lmfleet.worker.model.default_model import gguf_cache_dir
    from lmfleet.worker.model.gguf_convert import convert_gguf

    gguf = Path(args.gguf).expanduser()
    if not gguf.is_file():
        raise _UsageError(f"GGUF file not found: {gguf}")
    out = Path(args.out).expanduser() if args.out else gguf_cache_dir(gguf)
    result = convert_gguf(gguf, out, progress=not args.quiet)
    print(result)  # stdout carries only the result, so scripts can capture it
    return EXIT_OK


def _add_convert(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert",
        help="convert a GGUF model to a float32 Hugging Face directory",
        description="Convert a Llama-family GGUF file into a Hugging Face directory "
        "(config.json, float32 model.safetensors, tokenizer, chat template). "
        "Prints the directory on stdout; progress goes to stderr.",
    )
    p.add_argument("--gguf", required=True, metavar="FILE", help="the .gguf file to convert")
    p.add_argument(
        "--out",
        metavar="DIR",
        help="output directory; must not exist or be empty "
        "(default: the cache directory that `--model FILE.gguf` would use)",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_convert)


# ---- models -------------------------------------------------------------------------


def _cmd_models(args: argparse.Namespace) -> int:
    from lmfleet.worker.model import default_model as dm

    target = dm.default_model_dir()
    try:
        source = str(dm.embedded_gguf_path())
    except ValueError:
        source = f"not installed ({dm.INSTALL_HINT})"
    print(f"{dm.DEFAULT_MODEL_NAME} (alias {dm.DEFAULT_MODEL_ID})")
    print(f"  source:    {source}")
    print(f"  cache:     {target}")
    print(f"  converted: {'yes' if dm.is_model_dir(target) else 'no (converted on first use)'}")
    models = dm.cache_dir() / "models"
    others = []
    if models.is_dir():
        # Hidden entries are in-flight partial conversions and lock files.
        others = [
            p
            for p in sorted(models.iterdir())
            if p != target and not p.name.startswith(".") and dm.is_model_dir(p)
        ]
    if others:
        print("other converted models in the cache:")
        for p in others:
            print(f"  {p}")
    return EXIT_OK


def _add_models(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "models",
        help="list the embedded default model and the converted models in the cache",
        description="Show the embedded default model (its GGUF source, cache directory "
        "and whether it is converted yet) and other models converted into the cache "
        "($LMFLEET_CACHE, default ~/.cache/lmfleet).",
    )
    p.set_defaults(func=_cmd_models)


# ---- the other subcommands ------------------------------------------------------------
# Each lives in its own module under lmfleet.cli.commands, exposing
# `add_parser(sub)` that registers it (with `set_defaults(func=...)`). Modules must not
# import torch or other heavy packages at the top, so `lmfleet --help` stays instant.
COMMAND_MODULES = ("generate", "worker", "router", "controller", "serve", "chat", "bench",
                   "quantize")


def _command_adders():
    import importlib

    return [importlib.import_module(f"lmfleet.cli.commands.{name}").add_parser
            for name in COMMAND_MODULES]


# ---- parser and entry point ---------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The `lmfleet` parser with every subcommand registered."""
    parser = _Parser(
        prog="lmfleet",
        description="lmfleet: serve LLMs from a fleet of GPU replicas behind one endpoint.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for add in (_add_convert, _add_models, *_command_adders()):
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the `lmfleet` command line; returns the exit code (see the module doc)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        return int(args.func(args) or EXIT_OK)
    except (_UsageError, ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except OSError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_FAILURE


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lmfleet")
    except PackageNotFoundError:
        return "unknown"


if __name__ == "__main__":
    sys.exit(main())
