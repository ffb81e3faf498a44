"""A replica SIGKILLed under load loses nothing: 24 non-streaming and 8 streaming greedy
requests across 2 workers, one worker killed while they run; all 32 complete, and every
text (streams included, resumed on the other worker from the tokens already sent) equals
the undisturbed run's. Real worker and router processes."""

from __future__ import annotations

import json
import signal
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.test_router_helpers import start_router, wait_until
from tests.integration.worker_process import worker_process

pytestmark = pytest.mark.integration

PROMPTS = [f"Write a short story about a {thing}." for thing in
           ("cat", "robot", "river", "castle", "violin", "comet", "garden", "ship")]
BLOCKING_TOKENS, STREAM_TOKENS = 48, 96


def body(model: str, prompt: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": stream}


def blocking(base_url: str, model: str, prompt: str) -> str:
    with httpx.Client(base_url=base_url, timeout=300) as client:
        answer = client.post("/v1/completions", json=body(model, prompt, BLOCKING_TOKENS,
                                                           False))
        assert answer.status_code == 200, answer.text
        return answer.json()["choices"][0]["text"]


def streamed(base_url: str, model: str, prompt: str, progress: list[int]) -> str:
    text = []
    with httpx.Client(base_url=base_url, timeout=300) as client:
        with client.stream("POST", "/v1/completions",
                           json=body(model, prompt, STREAM_TOKENS, True)) as response:
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event  # the stream must never break
                text.append(event["choices"][0]["text"])
                progress.append(1)
    return "".join(text)


def run_load(base_url: str, model: str, kill=None) -> list[str]:
    progress: list[int] = []
    with ThreadPoolExecutor(32) as pool:
        streams = [pool.submit(streamed, base_url, model, p, progress) for p in PROMPTS]
        blocks = [pool.submit(blocking, base_url, model, PROMPTS[i % 8]) for i in range(24)]
        if kill is not None:
            wait_until(lambda: len(progress) >= 16, timeout=120)  # streams under way
            kill()
        return [f.result(timeout=300) for f in streams + blocks]


def test_a_replica_killed_under_load_loses_no_request_and_no_token(default_model_dir):
    with worker_process(default_model_dir) as first, worker_process(default_model_dir) as second:
        with start_router([first.address, second.address]) as router:
            model = httpx.get(f"{router.base_url}/v1/models").json()["data"][0]["id"]
            undisturbed = run_load(router.base_url, model)
            killed = threading.Event()

            def kill() -> None:
                first.process.send_signal(signal.SIGKILL)
                killed.set()

            disturbed = run_load(router.base_url, model, kill)
    assert killed.is_set()
    assert disturbed == undisturbed
    assert len(set(undisturbed[:8])) > 1  # different prompts, different stories
