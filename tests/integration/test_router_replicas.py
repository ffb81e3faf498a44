"""Two replicas of one model behind a round-robin router: alternation, session
affinity, and retrying on the other replica when one dies before the first token. Which
worker served a request is read from the workers themselves (their prefix-cache query
counters grow with every prompt they see). The last two tests kill the workers."""

from __future__ import annotations

import contextlib

import httpx
import openai
import pytest

from tests.integration.test_router_helpers import openai_client, served_by, start_router
from tests.integration.worker_process import worker_process

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHAT = [{"role": "user", "content": "Hello!"}]
WORKER_ARGS = ["--max-model-len", "512"]


@pytest.fixture(scope="module")
def workers(default_model_dir):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(worker_process(default_model_dir, WORKER_ARGS))
               for _ in range(2)]


@pytest.fixture(scope="module")
def addresses(workers):
    return [w.address for w in workers]


@pytest.fixture(scope="module")
def router(addresses):
    # Polls so rare that only a failed call can reveal a dead worker: the retry path.
    # With no replica left a request waits a second for one, then gets its 503.
    with start_router(addresses, ["--policy", "round_robin", "--poll-interval", "600",
                                  "--replica-wait-timeout", "1"]) as router:
        yield router


@pytest.fixture(scope="module")
def client(router):
    return openai_client(router)


def chat(client, **extra):
    return client.chat.completions.create(model=client.models.list().data[0].id,
                                          messages=CHAT, max_tokens=3, extra_body=extra)


def test_without_a_session_requests_alternate(client, addresses):
    served = [served_by(addresses, lambda: chat(client)) for _ in range(4)]
    assert all(len(s) == 1 for s in served)
    assert sorted(s[0] for s in served) == [0, 0, 1, 1]


def test_a_session_sticks_to_one_replica(client, addresses):
    served = [served_by(addresses, lambda: chat(client, session_id="chat-42"))
              for _ in range(4)]
    assert len(served[0]) == 1
    assert served == [served[0]] * 4


def test_a_dead_replica_is_retried_on_the_other_before_the_first_token(client, router,
                                                                        workers):
    workers[0].process.kill()  # no drain: its channel just fails
    workers[0].process.wait(30)
    for _ in range(4):  # round-robin sends half of these to the dead worker first
        assert chat(client).choices[0].message.content
    assert httpx.get(f"{router.base_url}/health", timeout=30).status_code == 200
    assert client.models.list().data[0].model_extra["num_replicas"] == 1


def test_with_no_replica_left_requests_are_503(client, router, workers):
    workers[1].process.kill()
    workers[1].process.wait(30)
    with pytest.raises(openai.APIStatusError) as error:
        chat(client)
    assert error.value.status_code == 503
    assert "retry-after" in error.value.response.headers
    assert httpx.get(f"{router.base_url}/health", timeout=30).status_code == 503
