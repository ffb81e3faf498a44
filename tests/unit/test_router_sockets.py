"""The router's listening sockets: TCP_NODELAY on accepted connections, and port conflicts
reported at once, naming the port (in-process routers and real CLI processes; no model)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys

import httpx
import pytest

from lmfleet.router.server import Router, RouterConfig
from lmfleet.router.sockets import ListenError, check_port_free, tcp_listener

# A bound on each scenario, so a regression (e.g. waiting for discovery) fails, not hangs.
SCENARIO_TIMEOUT_S = 60


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, SCENARIO_TIMEOUT_S))


def _nodelay(sock) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


@contextlib.contextmanager
def _taken_port():
    """A port some other server listens on."""
    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    other.bind(("127.0.0.1", 0))
    other.listen()
    try:
        yield other.getsockname()[1]
    finally:
        other.close()


def test_connections_accepted_on_the_http_listener_have_tcp_nodelay():
    async def scenario() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def on_connection(reader, writer) -> None:
            accepted.set_result(_nodelay(writer.get_extra_info("socket")))
            writer.close()

        listener = tcp_listener("127.0.0.1", 0)
        server = await asyncio.start_server(on_connection, sock=listener)
        try:
            _, writer = await asyncio.open_connection(*listener.getsockname()[:2])
            try:
                return await accepted
            finally:
                writer.close()
        finally:
            server.close()
            await server.wait_closed()

    assert _run(scenario()) != 0


def test_the_routers_http_connections_have_tcp_nodelay():
    """The real router's accepted keep-alive connection, seen from its HTTP server."""

    async def scenario() -> list[int]:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0)
        async with Router(config) as router:
            async with httpx.AsyncClient(base_url=f"http://{router.http_address}") as client:
                await client.get("/health")
                connections = list(router._http.server_state.connections)
                return [_nodelay(c.transport.get_extra_info("socket")) for c in connections]

    flags = _run(scenario())
    assert flags and all(flags)


def test_a_taken_http_port_is_reported_before_waiting_for_workers():
    # No worker answers at 127.0.0.1:1: discovery would wait the whole timeout first.
    with _taken_port() as port:
        config = RouterConfig(workers=("127.0.0.1:1",), http_port=port, grpc_port=0,
                              discovery_timeout=3600)
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{port} \(HTTP port\): "
                                                 "address already in use"):
            _run(Router(config).start())


def test_a_taken_grpc_port_is_reported_naming_it():
    with _taken_port() as port:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=port,
                              discovery_timeout=0)
        with pytest.raises(ListenError, match=rf"127\.0\.0\.1:{port} \(gRPC port\)"):
            _run(Router(config).start())


def test_a_second_grpc_server_cannot_share_the_routers_grpc_port():
    """gRPC binds with SO_REUSEPORT unless told not to: a second router on the same port
    would start and take half of the first one's connections."""

    async def scenario() -> None:
        first = Router(RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                                    discovery_timeout=0))
        async with first:
            second = Router(RouterConfig(store_url="memory://", http_port=0,
                                         grpc_port=first.grpc_port, discovery_timeout=0))
            with pytest.raises(ListenError, match=f":{first.grpc_port} \\(gRPC port\\)"):
                # Past the up-front check, as if the port was taken during discovery.
                await second._start_grpc()
            await second.stop()

    _run(scenario())


def test_check_port_free_accepts_port_zero_and_free_ports():
    check_port_free("127.0.0.1", 0, "HTTP port")
    with _taken_port() as port:
        with pytest.raises(ListenError, match="address already in use"):
            check_port_free("127.0.0.1", port, "HTTP port")


@pytest.mark.parametrize("flag", ["--port", "--grpc-port"])
def test_serve_reports_a_taken_port_before_starting_anything(flag):
    """`lmfleet serve` used to start Ray and load every replica (20 s and more) before
    failing with a bare `[Errno 98]`; now it fails first, naming the port and the flag."""
    other = "--grpc-port" if flag == "--port" else "--port"
    with _taken_port() as port:
        result = subprocess.run(
            [sys.executable, "-m", "lmfleet.cli", "serve", flag, str(port), other,
             "0"], capture_output=True, text=True, timeout=120,
            env={**os.environ, "RAY_ADDRESS": ""})
    assert result.returncode == 1, result.stderr
    assert f"error: cannot listen on 127.0.0.1:{port}" in result.stderr
    assert flag in result.stderr and "address already in use" in result.stderr
    assert "lmfleet serve:" not in result.stderr  # no progress: nothing was started


def test_a_body_shorter_than_its_content_length_gets_408_instead_of_holding_on():
    """The client promises 100 bytes and sends 10, then waits: the router answers 408 (JSON)
    once the body stalls for body_timeout_s, and closes the connection."""

    async def scenario() -> bytes:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0, body_timeout_s=0.5)
        async with Router(config) as router:
            host, port = router.http_address.rsplit(":", 1)
            reader, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                         b'{"model": ')
            await writer.drain()
            try:
                return await asyncio.wait_for(reader.read(), SCENARIO_TIMEOUT_S)
            finally:
                writer.close()

    response = _run(scenario())
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"error"' in body and b"not received within 0.5 s" in body


async def _trickle_headers(router: Router, first: bytes = b"") -> bytes:
    """Send `first`, then a request line and headers a byte every 0.1 s (never ending
    them); returns all the router sent back before it closed the connection."""
    host, port = router.http_address.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    received = bytearray()

    async def read_all() -> None:
        while chunk := await reader.read(65536):
            received.extend(chunk)

    reading = asyncio.create_task(read_all())
    try:
        writer.write(first)
        for byte in b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000:
            if reading.done():
                break
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.1)
        await asyncio.wait_for(reading, SCENARIO_TIMEOUT_S)
    finally:
        writer.close()
    return bytes(received)


def test_headers_that_trickle_in_get_408_and_the_connection_is_closed():
    async def scenario() -> bytes:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0, header_timeout_s=1.0)
        async with Router(config) as router:
            return await _trickle_headers(router)

    head, _, body = _run(scenario()).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408")
    assert b'"error"' in body and b"headers did not arrive in time" in body


def test_on_a_kept_alive_connection_the_next_requests_headers_are_bounded_too():
    async def scenario() -> bytes:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0, header_timeout_s=1.0)
        async with Router(config) as router:
            return await _trickle_headers(router, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")

    first, _, rest = _run(scenario()).partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 ")  # /health answered (no replica yet: 503)
    assert b"HTTP/1.1 408" in rest and b"headers did not arrive in time" in rest


def test_prompt_requests_on_one_connection_are_not_cut_and_huge_headers_get_431():
    async def scenario() -> tuple[list[int], int]:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0, header_timeout_s=0.5)
        async with Router(config) as router:
            async with httpx.AsyncClient(base_url=f"http://{router.http_address}") as client:
                codes = []
                for _ in range(3):  # one connection, idle less than the timeout between
                    codes.append((await client.get("/v1/models")).status_code)
                    await asyncio.sleep(0.3)
                huge = await client.get("/v1/models", headers={"x-big": "a" * 20000})
            return codes, huge.status_code

    codes, huge = _run(scenario())
    assert codes == [200, 200, 200]
    assert huge == 431


def test_grpc_messages_over_the_body_limit_are_refused_before_any_handler():
    import grpc

    from lmfleet.proto.v1 import serving_pb2 as pb
    from lmfleet.proto.v1 import serving_pb2_grpc

    async def scenario() -> tuple[grpc.StatusCode, grpc.StatusCode]:
        config = RouterConfig(store_url="memory://", http_port=0, grpc_port=0,
                              discovery_timeout=0, max_body_bytes=1000)
        async with Router(config) as router:
            async with grpc.aio.insecure_channel(router.grpc_address) as channel:
                stub = serving_pb2_grpc.ServingStub(channel)
                codes = []
                for text in ("a" * 5000, "a"):  # over the limit; within (no model: 404)
                    call = stub.Generate(pb.ServingGenerateRequest(text=text), timeout=30)
                    with pytest.raises(grpc.aio.AioRpcError) as error:
                        async for _ in call:
                            pass
                    codes.append(error.value.code())
                return tuple(codes)

    assert _run(scenario()) == (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.NOT_FOUND)
