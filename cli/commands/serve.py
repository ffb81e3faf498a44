"""`lmfleet serve`: the all-in-one endpoint. Starts (or joins, `--ray-address`) a Ray
cluster, runs the controller, which places each model's replicas as Ray actors and keeps
them healthy and scaled, and the router in front of them, in this one process, sharing an
in-memory state store.

Contract: progress and logs go to stderr (one `replica ... ready on ADDRESS (pid N)` line
per first replica); once every model has its first replicas and both front doors accept
connections, exactly one line goes to stdout (flushed):

    lmfleet serve ready http=HOST:PORT grpc=HOST:PORT models=NAME[,NAME...]

SIGINT/SIGTERM (also during start-up): stop the router, drain the replicas (up to
--drain-timeout), stop them and the local Ray cluster; exit 0. A replica that fails during
start-up: `error: model 'NAME': ...` with the worker's own error, exit 1. With several
models, one that fails (or that no node of the local Ray cluster can hold, e.g. `device:
cuda` on a machine without a GPU: said at once) is reported the same way on stderr and
the others are served (the ready line names those); the controller keeps retrying one
that failed to start, and the router serves it once it is ready.

The fleet comes from `--config fleet.yaml` (cluster/fleet_config.py: several models, each
with its size, autoscaling and engine options) or from the flags: each `--model` (named by
the matching `--model-name`, else 'default' or its directory name) with `--replicas N`, or
autoscaled between `--min-replicas` and `--max-replicas`. The engine flags (--device,
--dtype, --max-num-seqs, --scheduler, ...) are the worker's own: both come from the
engine options' one definition (worker/options.py).

The replicas' gRPC ports are for this fleet only: with a local Ray cluster they listen on
127.0.0.1 (`--replica-host` or the config's `controller.replica_host` says otherwise;
joining a cluster with --ray-address, they listen on their node's IP so this router
reaches them), and every Worker call needs $LMFLEET_WORKER_TOKEN, which this command
makes up when it is not set (worker/auth.py), so no one else can drain or use them.
"""

from __future__ import annotations

import argparse
import sys

from lmfleet.cli.commands import router as router_command


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models end to end: Ray replicas, controller and router in one command",
        description="Start the replicas of each --model (or of each model in --config) as "
        "Ray actors, kept healthy and autoscaled by the controller, and the router (OpenAI "
        "HTTP API and lmfleet.v1 gRPC API) in front of them. Prints 'lmfleet serve ready "
        "http=HOST:PORT grpc=HOST:PORT models=...' on stdout when ready.",
    )
    p.add_argument("--config", default=None, metavar="FLEET_YAML",
                   help="fleet config (models, sizes, autoscaling, engine options); "
                   "replaces --model, --replicas and the engine flags")
    p.add_argument("--model", action="append", default=None, metavar="MODEL",
                   help="model directory, .gguf file or 'default' (embedded SmolLM2); repeat "
                   "to serve several models behind one endpoint (default: 'default')")
    p.add_argument("--model-name", action="append", default=None, metavar="NAME",
                   help="name clients use for the matching --model (in order; default: "
                   "'default' or the directory name)")
    p.add_argument("--replicas", type=int, default=None, metavar="N",
                   help="replicas per model, fixed (default 1)")
    p.add_argument("--min-replicas", type=int, default=None, metavar="N",
                   help="autoscale each model from N replicas (with --max-replicas)")
    p.add_argument("--max-replicas", type=int, default=None, metavar="N",
                   help="autoscale each model up to N replicas")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (HOST:PORT or 'auto') instead of starting a "
                   "local one")
    p.add_argument("--replica-host", default=None, metavar="HOST",
                   help="address the replicas' gRPC servers listen on (default: the "
                   "config's controller.replica_host, else 127.0.0.1 with a local Ray "
                   "cluster and each node's IP with --ray-address). Their calls need "
                   "LMFLEET_WORKER_TOKEN from the environment; a random one is made up when "
                   "it is not set")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="how long a replica being removed may finish its requests")
    router_command.add_replica_wait_flag(p)
    router_command.add_webui_flag(p)
    router_command.add_image_urls_flag(p)
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
                   help="how long to wait for the first replicas of every model")
    p.add_argument("--log-level", default="warning",
                   choices=["debug", "info", "warning", "error"],
                   help="log level; info also shows the controller's decisions and the "
                   "replicas' logs")
    from lmfleet.worker.options import add_engine_flags

    add_engine_flags(p.add_argument_group("engine options (passed to every replica)"))
    p.set_defaults(func=run)


def fleet_config(args: argparse.Namespace):
    """The FleetConfig of the command line (from --config, or from the flags); raises
    ValueError for bad combinations."""
    from lmfleet.cluster.autoscaler import AutoscalingConfig
    from lmfleet.cluster.fleet_config import (
        ControllerConfig,
        FleetConfig,
        ModelDeployment,
        load_fleet_config,
        model_path,
    )
    from lmfleet.worker.options import from_namespace

    flags = from_namespace(args)
    if args.config is not None:
        given = [name for name, value in (("--model", args.model), ("--model-name",
                 args.model_name), ("--replicas", args.replicas), ("--min-replicas",
                 args.min_replicas), ("--max-replicas", args.max_replicas)) if value]
        given += [f"--{key.replace('_', '-')}" for key in flags]
        if given:
            raise ValueError(f"--config describes the models; drop {', '.join(given)}")
        return load_fleet_config(args.config)
    models = args.model or ["default"]
    names = args.model_name or []
    if names and len(names) != len(models):
        raise ValueError(f"{len(names)} --model-name for {len(models)} --model: give one "
                         "name per model, in the same order, or none")
    if args.replicas is not None and (args.min_replicas or args.max_replicas):
        raise ValueError("give --replicas (a fixed size) or --min/--max-replicas, not both")
    if args.replicas is not None and args.replicas < 1:
        raise ValueError(f"invalid --replicas {args.replicas}: must be >= 1")
    low = args.replicas or args.min_replicas or 1
    high = args.replicas or args.max_replicas or low
    try:
        scaling = AutoscalingConfig(min_replicas=low, max_replicas=high)
    except ValueError as error:
        raise ValueError(f"invalid --min-replicas/--max-replicas: {error}") from None
    models = [model_path(m) for m in models]
    from lmfleet.worker.model.default_model import served_model_name

    names = names or [served_model_name(m) for m in models]
    scheduler = flags.pop("scheduler", None) or "fcfs"
    tp = flags.pop("tensor_parallel_size", 1)
    pp = flags.pop("pipeline_parallel_size", 1)
    controller = ControllerConfig(drain_timeout_s=max(args.drain_timeout, 0.1),
                                  start_timeout_s=args.start_timeout)
    return FleetConfig(tuple(
        ModelDeployment(name=n, path=m, tp=tp, pp=pp, scheduler=scheduler, engine=flags,
                        autoscaling=scaling)
        for n, m in zip(names, models, strict=True)), controller)


def replica_host(args: argparse.Namespace, configured: str | None) -> str | None:
    """Where the replicas listen: --replica-host, else the config's, else loopback when
    this process starts its own Ray cluster (the router beside it is all that calls them),
    else None (each node's IP: a cluster joined may place them on other machines)."""
    if args.replica_host:
        return args.replica_host
    if configured:
        return configured
    return "127.0.0.1" if args.ray_address is None else None


def ensure_worker_token() -> None:
    """Make up $LMFLEET_WORKER_TOKEN when it is not set. Set before Ray, the controller
    and the router start, so all of them (and Ray's local processes) share it."""
    import os
    import secrets

    from lmfleet.worker.auth import WORKER_TOKEN_ENV, worker_token_from_env

    if worker_token_from_env() is None:
        os.environ[WORKER_TOKEN_ENV] = secrets.token_urlsafe(32)


class _Stop(Exception):
    """SIGINT/SIGTERM arrived while the replicas were loading."""


def _progress(message: str) -> None:
    print(f"lmfleet serve: {message}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    import asyncio
    import dataclasses
    import logging
    import signal

    from lmfleet.cluster.controller import FleetStartError
    from lmfleet.cluster.controller_metrics import ControllerCollector
    from lmfleet.cluster.fleet_runtime import running_fleet
    from lmfleet.cluster.state import MEMORY_URL, MemoryStore
    from lmfleet.router.auth import api_key_from_env
    from lmfleet.router.server import RouterConfig
    from lmfleet.router.sockets import check_port_free

    fleet = fleet_config(args)
    host = replica_host(args, fleet.controller.replica_host)
    fleet = dataclasses.replace(
        fleet, controller=dataclasses.replace(fleet.controller, replica_host=host))
    ensure_worker_token()
    # Checked before anything starts.
    config = RouterConfig(
        store_url=MEMORY_URL, cluster=fleet.cluster, host=args.host, http_port=args.port,
        grpc_port=args.grpc_port, api_key=api_key_from_env(args.api_key),
        max_in_flight=args.max_in_flight, max_queued=args.max_queued, policy=args.policy,
        discovery_timeout=0.0, drain_timeout=max(args.drain_timeout, 0.0),
        **router_command.replica_wait(args), webui=not args.no_webui,
        allow_image_urls=args.allow_image_urls)
    # Ports are checked before Ray and the replicas start (tens of seconds), so a taken
    # one is reported at once, by number (ListenError: `error: cannot listen on ...`).
    check_port_free(config.host, config.http_port, "HTTP port, --port")
    check_port_free(config.host, config.grpc_port, "gRPC port, --grpc-port")
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def interrupt(signum, frame) -> None:
        raise _Stop()

    # Until the event loop takes over, a signal interrupts the (blocking) start-up.
    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}
    store = MemoryStore(fleet.cluster)
    try:
        with running_fleet(fleet, store, args.ray_address, args.start_timeout, _progress,
                           verbose=args.log_level in ("debug", "info")) as controller:
            # Until the event loop's handlers are in place, a signal is only remembered.
            pending: list[int] = []
            for signum in (signal.SIGINT, signal.SIGTERM):
                signal.signal(signum, lambda signum, frame: pending.append(signum))
            served = [m.name for m in fleet.models if m.name not in controller.start_failures]
            asyncio.run(_serve_router(config, store, ControllerCollector(controller),
                                      served, pending))
        return 0
    except _Stop:
        _progress("interrupted while loading; replicas stopped")
        return 0
    except (FleetStartError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


async def _serve_router(config, store, collector, model_names: list[str],
                        pending: list[int]) -> None:
    import asyncio
    import signal

    from lmfleet.router.server import Router

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if pending:
        stop.set()
    router = Router(config, store=store)
    router.metrics.registry.register(collector)
    try:
        await router.start()
        print(f"lmfleet serve ready http={router.http_address} grpc={router.grpc_address} "
              f"models={','.join(model_names)}", flush=True)
        await stop.wait()
        _progress("shutting down")
    finally:
        await router.stop()
