"""Starting and stopping model replicas: the `ReplicaLauncher` interface and its local
implementation, `LocalProcessLauncher` (one `lmfleet worker` subprocess per replica).

Everything launch-specific (processes, ports, logs, signals) stays behind
`ReplicaLauncher`, so `lmfleet serve` does not change when replicas become Ray actors.

    launcher = LocalProcessLauncher()
    try:
        addresses = launcher.start(ModelSpec("default", "default", replicas=2))
        ...                                   # route to addresses ("HOST:PORT" each)
    finally:
        launcher.stop()
"""

from __future__ import annotations

import abc
import collections
import contextlib
import ctypes
import ctypes.util
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Optional

READY_LINE = re.compile(r"^lmfleet worker ready on (?P<address>\S+) model=(?P<model>.*)$")
# Loading a model on a busy 2-core machine can take minutes; a GPU model much longer.
DEFAULT_START_TIMEOUT = 600.0
# The workers drain for up to their --drain-timeout (30 s by default) before exiting.
DEFAULT_STOP_TIMEOUT = 45.0
STDERR_TAIL_LINES = 20


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve.

    name: the name clients use (`model` field, /v1/models); also the workers' --model-name.
    model: a model directory, a .gguf file or "default" (the embedded SmolLM2).
    replicas: how many replicas (independent workers) to start.
    engine_flags: worker command-line flags for the engine, e.g. {"--max-num-seqs": "8"};
        a value of None passes the flag alone (a switch).
    """

    name: str
    model: str = "default"
    replicas: int = 1
    engine_flags: Mapping[str, Optional[str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.name or self.name != self.name.strip():
            raise ValueError(f"invalid model name {self.name!r}")
        if self.replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {self.replicas} (model {self.name})")
        for flag in self.engine_flags:
            if not flag.startswith("--"):
                raise ValueError(f"engine flag {flag!r} must start with '--'")
        object.__setattr__(self, "engine_flags", MappingProxyType(dict(self.engine_flags)))


class LaunchError(RuntimeError):
    """A replica could not be started; the message names the model and says why."""


class ReplicaLauncher(abc.ABC):
    """Starts and stops the replicas of models.

    Contract:
    - `start(spec)` blocks until every replica of `spec` serves (its worker gRPC endpoint
      accepts Generate) and returns their addresses, "HOST:PORT", one per replica. If any
      replica fails, it stops the replicas of `spec` it started and raises LaunchError
      naming the model; it never waits without bound.
    - `stop()` stops every replica this launcher started, letting in-flight requests
      drain for a bounded time; it returns when they are gone and may be called again.
    """

    @abc.abstractmethod
    def start(self, spec: ModelSpec) -> list[str]: ...

    @abc.abstractmethod
    def stop(self) -> None: ...


ProgressFn = Callable[[str], None]


def _kill_on_parent_death() -> Optional[Callable[[], None]]:
    """A preexec function making the child get SIGTERM when this process dies (Linux
    PR_SET_PDEATHSIG), so a killed `lmfleet serve` never leaves workers behind."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    pr_set_pdeathsig = 1

    def preexec() -> None:  # runs in the child between fork and exec: nothing else here
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


class _WorkerProcess:
    """One `lmfleet worker` subprocess; threads drain its pipes so it never blocks."""

    def __init__(self, command: list[str], label: str, echo_logs: bool) -> None:
        self.label = label
        # A session of its own: a Ctrl-C in the terminal reaches only the parent, which
        # stops the router first and then the workers, in that order.
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, errors="replace", start_new_session=True,
            preexec_fn=_kill_on_parent_death())
        self.stdout_lines: queue.Queue[Optional[str]] = queue.Queue()
        self.stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL_LINES)
        self._stderr_done = threading.Event()
        threading.Thread(target=self._pump_stdout, name=f"{label}-stdout", daemon=True).start()
        threading.Thread(target=self._pump_stderr, args=(echo_logs,), name=f"{label}-stderr",
                         daemon=True).start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _pump_stdout(self) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in self.process.stdout:
                self.stdout_lines.put(line.rstrip("\n"))
        self.stdout_lines.put(None)

    def _pump_stderr(self, echo: bool) -> None:
        with contextlib.suppress(ValueError, OSError):
            for line in self.process.stderr:
                line = line.rstrip("\n")
                self.stderr_tail.append(line)
                if echo:
                    print(f"[{self.label}] {line}", file=sys.stderr, flush=True)
        self._stderr_done.set()

    def failure_details(self) -> str:
        """Exit code and the last stderr lines, for an error message."""
        code = self.process.poll()
        self._stderr_done.wait(2.0)  # let the pump read what the dead process wrote
        tail = "\n".join(f"    {line}" for line in self.stderr_tail) or "    (no output)"
        state = f"exited with code {code}" if code is not None else "is still running"
        return f"{state}; last stderr lines:\n{tail}"

    def terminate(self) -> None:
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.terminate()

    def wait_or_kill(self, deadline: float) -> None:
        try:
            self.process.wait(max(deadline - time.monotonic(), 0.0))
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)


class LocalProcessLauncher(ReplicaLauncher):
    """Replicas as local subprocesses: `python -m lmfleet.cluster.cli worker --port 0 ...`
    with this interpreter, on `host`. Each prints its address on a ready line.

    start_timeout: seconds `start()` waits for all replicas of a model.
    stop_timeout: seconds `stop()` waits after SIGTERM (workers drain meanwhile) before
        SIGKILL.
    progress: called with one-line progress messages (e.g. print to stderr).
    echo_logs: copy the workers' stderr logs to ours, prefixed with the replica label.
    Launch from a thread that lives as long as the replicas (the main thread): on Linux
    the workers get SIGTERM when the launching thread's process dies.
    """

    def __init__(self, host: str = "127.0.0.1", start_timeout: float = DEFAULT_START_TIMEOUT,
                 stop_timeout: float = DEFAULT_STOP_TIMEOUT,
                 progress: Optional[ProgressFn] = None, echo_logs: bool = False,
                 heartbeat_s: float = 15.0) -> None:
        if start_timeout <= 0 or stop_timeout < 0:
            raise ValueError("start_timeout must be > 0 and stop_timeout >= 0")
        self.host = host
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.progress = progress or (lambda message: None)
        self.echo_logs = echo_logs
        self.heartbeat_s = heartbeat_s
        self._workers: list[_WorkerProcess] = []

    @property
    def pids(self) -> list[int]:
        """Process ids of the workers started so far (running or not)."""
        return [w.pid for w in self._workers]

    def command(self, spec: ModelSpec) -> list[str]:
        command = [sys.executable, "-m", "lmfleet.cluster.cli", "worker", "--model",
                   spec.model, "--model-name", spec.name, "--host", self.host, "--port", "0"]
        for flag, value in spec.engine_flags.items():
            command += [flag] if value is None else [flag, str(value)]
        return command

    def start(self, spec: ModelSpec) -> list[str]:
        command = self.command(spec)
        started = time.monotonic()
        self.progress(f"starting {spec.replicas} replica(s) of model '{spec.name}' "
                      f"({spec.model})")
        workers = [_WorkerProcess(command, f"{spec.name}#{i}", self.echo_logs)
                   for i in range(spec.replicas)]
        self._workers.extend(workers)
        try:
            return self._wait_ready(spec, workers, started)
        except BaseException:
            self._stop(workers)
            raise

    def _wait_ready(self, spec: ModelSpec, workers: list[_WorkerProcess],
                    started: float) -> list[str]:
        deadline = started + self.start_timeout
        addresses: list[Optional[str]] = [None] * len(workers)
        next_heartbeat = started + self.heartbeat_s
        while None in addresses:
            for index, worker in enumerate(workers):
                if addresses[index] is None:
                    addresses[index] = self._poll_ready(spec, worker)
                    if addresses[index] is not None:
                        self.progress(
                            f"  replica {index + 1}/{len(workers)} of '{spec.name}' ready on "
                            f"{addresses[index]} (pid {worker.pid}, "
                            f"{time.monotonic() - started:.1f} s)")
            now = time.monotonic()
            if None in addresses and now > deadline:
                raise LaunchError(
                    f"model '{spec.name}': a replica was not ready within "
                    f"{self.start_timeout:.0f} s")
            if now > next_heartbeat:
                num_ready = len(addresses) - addresses.count(None)
                self.progress(f"  still loading '{spec.name}': {num_ready}/{len(workers)} "
                              f"ready after {now - started:.0f} s")
                next_heartbeat = now + self.heartbeat_s
            if None in addresses:
                time.sleep(0.05)
        return [a for a in addresses if a is not None]

    @staticmethod
    def _poll_ready(spec: ModelSpec, worker: _WorkerProcess) -> Optional[str]:
        try:
            line = worker.stdout_lines.get_nowait()
        except queue.Empty:
            return None
        if line is None:
            raise LaunchError(f"model '{spec.name}': worker {worker.label} (pid {worker.pid}) "
                              f"died during start-up: {worker.failure_details()}")
        match = READY_LINE.match(line)
        if match is None:
            raise LaunchError(f"model '{spec.name}': worker {worker.label} printed "
                              f"{line!r} instead of its ready line")
        return match["address"]

    def stop(self) -> None:
        self._stop(self._workers)

    def _stop(self, workers: list[_WorkerProcess]) -> None:
        live = [w for w in workers if w.process.poll() is None]
        if live:
            self.progress(f"stopping {len(live)} worker(s)")
        for worker in live:  # all at once, so their drains overlap
            worker.terminate()
        deadline = time.monotonic() + self.stop_timeout
        for worker in workers:
            worker.wait_or_kill(deadline)
