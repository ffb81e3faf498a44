"""Two `lmfleet router --redis` processes over one real redis-server, in front of two real
workers that the test publishes (cluster/replica_publisher.py): both routers discover
the same replicas, a session sent alternately through both lands on one replica, and a
Redis restart interrupts nothing while the routers resynchronise after it. Which worker
served a request is read from the workers (their prefix-cache query counters).

The tests run in order and share the fleet; the last one restarts Redis."""

from __future__ import annotations

import contextlib
import re

import httpx
import pytest

from lmfleet.cluster.replica_publisher import ReplicaPublisher
from lmfleet.cluster.state import RedisStore
from tests.integration.test_router_helpers import (
    openai_client,
    served_by,
    start_router,
    wait_until,
)
from tests.integration.worker_process import worker_process
from tests.redis_server import RedisServerMissing, start_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.model]

CLUSTER = "itest"
CHAT = [{"role": "user", "content": "Hello!"}]
WORKER_ARGS = ["--max-model-len", "512", "--model-name", "smol"]
HEARTBEAT_S, TTL_S = 0.3, 2.0
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
def workers(default_model_dir):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(worker_process(default_model_dir, WORKER_ARGS))
               for _ in range(2)]


@pytest.fixture(scope="module")
def addresses(workers):
    return [w.address for w in workers]


@pytest.fixture(scope="module")
def store(redis_server):
    with RedisStore(redis_server.url, cluster=CLUSTER) as store:
        yield store


@pytest.fixture(scope="module")
def publishers(store, workers):
    publishers = [ReplicaPublisher(store, w.model_name, w.address, replica_id=f"replica-{i}",
                                   interval_s=HEARTBEAT_S, ttl_s=TTL_S).start()
                  for i, w in enumerate(workers)]
    yield publishers
    for publisher in publishers:
        publisher.stop(remove=False)


@pytest.fixture(scope="module")
def routers(redis_server, publishers):
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


def test_both_routers_discover_the_published_replicas(routers, addresses):
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S), [
        replicas_seen(r) for r in routers]
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
    assert store.get_session("smol", "conversation-1") == f"replica-{turns[0][0]}"


def test_a_redis_restart_interrupts_nothing_and_the_routers_resynchronise(
        routers, clients, addresses, redis_server, publishers, store):
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S)
    redis_server.stop()
    # The routers serve from their last view, with and without a session.
    for client in clients:
        assert chat(client).choices[0].message.content
        assert chat(client, session_id="during-outage").choices[0].message.content
    publishers[1].stop(remove=False)  # replica-1 is withdrawn while Redis is away
    redis_server.start()  # same port, empty

    # replica-0 is republished by its heartbeats; replica-1 never is, and goes.
    assert wait_until(lambda: all_see(routers, addresses[:1]), WAIT_S), [
        replicas_seen(r) for r in routers]
    for client in clients:
        assert served_by(addresses, lambda c=client: chat(c)) == [0]

    # A replica published after the restart is discovered again, and sessions are
    # shared through the store again.
    publishers[1].start()
    assert wait_until(lambda: all_see(routers, addresses), WAIT_S), [
        replicas_seen(r) for r in routers]
    turns = [served_by(addresses, lambda c=c: chat(c, session_id="after-restart"))
             for c in (clients[1], clients[0], clients[1])]
    assert turns == [turns[0]] * 3 and len(turns[0]) == 1
    assert store.get_session("smol", "after-restart") == f"replica-{turns[0][0]}"
