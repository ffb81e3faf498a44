"""The router's typed errors: one class per outcome a client can see.

Both front doors map them the same way: `http_status` and the OpenAI error `type` for the
HTTP API, `grpc_code` for lmfleet.v1.Serving. Anything a user can cause is one of these;
an unexpected exception is a bug and surfaces as a 500 / INTERNAL without a traceback.
"""

from __future__ import annotations

from typing import Optional

import grpc


class RouterError(Exception):
    """Base class. `param` names the offending request field when there is one."""

    http_status = 500
    grpc_code = grpc.StatusCode.INTERNAL
    error_type = "InternalServerError"

    def __init__(self, message: str, param: Optional[str] = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class InvalidRequestError(RouterError):
    """Bad input: wrong types, out-of-range values, prompt longer than the context."""

    http_status = 400
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "BadRequestError"


class UnauthenticatedError(RouterError):
    http_status = 401
    grpc_code = grpc.StatusCode.UNAUTHENTICATED
    error_type = "AuthenticationError"


class ModelNotFoundError(RouterError):
    http_status = 404
    grpc_code = grpc.StatusCode.NOT_FOUND
    error_type = "NotFoundError"


class BodyTooLargeError(RouterError):
    http_status = 413
    grpc_code = grpc.StatusCode.INVALID_ARGUMENT
    error_type = "BadRequestError"


class OverloadedError(RouterError):
    """Admission limits reached; the client should retry after `retry_after` seconds."""

    http_status = 503
    grpc_code = grpc.StatusCode.RESOURCE_EXHAUSTED
    error_type = "ServiceUnavailableError"

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NoReplicaError(RouterError):
    """No healthy replica of the model could take the request (after retries)."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "ServiceUnavailableError"
    retry_after = 1


class ShuttingDownError(RouterError):
    """The router is stopping: new requests are refused, running ones end at the drain
    deadline."""

    http_status = 503
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "ServiceUnavailableError"
    retry_after = 1


class DeadlineExceededError(RouterError):
    http_status = 504
    grpc_code = grpc.StatusCode.DEADLINE_EXCEEDED
    error_type = "TimeoutError"


class StreamInterruptedError(RouterError):
    """The replica failed after tokens were already sent: the stream ends with this error."""

    http_status = 502
    grpc_code = grpc.StatusCode.UNAVAILABLE
    error_type = "ServiceUnavailableError"
