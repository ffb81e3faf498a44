"""A real `redis-server` for tests (no tests here).

    with redis_server(tmp_path) as server:        # a free port, no persistence
        store = RedisStore(server.url)
        server.stop(); ...; server.start()       # a restart on the same port, empty

`redis-server` must be installed (`make redis-server` installs the Debian package); if
it is not, `redis_server()` raises RedisServerMissing, which the fixtures turn into a
failure, never a skip. Every wait is bounded; the server is always stopped.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0


class RedisServerMissing(RuntimeError):
    pass


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1:`port`, data in `directory` (none saved)."""

    def __init__(self, directory: Path, port: Optional[int] = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RedisServerMissing("redis-server is not installed; run `make redis-server` "
                                     "(or apt-get install redis-server)")
        self.binary = binary
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.port = port or _free_port()
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start on `self.port` and wait (bounded) until it answers PING."""
        import redis

        if self.process is not None:
            raise RuntimeError("redis-server is already running")
        log = open(self.directory / "redis.log", "ab")  # noqa: SIM115 (owned by the process)
        self.process = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.directory), "--daemonize", "no"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"redis-server exited with {self.process.returncode}: "
                                       f"{self.log_tail()}")
                with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
                    if client.ping():
                        return
                if time.monotonic() > deadline:
                    raise TimeoutError(f"redis-server did not answer in time: "
                                       f"{self.log_tail()}")
                time.sleep(0.05)
        except BaseException:
            self.stop()
            raise
        finally:
            client.close()

    def stop(self) -> None:
        """Stop it (SIGTERM, then SIGKILL); its data is gone (no persistence)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        self.process = None

    def log_tail(self, lines: int = 10) -> str:
        path = self.directory / "redis.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])


def start_redis_server(directory: Path) -> RedisServer:
    """A started RedisServer on a free port (the caller stops it). A port taken between
    picking and binding (another process won the race) is retried on a new port."""
    for attempt in range(3):
        server = RedisServer(directory)
        try:
            server.start()
            return server
        except RuntimeError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """`start_redis_server`, stopped on exit."""
    server = start_redis_server(directory)
    try:
        yield server
    finally:
        server.stop()
