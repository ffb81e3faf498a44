"""The worker token (issue 19, item 7) on real processes: a worker started with
$LMFLEET_WORKER_TOKEN refuses every lmfleet.v1.Worker call without it or with a wrong one,
keeps health and reflection open for probes, and serves a router given the same token;
a router without it gets an error, never a hang."""

from __future__ import annotations

import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmfleet.proto.v1 import worker_pb2 as pb
from lmfleet.proto.v1 import worker_pb2_grpc
from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

TOKEN = "s3cret-worker-token"
GOOD = (("authorization", f"Bearer {TOKEN}"),)
WRONG = [(), (("authorization", "Bearer wrong-token"),),
         (("authorization", f"Bearer {TOKEN}x"),), (("authorization", f"Basic {TOKEN}"),),
         (("authorization", TOKEN),)]
TIMEOUT = 60  # seconds: bounded even on a shared 2-core machine


@pytest.fixture(scope="module")
def address(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", "64"],
                      env={"LMFLEET_WORKER_TOKEN": TOKEN}) as address:
        yield address


@pytest.fixture(scope="module")
def channel(address):
    with grpc.insecure_channel(address) as channel:
        yield channel


def _calls(stub: worker_pb2_grpc.WorkerStub):
    """Every Worker method, as a function of the call metadata."""

    def generate(metadata):
        request = pb.GenerateRequest(request_id="auth-test", prompt_token_ids=[1, 2, 3],
                                     sampling_params=pb.SamplingParams(max_tokens=2))
        return list(stub.Generate(request, timeout=TIMEOUT, metadata=metadata))

    return {
        "Generate": generate,
        "Drain": lambda m: stub.Drain(pb.DrainRequest(timeout_seconds=0), timeout=TIMEOUT,
                                      metadata=m),
        "Abort": lambda m: stub.Abort(pb.AbortRequest(request_ids=["x"]), timeout=TIMEOUT,
                                      metadata=m),
        "GetLoad": lambda m: stub.GetLoad(pb.GetLoadRequest(), timeout=TIMEOUT, metadata=m),
        "GetModelInfo": lambda m: stub.GetModelInfo(pb.GetModelInfoRequest(),
                                                    timeout=TIMEOUT, metadata=m),
    }


@pytest.mark.parametrize("metadata", WRONG, ids=["none", "wrong", "longer", "basic", "bare"])
def test_every_worker_method_refuses_a_missing_or_wrong_token(channel, metadata):
    stub = worker_pb2_grpc.WorkerStub(channel)
    for name, call in _calls(stub).items():
        with pytest.raises(grpc.RpcError) as raised:
            call(metadata)
        assert raised.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
        assert "LMFLEET_WORKER_TOKEN" in raised.value.details(), name
    # The refused Drain did nothing: the worker still serves and is not draining.
    assert stub.GetLoad(pb.GetLoadRequest(), timeout=TIMEOUT, metadata=GOOD).draining is False


def test_health_and_reflection_need_no_token(channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "lmfleet.v1.Worker"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=TIMEOUT)
        assert response.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = reflection.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=TIMEOUT)
    services = {s.name for a in answers for s in a.list_services_response.service}
    assert "lmfleet.v1.Worker" in services


def test_the_right_token_is_served(channel):
    calls = _calls(worker_pb2_grpc.WorkerStub(channel))
    assert calls["GetModelInfo"](GOOD).max_model_len == 64
    assert calls["Abort"](GOOD).num_aborted == 0
    responses = calls["Generate"](GOOD)
    assert responses[-1].WhichOneof("response") == "complete"
    assert responses[-1].complete.completion_tokens == 2


def test_router_with_the_token_serves_a_completion(address):
    with start_router([address], env={"LMFLEET_WORKER_TOKEN": TOKEN}) as router:
        response = httpx.post(f"{router.base_url}/v1/completions", timeout=TIMEOUT,
                              json={"prompt": "The sky is", "max_tokens": 3,
                                    "temperature": 0})
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["completion_tokens"] == 3
        # Its load polls pass too: the replica is listed as healthy.
        models = httpx.get(f"{router.base_url}/v1/models", timeout=TIMEOUT).json()["data"]
        assert len(models) == 1


def test_router_without_the_token_answers_an_error_not_a_hang(address):
    started = time.monotonic()
    with start_router([address], ["--discovery-timeout", "1"],
                      env={"LMFLEET_WORKER_TOKEN": ""}) as router:
        response = httpx.post(f"{router.base_url}/v1/completions", timeout=TIMEOUT,
                              json={"prompt": "The sky is", "max_tokens": 3})
    assert response.status_code >= 400
    assert "error" in response.json()
    assert time.monotonic() - started < TIMEOUT
