"""The HTTP connection protocol of the router: uvicorn's h11 protocol with a bound on the
time a request's headers may take.

uvicorn closes a keep-alive connection idle between requests, and http_gate.py bounds
each read of a body, but nothing bounds the request line and headers: a client that
sends them a byte at a time (or stops half-way) holds a connection and its buffers for
ever, and enough of them exhaust the server's sockets. Here every connection must deliver
each request's headers within `header_timeout_s` of the connection opening or of the
previous response ending; otherwise it is answered 408 (a JSON error, as the API's other
errors) and closed. Headers still incomplete past `MAX_HEADER_BYTES` get h11's 400
(complete ones that large get http_gate.py's 431).
"""

from __future__ import annotations

import asyncio
import json
from typing import Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT_S = 30.0


def _timeout_response() -> bytes:
    body = json.dumps({"error": {
        "message": "the request headers did not arrive in time", "type": "timeout_error",
        "param": None, "code": 408}}).encode()
    head = ("HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode()
    return head + body


class HeaderTimeoutProtocol(H11Protocol):
    """H11Protocol whose connections must send each request's headers within
    `header_timeout_s` seconds (set by `protocol_with_header_timeout`)."""

    header_timeout_s = DEFAULT_HEADER_TIMEOUT_S

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: Optional[asyncio.TimerHandle] = None
        self._headed_cycle = None  # the request cycle whose headers have arrived
        self._arm_header_timer()

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._headed_cycle:
            self._headed_cycle = self.cycle  # a new request's headers are complete
            self._cancel_header_timer()

    def on_response_complete(self) -> None:
        # Armed first: a pipelined request already buffered is handled inside super()
        # (its headers then cancel the timer); a closing connection cancels it too.
        if not self.transport.is_closing():
            self._arm_header_timer()
        super().on_response_complete()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_late)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_late(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            self.transport.write(_timeout_response())
            self.transport.close()


def protocol_with_header_timeout(header_timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class for uvicorn.Config(http=...) with this header timeout."""
    if not header_timeout_s > 0:
        raise ValueError(f"header_timeout_s must be positive, got {header_timeout_s}")
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,),
                {"header_timeout_s": header_timeout_s})
