"""A fleet in the test process (no tests here): a real local Ray cluster, the controller
and a router, so tests can reach the replicas' actors (to kill them) and the controller's
snapshots directly, while requests go through real HTTP.

    with in_process_fleet(fleet_config) as fleet:
        fleet.base_url, fleet.controller, fleet.ready("model")

The router runs on an event loop in a thread of its own; everything stops on exit
(router, replicas with a short drain, Ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

from lmfleet.cluster.controller import Controller
from lmfleet.cluster.fleet_config import FleetConfig
from lmfleet.cluster.fleet_runtime import running_fleet
from lmfleet.cluster.state import MEMORY_URL, MemoryStore, StateStore
from lmfleet.router.server import Router, RouterConfig

START_TIMEOUT_S = 400.0  # first replicas loading on a busy 2-core machine


@dataclass
class InProcessFleet:
    controller: Controller
    router: Router
    store: StateStore

    @property
    def base_url(self) -> str:
        return f"http://{self.router.http_address}"

    def ready(self, model: str) -> tuple[str, ...]:
        """Ids of the model's READY replicas after the controller's last round."""
        snapshot = self.controller.snapshot().get(model)
        return () if snapshot is None else snapshot.ready

    def settled_at(self, model: str) -> int:
        """The model's READY replica count when none is starting or draining, else -1."""
        snapshot = self.controller.snapshot().get(model)
        if snapshot is None or snapshot.starting or snapshot.draining:
            return -1
        return len(snapshot.ready)

    def wait_for(self, condition: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if condition():
                return True
            self.controller.wait_round(1.0)
        return condition()


def _progress(message: str) -> None:
    print(f"fleet: {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def in_process_fleet(fleet: FleetConfig, store: Optional[StateStore] = None,
                     store_url: str = MEMORY_URL, **router_options) -> Iterator[InProcessFleet]:
    """`router_options` go to the RouterConfig (e.g. replica_wait_s)."""
    store = store if store is not None else MemoryStore(fleet.cluster)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="test-router", daemon=True)
    thread.start()
    config = RouterConfig(store_url=store_url, cluster=fleet.cluster, http_port=0,
                          grpc_port=0, discovery_timeout=0.0, store_poll_interval=0.2,
                          poll_interval=0.2, **router_options)

    def on_loop(coroutine_fn):
        return asyncio.run_coroutine_threadsafe(coroutine_fn(), loop).result(60)

    try:
        with running_fleet(fleet, store, None, START_TIMEOUT_S, _progress) as controller:
            router = on_loop(lambda: _start_router(config, store))
            try:
                yield InProcessFleet(controller, router, store)
            finally:
                on_loop(router.stop)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


async def _start_router(config: RouterConfig, store: StateStore) -> Router:
    router = Router(config, store=store)
    await router.start()
    return router
