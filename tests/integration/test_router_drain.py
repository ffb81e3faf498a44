"""A router stopping (SIGTERM on `lmfleet router`) drains instead of cutting requests:
requests that finish within --drain-timeout are answered normally; at the deadline a
stream ends with an error event and `data: [DONE]`, a non-streaming request gets a JSON 503,
and the process exits 0. Real worker and router processes."""

from __future__ import annotations

import json
import signal
import threading

import httpx
import pytest

from tests.integration.test_router_helpers import start_router, wait_until
from tests.integration.worker_process import start_worker

pytestmark = pytest.mark.integration

LONG = 6000  # tokens: minutes on CPU, so these requests are surely running at the deadline
SHORT = 300  # tokens: a few seconds, well inside the 60 s drain
EXIT_TIMEOUT_S = 90


@pytest.fixture(scope="module")
def worker(default_model_dir):
    with start_worker(default_model_dir) as address:
        yield address


def completion(base_url: str, max_tokens: int, stream: bool) -> dict:
    model = httpx.get(f"{base_url}/v1/models", timeout=10).json()["data"][0]["id"]
    return {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens,
            "ignore_eos": True, "temperature": 0, "stream": stream}


def test_sigterm_ends_running_requests_cleanly_at_the_drain_deadline(worker):
    with start_router([worker], ["--drain-timeout", "2"]) as router:
        lines: list[str] = []
        answers: dict[str, httpx.Response] = {}

        def stream() -> None:
            with httpx.Client(base_url=router.base_url, timeout=120) as client:
                with client.stream("POST", "/v1/completions",
                                   json=completion(router.base_url, LONG, True)) as response:
                    lines.extend(line for line in response.iter_lines() if line)

        def blocking() -> None:
            with httpx.Client(base_url=router.base_url, timeout=120) as client:
                answers["blocking"] = client.post("/v1/completions",
                                                  json=completion(router.base_url, LONG, False))

        threads = [threading.Thread(target=stream), threading.Thread(target=blocking)]
        for thread in threads:
            thread.start()
        wait_until(lambda: len(lines) >= 3, timeout=60)  # the stream is under way
        router.process.send_signal(signal.SIGTERM)
        for thread in threads:
            thread.join(EXIT_TIMEOUT_S)
        assert router.process.wait(EXIT_TIMEOUT_S) == 0
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))
    assert error["error"]["type"] == "ServiceUnavailableError"
    assert "shut down" in error["error"]["message"]
    answer = answers["blocking"]
    assert answer.status_code == 503
    assert answer.headers["content-type"].startswith("application/json")
    assert answer.json()["error"]["type"] == "ServiceUnavailableError"


def test_requests_that_finish_within_the_drain_timeout_are_answered(worker):
    with start_router([worker], ["--drain-timeout", "60"]) as router:
        answers: dict[str, httpx.Response] = {}
        started = threading.Event()

        def short() -> None:
            with httpx.Client(base_url=router.base_url, timeout=120) as client:
                started.set()
                answers["short"] = client.post(
                    "/v1/completions", json=completion(router.base_url, SHORT, False))

        thread = threading.Thread(target=short)
        thread.start()
        started.wait(10)
        wait_until(lambda: _running(router.base_url) >= 1, timeout=30)
        router.process.send_signal(signal.SIGTERM)
        thread.join(EXIT_TIMEOUT_S)
        assert router.process.wait(EXIT_TIMEOUT_S) == 0
    answer = answers["short"]
    assert answer.status_code == 200
    assert answer.json()["usage"]["completion_tokens"] == SHORT


def _running(base_url: str) -> float:
    """Requests the router is serving now, from its own metrics."""
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("lmfleet:router_requests_in_flight"):
            total += float(line.rsplit(" ", 1)[1])
    return total
