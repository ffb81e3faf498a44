"""Hostile input on both front doors of a real `lmfleet router` (in front of a real worker):
never a 5xx, a 400 / INVALID_ARGUMENT naming the field, and a healthy /metrics afterwards
whose model_name labels are served names only, whatever model names clients sent.
"""

from __future__ import annotations

import json
import random
import string
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.proto.v1 import serving_pb2 as pb
from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

TIMEOUT = 120  # seconds; bounded, generous for a shared 2-core machine
MESSAGES = [{"role": "user", "content": "Hi"}]
SURROGATE = "\ud800"  # valid in a JSON string escape, not a Unicode character
# Text that is not UTF-8 (an encoded surrogate) for protobuf string fields.
BAD_UTF8 = b"\xed\xa0\x80"


@pytest.fixture(scope="module")
def worker(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", "256"]) as address:
        yield address


@pytest.fixture(scope="module")
def router(worker):
    with start_router([worker]) as router:
        yield router


@pytest.fixture(scope="module")
def http(router):
    with httpx.Client(base_url=router.base_url, timeout=TIMEOUT) as client:
        yield client


@pytest.fixture(scope="module")
def served(http) -> set[str]:
    return {card["id"] for card in http.get("/v1/models").json()["data"]}


def post(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    # ensure_ascii: a lone surrogate goes out as the JSON escape "\ud800" (httpx's own
    # encoder would fail on it before sending).
    return http.post(path, content=json.dumps(body, ensure_ascii=True).encode(),
                     headers={"content-type": "application/json"})


def completion(**fields) -> dict[str, Any]:
    return {"prompt": "Hi", "max_tokens": 1, **fields}


def chat(**fields) -> dict[str, Any]:
    return {"messages": MESSAGES, "max_tokens": 1, **fields}


def assert_bad_request(response: httpx.Response, param: str) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == ("BadRequestError", 400, param)
    assert param.split("[")[0].split(".")[0] in error["message"]


def label_values(metrics_text: str, label: str) -> set[str]:
    return {sample.labels[label] for family in text_string_to_metric_families(metrics_text)
            for sample in family.samples if label in sample.labels}


BAD_REQUESTS = [
    # Lone surrogates, wherever text goes.
    ("/v1/completions", completion(prompt=SURROGATE), "prompt"),
    ("/v1/completions", completion(prompt=["fine", f"a{SURROGATE}"]), "prompt[1]"),
    ("/v1/completions", completion(session_id=SURROGATE), "session_id"),
    ("/v1/completions", completion(model=SURROGATE), "model"),
    ("/v1/completions", completion(stop=["x", SURROGATE]), "stop[1]"),
    ("/v1/chat/completions", chat(messages=[{"role": "user", "content": SURROGATE}]),
     "messages[0].content"),
    ("/v1/chat/completions",
     chat(messages=[{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]),
     "messages[0].content[0].text"),
    # Wrong types of known fields are not coerced.
    ("/v1/completions", completion(stream="yes"), "stream"),
    ("/v1/chat/completions", chat(stream="yes"), "stream"),
    ("/v1/completions", completion(max_tokens="1"), "max_tokens"),
    ("/v1/chat/completions", chat(stream_options={"include_usage": "yes"}),
     "stream_options.include_usage"),
    ("/v1/chat/completions", chat(messages=[{"role": "banana", "content": "Hi"}]),
     "messages.0.role"),
    # Features that change the output and are not implemented are refused.
    ("/v1/chat/completions",
     chat(tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}]),
     "tools"),
    ("/v1/chat/completions", chat(tool_choice="required"), "tool_choice"),
    ("/v1/chat/completions", chat(response_format={"type": "json_object"}),
     "response_format"),
    ("/v1/chat/completions", chat(logit_bias={"42": 100}), "logit_bias"),
    ("/v1/completions", completion(echo=True), "echo"),
    ("/v1/completions", completion(suffix="end"), "suffix"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS,
                         ids=[f"{p}-{param}-{i}" for i, (p, _, param) in
                              enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_400_naming_the_field(http, path, body, param):
    assert_bad_request(post(http, path, body), param)


@pytest.mark.parametrize("body", [
    chat(tools=[], tool_choice="none"),
    chat(response_format={"type": "text"}),
    chat(logit_bias={}),
    completion(echo=False, best_of=1, unknown_extra={"any": SURROGATE}),
])
def test_off_values_of_unsupported_features_and_unknown_fields_are_accepted(http, body):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    response = post(http, path, body)
    assert response.status_code == 200, response.text


def test_a_body_that_is_not_utf8_is_a_400(http):
    response = http.post("/v1/completions", content=b'{"prompt": "\xff\xfe", "max_tokens": 1}',
                         headers={"content-type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "BadRequestError"


def test_client_model_names_never_become_metric_labels(http, served):
    assert_bad_request(post(http, "/v1/completions", completion(model=SURROGATE)), "model")
    rng = random.Random(19)
    names = {"".join(rng.choices(string.ascii_letters + string.digits + "-_./ é\"\\\n",
                                 k=rng.randint(1, 40))) for _ in range(50)}
    for name in names:
        response = post(http, "/v1/completions", completion(model=name))
        assert response.status_code == 404, response.text
        assert response.json()["error"]["param"] == "model"
    for _ in range(2):  # every later scrape works too
        metrics = http.get("/metrics")
        assert metrics.status_code == 200, metrics.text
    values = label_values(metrics.text, "model_name")
    # "" counts requests whose model was never resolved (this test's 404s among them).
    assert values <= served | {""}, values - served
    assert "" in values and served <= values


def test_grpc_rejects_text_that_is_not_utf8(router):
    """A protobuf string field must be UTF-8; one that is not is INVALID_ARGUMENT (it was
    UNKNOWN: the message failed to parse inside gRPC)."""
    good = pb.ServingGenerateRequest(model="MODEL", text="TEXT", session_id="SESS",
                                     params=pb.GenerationParams(max_tokens=1))
    raw = good.SerializeToString()
    with grpc.insecure_channel(router.grpc) as channel:
        generate = channel.unary_stream("/lmfleet.v1.Serving/Generate",
                                        request_serializer=lambda data: data,
                                        response_deserializer=pb.ServingGenerateResponse
                                        .FromString)
        for field in (b"MODEL", b"TEXT", b"SESS"):
            bad = raw.replace(field, BAD_UTF8 + field[len(BAD_UTF8):])
            with pytest.raises(grpc.RpcError) as caught:
                list(generate(bad, timeout=TIMEOUT))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, field
            assert "UTF-8" in caught.value.details()


def test_grpc_rejects_an_unknown_chat_role(router):
    from lmfleet.proto.v1 import serving_pb2_grpc

    request = pb.ServingGenerateRequest(
        chat=pb.ChatMessages(messages=[pb.ChatMessage(role="banana", content="Hi")]),
        params=pb.GenerationParams(max_tokens=1))
    with grpc.insecure_channel(router.grpc) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            list(serving_pb2_grpc.ServingStub(channel).Generate(request, timeout=TIMEOUT))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "messages[0].role" in caught.value.details()


def test_models_reveal_no_file_paths(http, default_model_dir):
    """The worker reports its model directory (model_path); clients never see it."""
    cards = http.get("/v1/models").json()["data"]
    assert cards
    for card in cards:
        for field in ("id", "owned_by", "root"):
            value = card.get(field) or ""
            assert not Path(value).is_absolute() and not value.startswith("~"), (field, value)
            assert str(default_model_dir.parent) not in value, (field, value)
