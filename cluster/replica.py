"""Rank 0 of a replica as a Ray actor: an `lmfleet worker` (engine + gRPC server) living in
the actor's process, placed by the controller in the replica's placement group.

Requests never pass through Ray: the router talks gRPC (worker.proto) straight to the
address `start()` returns, exactly as to a plain `lmfleet worker`. Ray only places,
watches and stops the process, so the data path costs what a plain worker costs.

The actor is threaded (`max_concurrency`) so the controller can call `wait_until_stopped`
(its death watch: the call returns when the replica is stopped on purpose and fails with
a RayActorError when the process dies) while `start()` is still loading the model.

    actor = replica_actor_class().options(...).remote(["--model", "default", ...])
    address, pid = ray.get(actor.start.remote(None))   # "NODE_IP:PORT" once loaded
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Optional

logger = logging.getLogger(__name__)

# start(), wait_until_stopped(), shutdown() and pid() may all be in progress at once.
ACTOR_MAX_CONCURRENCY = 4
# How often rank 0 of a tensor-parallel replica checks that its other ranks live.
RANK_WATCH_INTERVAL_S = 0.5
RANK_DIED_EXIT_CODE = 70


class ReplicaActor:
    """One replica's worker inside a Ray actor. Construct through `replica_actor_class()`.

    model, model_name: what to load and the name clients use for it; options: engine
        options by key (worker/options.py), checked on construction, so bad ones fail the
        actor's creation with a ValueError.
    """

    def __init__(self, model: str, model_name: str, options: dict) -> None:
        from lmfleet.worker.config import EngineConfig

        EngineConfig.from_options(model, **options)  # raises before anything loads
        self._model, self._model_name, self._options = model, model_name, dict(options)
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._server = None
        self._stopped = threading.Event()
        self._stopping = threading.Event()  # shutdown() began: ranks may end on purpose
        self._lock = threading.Lock()

    def start(self, host: Optional[str] = None,
              token: Optional[str] = None) -> tuple[str, int]:
        """Load the model and serve it; returns (the worker's gRPC address "HOST:PORT",
        this process's pid).

        host: the address to listen on (default: this node's IP as Ray knows it, so
        routers on other nodes can reach it).
        token: the worker token Worker calls must carry (default: $LMFLEET_WORKER_TOKEN
        of this process; none: open)."""
        import ray

        from lmfleet.worker.async_engine import AsyncEngine
        from lmfleet.worker.server import WorkerServer
        from lmfleet.worker.serving import build_engine

        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        host = host or ray.util.get_node_ip_address()
        parallel = (self._options.get("tensor_parallel_size", 1)
                    * self._options.get("pipeline_parallel_size", 1) > 1)
        start_ranks = None
        if parallel:  # the other ranks: actors in this replica's placement group
            from lmfleet.cluster.rank_actors import RayRanks

            start_ranks = RayRanks
        engine, model_name = build_engine(self._model, self._options, self._model_name,
                                          start_ranks)
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="replica-loop", daemon=True).start()

        async def serve() -> tuple[WorkerServer, int]:  # grpc.aio needs the loop running
            server = WorkerServer(AsyncEngine(engine), model_name, token=token)
            return server, await server.start(host, 0)

        server, port = asyncio.run_coroutine_threadsafe(serve(), loop).result()
        with self._lock:
            self._loop, self._server = loop, server
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        logger.info("replica of %s serving on %s (pid %d)", model_name, address, os.getpid())
        if parallel:
            threading.Thread(target=self._watch_ranks, args=(engine,), name="rank-watch",
                             daemon=True).start()
        return address, os.getpid()

    def _watch_ranks(self, engine) -> None:
        """A replica is its ranks together: when one of them dies, this process (rank 0)
        exits too, so Ray reports the actor dead and the controller replaces the whole
        replica at once (rather than a replica whose every step would fail)."""
        while not self._stopped.wait(RANK_WATCH_INTERVAL_S):
            dead = engine.dead_ranks()
            if dead and not self._stopping.is_set():
                logger.error("replica rank(s) died: %s; stopping the replica",
                             ", ".join(dead))
                os._exit(RANK_DIED_EXIT_CODE)

    def wait_until_stopped(self) -> bool:
        """Blocks until `shutdown()` ran; the controller's death watch (see module doc)."""
        self._stopped.wait()
        return True

    def shutdown(self, drain_timeout: float = 0.0) -> int:
        """Drain for up to `drain_timeout` s, abort what is left, stop serving. Returns
        how many requests were aborted. Idempotent."""
        self._stopping.set()
        with self._lock:
            loop, server, self._server = self._loop, self._server, None
        aborted = 0
        if server is not None and loop is not None:
            aborted = asyncio.run_coroutine_threadsafe(
                server.shutdown(drain_timeout), loop).result()
            loop.call_soon_threadsafe(loop.stop)
        self._stopped.set()
        return aborted

    def pid(self) -> int:
        return os.getpid()


def replica_actor_class():
    """The Ray actor class of `ReplicaActor` (Ray is imported only when a fleet runs)."""
    import ray

    return ray.remote(max_concurrency=ACTOR_MAX_CONCURRENCY)(ReplicaActor)
