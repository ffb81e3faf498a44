"""A request that arrives while the only worker is down waits for it to come back (up to
--replica-wait-timeout) instead of failing at once with a 503 that exhausts a client's
retries before a restarted replica is up. Real router and worker processes."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.test_router_helpers import start_router, wait_until
from tests.integration.worker_process import worker_process

pytestmark = [pytest.mark.integration, pytest.mark.model]

WORKER_ARGS = ["--max-model-len", "256"]
WAIT_S = 240.0  # the router's bound, and ours: a worker loading on a busy 2-core machine
BODY = {"prompt": [504, 3458, 282, 4649, 314], "max_tokens": 4, "temperature": 0,
        "ignore_eos": True}


def complete(base_url: str) -> httpx.Response:
    return httpx.post(f"{base_url}/v1/completions", json=BODY, timeout=WAIT_S + 60)


def test_a_request_waits_for_a_restarted_worker(default_model_dir):
    with worker_process(default_model_dir, WORKER_ARGS) as first, \
            start_router([first.address], ["--replica-wait-timeout", str(WAIT_S)]) as router:
        before = complete(router.base_url)
        assert before.status_code == 200, before.text
        first.process.kill()
        first.process.wait(30)
        # The router has seen it die (its load polls fail): nothing can serve now.
        assert wait_until(lambda: httpx.get(f"{router.base_url}/health",
                                            timeout=30).status_code == 503, 60)
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(complete, router.base_url)
            time.sleep(2.0)
            assert not pending.done(), pending.result().text  # waiting, not a 503
            port = first.address.rpartition(":")[2]
            with worker_process(default_model_dir, [*WORKER_ARGS, "--port", port]):
                answer = pending.result(timeout=WAIT_S + 60)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
