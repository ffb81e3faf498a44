"""Run a real `lmfleet serve` subprocess for a test (no tests here).

    with start_serve(["--replicas", "2"]) as serve:
        serve.base_url, serve.grpc, serve.models, serve.worker_addresses, serve.worker_pids

(The workers are Ray actors: their pids come from serve's `replica ... ready on ADDRESS
(pid N)` progress lines; `descendant_pids()` also finds Ray's own processes.)

Ports are free ones (`--port 0 --grpc-port 0`). Exiting the block stops it: SIGTERM, then
SIGKILL if it has not exited within STOP_TIMEOUT seconds; `stop()` does that earlier and
returns the exit code. Its stderr is kept (`serve.stderr_lines`) and copied to ours.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

READY_LINE = re.compile(
    r"^lmfleet serve ready http=(?P<http>\S+) grpc=(?P<grpc>\S+) models=(?P<models>\S+)$")
CONTROLLER_READY = re.compile(r"^lmfleet controller ready models=(?P<models>\S+)$")
WORKER_READY = re.compile(r"ready on (?P<address>\S+) \(pid (?P<pid>\d+)")
# Several workers loading at once on a busy 2-core machine: be patient, but bounded.
START_TIMEOUT = 400.0
STOP_TIMEOUT = 90.0
# `lmfleet serve`'s replicas need a worker token; the tests give serve this one so they
# can also call the replicas directly (worker_load(address, WORKER_TOKEN)).
WORKER_TOKEN = "lmfleet-test-worker-token"


@dataclass
class ServeProcess:
    http: str
    grpc: str
    models: list[str]
    process: subprocess.Popen
    stderr_lines: list[str] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.http}"

    @property
    def worker_addresses(self) -> list[str]:
        return [m["address"] for line in self.stderr_lines if (m := WORKER_READY.search(line))]

    @property
    def worker_pids(self) -> list[int]:
        return [int(m["pid"]) for line in self.stderr_lines if (m := WORKER_READY.search(line))]

    def descendant_pids(self) -> list[int]:
        """Every live process below serve (Ray's and the replicas'), from /proc."""
        found: list[int] = []
        todo = [self.process.pid]
        while todo:
            for children in Path(f"/proc/{todo.pop()}/task").glob("*/children"):
                with contextlib.suppress(OSError):
                    pids = [int(pid) for pid in children.read_text().split()]
                    found += pids
                    todo += pids
        return sorted(set(found))

    def stop(self, sig: int = 15) -> Optional[int]:
        """Send `sig` (default SIGTERM); wait (bounded), SIGKILL if needed; exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(STOP_TIMEOUT)
        return self.process.returncode


@contextlib.contextmanager
def start_serve(extra_args: Sequence[str] = ()) -> Iterator[ServeProcess]:
    """Run `lmfleet serve` on free ports; yield once it printed its ready line."""
    with _start("serve", ["--port", "0", "--grpc-port", "0", *extra_args], READY_LINE,
                {"LMFLEET_WORKER_TOKEN": WORKER_TOKEN}) as (process, match, stderr_lines):
        yield ServeProcess(match["http"], match["grpc"], match["models"].split(","),
                           process, stderr_lines)


@contextlib.contextmanager
def start_controller(args: Sequence[str]) -> Iterator[ServeProcess]:
    """Run `lmfleet controller ARGS`; yield once it printed its ready line (`http` and
    `grpc` are empty: a controller serves no requests)."""
    with _start("controller", args, CONTROLLER_READY) as (process, match, stderr_lines):
        yield ServeProcess("", "", match["models"].split(","), process, stderr_lines)


@contextlib.contextmanager
def _start(command: str, args: Sequence[str], ready: re.Pattern,
           env: Optional[dict[str, str]] = None):
    process = subprocess.Popen([sys.executable, "-m", "lmfleet.cli", command, *args],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True,
                               env={**os.environ, **(env or {})})
    stderr_lines: list[str] = []
    threading.Thread(target=_pump_stderr, args=(process, stderr_lines), daemon=True).start()
    try:
        line = first_line(process, START_TIMEOUT)
        match = ready.match(line)
        if match is None:
            raise RuntimeError(f"unexpected first line from lmfleet {command}: {line!r}")
        yield process, match, stderr_lines
    finally:
        ServeProcess("", "", [], process, stderr_lines).stop()
        process.stdout.close()


def _pump_stderr(process: subprocess.Popen, lines: list[str]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for text in process.stderr:
            lines.append(text.rstrip("\n"))
            sys.stderr.write(text)


def first_line(process: subprocess.Popen, timeout: float) -> str:
    """The first line `process` prints on stdout (its ready line); its stdout keeps being
    drained afterwards so it never blocks on the pipe."""
    lines: queue.Queue[Optional[str]] = queue.Queue()

    def pump() -> None:
        with contextlib.suppress(ValueError, OSError):
            for text in process.stdout:
                lines.put(text.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, name="stdout-pump", daemon=True).start()
    try:
        line = lines.get(timeout=timeout)
    except queue.Empty:
        raise TimeoutError("no ready line in time") from None
    if line is None:
        raise RuntimeError(f"exited before it was ready ({process.wait(30)})")
    return line
