"""ReplicaPublisher (cluster/replica_publisher.py) against a MemoryStore and a small
in-process gRPC server that answers GetLoad like a worker (no model)."""

from __future__ import annotations

from concurrent import futures

import grpc
import pytest

from lmfleet.cluster.replica_publisher import ReplicaPublisher
from lmfleet.cluster.state import MemoryStore
from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.test_router_helpers import wait_until


class _LoadOnlyWorker(worker_pb2_grpc.WorkerServicer):
    def GetLoad(self, request, context):
        return worker_pb2.LoadReport(num_running=2, num_waiting=1, kv_cache_usage=0.5,
                                     draining=True)


@pytest.fixture
def worker_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    worker_pb2_grpc.add_WorkerServicer_to_server(_LoadOnlyWorker(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield server, f"127.0.0.1:{port}"
    server.stop(None)


def test_a_heartbeat_carries_health_and_a_load_summary(worker_address):
    server, address = worker_address
    store = MemoryStore()
    publisher = ReplicaPublisher(store, "m", address, replica_id="r0", interval_s=1, ttl_s=5)
    stored = publisher.publish_once()
    assert (stored.replica_id, stored.model, stored.address, stored.healthy) == (
        "r0", "m", address, True)
    assert {k: stored.load[k] for k in ("num_running", "num_waiting", "kv_cache_usage",
                                        "draining")} == {
        "num_running": 2.0, "num_waiting": 1.0, "kv_cache_usage": 0.5, "draining": 1.0}
    assert store.list_replicas() == [stored] and stored.ttl_s == 5
    server.stop(None)  # the worker is gone: still published, as unhealthy
    assert publisher.publish_once().healthy is False
    assert store.list_replicas()[0].healthy is False
    publisher.stop()
    assert store.list_replicas() == []


def test_the_background_thread_publishes_until_stopped(worker_address):
    _, address = worker_address
    store = MemoryStore()
    with ReplicaPublisher(store, "m", address, interval_s=0.05):
        assert wait_until(lambda: len(store.list_replicas()) == 1, timeout=30)
        assert store.list_replicas()[0].replica_id == address  # the default id
    assert store.list_replicas() == []  # stop() removes the record


def test_a_ttl_that_does_not_outlast_the_interval_is_refused():
    with pytest.raises(ValueError, match="must exceed interval_s"):
        ReplicaPublisher(MemoryStore(), "m", "h:1", interval_s=2, ttl_s=2)
    with pytest.raises(ValueError, match="HOST:PORT"):
        ReplicaPublisher(MemoryStore(), "m", "nowhere")
