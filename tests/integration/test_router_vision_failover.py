"""A replica SIGKILLed while it streams an answer about an image: the router resumes the
stream on the other replica with the prompt, the tokens already sent and the same image,
and the client's text equals the undisturbed run's. Real worker and router processes on a
tiny random LLaVA."""

from __future__ import annotations

import base64
import json
import signal
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.integration.test_router_helpers import start_router, wait_until, worker_load
from tests.integration.worker_process import worker_process
from tests.vision_model import image_bytes, make_tiny_llava

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_TOKENS = 400
IMAGE_URL = "data:image/png;base64," + base64.b64encode(image_bytes(3)).decode()


def streamed(base_url: str, progress: list[int]) -> str:
    body = {"model": "tiny-llava", "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True, "stream": True,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": "Describe it at length."},
                {"type": "image_url", "image_url": {"url": IMAGE_URL}}]}]}
    text = []
    with httpx.Client(base_url=base_url, timeout=300) as client:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200, response.read()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line.removeprefix("data: "))
                assert "error" not in event, event  # the stream must never break
                for choice in event["choices"]:
                    text.append(choice["delta"].get("content") or "")
                progress.append(1)
    return "".join(text)


def test_a_killed_replica_resumes_an_image_answer_elsewhere(tmp_path, default_model_dir):
    llava = make_tiny_llava(tmp_path / "tiny-llava", default_model_dir)
    args = ["--max-model-len", "512"]
    with worker_process(llava, args) as first, worker_process(llava, args) as second:
        with start_router([first.address, second.address]) as router:
            undisturbed = streamed(router.base_url, [])
            progress: list[int] = []
            with ThreadPoolExecutor(1) as pool:
                answer = pool.submit(streamed, router.base_url, progress)
                assert wait_until(lambda: len(progress) >= 8, timeout=120)
                # The replica running the answer (mid-answer: it is still running there).
                busy = [w for w in (first, second) if worker_load(w.address).num_running]
                assert len(busy) == 1
                busy[0].process.send_signal(signal.SIGKILL)
                events_before_kill = len(progress)
                # Without the image the other replica would refuse the resumed prompt
                # (INVALID_ARGUMENT), and the stream would end with an error event.
                disturbed = answer.result(timeout=300)
            assert len(progress) > events_before_kill
    assert disturbed == undisturbed and len(undisturbed) > 100
