"""Discovery from the state store: keeps a router's ReplicaRegistry in step with the
replicas published in a `StateStore` (cluster/state/), and shares session bindings
through it.

`StoreSync.start()` runs one asyncio task that lists the store's replicas every
`poll_interval` seconds and reconciles the registry:

- a new record (model, replica_id) is added once its worker answers GetModelInfo (the
  same query static workers get); until then it is retried on every round. A worker whose
  ModelInfo names another model than its record is skipped, with a warning;
- a record whose address changed (the replica restarted elsewhere) replaces the old one;
- its `healthy` flag becomes the replica's `published_healthy` (the router's own load
  polls still decide `healthy`);
- a replica missing from the store is removed only after it has been missing, in
  successful listings, for its last TTL. A replica that stops heartbeating is already
  gone from the store after its TTL (and marked unhealthy by the router's own polls much
  sooner), so the delay costs nothing in routing; what it buys is that a Redis that
  restarts empty (or a listing that races the publishers' first heartbeats after it)
  does not make every model vanish for a moment: live publishers republish within their
  TTL, and only replicas that really stopped are removed.

When the store cannot be reached the router keeps serving from its last view: a warning
is logged once, listing is retried every round, and the next successful listing
resynchronises (logged). Session bindings (`get_session` / `set_session`, the registry's
SessionDirectory) go to the store with `session_ttl`; while the store is known to be down
they are skipped at once (None), so requests fall back to this router's own affinity
without waiting on timeouts.

The store's calls are synchronous; they run in worker threads (`asyncio.to_thread`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Optional

from lmfleet.cluster.state import ReplicaRecord, StateStore, StateStoreError
from lmfleet.router.model_replicas import Replica
from lmfleet.router.replicas import ReplicaRegistry

logger = logging.getLogger(__name__)

_Key = tuple[str, str]  # (model, replica_id)


class StoreSync:
    """Store-driven discovery and shared sessions for one router; see the module doc."""

    def __init__(self, store: StateStore, registry: ReplicaRegistry,
                 poll_interval: float = 0.5, session_ttl: float = 3600.0) -> None:
        if poll_interval <= 0 or session_ttl <= 0:
            raise ValueError("poll_interval and session_ttl must be positive")
        self.store = store
        self.registry = registry
        self.poll_interval = poll_interval
        self.session_ttl = session_ttl
        # Whether the last store call succeeded; session calls are skipped while not.
        self.available = True
        self._replicas: dict[_Key, Replica] = {}
        self._ttls: dict[_Key, float] = {}
        self._missing_since: dict[_Key, float] = {}
        self._mismatch_warned: set[_Key] = set()
        self._task: Optional[asyncio.Task] = None
        # The registry's models keep their session bindings here from now on.
        registry.sessions = self
        for model in registry.models.values():
            model.sessions = self

    # ---- discovery ----------------------------------------------------------------------
    async def sync_once(self) -> bool:
        """List the store and reconcile the registry. False (and nothing changed) when
        the store is unavailable."""
        try:
            records = await asyncio.to_thread(self.store.list_replicas)
        except StateStoreError as error:
            self._mark_unavailable(error)
            return False
        if not self.available:
            logger.warning("state store %s is back; resynchronising", self.store)
        self.available = True
        await self._reconcile(records)
        return True

    async def _reconcile(self, records: list[ReplicaRecord]) -> None:
        now = asyncio.get_running_loop().time()
        static = self.registry.static_addresses
        published = {(r.model, r.replica_id): r for r in records if r.address not in static}
        new: list[ReplicaRecord] = []
        for key, record in published.items():
            self._missing_since.pop(key, None)
            self._ttls[key] = record.ttl_s
            replica = self._replicas.get(key)
            if replica is not None and replica.address != record.address:
                logger.info("replica %s of %s moved from %s to %s", record.replica_id,
                            record.model, replica.address, record.address)
                self._drop(key)
                replica = None
            if replica is None:
                new.append(record)
            else:
                replica.published_healthy = record.healthy
        for key in [k for k in self._replicas if k not in published]:
            missing_since = self._missing_since.setdefault(key, now)
            if now - missing_since >= self._ttls.get(key, 0.0):
                self._drop(key)
        self._ttls = {k: t for k, t in self._ttls.items()
                      if k in published or k in self._replicas}
        infos = await asyncio.gather(*(self.registry.model_info(r.address) for r in new))
        for record, info in zip(new, infos, strict=True):
            key = (record.model, record.replica_id)
            if info is None:
                logger.debug("published replica %s at %s does not answer yet",
                             record.replica_id, record.address)
            elif info.model_name != record.model:
                if key not in self._mismatch_warned:
                    self._mismatch_warned.add(key)
                    logger.warning("replica %s is published as model %r but its worker at "
                                   "%s serves %r; ignoring it", record.replica_id,
                                   record.model, record.address, info.model_name)
            elif key not in self._replicas:
                replica = await self.registry.add_replica(record.address, info,
                                                          replica_id=record.replica_id)
                replica.published_healthy = record.healthy
                self._replicas[key] = replica
                self._mismatch_warned.discard(key)

    def _drop(self, key: _Key) -> None:
        replica = self._replicas.pop(key)
        self._missing_since.pop(key, None)
        self.registry.remove_replica(replica)

    def _mark_unavailable(self, error: Exception) -> None:
        if self.available:
            num = len(self._replicas)
            logger.warning("state store %s unavailable (%s); serving the last view (%d "
                           "published replica%s) and retrying every %.1f s", self.store,
                           error, num, "" if num == 1 else "s", self.poll_interval)
        self.available = False

    @property
    def published_replicas(self) -> dict[_Key, Replica]:
        """The registry's replicas that came from the store, by (model, replica_id)."""
        return dict(self._replicas)

    def start(self) -> None:
        """Start the background listing (idempotent)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._sync_forever())

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                await self.sync_once()
            except Exception:  # a bug here must not stop discovery for good
                logger.exception("state store sync failed")

    async def stop(self) -> None:
        """Stop the background listing and close the store's connections."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.to_thread(self.store.close)

    # ---- sessions (the registry's SessionDirectory) -------------------------------------
    async def get_session(self, model: str, session_id: str) -> Optional[str]:
        if not self.available:
            return None
        try:
            return await asyncio.to_thread(self.store.get_session, model, session_id)
        except StateStoreError as error:
            self._mark_unavailable(error)
            return None

    async def set_session(self, model: str, session_id: str, replica_id: str) -> None:
        if not self.available:
            return
        try:
            await asyncio.to_thread(self.store.set_session, model, session_id, replica_id,
                                    self.session_ttl)
        except StateStoreError as error:
            self._mark_unavailable(error)
