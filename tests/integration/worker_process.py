"""Run a real `lmfleet worker` subprocess for a test.

    from tests.integration.worker_process import start_worker

    with start_worker(model_dir, extra_args=["--max-model-len", "64"]) as address:
        channel = grpc.insecure_channel(address)   # address is "127.0.0.1:PORT"
        ...

`start_worker` starts `python -m lmfleet.cli worker --model DIR --port 0 ...`,
reads the port from its stdout ready line, waits (bounded) until grpc health reports
SERVING, yields the address, and on exit stops the process: SIGTERM, then SIGKILL if it
has not exited within `stop_timeout` seconds. The worker's logs (stderr) go to the test's
stderr, so pytest shows them when a test fails.

`worker_process` is the same with a `WorkerProcess` handle (address, Popen, ready line)
for tests that signal the process themselves.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

READY_LINE = re.compile(r"^lmfleet worker ready on (?P<address>\S+) model=(?P<model>.*)$")
# Loading the model on a busy 2-core machine can take a while; never wait forever.
DEFAULT_START_TIMEOUT = 240.0
DEFAULT_STOP_TIMEOUT = 60.0


@dataclass
class WorkerProcess:
    address: str  # "HOST:PORT", ready for grpc.insecure_channel
    model_name: str
    ready_line: str
    process: subprocess.Popen


@contextlib.contextmanager
def worker_process(
    model_dir: Union[str, Path],
    extra_args: Sequence[str] = (),
    start_timeout: float = DEFAULT_START_TIMEOUT,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    env: Optional[dict[str, str]] = None,
) -> Iterator[WorkerProcess]:
    """Start a worker on a free port; yield its handle once health is SERVING. `env`
    adds to (or overrides) this process's environment."""
    command = [sys.executable, "-m", "lmfleet.cli", "worker", "--model",
               str(model_dir), "--host", "127.0.0.1", "--port", "0", *extra_args]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    try:
        deadline = time.monotonic() + start_timeout
        line = _read_ready_line(process, deadline)
        match = READY_LINE.match(line)
        if match is None:
            raise RuntimeError(f"unexpected first line from the worker: {line!r}")
        handle = WorkerProcess(match["address"], match["model"], line, process)
        _wait_serving(handle.address, process, deadline)
        yield handle
    finally:
        stop(process, stop_timeout)


@contextlib.contextmanager
def start_worker(
    model_dir: Union[str, Path],
    extra_args: Sequence[str] = (),
    start_timeout: float = DEFAULT_START_TIMEOUT,
    stop_timeout: float = DEFAULT_STOP_TIMEOUT,
    env: Optional[dict[str, str]] = None,
) -> Iterator[str]:
    """Start a worker on a free port; yield "127.0.0.1:PORT" once health is SERVING."""
    with worker_process(model_dir, extra_args, start_timeout, stop_timeout, env) as handle:
        yield handle.address


def stop(process: subprocess.Popen, timeout: float = DEFAULT_STOP_TIMEOUT) -> Optional[int]:
    """SIGTERM, then SIGKILL after `timeout` s; returns the exit code."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(30)
    if process.stdout is not None:
        process.stdout.close()
    return process.returncode


def _read_ready_line(process: subprocess.Popen, deadline: float) -> str:
    # A reader thread, because a pipe read has no timeout; it keeps draining stdout
    # afterwards so the worker can never block on a full pipe.
    lines: queue.Queue[Optional[str]] = queue.Queue()

    def pump() -> None:
        try:
            for text in process.stdout:
                lines.put(text.rstrip("\n"))
        except ValueError:
            pass  # stdout closed by stop()
        lines.put(None)

    threading.Thread(target=pump, name="worker-stdout", daemon=True).start()
    try:
        line = lines.get(timeout=max(deadline - time.monotonic(), 0.0))
    except queue.Empty:
        raise TimeoutError("the worker printed no ready line in time") from None
    if line is None:
        raise RuntimeError(f"the worker exited before it was ready (code {process.wait(30)})")
    return line


def _wait_serving(address: str, process: subprocess.Popen, deadline: float) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the worker exited with code {process.returncode}")
            try:
                response = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
                if response.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise TimeoutError(f"the worker at {address} did not become SERVING in time")
            time.sleep(0.1)
