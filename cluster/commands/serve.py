"""`lmfleet serve`: the all-in-one endpoint. Starts N local workers per model, then the
router in this process in front of all of them.

Contract: progress and logs go to stderr; once every worker is loaded and both front
doors accept connections, exactly one line goes to stdout (flushed):

    lmfleet serve ready http=HOST:PORT grpc=HOST:PORT models=NAME[,NAME...]

SIGINT/SIGTERM (also during start-up): stop the router, then SIGTERM the workers (they
drain for up to --drain-timeout), SIGKILL any left after a bounded wait; exit 0. A worker
that dies during start-up: `error: model 'NAME': ... last stderr lines ...`, exit 1.

Model names: `--model-name` values pair with `--model` values in order; without one a
model is called 'default' (the embedded model) or by its directory (or .gguf file) name.
The engine flags (--device, --dtype, --max-num-seqs, --scheduler, ...) are the worker's
own, copied from `lmfleet worker`'s parser, so both always accept the same ones.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from pathlib import Path

from lmfleet.cluster.commands import worker as worker_command

# Worker flags that serve sets itself per replica instead of copying.
_NOT_ENGINE_FLAGS = {"help", "model", "model_name", "host", "port"}
_DEFAULT_MODEL_ALIASES = ("default", "SmolLM2-135M-Instruct")


def _worker_engine_actions() -> list[argparse.Action]:
    parser = argparse.ArgumentParser()
    worker_command.add_parser(parser.add_subparsers())
    worker_parser = parser._subparsers._group_actions[0].choices["worker"]
    return [a for a in worker_parser._actions if a.dest not in _NOT_ENGINE_FLAGS]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models end to end: local workers and the router in one command",
        description="Start --replicas local workers for each --model, then the router (OpenAI "
        "HTTP API and lmfleet.v1 gRPC API) in front of them. Prints 'lmfleet serve ready "
        "http=HOST:PORT grpc=HOST:PORT models=...' on stdout when ready.",
    )
    p.add_argument("--model", action="append", default=None, metavar="MODEL",
                   help="model directory, .gguf file or 'default' (embedded SmolLM2); repeat "
                   "to serve several models behind one endpoint (default: 'default')")
    p.add_argument("--model-name", action="append", default=None, metavar="NAME",
                   help="name clients use for the matching --model (in order; default: "
                   "'default' or the directory name)")
    p.add_argument("--replicas", type=int, default=1, metavar="N",
                   help="workers (replicas) per model (default 1)")
    p.add_argument("--host", default="127.0.0.1", help="address the router listens on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free port)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: a free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LMFLEET_API_KEY; "
                   "none: open)")
    p.add_argument("--policy", default="least_loaded",
                   help="routing policy: least_loaded, round_robin or session_affinity")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="requests per model running at once (default: unlimited)")
    p.add_argument("--max-queued", type=int, default=None, metavar="N",
                   help="requests per model waiting beyond --max-in-flight (more get 503)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for the workers of a model to load")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="router log level; info or debug also shows the workers' logs")
    engine = p.add_argument_group("engine options (passed to every worker)")
    for action in _worker_engine_actions():
        engine._add_action(copy.copy(action))
    p.set_defaults(func=run)


def model_name(model: str) -> str:
    """The default client-facing name of a --model value."""
    if model in _DEFAULT_MODEL_ALIASES:
        return "default"
    path = Path(model.rstrip("/\\"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def engine_flags(args: argparse.Namespace) -> dict[str, str | None]:
    """The engine flags given on the command line that differ from the worker's defaults."""
    flags: dict[str, str | None] = {}
    for action in _worker_engine_actions():
        value = getattr(args, action.dest, None)
        if value is None or value == action.default or not action.option_strings:
            continue
        flag = max(action.option_strings, key=len)
        flags[flag] = None if action.nargs == 0 else str(value)
    return flags


def model_specs(args: argparse.Namespace):
    """One ModelSpec per --model; raises ValueError for bad combinations."""
    from lmfleet.cluster.launcher import ModelSpec

    models = args.model or ["default"]
    names = args.model_name or []
    if names and len(names) != len(models):
        raise ValueError(f"{len(names)} --model-name for {len(models)} --model: give one "
                         "name per model, in the same order, or none")
    if args.replicas < 1:
        raise ValueError(f"invalid --replicas {args.replicas}: must be >= 1")
    for model in models:
        if model not in _DEFAULT_MODEL_ALIASES and not os.path.exists(model):
            raise ValueError(f"model not found: {model} (a directory, a .gguf file or "
                             "'default')")
    names = names or [model_name(m) for m in models]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"model name {duplicates[0]!r} is used twice; set --model-name")
    flags = engine_flags(args)
    return [ModelSpec(name=n, model=m, replicas=args.replicas, engine_flags=flags)
            for n, m in zip(names, models, strict=True)]


class _Stop(Exception):
    """SIGINT/SIGTERM arrived while the workers were loading."""


def _progress(message: str) -> None:
    print(f"lmfleet serve: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    import signal

    from lmfleet.cluster.launcher import LaunchError, LocalProcessLauncher
    from lmfleet.router.auth import api_key_from_env
    from lmfleet.router.server import RouterConfig

    specs = model_specs(args)
    # Checked before any worker loads; the real addresses replace the placeholder later.
    config = RouterConfig(
        workers=("127.0.0.1:0",), host=args.host, http_port=args.port,
        grpc_port=args.grpc_port, api_key=api_key_from_env(args.api_key),
        max_in_flight=args.max_in_flight, max_queued=args.max_queued, policy=args.policy,
        discovery_timeout=60.0)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    drain_timeout = getattr(args, "drain_timeout", 30.0) or 0.0
    launcher = LocalProcessLauncher(
        host=args.host if args.host not in ("0.0.0.0", "::") else "127.0.0.1",
        start_timeout=args.start_timeout, stop_timeout=drain_timeout + 15.0,
        progress=_progress, echo_logs=args.log_level in ("debug", "info"))

    def interrupt(signum, frame) -> None:
        raise _Stop()

    # Until the event loop takes over, a signal interrupts the (blocking) loading.
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            addresses = [a for spec in specs for a in launcher.start(spec)]
        except _Stop:
            _progress("interrupted while loading; workers stopped")
            return 0
        except LaunchError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            return 1
        # Until the event loop's handlers are in place, a signal is only remembered.
        pending: list[int] = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, lambda signum, frame: pending.append(signum))
        config = dataclasses.replace(config, workers=tuple(addresses))
        import asyncio

        asyncio.run(_serve_router(config, [s.name for s in specs], pending))
        return 0
    finally:
        with _signals_ignored():
            launcher.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class _signals_ignored:
    """Shutdown must not be cut short by a second Ctrl-C; it is bounded anyway."""

    def __enter__(self) -> None:
        import signal

        self._saved = {s: signal.signal(s, signal.SIG_IGN)
                       for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc_info) -> None:
        import signal

        for signum, handler in self._saved.items():
            signal.signal(signum, handler)


async def _serve_router(config, model_names: list[str], pending: list[int]) -> None:
    import asyncio
    import signal

    from lmfleet.router.server import Router

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if pending:
        stop.set()
    router = Router(config)
    try:
        await router.start()
        print(f"lmfleet serve ready http={router.http_address} grpc={router.grpc_address} "
              f"models={','.join(model_names)}", flush=True)
        await stop.wait()
        _progress("shutting down")
    finally:
        await router.stop()
