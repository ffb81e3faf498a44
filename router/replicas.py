"""The router's live view of its workers: replicas grouped by model, with load and health.

`ReplicaRegistry` owns one gRPC channel per worker address. `discover()` asks every
worker for its `ModelInfo` and groups workers by model name (several models behind one
endpoint); a worker that does not answer stays pending and is retried by the poller. The
poller (`start()` / `stop()`, one asyncio task) calls `GetLoad` on every replica each
`poll_interval` seconds: an answer marks the replica healthy and records its LoadReport,
a failure marks it unhealthy until the next answer. The generation path marks a replica
unhealthy at once when a call to it fails with UNAVAILABLE.

Replicas can also come and go while the router runs (`add_replica` / `remove_replica`,
driven by router/store_sync.py from the shared state store): a model appears with its
first replica and disappears `empty_model_grace_s` after its last one went (unless a
replacement came; meanwhile requests wait for it rather than get a 404); a removed
replica's channel is closed once the requests it still serves have finished. When a
`SessionDirectory` is attached (`registry.sessions`), `ModelReplicas.select_for`
(router/model_replicas.py) keeps a session's binding there, so several routers send one
session to the same replica.

With $LMFLEET_WORKER_TOKEN set, every call on these channels carries it (a client
interceptor, worker/auth.py), as workers started with the same token require.

Everything here runs on the router's event loop; nothing needs a lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Optional

import grpc

from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.router.admission import Admission
from lmfleet.router.errors import InvalidRequestError, ModelNotFoundError
from lmfleet.router.model_replicas import ModelReplicas, Replica, SessionDirectory
from lmfleet.router.policies import make_policy
from lmfleet.router.tokenizer import ModelTokenizer
from lmfleet.worker.auth import WORKER_TOKEN_ENV, client_interceptors, worker_token_from_env
from lmfleet.worker.chat_images import MAX_GENERATE_REQUEST_BYTES

logger = logging.getLogger(__name__)

# Reconnect quickly to a worker that comes back (gRPC's default backoff grows to 120 s).
CHANNEL_OPTIONS = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # A Generate request carries its images; the worker takes as much.
    ("grpc.max_send_message_length", MAX_GENERATE_REQUEST_BYTES),
)


TokenizerLoader = Callable[[str, str], ModelTokenizer]


class ReplicaRegistry:
    """All workers of this router, by model.

    `model_policies` maps a model name to a policy name; others use `default_policy`.
    `tokenizer_loader(model_path, model_name)` loads a model's tokenizer (blocking; it
    runs in a thread). `worker_token` is sent on every worker call (default:
    $LMFLEET_WORKER_TOKEN; none: calls carry no token).
    """

    def __init__(self, addresses: Sequence[str], tokenizer_loader: TokenizerLoader,
                 default_policy: str = "least_loaded",
                 model_policies: Optional[dict[str, str]] = None,
                 max_in_flight: Optional[int] = None, max_queued: Optional[int] = None,
                 poll_interval: float = 0.5, rpc_timeout: float = 2.0,
                 allow_no_workers: bool = False,
                 worker_token: Optional[str] = None,
                 empty_model_grace_s: float = 0.0) -> None:
        if not addresses and not allow_no_workers:
            raise ValueError("at least one worker address is needed")
        make_policy(default_policy)  # ValueError for an unknown name, before any I/O
        for name in (model_policies or {}).values():
            make_policy(name)
        self._tokenizer_loader = tokenizer_loader
        self._default_policy = default_policy
        self._model_policies = dict(model_policies or {})
        self._max_in_flight = max_in_flight
        self._max_queued = max_queued
        self._poll_interval = poll_interval
        self._rpc_timeout = rpc_timeout
        self._channels: dict[str, grpc.aio.Channel] = {}
        self._pending: list[str] = list(dict.fromkeys(addresses))
        self.models: dict[str, ModelReplicas] = {}
        self._poller: Optional[asyncio.Task] = None
        self._static_addresses = frozenset(self._pending)
        self._tokenizers: dict[tuple[str, str], ModelTokenizer] = {}
        self._retired: list[Replica] = []  # removed; channel closed when idle
        self.sessions: Optional[SessionDirectory] = None
        self._interceptors = client_interceptors(worker_token or worker_token_from_env())
        self._auth_warned: set[str] = set()  # addresses whose token refusal was logged
        # A model whose last replica was removed stays this long (requests wait for a
        # replacement instead of a 404); `_emptied_at` holds when it emptied.
        self._empty_model_grace_s = empty_model_grace_s
        self._emptied_at: dict[str, float] = {}

    # ---- lookup -----------------------------------------------------------------------
    def get(self, model: Optional[str]) -> ModelReplicas:
        """The model's replicas; `None` or "" means the only model served.

        Raises ModelNotFoundError for an unknown name, InvalidRequestError when the name is
        omitted but several models are served.
        """
        if not model:
            if len(self.models) == 1:
                return next(iter(self.models.values()))
            if not self.models:
                raise ModelNotFoundError("no model is being served yet")
            raise InvalidRequestError("model is required: this endpoint serves "
                                      f"{', '.join(sorted(self.models))}", param="model")
        try:
            return self.models[model]
        except KeyError:
            raise ModelNotFoundError(f"The model `{model}` does not exist.",
                                     param="model") from None

    @property
    def pending_addresses(self) -> list[str]:
        return list(self._pending)

    @property
    def static_addresses(self) -> frozenset[str]:
        """The worker addresses given at construction."""
        return self._static_addresses

    def mark_unhealthy(self, replica: Replica) -> None:
        if replica.healthy:
            logger.warning("replica %s (%s) marked unhealthy", replica.address,
                           replica.model_name)
        replica.healthy = False

    # ---- discovery and polling ----------------------------------------------------------
    async def discover(self, timeout: float) -> None:
        """Ask pending workers for their model until all answered or `timeout` passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._pending:
            await self._discover_pending()
            if not self._pending or loop.time() >= deadline:
                break
            await asyncio.sleep(min(self._poll_interval, max(0.0, deadline - loop.time())))
        for address in self._pending:
            logger.warning("worker %s did not answer yet; will keep trying", address)

    async def _discover_pending(self) -> None:
        results = await asyncio.gather(*(self._model_info(a) for a in self._pending))
        for address, info in zip(list(self._pending), results, strict=True):
            if info is None:
                continue
            await self.add_replica(address, info)
            self._pending.remove(address)

    async def model_info(self, address: str) -> Optional[worker_pb2.ModelInfo]:
        """The worker's GetModelInfo answer, or None if it did not answer in time."""
        return await self._model_info(address)

    async def _model_info(self, address: str) -> Optional[worker_pb2.ModelInfo]:
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        try:
            return await stub.GetModelInfo(worker_pb2.GetModelInfoRequest(),
                                           timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.UNAUTHENTICATED:
                # A token mismatch never heals by itself: say so once, loudly.
                if address not in self._auth_warned:
                    self._auth_warned.add(address)
                    logger.error("worker %s refused the router's worker token (is "
                                 "$%s the same on both?): %s", address, WORKER_TOKEN_ENV,
                                 error.details())
            else:
                logger.debug("GetModelInfo(%s) failed: %s", address, error.code())
            return None

    async def add_replica(self, address: str, info: worker_pb2.ModelInfo,
                          replica_id: Optional[str] = None) -> Replica:
        """Route `info.model_name` to the worker at `address` too (creating the model,
        with its tokenizer, on its first replica)."""
        name = info.model_name
        if name not in self.models:
            key = (info.model_path, name)
            if key not in self._tokenizers:  # a model that comes back keeps its tokenizer
                self._tokenizers[key] = await asyncio.to_thread(
                    self._tokenizer_loader, info.model_path, name)
            policy = make_policy(self._model_policies.get(name, self._default_policy))
            self.models[name] = ModelReplicas(
                name=name, tokenizer=self._tokenizers[key], policy=policy,
                admission=Admission(name, self._max_in_flight, self._max_queued),
                sessions=self.sessions)
        stub = worker_pb2_grpc.WorkerStub(self._channel(address))
        replica = Replica(address=address, info=info, stub=stub, replica_id=replica_id or "")
        self.models[name].add(replica)
        logger.info("worker %s serves model %s (max_model_len %d)", address, name,
                    info.max_model_len)
        return replica

    def remove_replica(self, replica: Replica) -> None:
        """Stop routing to `replica`; its model goes `empty_model_grace_s` after its last
        replica does (at once when 0). Requests it serves now finish; its channel is
        closed by the poller once they have."""
        model = self.models.get(replica.model_name)
        if model is None or not any(r is replica for r in model.replicas):
            return
        model.remove(replica)
        if not model.replicas:
            if self._empty_model_grace_s > 0:
                self._emptied_at[model.name] = time.monotonic()
                logger.info("model %s has no replica left; waiting %.0f s for one",
                            model.name, self._empty_model_grace_s)
            else:
                self._forget_model(model.name)
        self._retired.append(replica)
        logger.info("replica %s (%s) removed", replica.address, replica.model_name)

    def _forget_model(self, name: str) -> None:
        self.models.pop(name, None)
        self._emptied_at.pop(name, None)
        logger.info("model %s has no replica left; no longer served", name)

    def _forget_empty_models(self) -> None:
        now = time.monotonic()
        for name, since in list(self._emptied_at.items()):
            model = self.models.get(name)
            if model is not None and model.replicas:
                del self._emptied_at[name]  # a replacement came
            elif now - since >= self._empty_model_grace_s:
                self._forget_model(name)

    async def _close_idle_channels(self) -> None:
        in_use = {r.address for m in self.models.values() for r in m.replicas}
        in_use.update(self._pending)
        busy = {r.address for r in self._retired if r.in_flight > 0}
        for replica in self._retired:
            address = replica.address
            if address not in in_use and address not in busy and address in self._channels:
                await self._channels.pop(address).close()
        self._retired = [r for r in self._retired if r.address in busy]

    def _channel(self, address: str) -> grpc.aio.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.aio.insecure_channel(
                address, options=CHANNEL_OPTIONS, interceptors=self._interceptors)
        return self._channels[address]

    async def poll_once(self) -> None:
        """One round: refresh every replica's load and health, retry pending workers."""
        replicas = [r for m in self.models.values() for r in m.replicas]
        await asyncio.gather(*(self._poll_replica(r) for r in replicas))
        if self._pending:
            await self._discover_pending()
        if self._retired:
            await self._close_idle_channels()
        if self._emptied_at:
            self._forget_empty_models()

    async def _poll_replica(self, replica: Replica) -> None:
        try:
            replica.load = await replica.stub.GetLoad(worker_pb2.GetLoadRequest(),
                                                      timeout=self._rpc_timeout)
        except grpc.aio.AioRpcError:
            self.mark_unhealthy(replica)
            return
        if not replica.healthy:
            logger.info("replica %s (%s) is healthy again", replica.address,
                        replica.model_name)
        replica.healthy = True

    def start(self) -> None:
        """Start the background poller (idempotent)."""
        if self._poller is None:
            self._poller = asyncio.get_running_loop().create_task(self._poll_forever())

    async def _poll_forever(self) -> None:
        while True:
            try:
                await self.poll_once()
            except Exception:  # a bug here must not stop health tracking for good
                logger.exception("replica poll failed")
            await asyncio.sleep(self._poll_interval)

    async def stop(self) -> None:
        """Stop the poller and close every channel."""
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for channel in self._channels.values():
            await channel.close()
        self._channels.clear()
