"""The Kubernetes shape on one machine: `lmfleet controller` (two Ray replicas of one
model, published to a real redis-server) and two `lmfleet router --redis` processes in
front: both routers discover the same replicas, a session sent alternately through both
lands on one replica, and a Redis restart (with a replica killed while Redis is away)
interrupts nothing while the routers resynchronise after it. Which replica served a
request is read from the replicas (their prefix-cache query counters).

The tests run in order and share the fleet; the last one restarts Redis."""

from __future__ import annotations

import os
import re
import signal

import httpx
import pytest

from lmfleet.cluster.state import RedisStore
from tests.integration.serve_process import WORKER_READY, start_controller
from tests.integration.test_router_helpers import (
    openai_client,
    served_by,
    start_router,
    wait_until,
)
from tests.redis_server import RedisServerMissing, start_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.model]

CLUSTER = "itest"
CHAT = [{"role": "user", "content": "Hello!"}]
FLEET_YAML = f"""
cluster: {CLUSTER}
controller: {{reconcile_interval_s: 0.3, replica_ttl_s: 2.0}}
models:
  - name: smol
    replicas: 2
    engine: {{max_model_len: 512, num_kv_blocks: 128}}
"""
WAIT_S = 90.0  # bound on every wait for routers to catch up (a busy 2-core machine)
HEALTHY_LINE = re.compile(r'^lmfleet:replica_healthy\{(?P<labels>[^}]*)\} (?P<value>\S+)$')


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    try:
        server = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisServerMissing as error:
        pytest.fail(str(error))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def controller(redis_server, tmp_path_factory):
    config = tmp_path_factory.mktemp("fleet") / "fleet.yaml"
    config.write_text(FLEET_YAML)
    with start_controller(["--config", str(config), "--redis", redis_server.url]) as process:
        yield process


@pytest.fixture(scope="module")
def store(redis_server):
    with RedisStore(redis_server.url, cluster=CLUSTER) as store:
        yield store


def published(store) -> list[str]:
    """Addresses of the replicas in the store, in replica-id order."""
    return [record.address for record in store.list_replicas("smol")]


@pytest.fixture(scope="module")
def addresses(controller, store):
    assert wait_until(lambda: len(published(store)) == 2, WAIT_S)
    return published(store)


@pytest.fixture(scope="module")
def routers(redis_server, controller):
    args = ["--redis", redis_server.url, "--cluster", CLUSTER, "--policy", "round_robin",
            "--store-poll-interval", "0.2"]
    with start_router([], args) as first, start_router([], args) as second:
        yield first, second


@pytest.fixture(scope="module")
def clients(routers):
    return [openai_client(router) for router in routers]


def replicas_seen(router) -> dict[str, float]:
    """replica address -> healthy (1.0 / 0.0), from the router's /metrics."""
    text = httpx.get(f"{router.base_url}/metrics", timeout=30).text
    seen = {}
    for line in text.splitlines():
        match = HEALTHY_LINE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match["labels"]))
            seen[labels["replica"]] = float(match["value"])
    return seen


def all_see(routers, addresses) -> bool:
    expected = {a: 1.0 for a in addresses}
    return all(replicas_seen(router) == expected for router in routers)


def chat(client, **extra):
    return client.chat.completions.create(model="smol", messages=CHAT, max_tokens=3,
                                          extra_body=extra)


def test_both_routers_discover_the_published_replicas(routers, addresses, store):
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S), [
        replicas_seen(r) for r in routers]
    # The controller heartbeats each replica with its health and a load summary.
    for record in store.list_replicas("smol"):
        assert record.healthy and record.ttl_s == 2.0
        assert record.load["draining"] == 0.0 and 0.0 <= record.load["kv_cache_usage"] <= 1.0
    for router in routers:
        models = httpx.get(f"{router.base_url}/v1/models", timeout=30).json()["data"]
        assert [(m["id"], m["num_replicas"]) for m in models] == [("smol", 2)]


def test_a_session_sent_through_both_routers_stays_on_one_replica(routers, clients,
                                                                  addresses, store):
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S)
    first, second = clients
    # Make the routers' round-robin cursors point at different replicas, so without the
    # shared binding the second router would send the session's next turn elsewhere.
    [served_second] = served_by(addresses, lambda: chat(second))
    [served_first] = served_by(addresses, lambda: chat(first))
    if served_first == served_second:
        served_by(addresses, lambda: chat(first))
    turns = [served_by(addresses, lambda c=c: chat(c, session_id="conversation-1"))
             for c in (first, second, first, second)]
    assert turns == [turns[0]] * 4 and len(turns[0]) == 1
    assert store.get_session("smol", "conversation-1") == f"smol-{turns[0][0]}"


def test_a_redis_restart_interrupts_nothing_and_the_routers_resynchronise(
        routers, clients, addresses, redis_server, controller, store):
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S)
    pids = {m["address"]: int(m["pid"]) for line in controller.stderr_lines
            if (m := WORKER_READY.search(line))}
    redis_server.stop()
    # The routers serve from their last view, with and without a session.
    for client in clients:
        assert chat(client).choices[0].message.content
        assert chat(client, session_id="during-outage").choices[0].message.content
    # A replica dies while Redis is away: the controller replaces it (and cannot tell
    # the store); the routers stop sending to it on their own.
    os.kill(pids[addresses[1]], signal.SIGKILL)
    for client in clients:
        assert chat(client).choices[0].message.content
    redis_server.start()  # same port, empty

    # The controller republishes the live replicas: the survivor and the replacement.
    assert wait_until(lambda: len(published(store)) == 2
                      and addresses[1] not in published(store), WAIT_S), published(store)
    now = published(store)
    assert addresses[0] in now
    assert wait_until(lambda: all_see(routers, now), WAIT_S), [
        replicas_seen(r) for r in routers]
    # Sessions are shared through the store again.
    turns = [served_by(now, lambda c=c: chat(c, session_id="after-restart"))
             for c in (clients[1], clients[0], clients[1])]
    assert turns == [turns[0]] * 3 and len(turns[0]) == 1
    bound = store.get_session("smol", "after-restart")
    assert [r.address for r in store.list_replicas("smol") if r.replica_id == bound] == [
        now[turns[0][0]]]
