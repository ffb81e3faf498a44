"""The OpenAI HTTP API end to end: the official `openai` client against a real
`lmfleet router` process in front of two real worker processes (SmolLM2), with the
offline `LLM` in this process as the reference for greedy outputs.
"""

from __future__ import annotations

import contextlib
import json

import httpx
import openai
import pytest

from lmfleet.worker import LLM, SamplingParams
from tests.integration.test_router_helpers import (
    openai_client,
    start_router,
    wait_until,
    worker_load,
)
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 1024
PROMPTS = ["The capital of France is", "Write one sentence about the ocean:"]
CHAT = [{"role": "user", "content": "Name three colors."}]


@pytest.fixture(scope="module")
def workers(default_model_dir):
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(start_worker(default_model_dir,
                                                ["--max-model-len", str(MAX_MODEL_LEN)]))
               for _ in range(2)]


@pytest.fixture(scope="module")
def router(workers):
    with start_router(workers) as router:
        yield router


@pytest.fixture(scope="module")
def client(router):
    return openai_client(router)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=MAX_MODEL_LEN)


def greedy(max_tokens=16):
    return {"temperature": 0, "max_tokens": max_tokens}


# ---- happy paths ---------------------------------------------------------------------


def test_models_lists_the_model_with_both_replicas(client, model):
    (card,) = client.models.list().data
    assert card.id == model
    assert card.model_extra["num_replicas"] == 2
    assert card.model_extra["max_model_len"] == MAX_MODEL_LEN


def test_chat_completion_has_text_and_consistent_usage(client, model):
    response = client.chat.completions.create(model=model, messages=CHAT, **greedy())
    choice = response.choices[0]
    assert response.object == "chat.completion"
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = response.usage
    assert usage.prompt_tokens > 0 and 0 < usage.completion_tokens <= 16
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_greedy_outputs_equal_the_offline_engine(client, model, llm):
    params = SamplingParams(max_tokens=16, temperature=0)
    offline = [o.text for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    response = client.completions.create(model=model, prompt=PROMPTS, **greedy())
    assert [c.index for c in response.choices] == [0, 1]
    assert [c.text for c in response.choices] == offline
    offline_chat = llm.chat(CHAT, params, use_tqdm=False)[0].text
    chat = client.chat.completions.create(model=model, messages=CHAT, **greedy())
    assert chat.choices[0].message.content == offline_chat


def test_token_id_prompts_give_the_same_text_as_strings(client, model, llm):
    ids = llm.tokenizer.encode(PROMPTS[0])
    by_text = client.completions.create(model=model, prompt=PROMPTS[0], **greedy())
    by_ids = client.completions.create(model=model, prompt=ids, **greedy())
    assert by_ids.choices[0].text == by_text.choices[0].text
    assert by_ids.usage.prompt_tokens == len(ids)


def test_streamed_chat_equals_the_whole_response_and_ends_with_usage(client, model):
    whole = client.chat.completions.create(model=model, messages=CHAT, **greedy())
    chunks = list(client.chat.completions.create(
        model=model, messages=CHAT, stream=True, stream_options={"include_usage": True},
        **greedy()))
    content_chunks = [c for c in chunks if c.choices]
    assert content_chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in content_chunks)
    assert text == whole.choices[0].message.content
    assert content_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens
    assert usage_chunk.usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_streamed_completion_without_usage_option_has_no_usage_chunk(client, model):
    whole = client.completions.create(model=model, prompt=PROMPTS[1], **greedy())
    chunks = list(client.completions.create(model=model, prompt=PROMPTS[1], stream=True,
                                            **greedy()))
    assert all(c.choices for c in chunks)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_n_2_fans_out_and_counts_both_completions(client, model):
    response = client.completions.create(
        model=model, prompt=PROMPTS[0], n=2, max_tokens=5, temperature=0.8, seed=3,
        extra_body={"ignore_eos": True})
    assert [c.index for c in response.choices] == [0, 1]
    assert all(c.finish_reason == "length" for c in response.choices)
    assert response.usage.completion_tokens == 10


def test_a_seed_makes_sampling_reproducible(client, model):
    def sample():
        response = client.completions.create(model=model, prompt=PROMPTS[1], n=2,
                                             max_tokens=16, temperature=0.8, seed=1234)
        return [c.text for c in response.choices]

    first = sample()
    assert sample() == first


@pytest.mark.parametrize("stream", [False, True])
def test_a_stop_string_ends_the_text_before_it(client, model, stream):
    full = client.completions.create(model=model, prompt=PROMPTS[1], **greedy(24))
    text = full.choices[0].text
    assert len(text) >= 8, text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.find(stop)]
    kwargs = dict(model=model, prompt=PROMPTS[1], stop=[stop], **greedy(24))
    if stream:
        chunks = list(client.completions.create(stream=True, **kwargs))
        got = "".join(c.choices[0].text for c in chunks)
        finish = chunks[-1].choices[0].finish_reason
    else:
        response = client.completions.create(**kwargs)
        got, finish = response.choices[0].text, response.choices[0].finish_reason
    assert got == expected
    assert finish == "stop"


def test_completion_logprobs_cover_every_token(client, model):
    response = client.completions.create(model=model, prompt=PROMPTS[0], logprobs=2,
                                         **greedy(6))
    logprobs = response.choices[0].logprobs
    assert len(logprobs.tokens) == response.usage.completion_tokens
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)


def test_chat_logprobs_list_the_top_alternatives(client, model):
    response = client.chat.completions.create(model=model, messages=CHAT, logprobs=True,
                                              top_logprobs=3, **greedy(6))
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    assert all(len(entry.top_logprobs) == 3 for entry in content)
    # Greedy: the chosen token is the most likely one.
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob, abs=1e-4)
               for entry in content)


# ---- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("body, param", [
    ({"temperature": -1}, "temperature"),
    ({"max_tokens": "many"}, "max_tokens"),
    ({"top_p": 2}, "top_p"),
    ({"n": 0}, "n"),
    ({"prompt": []}, "prompt"),
    ({"prompt": [10 ** 9]}, "prompt"),
])
def test_bad_parameters_are_400_naming_the_field(router, model, body, param):
    payload = {"model": model, "prompt": "hi", "max_tokens": 2, **body}
    response = httpx.post(f"{router.base_url}/v1/completions", json=payload, timeout=60)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == 400
    assert error["param"].startswith(param)


def test_malformed_json_is_400(router):
    response = httpx.post(f"{router.base_url}/v1/chat/completions",
                          content=b'{"messages": [', timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert "JSON" in response.json()["error"]["message"]


def test_a_prompt_longer_than_the_context_is_400(client, model):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model=model, prompt="hello " * (MAX_MODEL_LEN + 50),
                                  max_tokens=2)
    assert "maximum context length is 1024 tokens" in error.value.message


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model="no-such-model", messages=CHAT, max_tokens=2)
    assert error.value.body["code"] == 404


def test_a_body_over_the_limit_is_413(router, model):
    huge = json.dumps({"model": model, "prompt": "x" * (5 * 1024 * 1024), "max_tokens": 1})
    response = httpx.post(f"{router.base_url}/v1/completions", content=huge, timeout=60,
                          headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413


def test_the_server_stays_healthy_after_bad_requests(router, client, model):
    assert httpx.get(f"{router.base_url}/health", timeout=30).status_code == 200
    response = client.completions.create(model=model, prompt=PROMPTS[0], **greedy(2))
    assert response.choices[0].text


# ---- cancellation and metrics ----------------------------------------------------------


def test_a_client_disconnect_aborts_the_worker_request(router, workers, model):
    body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 900, "temperature": 0,
            "ignore_eos": True, "stream": True}
    with httpx.Client(timeout=60) as http, http.stream(
            "POST", f"{router.base_url}/v1/completions", json=body) as response:
        lines = response.iter_lines()
        data = [line for line in (next(lines) for _ in range(6)) if line.startswith("data:")]
        assert data
        assert wait_until(lambda: sum(worker_load(w).num_running for w in workers) == 1)
    # 900 tokens take far longer than this wait; only an abort frees the worker this soon.
    assert wait_until(lambda: all(worker_load(w).num_running == 0 and
                                  worker_load(w).num_waiting == 0 for w in workers),
                      timeout=15)


def test_metrics_count_requests_latency_and_tokens(router, client, model):
    client.completions.create(model=model, prompt=PROMPTS[0], **greedy(3))
    text = httpx.get(f"{router.base_url}/metrics", timeout=30).text
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    label = f'model_name="{model}"'
    assert samples[f"vllm:time_to_first_token_seconds_count{{{label}}}"] >= 1
    assert samples[f"vllm:e2e_request_latency_seconds_count{{{label}}}"] >= 1
    assert samples[f"vllm:generation_tokens_total{{{label}}}"] >= 3
    assert samples[f'lmfleet:router_requests_total{{api="http",{label},status="200"}}'] >= 1
    assert any(k.startswith("vllm:kv_cache_usage_perc{") for k in samples)
