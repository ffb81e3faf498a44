"""API keys and admission limits on both front doors: a real router process started with
`--api-key` and `--max-in-flight 1 --max-queued 0` in front of a real worker."""

from __future__ import annotations

import threading

import grpc
import httpx
import openai
import pytest

from lmfleet.proto.v1 import serving_pb2 as pb
from lmfleet.proto.v1 import serving_pb2_grpc
from tests.integration.test_router_helpers import (
    openai_client,
    start_router,
    wait_until,
    worker_load,
)
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

KEY = "test-key-0123"
AUTH = (("authorization", f"Bearer {KEY}"),)
RPC_TIMEOUT = 120
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def worker(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", "1024"]) as address:
        yield address


@pytest.fixture(scope="module")
def router(worker):
    # The key comes from the environment here; --api-key is the same setting.
    with start_router([worker], ["--max-in-flight", "1", "--max-queued", "0"],
                      env={"LMFLEET_API_KEY": KEY}) as router:
        yield router


@pytest.fixture(scope="module")
def client(router):
    return openai_client(router, api_key=KEY)


@pytest.fixture(scope="module")
def stub(router):
    with grpc.insecure_channel(router.grpc) as channel:
        yield serving_pb2_grpc.ServingStub(channel)


def small(client):
    return client.completions.create(prompt=PROMPT, max_tokens=2, temperature=0,
                                     model=client.models.list().data[0].id)


# ---- auth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("api_key", ["wrong-key", KEY + "x", KEY[:-1]])
def test_a_wrong_key_is_401(router, api_key):
    with pytest.raises(openai.AuthenticationError) as error:
        small(openai_client(router, api_key=api_key))
    assert error.value.status_code == 401


def test_a_missing_key_is_401_even_with_a_bad_body(router):
    response = httpx.post(f"{router.base_url}/v1/completions", content=b"{not json",
                          timeout=30)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == 401


def test_the_right_key_is_accepted(client):
    assert small(client).choices[0].finish_reason in ("stop", "length")


def test_health_and_metrics_need_no_key(router):
    assert httpx.get(f"{router.base_url}/health", timeout=30).status_code == 200
    assert httpx.get(f"{router.base_url}/metrics", timeout=30).status_code == 200


def test_grpc_without_the_key_is_unauthenticated(stub):
    request = pb.ServingGenerateRequest(text=PROMPT, params=pb.GenerationParams(max_tokens=2))
    for metadata in ((), (("authorization", "Bearer nope"),)):
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(request, timeout=RPC_TIMEOUT, metadata=metadata))
        assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with pytest.raises(grpc.RpcError) as error:
        stub.ListModels(pb.ListModelsRequest(), timeout=RPC_TIMEOUT)
    assert error.value.code() == grpc.StatusCode.UNAUTHENTICATED
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT, metadata=AUTH))
    assert responses[-1].complete.usage.completion_tokens >= 1


# ---- admission -----------------------------------------------------------------------------


def test_beyond_the_limits_requests_get_503_and_resource_exhausted(router, client, stub,
                                                                   worker):
    model = client.models.list().data[0].id
    started, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def occupy() -> None:  # one long streamed request holds the only in-flight slot
        try:
            stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=900,
                                               temperature=0, stream=True,
                                               extra_body={"ignore_eos": True})
            with stream:
                for _ in stream:
                    started.set()
                    if release.is_set():
                        break
        except BaseException as error:  # reported by the main thread
            errors.append(error)
            started.set()

    thread = threading.Thread(target=occupy, daemon=True)
    thread.start()
    try:
        assert started.wait(RPC_TIMEOUT) and not errors
        with pytest.raises(openai.APIStatusError) as refused:
            small(client)
        assert refused.value.status_code == 503
        assert int(refused.value.response.headers["retry-after"]) >= 1
        assert refused.value.body["code"] == 503
        with pytest.raises(grpc.RpcError) as exhausted:
            list(stub.Generate(pb.ServingGenerateRequest(
                text=PROMPT, params=pb.GenerationParams(max_tokens=2)),
                timeout=RPC_TIMEOUT, metadata=AUTH))
        assert exhausted.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        release.set()
        thread.join(RPC_TIMEOUT)
    assert not thread.is_alive() and not errors
    # The slot comes back once the first request is gone (its worker request aborted).
    assert wait_until(lambda: worker_load(worker).num_running == 0, timeout=30)
    assert wait_until(lambda: _admitted(client), timeout=30)
    assert httpx.get(f"{router.base_url}/health", timeout=30).status_code == 200


def _admitted(client) -> bool:
    try:
        return bool(small(client).choices)
    except openai.APIStatusError as error:
        if error.status_code != 503:
            raise
        return False
