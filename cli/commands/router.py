"""`lmfleet router`: the OpenAI HTTP API and the lmfleet.v1 gRPC API in front of workers.

Prints exactly one line on stdout once both servers accept connections:
`lmfleet router ready http=HOST:PORT grpc=HOST:PORT` (ports resolved when given as 0).
Logs go to stderr. SIGINT/SIGTERM stop it gracefully (exit 0): no new connections or
requests (JSON 503), running requests finish for up to --drain-timeout, the rest end with
an error (a stream with an error event and [DONE]).

Workers come either from `--worker` (a fixed list) or from a Redis state store
(`--redis URL [--cluster NAME]`), where replicas are published with a TTL
(cluster/state/; the controller publishes them): models appear and disappear with their
replicas, and several routers on one Redis share session affinity. If Redis goes away the
router keeps serving from its last view and resynchronises when it returns.
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "router",
        help="serve the OpenAI API and the lmfleet gRPC API in front of worker replicas",
        description="Route requests to lmfleet workers. Each worker's model is discovered "
        "(GetModelInfo); workers serving the same model name are replicas of it, and "
        "several models can be served behind one endpoint. Environment: "
        "LMFLEET_WORKER_TOKEN, when set, is sent to every worker as metadata "
        "'authorization: Bearer TOKEN' (the workers must have the same value).",
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--worker", action="append", metavar="HOST:PORT",
                        help="a worker's gRPC address (repeat for more workers)")
    source.add_argument("--redis", default=None, metavar="URL",
                        help="discover replicas from the Redis state store at URL "
                        "(redis://HOST:PORT[/DB], rediss://..., unix:///PATH) and share "
                        "session affinity with the other routers on it")
    p.add_argument("--cluster", default="default", metavar="NAME",
                   help="state store namespace (keys lmfleet:{NAME}:...; default 'default')")
    p.add_argument("--store-poll-interval", type=float, default=0.5, metavar="SECONDS",
                   help="how often the state store's replicas are listed (default 0.5)")
    p.add_argument("--session-ttl", type=float, default=3600.0, metavar="SECONDS",
                   help="how long a session's replica binding lives in the state store "
                   "after its last request (default 3600)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=8000, help="HTTP port (0: a free port)")
    p.add_argument("--grpc-port", type=int, default=50051, help="gRPC port (0: a free port)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' (default: $LMFLEET_API_KEY; "
                   "none: open)")
    p.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                   help="requests per model running at once (default: unlimited)")
    p.add_argument("--max-queued", type=int, default=None, metavar="N",
                   help="requests per model waiting beyond --max-in-flight; more get 503 "
                   "(default: unlimited)")
    p.add_argument("--policy", action="append", default=None, metavar="[MODEL=]NAME",
                   help="routing policy: least_loaded (default), round_robin or "
                   "session_affinity; MODEL=NAME sets it for one model (repeatable)")
    p.add_argument("--max-body-bytes", type=int, default=4 * 1024 * 1024, metavar="N",
                   help="largest accepted HTTP request body (default 4 MiB; larger: 413)")
    p.add_argument("--request-timeout", type=float, default=None, metavar="SECONDS",
                   help="deadline for each HTTP request (default: none)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT: stop accepting, let running requests finish for "
                   "up to this long, then end the rest with an error (streams: an error "
                   "event and [DONE]; others: a JSON 503)")
    add_replica_wait_flag(p)
    add_webui_flag(p)
    add_image_urls_flag(p)
    p.add_argument("--discovery-timeout", type=float, default=60.0, metavar="SECONDS",
                   help="how long start-up waits for workers to report their model")
    p.add_argument("--poll-interval", type=float, default=0.5, metavar="SECONDS",
                   help="how often each worker's load and health are polled")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def add_replica_wait_flag(p: argparse.ArgumentParser) -> None:
    """--replica-wait-timeout, shared with `lmfleet serve`."""
    p.add_argument("--replica-wait-timeout", type=float, default=None, metavar="SECONDS",
                   help="while no replica of a model can take a request (a replacement is "
                   "starting, all are unhealthy), how long requests wait for one before a "
                   "503 (default 15; 0: at once)")


def add_webui_flag(p: argparse.ArgumentParser) -> None:
    """--no-webui, shared with `lmfleet serve`."""
    p.add_argument("--no-webui", action="store_true",
                   help="do not serve the built-in chat page at /")


def add_image_urls_flag(p: argparse.ArgumentParser) -> None:
    """--allow-image-urls, shared with `lmfleet serve`."""
    p.add_argument("--allow-image-urls", action="store_true",
                   help="fetch http(s) image URLs in chat requests (at most 20 MiB, 10 s "
                   "each; the router's network is then reachable through it). Default: "
                   "images only inline, as data URLs")


def replica_wait(args: argparse.Namespace) -> dict:
    """RouterConfig's replica_wait_s from --replica-wait-timeout (unset: its default)."""
    if args.replica_wait_timeout is None:
        return {}
    return {"replica_wait_s": args.replica_wait_timeout}


def _policies(values: list[str] | None) -> tuple[str, tuple[tuple[str, str], ...]]:
    default = "least_loaded"
    per_model: list[tuple[str, str]] = []
    for value in values or ():
        model, sep, name = value.rpartition("=")
        if sep:
            if not model:
                raise ValueError(f"--policy {value!r}: expected MODEL=NAME")
            per_model.append((model, name))
        else:
            default = name
    return default, tuple(per_model)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    import signal
    import sys

    from lmfleet.router.auth import api_key_from_env
    from lmfleet.router.server import RouterConfig, serve_router

    policy, model_policies = _policies(args.policy)
    if args.redis is not None and args.redis.startswith("memory:"):
        raise ValueError("--redis needs a Redis URL (redis://HOST:PORT)")
    config = RouterConfig(
        workers=tuple(args.worker or ()), store_url=args.redis, cluster=args.cluster,
        store_poll_interval=args.store_poll_interval, session_ttl=args.session_ttl,
        host=args.host, http_port=args.port,
        grpc_port=args.grpc_port, api_key=api_key_from_env(args.api_key),
        max_in_flight=args.max_in_flight, max_queued=args.max_queued, policy=policy,
        model_policies=model_policies, max_body_bytes=args.max_body_bytes,
        request_timeout=args.request_timeout, discovery_timeout=args.discovery_timeout,
        drain_timeout=args.drain_timeout, **replica_wait(args), webui=not args.no_webui,
        allow_image_urls=args.allow_image_urls, poll_interval=args.poll_interval)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def ready(router) -> None:
        print(f"lmfleet router ready http={router.http_address} grpc={router.grpc_address}",
              flush=True)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_router(config, ready, stop)

    asyncio.run(main())
    return 0
