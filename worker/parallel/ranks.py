"""The ranks of one parallel replica, as local processes.

Rank 0 is the engine's own process (driver.py says what each rank does per step); this
starts ranks 1 .. tp x pp - 1 with `spawn`, joins their groups, names the rank whose
failure broke a step, and stops them. A rank leaves on the shutdown message, or by itself
when rank 0's process is gone (it would otherwise wait for the next message forever).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.parallel import state

logger = logging.getLogger(__name__)

# How often a rank checks that rank 0's process is still there.
PARENT_CHECK_S = 0.5


class RankProcesses:
    """Ranks 1..tp x pp - 1 as spawned processes, and rank 0's membership of the groups."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.size = config.parallel.world_size
        context = mp.get_context("spawn")
        self.errors = context.Queue()
        port = state.free_port()
        os.environ.update(state.rank_environment())  # inherited by the ranks started below
        self.processes = []
        for rank in range(1, self.size):
            process = context.Process(
                target=_rank_main, name=f"lmfleet-rank{rank}", daemon=True,
                args=(rank, port, config, str(model_dir), self.errors,
                      torch.get_num_threads()))
            process.start()
            self.processes.append(process)
        self._closed = False
        try:
            join_while_watching(lambda: join_groups(0, config, port), self.dead)
        except BaseException as error:
            failure = self.failure(error)
            self.close(timeout_s=0)
            raise failure from error

    def failure(self, error: BaseException) -> BaseException:
        """The error to raise on rank 0 when a collective failed: a rank's own error if one
        reported it (it is the cause; rank 0 only saw the connection drop)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                rank, message = self.errors.get(timeout=0.1)
                return RuntimeError(f"parallel rank {rank} failed: {message}")
            except queue.Empty:
                if all(not p.is_alive() for p in self.processes):
                    break
        dead = self.dead()
        if dead:
            return RuntimeError(f"parallel {', '.join(dead)} died: {error}")
        return error

    def dead(self) -> list[str]:
        """The ranks whose process has ended ("rank 2 (exit code -9)"), if any."""
        return [f"rank {i + 1} (exit code {p.exitcode})"
                for i, p in enumerate(self.processes) if not p.is_alive()]

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every rank: they leave on the shutdown message (sent by the driver) or, if
        stuck, are terminated."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + timeout_s
        for process in self.processes:
            process.join(max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(5.0)
        state.destroy_groups()


def join_groups(rank: int, config: EngineConfig, port: int, host: str = "127.0.0.1",
                cuda_device: Optional[int] = None) -> None:
    parallel = config.parallel
    state.init_groups(rank, parallel.tensor_parallel_size, parallel.pipeline_parallel_size,
                      port, config.model.device, parallel.parallel_timeout_s, host, cuda_device)


def join_while_watching(join: Callable[[], None], dead: Callable[[], list[str]]) -> None:
    """Run `join` (rank 0 joining the groups) in a thread, watching the other ranks
    meanwhile: one that ends before joining (an import error, a bad config) fails this at
    once, not at the group timeout."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            join()
            outcome.append(None)
        except BaseException as error:
            outcome.append(error)

    thread = threading.Thread(target=run, name="lmfleet-rank-join", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.1)
        if thread.is_alive() and dead():
            raise RuntimeError("a rank exited before the group was set up")
    if outcome[0] is not None:
        raise outcome[0]


def run_rank(rank: int, config: EngineConfig, model_dir: str, port: int,
             host: str = "127.0.0.1", cuda_device: Optional[int] = None) -> None:
    """Everything a rank other than 0 does: join the groups, load its shard, run the steps
    rank 0 sends until the shutdown message, leave the groups."""
    from lmfleet.worker.parallel.driver import serve_later_stage, serve_stage0
    from lmfleet.worker.runner.model_runner import ModelRunner

    try:
        join_groups(rank, config, port, host, cuda_device)
        runner = ModelRunner(config, Path(model_dir))
        if state.get_pp_rank() == 0:
            serve_stage0(runner)
        else:
            serve_later_stage(runner)
        if runner.pipeline is not None:
            runner.pipeline.flush()
    finally:
        state.destroy_groups()


def _exit_with_parent() -> None:
    """Leave when rank 0's process is gone (killed: it sent no shutdown message)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="lmfleet-parent-watch", daemon=True).start()


def _rank_main(rank: int, port: int, config: EngineConfig, model_dir: str, errors: Any,
               num_threads: int) -> None:
    _exit_with_parent()
    os.environ.update(state.rank_environment())
    torch.set_num_threads(num_threads)
    try:
        run_rank(rank, config, model_dir, port)
    except BaseException as error:  # reported to rank 0, which names this rank
        errors.put((rank, f"{type(error).__name__}: {error}"))
        logger.error("parallel rank %d failed:\n%s", rank, traceback.format_exc())
        raise SystemExit(1) from None
    # A clean stop leaves at once: once seen, the interpreter's teardown of the collective
    # library's threads aborted ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
