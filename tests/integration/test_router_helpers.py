"""Helpers for the router integration tests (no tests here): a real `lmfleet router`
subprocess, bounded waits, and direct worker load queries.

    with start_router([worker_address], ["--max-in-flight", "1"]) as router:
        client = openai_client(router)
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Optional

import grpc

from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.worker.auth import token_metadata
from tests.integration.serve_process import first_line

READY_LINE = re.compile(r"^lmfleet router ready http=(?P<http>\S+) grpc=(?P<grpc>\S+)$")
START_TIMEOUT = 180.0
STOP_TIMEOUT = 30.0


@dataclass
class RouterProcess:
    http: str  # "HOST:PORT"
    grpc: str
    process: subprocess.Popen

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"


@contextlib.contextmanager
def start_router(workers: Sequence[str], extra_args: Sequence[str] = (),
                 env: Optional[dict[str, str]] = None) -> Iterator[RouterProcess]:
    """Run `lmfleet router` on free ports; yield once it printed its ready line."""
    command = [sys.executable, "-m", "lmfleet.cli", "router", "--port", "0",
               "--grpc-port", "0", *extra_args]
    for address in workers:
        command += ["--worker", address]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True,
                               env={**os.environ, **(env or {})})
    try:
        line = first_line(process, START_TIMEOUT)
        match = READY_LINE.match(line)
        if match is None:
            raise RuntimeError(f"unexpected first line from the router: {line!r}")
        yield RouterProcess(match["http"], match["grpc"], process)
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(STOP_TIMEOUT)
        process.stdout.close()


def openai_client(router: RouterProcess, api_key: str = "unused", timeout: float = 120.0):
    import openai

    return openai.OpenAI(base_url=f"{router.base_url}/v1", api_key=api_key, max_retries=0,
                         timeout=timeout)


def worker_load(address: str, token: Optional[str] = None) -> worker_pb2.LoadReport:
    """GetLoad of a worker (`token`: the worker token it requires, if any)."""
    with grpc.insecure_channel(address) as channel:
        return worker_pb2_grpc.WorkerStub(channel).GetLoad(
            worker_pb2.GetLoadRequest(), timeout=10, metadata=token_metadata(token))


def served_by(addresses: Sequence[str], send: Callable[[], object]) -> list[int]:
    """Indices of the workers that saw a prompt while `send()` ran (their prefix-cache
    query counters moved)."""
    before = [worker_load(a).prefix_cache_queries for a in addresses]
    send()
    after = [worker_load(a).prefix_cache_queries for a in addresses]
    return [i for i, (b, a) in enumerate(zip(before, after, strict=True)) if a > b]


def wait_until(predicate: Callable[[], bool], timeout: float = 30.0,
               interval: float = 0.1) -> bool:
    """Poll `predicate` until true or `timeout` seconds passed; returns the last result."""
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)
