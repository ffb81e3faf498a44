"""The StateStore contract (cluster/state/), run against MemoryStore on a fake clock and
against RedisStore on a real redis-server; then what only one of them can show (exact TTL
boundaries, thread safety; Redis key layout, index pruning, outages).

On Redis, time passes for real: an entry that must expire gets SHORT seconds and the test
waits WAIT; one that must survive gets LONG (never reached during a test). Stamped
heartbeat times come from the store's injected clock on both stores, so they are exact.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import redis

from lmfleet.cluster.state import (
    MemoryStore,
    RedisStore,
    ReplicaRecord,
    StateStore,
    StateStoreUnavailable,
    open_store,
)
from tests.redis_server import RedisServer, RedisServerMissing, start_redis_server

SHORT, WAIT, LONG = 0.2, 0.5, 600.0


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Harness:
    store: StateStore
    other_cluster: Callable[[str], StateStore]  # a store of another cluster, same backend
    advance: Callable[[float], None]
    clock: FakeClock


def start_redis(directory) -> RedisServer:
    """A started server, or a test failure (never a skip) when redis-server is missing."""
    try:
        return start_redis_server(directory)
    except RedisServerMissing as error:
        pytest.fail(str(error))


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    server = start_redis(tmp_path_factory.mktemp("redis"))
    yield server.url
    server.stop()


def record(replica_id="r1", model="m", address="127.0.0.1:7001", **fields) -> ReplicaRecord:
    return ReplicaRecord(replica_id, model, address, **fields)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def harness(request) -> Harness:
    clock = FakeClock()
    if request.param == "memory":
        store = MemoryStore(clock=clock)

        def advance(seconds: float) -> None:
            clock.now += seconds

        return Harness(store, store.for_cluster, advance, clock)
    url = request.getfixturevalue("redis_url")
    redis.Redis.from_url(url).flushall()
    stores: list[RedisStore] = []

    def make(cluster: str) -> RedisStore:
        stores.append(RedisStore(url, cluster, clock=clock))
        return stores[-1]

    request.addfinalizer(lambda: [s.close() for s in stores])
    return Harness(make("default"), make, lambda seconds: time.sleep(seconds), clock)


# ---- the contract, on both stores -------------------------------------------------------
def test_a_registered_replica_is_listed_with_its_heartbeat_stamped(harness):
    published = record(healthy=False, load={"num_running": 2, "kv_cache_usage": 0.25})
    stored = harness.store.register(published, LONG)
    assert stored == record(healthy=False, load={"num_running": 2, "kv_cache_usage": 0.25},
                            heartbeat_at=harness.clock.now, ttl_s=LONG)
    assert harness.store.list_replicas() == [stored]
    assert harness.store.list_replicas("m") == [stored]
    assert harness.store.models() == ["m"]


def test_a_replica_not_heartbeated_within_its_ttl_disappears(harness):
    harness.store.register(record("short"), SHORT)
    harness.store.register(record("long"), LONG)
    harness.advance(WAIT)
    assert [r.replica_id for r in harness.store.list_replicas("m")] == ["long"]


def test_a_heartbeat_restarts_the_ttl_and_replaces_health_and_load(harness):
    harness.store.register(record(load={"num_running": 1}), SHORT)
    harness.clock.now += SHORT / 2  # the stamp moves; on the fake clock, not expired yet
    beat_at = harness.clock.now
    harness.store.heartbeat(record(healthy=False, load={"num_waiting": 3}), LONG)
    harness.advance(WAIT)
    assert harness.store.list_replicas() == [
        record(healthy=False, load={"num_waiting": 3}, heartbeat_at=beat_at, ttl_s=LONG)]


def test_a_heartbeat_after_expiry_publishes_the_replica_again(harness):
    harness.store.register(record(), SHORT)
    harness.advance(WAIT)
    assert harness.store.list_replicas() == []
    harness.store.heartbeat(record(), LONG)
    assert [r.replica_id for r in harness.store.list_replicas()] == ["r1"]


def test_remove_withdraws_a_replica_at_once(harness):
    harness.store.register(record("r1"), LONG)
    harness.store.register(record("r2"), LONG)
    assert harness.store.remove("m", "r1") is True
    assert harness.store.remove("m", "r1") is False
    assert harness.store.remove("other", "r2") is False
    assert [r.replica_id for r in harness.store.list_replicas()] == ["r2"]


def test_replicas_are_grouped_by_model_and_a_model_goes_with_its_last_replica(harness):
    store = harness.store
    store.register(record("b1", model="beta"), LONG)
    store.register(record("a2", model="alpha"), SHORT)
    store.register(record("a1", model="alpha"), LONG)
    assert [(r.model, r.replica_id) for r in store.list_replicas()] == [
        ("alpha", "a1"), ("alpha", "a2"), ("beta", "b1")]
    assert [r.replica_id for r in store.list_replicas("beta")] == ["b1"]
    assert store.list_replicas("gamma") == []
    assert store.models() == ["alpha", "beta"]
    store.remove("alpha", "a1")
    harness.advance(WAIT)  # a2 expires
    assert store.models() == ["beta"]
    assert store.list_replicas("alpha") == []


def test_names_containing_the_key_separator_never_collide(harness):
    store = harness.store
    store.register(record("8b:r1", model="llama", address="h:1"), LONG)
    store.register(record("r1", model="llama:8b", address="h:2"), LONG)
    store.set_session("llama", "8b:s", "x", LONG)
    assert [(r.model, r.replica_id, r.address) for r in store.list_replicas()] == [
        ("llama", "8b:r1", "h:1"), ("llama:8b", "r1", "h:2")]
    assert store.get_session("llama:8b", "s") is None
    assert store.get_session("llama", "8b:s") == "x"


def test_clusters_do_not_see_each_others_state(harness):
    mine, theirs = harness.store, harness.other_cluster("blue:{x}")
    mine.register(record("r1"), LONG)
    theirs.register(record("r2"), LONG)
    mine.set_session("m", "s", "r1", LONG)
    theirs.put_kv_hint("m", "s", "r2", LONG)
    assert [r.replica_id for r in mine.list_replicas()] == ["r1"]
    assert [r.replica_id for r in theirs.list_replicas()] == ["r2"]
    assert (mine.get_session("m", "s"), theirs.get_session("m", "s")) == ("r1", None)
    assert (mine.get_kv_hint("m", "s"), theirs.get_kv_hint("m", "s")) == (None, "r2")
    assert theirs.remove("m", "r1") is False


def test_a_session_binding_is_per_model_replaced_by_a_new_one_and_expires(harness):
    store = harness.store
    assert store.get_session("m", "chat-1") is None
    store.set_session("m", "chat-1", "r1", LONG)
    store.set_session("n", "chat-1", "r9", LONG)
    store.set_session("m", "chat-1", "r2", SHORT)  # re-bound, with a new TTL
    store.set_session("m", "chat-2", "r1", LONG)
    assert (store.get_session("m", "chat-1"), store.get_session("n", "chat-1")) == ("r2", "r9")
    harness.advance(WAIT)
    assert store.get_session("m", "chat-1") is None
    assert store.get_session("m", "chat-2") == "r1"


def test_kv_hints_are_kept_apart_from_sessions_and_expire(harness):
    store = harness.store
    store.set_session("m", "s", "r1", LONG)
    store.put_kv_hint("m", "s", "r2", SHORT)
    store.put_kv_hint("m", "t", "r3", LONG)
    assert (store.get_session("m", "s"), store.get_kv_hint("m", "s")) == ("r1", "r2")
    assert store.get_kv_hint("m", "unknown") is None
    harness.advance(WAIT)
    assert (store.get_session("m", "s"), store.get_kv_hint("m", "s")) == ("r1", None)
    assert store.get_kv_hint("m", "t") == "r3"


@pytest.mark.parametrize("call", [
    lambda s: s.register(record(), 0),
    lambda s: s.register(record(), float("inf")),
    lambda s: s.register({"replica_id": "r1"}, 1),
    lambda s: s.remove("", "r1"),
    lambda s: s.list_replicas(""),
    lambda s: s.set_session("m", "", "r1", 1),
    lambda s: s.set_session("m", "s", "r1", -1),
    lambda s: s.get_session("m", None),
    lambda s: s.put_kv_hint("m", "s", "", 1),
    lambda s: s.get_kv_hint("", "s"),
])
def test_bad_input_is_a_value_error_and_writes_nothing(harness, call):
    with pytest.raises(ValueError):
        call(harness.store)
    assert harness.store.list_replicas() == []


@pytest.mark.parametrize("fields, message", [
    (dict(replica_id=""), "replica_id"),
    (dict(model=None), "model"),
    (dict(address="no-port"), "HOST:PORT"),
    (dict(load={"num_running": "2"}), "load"),
    (dict(load={"kv": float("nan")}), "load"),
])
def test_replica_records_validate_their_fields(fields, message):
    values = dict(replica_id="r1", model="m", address="h:1") | fields
    with pytest.raises(ValueError, match=message):
        ReplicaRecord(**values)


def test_a_record_survives_its_json_form_and_rejects_other_json():
    original = record(healthy=False, load={"num_running": 1.0}, heartbeat_at=5.5, ttl_s=3)
    assert ReplicaRecord.from_json(original.to_json()) == original
    for text in ("[]", '{"replica_id": "r"}', "not json"):
        with pytest.raises(ValueError):
            ReplicaRecord.from_json(text)


def test_open_store_knows_memory_and_redis_urls():
    assert isinstance(open_store("memory://", cluster="c"), MemoryStore)
    redis_store = open_store("redis://127.0.0.1:1", cluster="c")  # lazy: no connection
    assert isinstance(redis_store, RedisStore) and redis_store.cluster == "c"
    with pytest.raises(ValueError, match="state store URL"):
        open_store("http://127.0.0.1:1")


# ---- MemoryStore only -------------------------------------------------------------------
def test_memory_expiry_is_exact_to_the_clock():
    clock = FakeClock()
    store = MemoryStore(clock=clock)
    store.register(record(), 10)
    store.set_session("m", "s", "r1", 10)
    clock.now += 9.999
    assert len(store.list_replicas()) == 1 and store.get_session("m", "s") == "r1"
    clock.now += 0.001
    assert store.list_replicas() == [] and store.get_session("m", "s") is None
    assert store.remove("m", "r1") is False


def test_memory_store_is_safe_under_concurrent_heartbeats_and_listings():
    store = MemoryStore()
    errors: list[BaseException] = []

    def beat(thread: int) -> None:
        try:
            for i in range(200):
                store.heartbeat(record(f"t{thread}-{i % 20}"), LONG)
                store.set_session("m", f"s{thread}-{i}", "r", LONG)
                store.list_replicas("m")
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=beat, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert len(store.list_replicas()) == 8 * 20
    assert store.get_session("m", "s7-199") == "r"


# ---- RedisStore only --------------------------------------------------------------------
@pytest.mark.integration
def test_redis_keys_follow_the_documented_layout_and_indexes_are_pruned(redis_url):
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    client.flushall()
    with RedisStore(redis_url, cluster="c") as store:
        store.register(record("r:1", model="m/x"), SHORT)
        store.set_session("m/x", "s", "r:1", LONG)
        store.put_kv_hint("m/x", "s", "r:1", LONG)
        assert sorted(client.keys("*")) == [
            "lmfleet:{c}:kvhint:m%2Fx:s", "lmfleet:{c}:models", "lmfleet:{c}:replica:m%2Fx:r%3A1",
            "lmfleet:{c}:replicas:m%2Fx", "lmfleet:{c}:session:m%2Fx:s"]
        assert 0 < client.pttl("lmfleet:{c}:replica:m%2Fx:r%3A1") <= SHORT * 1000
        assert client.smembers("lmfleet:{c}:replicas:m%2Fx") == {"r%3A1"}
        assert client.smembers("lmfleet:{c}:models") == {"m%2Fx"}
        time.sleep(WAIT)
        assert store.list_replicas() == []
        assert client.exists("lmfleet:{c}:replicas:m%2Fx", "lmfleet:{c}:models") == 0
    client.close()


@pytest.mark.integration
def test_redis_skips_a_malformed_record(redis_url, caplog):
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    with RedisStore(redis_url) as store:
        store.register(record("good"), LONG)
        client.set("lmfleet:{default}:replica:m:bad", b"{not json")
        client.sadd("lmfleet:{default}:replicas:m", "bad")
        assert [r.replica_id for r in store.list_replicas()] == ["good"]
    assert "malformed replica record" in caplog.text
    client.close()


@pytest.mark.integration
def test_an_unreachable_redis_raises_state_store_unavailable(tmp_path):
    server = start_redis(tmp_path)
    store = RedisStore(server.url, socket_timeout=1, socket_connect_timeout=1)
    store.register(record(), LONG)
    server.stop()
    for call in (lambda: store.list_replicas(), lambda: store.register(record(), LONG),
                 lambda: store.remove("m", "r1"), lambda: store.get_session("m", "s"),
                 lambda: store.set_session("m", "s", "r1", LONG),
                 lambda: store.put_kv_hint("m", "s", "r1", LONG),
                 lambda: store.get_kv_hint("m", "s")):
        with pytest.raises(StateStoreUnavailable, match=f"127.0.0.1:{server.port}"):
            call()
    # The same store object works again once Redis is back (empty: no persistence).
    server.start()
    try:
        assert store.list_replicas() == []
        store.heartbeat(record(), LONG)
        assert [r.replica_id for r in store.list_replicas()] == ["r1"]
    finally:
        store.close()
        server.stop()
