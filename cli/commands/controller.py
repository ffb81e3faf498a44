"""`lmfleet controller`: run a fleet's controller on its own (the Kubernetes shape: one
controller, several `lmfleet router --redis URL` in front, replicas on Ray).

It starts (or joins, `--ray-address`) a Ray cluster, keeps every model of `--config` at
its autoscaled size with healthy replicas, and publishes them to the Redis state store
(`--redis`, namespace `--cluster` or the config's), where routers discover them.

Prints exactly one line on stdout once every model has its first replicas:
`lmfleet controller ready models=NAME[,NAME...]`; logs (with every scaling decision and
its inputs) go to stderr; `--metrics-port` serves the controller's Prometheus metrics.
SIGINT/SIGTERM: drain and stop the replicas, exit 0.

Replicas listen on their node's IP (routers in other pods call them) unless
`--replica-host` or the config's `controller.replica_host` says otherwise; set
$LMFLEET_WORKER_TOKEN (e.g. from a Secret) here and in every router, so only they can call
the replicas (worker/auth.py).
"""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "controller",
        help="keep a fleet's replicas running, healthy and autoscaled (Ray), published "
        "in Redis for the routers",
        description="Run the controller of the fleet described by --config: replicas as "
        "Ray actors in placement groups, health checks, restarts, drains and autoscaling, "
        "published to the Redis state store that `lmfleet router --redis` reads. "
        "Environment: LMFLEET_WORKER_TOKEN, a shared secret the replicas then require on "
        "every Worker call; give the routers the same value.",
    )
    p.add_argument("--config", required=True, metavar="FLEET_YAML", help="the fleet config")
    p.add_argument("--redis", required=True, metavar="URL",
                   help="the state store (redis://HOST:PORT[/DB], rediss://, unix://)")
    p.add_argument("--cluster", default=None, metavar="NAME",
                   help="state store namespace (default: the config's `cluster`)")
    p.add_argument("--ray-address", default=None, metavar="ADDRESS",
                   help="join this Ray cluster (HOST:PORT or 'auto'; default: start one)")
    p.add_argument("--replica-host", default=None, metavar="HOST",
                   help="address the replicas listen on (default: the config's "
                   "controller.replica_host, else each node's IP)")
    p.add_argument("--metrics-port", type=int, default=None, metavar="PORT",
                   help="serve Prometheus metrics on this port (0: a free one)")
    p.add_argument("--metrics-host", default="127.0.0.1", metavar="HOST",
                   help="address the metrics server listens on (default 127.0.0.1; 0.0.0.0 "
                   "in a pod, so Prometheus and probes can reach it)")
    p.add_argument("--start-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long to wait for the first replicas of every model")
    p.add_argument("--log-level", default="info",
                   choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses
    import logging
    import signal
    import sys
    import threading

    from lmfleet.cluster.controller import FleetStartError
    from lmfleet.cluster.fleet_config import load_fleet_config
    from lmfleet.cluster.fleet_runtime import running_fleet
    from lmfleet.cluster.state import URL_SCHEMES, open_store

    if not args.redis.startswith(URL_SCHEMES):
        raise ValueError(f"--redis needs a Redis URL ({', '.join(URL_SCHEMES)}...)")
    if args.metrics_port is not None and not 0 <= args.metrics_port <= 65535:
        raise ValueError(f"invalid --metrics-port {args.metrics_port}")
    fleet = load_fleet_config(args.config)
    if args.cluster:
        fleet = dataclasses.replace(fleet, cluster=args.cluster)
    if args.replica_host:
        fleet = dataclasses.replace(fleet, controller=dataclasses.replace(
            fleet.controller, replica_host=args.replica_host))
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()

    class Stop(Exception):
        pass

    def interrupt(signum, frame) -> None:
        raise Stop()

    previous = {s: signal.signal(s, interrupt) for s in (signal.SIGINT, signal.SIGTERM)}

    def progress(message: str) -> None:
        print(f"lmfleet controller: {message}", file=sys.stderr, flush=True)

    store = open_store(args.redis, fleet.cluster)
    try:
        with running_fleet(fleet, store, args.ray_address, args.start_timeout, progress,
                           verbose=args.log_level == "debug") as controller:
            for signum in previous:
                signal.signal(signum, lambda signum, frame: stop.set())
            if args.metrics_port is not None:
                port = _serve_metrics(controller, args.metrics_port, args.metrics_host)
                progress(f"metrics on http://{args.metrics_host}:{port}/metrics")
            served = [m.name for m in fleet.models if m.name not in controller.start_failures]
            print(f"lmfleet controller ready models={','.join(served)}", flush=True)
            while not stop.wait(0.5):
                pass
            progress("shutting down")
        return 0
    except Stop:
        progress("interrupted while loading; replicas stopped")
        return 0
    except (FleetStartError, TimeoutError) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    finally:
        store.close()
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _serve_metrics(controller, port: int, host: str = "127.0.0.1") -> int:
    from prometheus_client import CollectorRegistry, start_http_server

    from lmfleet.cluster.controller_metrics import ControllerCollector

    registry = CollectorRegistry(auto_describe=True)
    registry.register(ControllerCollector(controller))
    server, _ = start_http_server(port, addr=host, registry=registry)
    return server.server_port
