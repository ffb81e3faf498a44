"""The worker token's checks (worker/auth.py) and where `lmfleet serve` binds replicas,
without processes: the constant-time comparison, the server interceptor's choice of
service, the client interceptor's metadata."""

from __future__ import annotations

import argparse
import asyncio
import hmac
import os

import grpc
import pytest

from lmfleet.cli.commands import serve as serve_command
from lmfleet.worker import auth

TOKEN = "tok-123"
ORIGINAL_TOKEN = os.environ.get(auth.WORKER_TOKEN_ENV)


class _Details:
    def __init__(self, method: str, metadata=()) -> None:
        self.method = method
        self.invocation_metadata = metadata


def _handler(streaming: bool = False) -> grpc.RpcMethodHandler:
    async def behaviour(request, context):  # the real method; must not be reached
        raise AssertionError("called")

    factory = (grpc.unary_stream_rpc_method_handler if streaming
               else grpc.unary_unary_rpc_method_handler)
    return factory(behaviour, request_deserializer=bytes, response_serializer=bytes)


def _intercept(method: str, metadata=(), streaming: bool = False):
    handler = _handler(streaming)

    async def continuation(details):
        return handler

    interceptor = auth.WorkerTokenInterceptor(TOKEN)
    result = asyncio.run(interceptor.intercept_service(continuation,
                                                       _Details(method, metadata)))
    return handler, result


@pytest.mark.parametrize("metadata, ok", [
    ((("authorization", f"Bearer {TOKEN}"),), True),
    ((("Authorization", f"bearer  {TOKEN} "),), True),
    ((("authorization", f"Bearer {TOKEN}".encode()),), True),
    ((("x-other", "1"), ("authorization", f"Bearer {TOKEN}")), True),
    ((), False),
    (None, False),
    ((("authorization", "Bearer tok-12"),), False),
    ((("authorization", f"Bearer {TOKEN}4"),), False),
    ((("authorization", f"Basic {TOKEN}"),), False),
    ((("authorization", TOKEN),), False),
    ((("authorization", "Bearer \udc80"),), False),
])
def test_bearer_matches(metadata, ok):
    assert auth.bearer_matches(TOKEN, metadata) is ok


def test_the_token_is_compared_in_constant_time(monkeypatch):
    seen = []
    real = hmac.compare_digest

    def spy(a, b):
        seen.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert not auth.bearer_matches(TOKEN, [("authorization", "Bearer guess")])
    assert auth.bearer_matches(TOKEN, [("authorization", f"Bearer {TOKEN}")])
    assert seen == [(TOKEN.encode(), b"guess"), (TOKEN.encode(), TOKEN.encode())]


@pytest.mark.parametrize("streaming", [False, True])
def test_worker_methods_without_the_token_get_a_denying_handler(streaming):
    handler, result = _intercept("/lmfleet.v1.Worker/Drain", streaming=streaming)
    assert result is not handler
    assert result.response_streaming is streaming
    assert result.request_deserializer is bytes and result.response_serializer is bytes

    class Context:
        async def abort(self, code, details):
            raise grpc.RpcError(code, details)

    with pytest.raises(grpc.RpcError) as raised:
        behaviour = result.unary_stream if streaming else result.unary_unary
        asyncio.run(behaviour(b"", Context()))
    assert raised.value.args == (grpc.StatusCode.UNAUTHENTICATED,
                                 auth.UNAUTHENTICATED_MESSAGE)


def test_worker_methods_with_the_token_and_other_services_pass():
    metadata = (("authorization", f"Bearer {TOKEN}"),)
    handler, result = _intercept("/lmfleet.v1.Worker/Generate", metadata, streaming=True)
    assert result is handler
    for method in ("/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch",
                   "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"):
        handler, result = _intercept(method)
        assert result is handler, method


def test_an_empty_token_is_refused():
    with pytest.raises(ValueError):
        auth.WorkerTokenInterceptor("")


def test_client_interceptors_add_the_token_to_unary_and_streaming_calls():
    details = grpc.aio.ClientCallDetails("/lmfleet.v1.Worker/GetLoad", 2.0,
                                         grpc.aio.Metadata(("x-a", "1")), None, None)
    sent = []

    async def continuation(details, request):
        sent.append(details)
        return "call"

    unary, streaming = auth.client_interceptors(TOKEN)
    assert asyncio.run(unary.intercept_unary_unary(continuation, details, b"")) == "call"
    assert asyncio.run(streaming.intercept_unary_stream(continuation, details, b"")) == "call"
    for each in sent:
        assert list(each.metadata) == [("x-a", "1"), ("authorization", f"Bearer {TOKEN}")]
        assert auth.bearer_matches(TOKEN, each.metadata)
    assert auth.client_interceptors(None) is None


def test_a_channel_files_the_interceptors_under_both_call_kinds():
    async def build():
        channel = grpc.aio.insecure_channel("127.0.0.1:1",
                                            interceptors=auth.client_interceptors(TOKEN))
        kinds = (channel._unary_unary_interceptors, channel._unary_stream_interceptors)
        await channel.close()
        return kinds

    unary, streaming = asyncio.run(build())
    assert [type(i) for i in unary] == [auth.UnaryUnaryTokenInterceptor]
    assert [type(i) for i in streaming] == [auth.UnaryStreamTokenInterceptor]


def test_token_from_env(monkeypatch):
    monkeypatch.setenv(auth.WORKER_TOKEN_ENV, "")
    assert auth.worker_token_from_env() is None
    assert auth.token_metadata(None) == ()
    monkeypatch.setenv(auth.WORKER_TOKEN_ENV, TOKEN)
    assert auth.worker_token_from_env() == TOKEN


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("[::1]", True),
    ("localhost", True), ("0.0.0.0", False), ("::", False), ("10.1.2.3", False),
    ("worker.example", False)])
def test_listen_warning_only_beyond_loopback_without_a_token(host, loopback):
    assert auth.is_loopback(host) is loopback
    assert (auth.worker_listen_warning(host, None) is None) is loopback
    assert auth.worker_listen_warning(host, TOKEN) is None


def _serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


def test_serve_binds_replicas_to_loopback_with_a_local_ray_cluster():
    assert serve_command.replica_host(_serve_args(), None) == "127.0.0.1"
    # Joining a cluster: each node's IP, so this router reaches replicas on other nodes.
    assert serve_command.replica_host(_serve_args("--ray-address", "auto"), None) is None
    assert serve_command.replica_host(_serve_args(), "10.0.0.5") == "10.0.0.5"
    args = _serve_args("--replica-host", "0.0.0.0", "--ray-address", "auto")
    assert serve_command.replica_host(args, "10.0.0.5") == "0.0.0.0"


def test_serve_makes_up_a_token_only_when_none_is_set(monkeypatch):
    # setenv (not delenv) so the made-up token is undone after the test even when the
    # variable was absent: later tests start workers and routers with this environment.
    monkeypatch.setenv(auth.WORKER_TOKEN_ENV, "")
    serve_command.ensure_worker_token()
    made_up = auth.worker_token_from_env()
    assert made_up and len(made_up) >= 32
    serve_command.ensure_worker_token()
    assert auth.worker_token_from_env() == made_up
    monkeypatch.setenv(auth.WORKER_TOKEN_ENV, TOKEN)
    serve_command.ensure_worker_token()
    assert auth.worker_token_from_env() == TOKEN


def test_the_environment_is_left_as_found():
    # Runs after the test above: nothing of its made-up token may remain.
    assert os.environ.get(auth.WORKER_TOKEN_ENV) == ORIGINAL_TOKEN
