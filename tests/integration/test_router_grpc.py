"""The public gRPC API (lmfleet.v1.Serving) on the generated stubs, against a real
`lmfleet router` process and a real worker process."""

from __future__ import annotations

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmfleet.proto.v1 import serving_pb2 as pb
from lmfleet.proto.v1 import serving_pb2_grpc
from tests.integration.test_router_helpers import start_router, wait_until, worker_load
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 1024
RPC_TIMEOUT = 120  # seconds; bounded, generous for a shared 2-core machine
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def worker(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", str(MAX_MODEL_LEN)]) as address:
        yield address


@pytest.fixture(scope="module")
def router(worker):
    with start_router([worker]) as router:
        yield router


@pytest.fixture(scope="module")
def channel(router):
    with grpc.insecure_channel(router.grpc) as channel:
        yield channel


@pytest.fixture(scope="module")
def stub(channel):
    return serving_pb2_grpc.ServingStub(channel)


def greedy(max_tokens=12, **extra):
    return pb.GenerationParams(max_tokens=max_tokens, temperature=0, **extra)


def collect(stream):
    responses = list(stream)
    deltas = [r.delta for r in responses[:-1]]
    assert all(r.WhichOneof("response") == "delta" for r in responses[:-1])
    assert responses[-1].WhichOneof("response") == "complete"
    return "".join(d.text for d in deltas), [t for d in deltas for t in d.token_ids], \
        responses[-1].complete


def test_list_models_names_the_model_and_its_replica(stub):
    (card,) = stub.ListModels(pb.ListModelsRequest(), timeout=RPC_TIMEOUT).models
    assert card.max_model_len == MAX_MODEL_LEN
    assert card.num_replicas == 1
    assert card.name


def test_health_is_serving(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lmfleet.v1.Serving"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=30)
        assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_serving_service(channel):
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    (response,) = list(reflection.ServerReflectionInfo(iter([request]), timeout=30))
    names = {s.name for s in response.list_services_response.service}
    assert "lmfleet.v1.Serving" in names


def test_generate_streams_the_same_text_as_the_http_api(stub, router):
    text, token_ids, complete = collect(stub.Generate(
        pb.ServingGenerateRequest(text=PROMPT, params=greedy()), timeout=RPC_TIMEOUT))
    http = httpx.post(f"{router.base_url}/v1/completions", timeout=RPC_TIMEOUT,
                      json={"prompt": PROMPT, "max_tokens": 12, "temperature": 0}).json()
    assert text == http["choices"][0]["text"]
    assert complete.finish_reason == http["choices"][0]["finish_reason"]
    assert complete.usage.completion_tokens == len(token_ids) == \
        http["usage"]["completion_tokens"]
    assert complete.usage.prompt_tokens == http["usage"]["prompt_tokens"]


def test_token_id_and_chat_prompts(stub):
    _, output_ids, by_text = collect(stub.Generate(
        pb.ServingGenerateRequest(text=PROMPT, params=greedy()), timeout=RPC_TIMEOUT))
    _, _, by_ids = collect(stub.Generate(pb.ServingGenerateRequest(
        token_ids=pb.TokenIds(ids=output_ids), params=greedy(max_tokens=4)),
        timeout=RPC_TIMEOUT))
    assert by_ids.usage.prompt_tokens == len(output_ids)
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="user", content="Say hello.")])
    text, _, complete = collect(stub.Generate(
        pb.ServingGenerateRequest(chat=chat, params=greedy()), timeout=RPC_TIMEOUT))
    assert text
    # The chat template wraps the message in role markers and a system prompt.
    assert complete.usage.prompt_tokens > by_text.usage.prompt_tokens


def test_stop_strings_end_the_stream(stub):
    full, _, _ = collect(stub.Generate(pb.ServingGenerateRequest(
        text=PROMPT, params=greedy(max_tokens=16)), timeout=RPC_TIMEOUT))
    stop = full[len(full) // 2:len(full) // 2 + 2]
    text, _, complete = collect(stub.Generate(pb.ServingGenerateRequest(
        text=PROMPT, params=greedy(max_tokens=16, stop=[stop])), timeout=RPC_TIMEOUT))
    assert text == full[:full.find(stop)]
    assert complete.finish_reason == "stop"


@pytest.mark.parametrize("request_", [
    pb.ServingGenerateRequest(params=greedy()),  # no prompt
    pb.ServingGenerateRequest(text="", params=greedy()),
    pb.ServingGenerateRequest(text=PROMPT, params=pb.GenerationParams(temperature=-1)),
    pb.ServingGenerateRequest(text=PROMPT, params=pb.GenerationParams(top_p=1.5)),
    pb.ServingGenerateRequest(text="hello " * (MAX_MODEL_LEN + 10), params=greedy()),
    pb.ServingGenerateRequest(token_ids=pb.TokenIds(ids=[10 ** 8]), params=greedy()),
], ids=["no-prompt", "empty-text", "temperature", "top_p", "too-long", "bad-token-id"])
def test_bad_input_is_invalid_argument(stub, request_):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(request_, timeout=RPC_TIMEOUT))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_an_unknown_model_is_not_found(stub):
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.ServingGenerateRequest(model="nope", text=PROMPT,
                                                     params=greedy()), timeout=RPC_TIMEOUT))
    assert error.value.code() == grpc.StatusCode.NOT_FOUND


def _idle(worker) -> bool:
    load = worker_load(worker)
    return load.num_running == 0 and load.num_waiting == 0


def test_the_client_deadline_is_honoured_and_frees_the_worker(stub, worker):
    long = pb.GenerationParams(max_tokens=900, temperature=0, ignore_eos=True)
    with pytest.raises(grpc.RpcError) as error:
        list(stub.Generate(pb.ServingGenerateRequest(text=PROMPT, params=long), timeout=2))
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    # 900 tokens take far longer; only the propagated deadline frees the worker this soon.
    assert wait_until(lambda: _idle(worker), timeout=15)


def test_cancelling_the_call_aborts_the_worker_request(stub, worker):
    long = pb.GenerationParams(max_tokens=900, temperature=0, ignore_eos=True)
    call = stub.Generate(pb.ServingGenerateRequest(text=PROMPT, params=long),
                         timeout=RPC_TIMEOUT)
    first = next(call)
    assert first.WhichOneof("response") == "delta"
    assert worker_load(worker).num_running == 1
    call.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(call)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    assert wait_until(lambda: _idle(worker), timeout=15)
