"""ASGI middleware in front of the HTTP API: header size limit, API-key check,
request-body limit and body read timeout.

Request line + headers over `MAX_HEADER_BYTES` get 431 (the HTTP protocol bounds the time
they may take: router/http_protocol.py).

Runs before FastAPI parses anything, so a request without the key gets 401 whatever its
body, and an oversized body gets 413 without being buffered: a declared Content-Length
over the limit is refused at once; a body that grows past the limit while read (chunked
uploads) is refused then. The rest of an oversized body is read and discarded (up to
`DRAIN_LIMIT_BYTES`) so the client sees the 413 instead of a reset connection.

A body that stops arriving (shorter than its Content-Length, or a stalled upload) would
hold the connection and a server task forever: each read waits at most `body_timeout_s`,
then the request is answered 408 and the connection closed.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, Optional

from lmfleet.router.auth import ApiKeyAuth
from lmfleet.router.openai_api import error_body

# Bytes of an oversized body read and dropped before answering 413; beyond this the
# connection is simply answered and closed.
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024
PROTECTED_PREFIX = "/v1/"
DEFAULT_BODY_TIMEOUT_S = 30.0
# Request line + headers; larger ones get 431 (nginx's default buffers hold 8-32 KiB).
MAX_HEADER_BYTES = 16 * 1024


class HttpGate:
    def __init__(self, app: Any, auth: ApiKeyAuth, max_body_bytes: int,
                 on_refused: Optional[Callable[[int], None]] = None,
                 body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> None:
        """`on_refused(status)` is told about every request answered here (401, 408, 413)."""
        if max_body_bytes < 1:
            raise ValueError(f"max_body_bytes must be positive, got {max_body_bytes}")
        if not body_timeout_s > 0:
            raise ValueError(f"body_timeout_s must be positive, got {body_timeout_s}")
        self.body_timeout_s = body_timeout_s
        self.app = app
        self.auth = auth
        self.max_body_bytes = max_body_bytes
        self.on_refused = on_refused

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        raw_headers = scope.get("headers", ())
        header_bytes = len(scope.get("raw_path", b"")) + sum(
            len(k) + len(v) + 4 for k, v in raw_headers)  # 4: ": " and CRLF
        if header_bytes > MAX_HEADER_BYTES:
            self._refused(431)
            await _send_error(send, 431, "BadRequestError",
                              f"request headers larger than {MAX_HEADER_BYTES} bytes",
                              {"connection": "close"})
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        if scope["path"].startswith(PROTECTED_PREFIX) and not self.auth.authorized(
                headers.get("authorization")):
            self._refused(401)
            await _send_error(send, 401, "AuthenticationError",
                              "invalid or missing API key (send 'Authorization: Bearer <key>')",
                              {"www-authenticate": "Bearer"})
            return
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            await self._refuse_too_large(receive, send)
            return
        body = bytearray()
        more = True
        while more:
            try:
                message = await asyncio.wait_for(receive(), self.body_timeout_s)
            except asyncio.TimeoutError:
                self._refused(408)
                await _send_error(send, 408, "BadRequestError",
                                  f"request body not received within {self.body_timeout_s:g} s",
                                  {"connection": "close"})
                return
            if message["type"] != "http.request":
                await self.app(scope, _replay(bytes(body), message, receive), send)
                return
            body.extend(message.get("body", b""))
            more = message.get("more_body", False)
            if len(body) > self.max_body_bytes:
                await self._refuse_too_large(receive, send, already_read=len(body), more=more)
                return
        await self.app(scope, _replay(bytes(body), None, receive), send)

    def _refused(self, status: int) -> None:
        if self.on_refused is not None:
            self.on_refused(status)

    async def _refuse_too_large(self, receive, send, already_read: int = 0,
                                more: bool = True) -> None:
        read = already_read
        while more and read < DRAIN_LIMIT_BYTES:
            message = await receive()
            if message["type"] != "http.request":
                break
            read += len(message.get("body", b""))
            more = message.get("more_body", False)
        self._refused(413)
        await _send_error(send, 413, "BadRequestError",
                          f"request body larger than {self.max_body_bytes} bytes",
                          {"connection": "close"})


def _replay(body: bytes, pending: Any, receive):
    """A `receive` that first yields the buffered body, then defers to the real one
    (so the app still sees http.disconnect)."""
    sent = False

    async def replay_receive():
        nonlocal sent, pending
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replay_receive


async def _send_error(send, status: int, error_type: str, message: str,
                      extra_headers: dict[str, str]) -> None:
    payload = json.dumps(error_body(message, error_type, status)).encode("utf-8")
    headers = [(b"content-type", b"application/json"),
               (b"content-length", str(len(payload)).encode("ascii"))]
    headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in extra_headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload, "more_body": False})
