"""Two models behind one endpoint: workers started with different `--model-name`, one
router. Which worker served a request is read from the workers themselves (their
prefix-cache query counters grow with every prompt they see)."""

from __future__ import annotations

import contextlib

import httpx
import pytest

from tests.integration.test_router_helpers import openai_client, served_by, start_router
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHAT = [{"role": "user", "content": "Hello!"}]
WORKER_ARGS = ["--max-model-len", "512"]
NAMES = ("alpha", "beta")


@pytest.fixture(scope="module")
def workers(default_model_dir):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(start_worker(default_model_dir,
                                                [*WORKER_ARGS, "--model-name", name]))
               for name in NAMES]


@pytest.fixture(scope="module")
def router(workers):
    with start_router(workers) as router:
        yield router


def test_models_lists_both(router):
    models = openai_client(router).models.list().data
    assert sorted(m.id for m in models) == list(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_the_model_field_picks_the_worker(router, workers, name):
    client = openai_client(router)
    responses = []
    served = served_by(workers, lambda: responses.append(
        client.chat.completions.create(model=name, messages=CHAT, max_tokens=3)))
    assert served == [NAMES.index(name)]
    assert responses[0].model == name


def test_without_a_model_field_the_choice_is_ambiguous(router):
    response = httpx.post(f"{router.base_url}/v1/completions", timeout=60,
                          json={"prompt": "hi", "max_tokens": 2})
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "model"
