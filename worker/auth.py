"""The shared token between routers (and the controller) and workers.

A worker's gRPC port can Drain, Abort and Generate, so anyone who reaches it could take a
replica out of service. With the environment variable LMFLEET_WORKER_TOKEN set, a worker
requires metadata `authorization: Bearer <token>` on every lmfleet.v1.Worker method and
answers UNAUTHENTICATED otherwise; grpc.health.v1 and reflection stay open, because
Kubernetes gRPC probes cannot send metadata. Routers and the controller send the token of
their own environment on every call. `lmfleet serve` makes up one for its processes.

Without the variable nothing is checked (a worker bound to loopback is reachable only
from its machine; `worker_listen_warning` says when that is not the case).
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from typing import Optional

import grpc

WORKER_TOKEN_ENV = "LMFLEET_WORKER_TOKEN"
# The service whose methods need the token (health and reflection do not).
_PROTECTED_PREFIX = "/lmfleet.v1.Worker/"
UNAUTHENTICATED_MESSAGE = (f"invalid or missing worker token (metadata 'authorization: "
                           f"Bearer <token>' with the worker's ${WORKER_TOKEN_ENV})")


def worker_token_from_env() -> Optional[str]:
    """$LMFLEET_WORKER_TOKEN, or None when unset or empty."""
    return os.environ.get(WORKER_TOKEN_ENV) or None


def token_metadata(token: Optional[str]) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without a token)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def bearer_matches(token: str, metadata) -> bool:
    """Whether gRPC invocation metadata (key/value pairs) holds `authorization: Bearer
    <token>`. The token is compared in constant time (hmac.compare_digest, as the router's
    API key is) so response timing does not reveal how much of a guess was right."""
    for key, value in metadata or ():
        if key.lower() != "authorization":
            continue
        if isinstance(value, bytes):
            value = value.decode("utf-8", "replace")
        scheme, _, given = value.strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        try:
            given_bytes = given.strip().encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate can never be the token
            return False
        return hmac.compare_digest(token.encode("utf-8"), given_bytes)
    return False


def is_loopback(host: str) -> bool:
    """Whether listening on `host` keeps the port on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def worker_listen_warning(host: str, token: Optional[str]) -> Optional[str]:
    """A warning for a worker that listens beyond loopback without a token, else None."""
    if token or is_loopback(host):
        return None
    return (f"the worker listens on {host} without ${WORKER_TOKEN_ENV}: anyone who can reach "
            "its port can Generate, Abort or Drain; set the same token for the worker and "
            "its routers")


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that only answers UNAUTHENTICATED."""

    async def unauthenticated(request_or_iterator, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE)

    codecs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.request_streaming and handler.response_streaming:
        return grpc.stream_stream_rpc_method_handler(unauthenticated, **codecs)
    if handler.request_streaming:
        return grpc.stream_unary_rpc_method_handler(unauthenticated, **codecs)
    if handler.response_streaming:
        return grpc.unary_stream_rpc_method_handler(unauthenticated, **codecs)
    return grpc.unary_unary_rpc_method_handler(unauthenticated, **codecs)


class WorkerTokenInterceptor(grpc.aio.ServerInterceptor):
    """Server side: lmfleet.v1.Worker methods need the token; other services pass."""

    def __init__(self, token: str) -> None:
        if not token:
            raise ValueError("the worker token must not be empty")
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(_PROTECTED_PREFIX):
            return handler
        if bearer_matches(self._token, handler_call_details.invocation_metadata):
            return handler
        return _deny(handler)


class _TokenMetadata:
    def __init__(self, token: str) -> None:
        self._metadata = token_metadata(token)

    def _with_token(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        pairs = [*(details.metadata or ()), *self._metadata]
        return details._replace(metadata=grpc.aio.Metadata(*pairs))


# One class per call kind: a grpc.aio channel files an interceptor under the first kind
# it is an instance of only, so one class of both would never see the Generate streams.
class UnaryUnaryTokenInterceptor(_TokenMetadata, grpc.aio.UnaryUnaryClientInterceptor):
    """Client side (grpc.aio channels): adds the token to every unary call's metadata."""

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


class UnaryStreamTokenInterceptor(_TokenMetadata, grpc.aio.UnaryStreamClientInterceptor):
    """Client side: the same for server-streaming calls (Generate)."""

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await continuation(self._with_token(client_call_details), request)


def client_interceptors(token: Optional[str]) -> Optional[list]:
    """Interceptors for grpc.aio channels to workers (None without a token, so a fleet
    without one pays nothing per call)."""
    if not token:
        return None
    return [UnaryUnaryTokenInterceptor(token), UnaryStreamTokenInterceptor(token)]
