"""Listening sockets of the router's front doors, and clear errors when a port is taken.

`tcp_listener(host, port, what)` makes the HTTP server's socket. It is created with
protocol IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on an accepted connection only when
the socket object says IPPROTO_TCP (`base_events._set_nodelay`), and an accepted socket
inherits the listener's protocol. Without TCP_NODELAY a response written in two segments
(uvicorn sends headers, then the body) waits for the client's delayed ACK, about 40 ms on
Linux, on every request of a reused connection.

`check_port_free(host, port, what)` binds and releases a port, so a command can refuse to
start before spending time on workers or Ray when its port is taken (the real bind later
still reports a conflict the same way if the port was taken meanwhile).

Both raise `ListenError` (an OSError) whose message names the address and what the port
was for: "cannot listen on 127.0.0.1:8000 (HTTP port): address already in use".
"""

from __future__ import annotations

import errno
import socket


class ListenError(OSError):
    """A port could not be bound (in use, no such address, ...); the message names the
    address and what it was for."""


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _bind_error(host: str, port: int, what: str, error: OSError) -> ListenError:
    reason = ("address already in use" if error.errno == errno.EADDRINUSE
              else error.strerror or str(error))
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hint = " (choose another port, or 0 for a free one)" if error.errno == errno.EADDRINUSE \
        else ""
    result = ListenError(f"cannot listen on {address} ({what}): {reason}{hint}")
    result.errno = error.errno  # kept for callers; str() stays the message alone
    return result


def tcp_listener(host: str, port: int, what: str = "HTTP port") -> socket.socket:
    """A bound TCP socket (not yet listening) whose accepted connections get TCP_NODELAY
    from asyncio. Port 0 picks a free port (see `getsockname()`)."""
    sock = socket.socket(_family(host), socket.SOCK_STREAM, socket.IPPROTO_TCP)
    # As asyncio's own create_server: a restarted server can reuse a port in TIME_WAIT.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise _bind_error(host, port, what, error) from None
    return sock


def check_port_free(host: str, port: int, what: str) -> None:
    """Raise ListenError if `host:port` cannot be bound now (port 0 always can)."""
    if port == 0:
        return
    tcp_listener(host, port, what).close()
