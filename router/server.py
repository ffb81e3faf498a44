"""Running the router: HTTP (uvicorn + FastAPI) and gRPC (grpc.aio) in one event loop.

    config = RouterConfig(workers=("127.0.0.1:50061",), http_port=0, grpc_port=0)
    async with Router(config) as router:       # or: await router.start() / router.stop()
        print(router.http_address, router.grpc_address)

`Router.start()` asks every worker for its model (GetModelInfo), groups workers by model
name, loads each model's tokenizer, starts the load/health poller, then both servers.
Workers that do not answer within `discovery_timeout` are retried in the background and
join their model when they do.

With a state store (`store_url`: "redis://HOST:PORT" shared by several routers, or
"memory://" for an in-process store that code in this process publishes to through
`router.store`), replicas are also discovered from the store: models appear and disappear
with their published replicas, and session bindings are kept in the store so every
router sends a session to the same replica (router/store_sync.py).

`serve_router(config, ready)` runs a Router until its task is cancelled or `stop_event`
is set (what `lmfleet router` does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Optional

import grpc
import uvicorn

from lmfleet.cluster.state import (
    DEFAULT_CLUSTER,
    MEMORY_URL,
    URL_SCHEMES,
    StateStore,
    open_store,
)
from lmfleet.router.app import HttpContext, create_app
from lmfleet.router.auth import ApiKeyAuth
from lmfleet.router.drain import Drain
from lmfleet.router.generation import DEFAULT_MAX_ATTEMPTS, DEFAULT_REPLICA_WAIT_S, Generation
from lmfleet.router.grpc_api import ServingServicer, add_grpc_services
from lmfleet.router.http_gate import DEFAULT_BODY_TIMEOUT_S, MAX_HEADER_BYTES
from lmfleet.router.http_protocol import DEFAULT_HEADER_TIMEOUT_S, protocol_with_header_timeout
from lmfleet.router.images import ImageOptions
from lmfleet.router.metrics import RouterMetrics
from lmfleet.router.policies import DEFAULT_POLICY, make_policy
from lmfleet.router.replicas import ReplicaRegistry, TokenizerLoader
from lmfleet.router.sockets import ListenError, check_port_free, tcp_listener
from lmfleet.router.store_sync import StoreSync
from lmfleet.router.tokenizer import load_model_tokenizer

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class RouterConfig:
    """How to run one router. Ports may be 0 (a free port is picked; see Router.*_address).

    workers: worker gRPC addresses ("host:port"); their models are discovered.
    store_url: a state store to discover replicas from and share sessions through:
        "redis://HOST:PORT[/DB]" (also rediss://, unix://) or "memory://"; None: none.
        At least one of `workers` and `store_url` is needed.
    cluster: the store namespace (keys `lmfleet:{cluster}:...`).
    store_poll_interval: seconds between listings of the store's replicas.
    session_ttl: seconds a session binding lives in the store after its last request.
    api_key: required as `Bearer` on /v1/* and on lmfleet.v1.Serving; None: open.
    max_in_flight / max_queued: admission limits per model (None: unlimited).
    policy: default routing policy; model_policies: (model, policy) overrides.
    max_body_bytes: larger HTTP bodies get 413.
    request_timeout: seconds every HTTP request may take (gRPC uses the client deadline).
    body_timeout_s: seconds an HTTP request body may stall between reads (then 408).
    header_timeout_s: seconds an HTTP request's line and headers may take (then 408).
    webui: serve the built-in chat page at / (router/webui/index.html).
    allow_image_urls: fetch http(s) image URLs of chat requests (router/images.py);
        otherwise images come inline only (data URLs, gRPC bytes).
    drain_timeout: on stop, seconds running requests may take to finish (router/drain.py).
    max_attempts: replicas tried per completion before UNAVAILABLE / 503.
    replica_wait_s: while no replica of the model can take a request (its replacement is
        starting, all are unhealthy), how long the request waits for one before 503; a
        model whose last replica went away is kept (not 404) that long too.
    poll_interval: seconds between load/health polls of each worker.
    discovery_timeout: seconds start() waits for workers to report their model.
    """

    workers: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 50051
    api_key: Optional[str] = None
    max_in_flight: Optional[int] = None
    max_queued: Optional[int] = None
    policy: str = DEFAULT_POLICY
    model_policies: tuple[tuple[str, str], ...] = ()
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    request_timeout: Optional[float] = None
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    webui: bool = True
    allow_image_urls: bool = False
    drain_timeout: float = 30.0
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    replica_wait_s: float = DEFAULT_REPLICA_WAIT_S
    poll_interval: float = 0.5
    discovery_timeout: float = 60.0
    store_url: Optional[str] = None
    cluster: str = DEFAULT_CLUSTER
    store_poll_interval: float = 0.5
    session_ttl: float = 3600.0

    def __post_init__(self) -> None:
        if isinstance(self.workers, str):
            raise ValueError("workers must be a sequence of HOST:PORT addresses")
        if not self.workers and self.store_url is None:
            raise ValueError("at least one worker address is needed (--worker HOST:PORT), "
                             "or a state store to discover them from (--redis URL)")
        if self.store_url is not None and not (
                self.store_url == MEMORY_URL or self.store_url.startswith(URL_SCHEMES)):
            raise ValueError(f"state store URL {self.store_url!r} must be {MEMORY_URL} or "
                             f"start with {', '.join(URL_SCHEMES)}")
        if not self.cluster:
            raise ValueError("cluster must be a non-empty name")
        if self.store_poll_interval <= 0 or self.session_ttl <= 0:
            raise ValueError("store_poll_interval and session_ttl must be positive")
        object.__setattr__(self, "workers", tuple(self.workers))
        for address in self.workers:
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                raise ValueError(f"worker address {address!r} is not HOST:PORT")
        for name, port in (("http_port", self.http_port), ("grpc_port", self.grpc_port)):
            if not 0 <= port <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {port}")
        make_policy(self.policy)
        for _, policy in self.model_policies:
            make_policy(policy)
        if self.max_in_flight is not None and self.max_in_flight < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {self.max_in_flight}")
        if self.max_queued is not None and self.max_queued < 0:
            raise ValueError(f"max_queued must be >= 0, got {self.max_queued}")
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {self.max_body_bytes}")
        if self.request_timeout is not None and self.request_timeout <= 0:
            raise ValueError(f"request_timeout must be positive, got {self.request_timeout}")
        if not self.body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be positive, got {self.body_timeout_s}")
        if not self.header_timeout_s > 0:
            raise ValueError(f"header_timeout_s must be positive, got {self.header_timeout_s}")
        if not self.drain_timeout >= 0:
            raise ValueError(f"drain_timeout must be >= 0, got {self.drain_timeout}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if not self.replica_wait_s >= 0:
            raise ValueError(f"replica_wait_s must be >= 0, got {self.replica_wait_s}")
        if self.poll_interval <= 0 or self.discovery_timeout < 0:
            raise ValueError("poll_interval must be > 0 and discovery_timeout >= 0")


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its signal handlers: the process owner (CLI, `lmfleet serve`, a
    test) decides when to stop, through Router.stop()."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Router:
    """Both front doors over one ReplicaRegistry. Start once, stop once."""

    def __init__(self, config: RouterConfig,
                 tokenizer_loader: TokenizerLoader = load_model_tokenizer,
                 store: Optional[StateStore] = None) -> None:
        """store: a state store object to discover replicas from (e.g. the MemoryStore a
        controller in this process publishes to); it takes the place of
        `config.store_url`, which must then be set (MEMORY_URL for an in-process one)."""
        self.config = config
        self.registry = ReplicaRegistry(
            config.workers, tokenizer_loader, default_policy=config.policy,
            model_policies=dict(config.model_policies), max_in_flight=config.max_in_flight,
            max_queued=config.max_queued, poll_interval=config.poll_interval,
            allow_no_workers=config.store_url is not None,
            empty_model_grace_s=config.replica_wait_s)
        self.store: Optional[StateStore] = None
        self.store_sync: Optional[StoreSync] = None
        if store is not None and config.store_url is None:
            raise ValueError("a router given a store needs config.store_url set")
        if config.store_url is not None:
            self.store = store if store is not None else open_store(config.store_url,
                                                                     config.cluster)
            self.store_sync = StoreSync(self.store, self.registry, config.store_poll_interval,
                                        config.session_ttl)
        self.metrics = RouterMetrics(self.registry)
        self.generation = Generation(self.registry, self.metrics, config.max_attempts,
                                     config.replica_wait_s)
        self.auth = ApiKeyAuth(config.api_key)
        self.drain = Drain()
        self._http: Optional[_EmbeddedUvicorn] = None
        self._http_task: Optional[asyncio.Task] = None
        self._grpc: Optional[grpc.aio.Server] = None
        self.http_port: Optional[int] = None
        self.grpc_port: Optional[int] = None

    @property
    def http_address(self) -> str:
        return f"{self.config.host}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    async def start(self) -> None:
        """Discover workers, then serve HTTP and gRPC. Raises ListenError (an OSError
        naming the port) if a port is taken, before waiting for any worker.

        With a store, start-up lists it once; an unreachable store is not fatal (a
        warning; discovery keeps trying in the background)."""
        # A taken port is reported now, naming it, not after discovery has waited.
        check_port_free(self.config.host, self.config.http_port, "HTTP port")
        check_port_free(self.config.host, self.config.grpc_port, "gRPC port")
        await self.registry.discover(self.config.discovery_timeout)
        self.registry.start()
        if self.store_sync is not None:
            await self.store_sync.sync_once()
            self.store_sync.start()
        try:
            await self._start_grpc()
            await self._start_http()
        except BaseException:
            await self.stop()
            raise
        logger.info("router serving %s (http %s, grpc %s)",
                    ", ".join(self.registry.models) or "no model yet", self.http_address,
                    self.grpc_address)

    async def _start_grpc(self) -> None:
        # gRPC sets SO_REUSEPORT by default: a second server on a taken port would bind
        # without error and share (steal) the other's connections.
        self._grpc = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            # The HTTP door's limits: a request message as large as a body may be
            # (larger: RESOURCE_EXHAUSTED before any handler runs), metadata as headers.
            ("grpc.max_receive_message_length", self.config.max_body_bytes),
            ("grpc.max_metadata_size", MAX_HEADER_BYTES),
            # Ping idle clients so connections of vanished ones are closed, not kept.
            ("grpc.keepalive_time_ms", 60_000), ("grpc.keepalive_timeout_ms", 20_000),
        ])
        await add_grpc_services(self._grpc, ServingServicer(self.registry, self.generation,
                                                            self.auth))
        host, port = self.config.host, self.config.grpc_port
        try:
            bound = self._grpc.add_insecure_port(f"{host}:{port}")
        except RuntimeError:
            bound = 0
        if bound == 0:
            # gRPC does not say why; a plain bind does (in use, no such address, ...).
            check_port_free(host, port, "gRPC port")
            raise ListenError(f"cannot listen on {host}:{port} (gRPC port)")
        self.grpc_port = bound
        await self._grpc.start()

    async def _start_http(self) -> None:
        app = create_app(HttpContext(
            registry=self.registry, generation=self.generation, metrics=self.metrics,
            auth=self.auth, max_body_bytes=self.config.max_body_bytes,
            request_timeout=self.config.request_timeout,
            body_timeout_s=self.config.body_timeout_s, drain=self.drain,
            webui=self.config.webui,
            images=ImageOptions(allow_urls=self.config.allow_image_urls)))
        # IPPROTO_TCP, so that asyncio sets TCP_NODELAY on every accepted connection.
        sock = tcp_listener(self.config.host, self.config.http_port, "HTTP port")
        self.http_port = sock.getsockname()[1]
        self._http = _EmbeddedUvicorn(uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="off",
            http=protocol_with_header_timeout(self.config.header_timeout_s),
            h11_max_incomplete_event_size=MAX_HEADER_BYTES,
            # Past the drain deadline every request ends by itself (drain.py); this is only
            # the backstop for a response that would not.
            timeout_graceful_shutdown=self.config.drain_timeout + 5))
        self._http_task = asyncio.get_running_loop().create_task(
            self._http.serve(sockets=[sock]))
        while not self._http.started:  # bounded: serve() either starts or ends the task
            if self._http_task.done():
                self._http_task.result()
                raise OSError("the HTTP server stopped during start-up")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop gracefully: stop accepting connections, refuse new requests (JSON 503),
        let running ones finish for up to `drain_timeout` s, then end the rest cleanly
        (streams with an error event and [DONE], others with a JSON 503; gRPC calls get
        the same grace). Then the poller and the worker channels. Safe to call twice."""
        grace = self.config.drain_timeout
        tasks = []
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True  # closes the listening socket first
            tasks.append(self._stop_http(grace))
        if self._grpc is not None:
            tasks.append(self._grpc.stop(grace=grace))
        await asyncio.gather(self.drain.drain(grace), *tasks)
        self._http, self._http_task, self._grpc = None, None, None
        if self.store_sync is not None:
            await self.store_sync.stop()
        await self.registry.stop()

    async def _stop_http(self, grace: float) -> None:
        try:
            await asyncio.wait_for(asyncio.shield(self._http_task), grace + 10)
        except asyncio.TimeoutError:
            self._http.force_exit = True
            await self._http_task

    async def __aenter__(self) -> Router:
        await self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


async def serve_router(config: RouterConfig,
                       ready: Optional[Callable[[Router], None]] = None,
                       stop_event: Optional[asyncio.Event] = None) -> None:
    """Run a router until `stop_event` is set or this coroutine is cancelled.

    `ready(router)` is called once both servers accept connections.
    """
    router = Router(config)
    await router.start()
    try:
        if ready is not None:
            ready(router)
        await (stop_event or asyncio.Event()).wait()
    finally:
        await router.stop()
