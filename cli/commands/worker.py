"""`lmfleet worker`: serve one model replica over gRPC (lmfleet.v1.Worker + health +
reflection).

Contract with launchers and tests: once the model is loaded and the server listens, the
command prints exactly one line to stdout (flushed), and nothing else ever goes there:

    lmfleet worker ready on HOST:PORT model=NAME

(`--port 0` picks a free port; the line carries the real one. An IPv6 host is bracketed.)
Logs go to stderr. $LMFLEET_WORKER_TOKEN, when set, must come with every Worker call
(worker/auth.py). SIGTERM or SIGINT: stop admitting requests (health NOT_SERVING), let
in-flight ones finish for up to `--drain-timeout` seconds, abort the rest, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

READY_PREFIX = "lmfleet worker ready on "


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve one model replica over gRPC (the router's backend)",
        description="Load MODEL and serve it over gRPC as lmfleet.v1.Worker (token ids in, "
        "token ids out), with grpc.health.v1 health and server reflection. Prints "
        f"'{READY_PREFIX}HOST:PORT model=NAME' on stdout when ready; logs go to stderr. "
        "Environment: LMFLEET_WORKER_TOKEN, when set, is a shared secret every "
        "lmfleet.v1.Worker call must carry as metadata 'authorization: Bearer TOKEN' "
        "(wrong or missing: UNAUTHENTICATED; health and reflection stay open for probes); "
        "give routers and the controller the same value.",
    )
    p.add_argument("--model", default="default",
                   help="model directory, .gguf file, or 'default' (embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; on any other address set "
                   "LMFLEET_WORKER_TOKEN, or anyone who reaches the port can drain the worker)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: a free one)")
    p.add_argument("--model-name", default=None,
                   help="name clients use (default: 'default' for the embedded model, else the "
                   "model directory's name or the .gguf file's stem)")
    from lmfleet.worker.options import add_engine_flags

    add_engine_flags(p.add_argument_group("engine options (worker/options.py)"))
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds to let in-flight requests finish")
    p.set_defaults(func=run)


class _RaisingParser(argparse.ArgumentParser):
    """A worker parser for argv built by code: errors raise ValueError instead of exiting
    the process."""

    def error(self, message: str):
        raise ValueError(message)


def parse_worker_argv(argv: list[str]) -> argparse.Namespace:
    """`lmfleet worker` arguments parsed from `argv` (without the 'worker' word); bad
    ones raise ValueError with argparse's message."""
    root = _RaisingParser(prog="lmfleet")
    add_parser(root.add_subparsers(parser_class=_RaisingParser))
    return root._subparsers._group_actions[0].choices["worker"].parse_args(argv)


def build_engine(args: argparse.Namespace):
    """Load the model and build the LLMEngine the arguments describe; returns
    (engine, model_name)."""
    from lmfleet.worker.options import from_namespace
    from lmfleet.worker.serving import build_engine as build

    return build(args.model, from_namespace(args), args.model_name)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"invalid --port {args.port}: must be in [0, 65535]")
    if args.drain_timeout < 0:
        raise ValueError(f"invalid --drain-timeout {args.drain_timeout}: must be >= 0")
    if args.model_name is not None:  # checked before the model loads
        from lmfleet.cluster.fleet_config import check_served_name

        check_served_name(args.model_name)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio

    from lmfleet.worker.async_engine import AsyncEngine

    engine, model_name = build_engine(args)
    return asyncio.run(_serve(AsyncEngine(engine), args, model_name))


async def _serve(engine, args: argparse.Namespace, model_name: str) -> int:
    import asyncio
    import signal

    from lmfleet.worker.server import WorkerServer

    server = WorkerServer(engine, model_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = await server.start(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{READY_PREFIX}{host}:{port} model={model_name}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: draining for up to %.1f s",
                                     args.drain_timeout)
    await server.shutdown(args.drain_timeout)
    return 0
