"""Routers sharing a state store (router/store_sync.py, ModelReplicas.select_for): session
bindings followed across routers, and the registry reconciled with published replicas.
Workers here are small in-process gRPC servers that answer GetModelInfo and GetLoad (no
model); the router side is the real one. The end-to-end version with real workers,
Redis and router processes is tests/integration/test_router_state_store.py."""

from __future__ import annotations

import asyncio
import logging
import socket

import grpc
import pytest

from lmfleet.cluster.state import MemoryStore, RedisStore, ReplicaRecord
from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.router.admission import Admission
from lmfleet.router.model_replicas import ModelReplicas, Replica
from lmfleet.router.policies import RoundRobinPolicy, RouteRequest
from lmfleet.router.replicas import ReplicaRegistry
from lmfleet.router.server import RouterConfig
from lmfleet.router.store_sync import StoreSync

LONG = 600.0


def registry() -> ReplicaRegistry:
    return ReplicaRegistry([], tokenizer_loader=lambda path, name: None,
                           allow_no_workers=True, rpc_timeout=5.0)


def router_view(sessions: StoreSync) -> ModelReplicas:
    """One router's replicas of model "m": a and b, round robin."""
    model = ModelReplicas(name="m", tokenizer=None, policy=RoundRobinPolicy(),
                          admission=Admission("m"), sessions=sessions)
    for address in ("a", "b"):
        info = worker_pb2.ModelInfo(model_name="m", max_model_len=64)
        model.add(Replica(address=address, info=info, stub=None, replica_id=f"r-{address}"))
    return model


def session(session_id: str = "chat-1") -> RouteRequest:
    return RouteRequest(model="m", session_id=session_id)


def test_two_routers_on_one_store_send_a_session_to_the_same_replica():
    async def scenario():
        store = MemoryStore()
        first, second = (router_view(StoreSync(store, registry())) for _ in range(2))
        # Without the store the second router would start the session on b: its
        # round-robin cursor is one ahead of the first router's.
        assert second.select(RouteRequest(model="m")).address == "a"
        picks = []
        for turn in range(4):
            picks.append((await (first, second)[turn % 2].select_for(session())).address)
        assert picks == ["a"] * 4
        assert store.get_session("m", "chat-1") == "r-a"
        # A new session on the second router starts where its own policy says.
        assert (await second.select_for(session("chat-2"))).address == "b"
        assert (await first.select_for(session("chat-2"))).address == "b"

    asyncio.run(scenario())


def test_a_session_moves_when_its_replica_cannot_take_it_and_the_move_is_shared():
    async def scenario():
        store = MemoryStore()
        first, second = (router_view(StoreSync(store, registry())) for _ in range(2))
        assert (await first.select_for(session())).address == "a"
        assert (await first.select_for(session(), exclude=["a"])).address == "b"
        assert store.get_session("m", "chat-1") == "r-b"
        second.replicas[1].published_healthy = False  # b's publisher reports it unhealthy
        assert (await second.select_for(session())).address == "a"
        assert store.get_session("m", "chat-1") == "r-a"

    asyncio.run(scenario())


def test_without_a_reachable_store_a_router_keeps_its_own_session_affinity():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    async def scenario():
        sync = StoreSync(RedisStore(f"redis://127.0.0.1:{port}"), registry())
        model = router_view(sync)
        assert model.select(RouteRequest(model="m")).address == "a"
        picks = [(await model.select_for(session())).address for _ in range(3)]
        assert picks == ["b"] * 3
        assert sync.available is False
        assert await sync.sync_once() is False

    asyncio.run(scenario())


class _FakeWorker(worker_pb2_grpc.WorkerServicer):
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name

    async def GetModelInfo(self, request, context):
        return worker_pb2.ModelInfo(model_name=self.model_name, model_path="/no/such/dir",
                                    max_model_len=64, vocab_size=100)

    async def GetLoad(self, request, context):
        return worker_pb2.LoadReport(num_running=0)


async def _start_fake_worker(model_name: str) -> tuple[grpc.aio.Server, str]:
    server = grpc.aio.server()
    worker_pb2_grpc.add_WorkerServicer_to_server(_FakeWorker(model_name), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, f"127.0.0.1:{port}"


def test_the_registry_follows_the_store(caplog):
    caplog.set_level(logging.WARNING)

    async def scenario():
        servers, addresses = [], []
        for name in ("m", "m", "other"):
            server, address = await _start_fake_worker(name)
            servers.append(server)
            addresses.append(address)
        store, reg = MemoryStore(), registry()
        sync = StoreSync(store, reg)
        try:
            def view() -> dict[str, list[tuple[str, str]]]:
                return {name: [(r.replica_id, r.address) for r in model.replicas]
                        for name, model in reg.models.items()}

            store.register(ReplicaRecord("r1", "m", addresses[0]), 0.3)
            store.register(ReplicaRecord("r2", "m", addresses[1]), 0.3)
            store.register(ReplicaRecord("r3", "m", addresses[2]), LONG)  # serves "other"
            assert await sync.sync_once() is True
            assert view() == {"m": [("r1", addresses[0]), ("r2", addresses[1])]}
            assert "published as model 'm'" in caplog.text
            assert reg.models["m"].sessions is sync

            store.heartbeat(ReplicaRecord("r1", "m", addresses[0], healthy=False), 0.3)
            await sync.sync_once()
            assert [r.eligible for r in reg.models["m"].replicas] == [False, True]

            # A removed replica goes once it has been missing for its TTL, not before.
            store.remove("m", "r2")
            await sync.sync_once()
            assert len(view()["m"]) == 2
            await asyncio.sleep(0.4)
            await sync.sync_once()
            assert view() == {"m": [("r1", addresses[0])]}

            # A replica republished at another address moves there.
            store.heartbeat(ReplicaRecord("r1", "m", addresses[1]), 0.3)
            await sync.sync_once()
            assert view() == {"m": [("r1", addresses[1])]}
            assert reg.models["m"].replicas[0].eligible

            # The model goes with its last replica, and comes back with a new one.
            store.remove("m", "r1")
            await sync.sync_once()
            await asyncio.sleep(0.4)
            await sync.sync_once()
            assert view() == {}
            store.register(ReplicaRecord("r4", "m", addresses[0]), LONG)
            await sync.sync_once()
            assert view() == {"m": [("r4", addresses[0])]}
        finally:
            await reg.stop()
            for server in servers:
                await server.stop(None)

    asyncio.run(scenario())


def test_a_model_without_replicas_is_kept_for_the_grace_then_forgotten():
    async def scenario():
        server, address = await _start_fake_worker("m")
        store = MemoryStore()
        reg = ReplicaRegistry([], tokenizer_loader=lambda path, name: None,
                              allow_no_workers=True, rpc_timeout=5.0, empty_model_grace_s=0.5)
        sync = StoreSync(store, reg)
        try:
            store.register(ReplicaRecord("r1", "m", address), 0.1)
            await sync.sync_once()
            kept = reg.models["m"]
            store.remove("m", "r1")
            await sync.sync_once()  # missing from now; dropped after its TTL
            await asyncio.sleep(0.2)
            await sync.sync_once()
            await reg.poll_once()
            # Replica gone, model kept (requests wait for a replacement, no 404)...
            assert reg.get("m") is kept and kept.replicas == [] and kept.num_healthy == 0
            # ...and a replacement joins the same entry, which then stays.
            store.register(ReplicaRecord("r2", "m", address), 0.1)
            await sync.sync_once()
            await asyncio.sleep(0.5)
            await reg.poll_once()
            assert reg.get("m") is kept and [r.replica_id for r in kept.replicas] == ["r2"]
            # Without a replacement, the model goes once the grace has passed.
            store.remove("m", "r2")
            await sync.sync_once()
            await asyncio.sleep(0.2)
            await sync.sync_once()
            await reg.poll_once()
            assert kept.replicas == []
            assert "m" in reg.models
            await asyncio.sleep(0.6)
            await reg.poll_once()
            assert "m" not in reg.models
        finally:
            await reg.stop()
            await server.stop(None)

    asyncio.run(scenario())


def test_router_config_takes_a_store_instead_of_workers():
    config = RouterConfig(store_url="redis://127.0.0.1:6379", cluster="blue")
    assert (config.workers, config.store_url, config.cluster) == (
        (), "redis://127.0.0.1:6379", "blue")
    with pytest.raises(ValueError, match="state store URL"):
        RouterConfig(store_url="http://127.0.0.1:1")
    with pytest.raises(ValueError, match="at least one worker"):
        RouterConfig()
    with pytest.raises(ValueError, match="cluster"):
        RouterConfig(store_url="memory://", cluster="")


def test_router_command_takes_workers_or_redis_not_both(capsys):
    from lmfleet.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["router", "--worker", "h:1", "--redis", "redis://127.0.0.1:1"])
    assert exit_info.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["router", "--redis", "memory://"]) == 2
    assert "needs a Redis URL" in capsys.readouterr().err
    assert main(["router", "--redis", "redis://127.0.0.1:1", "--session-ttl", "0"]) == 2
    assert "session_ttl" in capsys.readouterr().err
