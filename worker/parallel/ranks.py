"""The ranks of one tensor-parallel replica, as local processes.

Rank 0 is the engine's process: it runs the scheduler and KV accounting, and its runner
is wrapped in `DriverRunner`, which sends every step to the other ranks as a `StepMessage`
(plain data: the scheduled requests' new token ids, positions, block ids; the swaps and
releases since the last step) broadcast over the CPU group. Ranks 1.. run `serve_steps`:
they rebuild `ScheduledRequest`s from the message and call the same `ModelRunner.launch`,
so `StepInputs.prepare` fills identical token ids, positions, slot mappings and block
tables on every rank; each rank's forward works on its heads and KV, the collectives
inside the layers join them, and only rank 0 samples.

Overlapped steps under TP need rank 0's sampled tokens on the other ranks' devices (a
device broadcast per step, where the message marks placeholder rows); until that exists
the engine runs TP steps without overlap (the CPU default anyway).
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

import torch
import torch.multiprocessing as mp

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.kv.manager import blocks_for_tokens
from lmfleet.worker.parallel import state
from lmfleet.worker.scheduler.base import ScheduledRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ScheduledItem:
    """One scheduled request as a rank needs it: tokens [start, start + num_new_tokens)."""

    request_id: str
    num_new_tokens: int
    num_computed_tokens: int  # start
    num_tokens: int  # all known tokens (the step samples iff it reaches this)
    new_token_ids: tuple[int, ...]  # (num_new_tokens,)
    block_ids: tuple[int, ...]  # blocks covering tokens [0, start + num_new_tokens)
    num_prompt_tokens: int
    max_tokens: Optional[int]  # dense decode cache sizing


BlockCopies = tuple[tuple[int, int], ...]  # (source block, destination block) pairs


@dataclass(frozen=True)
class StepMessage:
    """Everything a rank needs for one step, as plain data (pickled by
    broadcast_object_list; no method names or engine objects)."""

    # (swap_out, swap_in) of each runner.swap since the last message, in call order: done
    # before this step's forward, the first time any rank touches those blocks.
    swaps: tuple[tuple[BlockCopies, BlockCopies], ...] = ()
    released: tuple[str, ...] = ()  # request ids finished since the last message
    scheduled: tuple[ScheduledItem, ...] = ()  # decodes and prefill chunks, engine order
    shutdown: bool = False


class _TokenWindow:
    """token_ids of a request as StepInputs reads them: absolute indices, of which only
    [offset, offset + len(tokens)) were sent."""

    def __init__(self, offset: int, tokens: tuple[int, ...]) -> None:
        self.offset, self.tokens = offset, tokens

    def __getitem__(self, index):
        if isinstance(index, slice):
            return list(self.tokens[index.start - self.offset:index.stop - self.offset])
        return self.tokens[index - self.offset]


def to_message_item(item: ScheduledRequest, block_size: int) -> ScheduledItem:
    request = item.request
    start = request.num_computed_tokens
    end = start + item.num_new_tokens
    return ScheduledItem(
        request.request_id, item.num_new_tokens, start, request.num_tokens,
        tuple(request.token_ids[start:end]),
        tuple(request.block_ids[:blocks_for_tokens(end, block_size)]),
        request.num_prompt_tokens, request.sampling_params.max_tokens)


def from_message_item(item: ScheduledItem) -> ScheduledRequest:
    request = SimpleNamespace(
        request_id=item.request_id, num_computed_tokens=item.num_computed_tokens,
        token_ids=_TokenWindow(item.num_computed_tokens, item.new_token_ids),
        num_tokens=item.num_tokens, block_ids=list(item.block_ids), num_pending_tokens=0,
        num_prompt_tokens=item.num_prompt_tokens,
        sampling_params=SimpleNamespace(max_tokens=item.max_tokens))
    return ScheduledRequest(request, item.num_new_tokens)  # type: ignore[arg-type]


class RankProcesses:
    """Ranks 1..tp-1 as spawned processes, and rank 0's membership of the group."""

    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.size = config.parallel.tensor_parallel_size
        context = mp.get_context("spawn")
        self.errors = context.Queue()
        port = state.free_port()
        os.environ.update(state.rank_environment())  # inherited by the ranks started below
        self.processes = []
        for rank in range(1, self.size):
            process = context.Process(
                target=_rank_main, name=f"lmfleet-tp-rank{rank}", daemon=True,
                args=(rank, self.size, port, config, str(model_dir), self.errors,
                      torch.get_num_threads()))
            process.start()
            self.processes.append(process)
        self._closed = False
        try:
            self._join_group(port, config)
        except BaseException as error:
            failure = self.failure(error)
            self.close(timeout_s=0)
            raise failure from error

    def _join_group(self, port: int, config: EngineConfig) -> None:
        """Join as rank 0, in a thread, watching the ranks meanwhile: one that dies before
        joining (an import error, a bad config) fails this at once, not at the timeout."""
        outcome: list[BaseException | None] = []

        def join() -> None:
            try:
                state.init_tp_group(0, self.size, port, config.model.device,
                                    config.parallel.parallel_timeout_s)
                outcome.append(None)
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=join, name="lmfleet-tp-join", daemon=True)
        thread.start()
        while thread.is_alive():
            thread.join(0.1)
            if thread.is_alive() and any(not p.is_alive() for p in self.processes):
                raise RuntimeError("a rank exited before the group was set up")
        if outcome[0] is not None:
            raise outcome[0]

    def failure(self, error: BaseException) -> BaseException:
        """The error to raise on rank 0 when a collective failed: a rank's own error if one
        reported it (it is the cause; rank 0 only saw the connection drop)."""
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                rank, message = self.errors.get(timeout=0.1)
                return RuntimeError(f"tensor-parallel rank {rank} failed: {message}")
            except queue.Empty:
                if all(not p.is_alive() for p in self.processes):
                    break
        dead = [f"rank {i + 1} (exit code {p.exitcode})"
                for i, p in enumerate(self.processes) if not p.is_alive()]
        if dead:
            return RuntimeError(f"tensor-parallel {', '.join(dead)} died: {error}")
        return error

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
        state.destroy_tp_group()


class DriverRunner:
    """Rank 0's runner: the local ModelRunner, plus each step broadcast to the other ranks
    before it runs here (the order of the collectives is the same on every rank)."""

    def __init__(self, runner: Any, ranks: RankProcesses) -> None:
        self.runner = runner
        self.ranks = ranks
        self._swaps: list = []
        self._released: list[str] = []
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # device, arch, num_blocks, ...
        return getattr(self.runner, name)

    def dead_ranks(self) -> list[str]:
        """The other ranks whose process has ended ("rank 2 (exit code -9)"), if any."""
        return [f"rank {i + 1} (exit code {p.exitcode})"
                for i, p in enumerate(self.ranks.processes) if not p.is_alive()]

    def swap(self, swap_out, swap_in) -> None:
        # Sent with the next step, before its forward: that is the first time any rank
        # reads or overwrites the swapped blocks.
        if swap_out or swap_in:
            self._swaps.append((tuple(map(tuple, swap_out)), tuple(map(tuple, swap_in))))
        self.runner.swap(swap_out, swap_in)

    def release(self, request_id: str) -> None:
        self._released.append(request_id)
        self.runner.release(request_id)

    def execute(self, scheduled, eos_token_ids):
        return self.launch(scheduled, eos_token_ids).wait()

    def launch(self, scheduled: list[ScheduledRequest], eos_token_ids, in_flight=None):
        if not scheduled:
            return self.runner.launch(scheduled, eos_token_ids, in_flight)
        if any(item.request.num_pending_tokens for item in scheduled):
            raise RuntimeError("overlapped steps are not supported with tensor parallelism")
        message = StepMessage(
            tuple(self._swaps), tuple(self._released),
            tuple(to_message_item(item, self.runner.block_size) for item in scheduled))
        self._swaps, self._released = [], []
        try:
            state.broadcast_message(message)
            return self.runner.launch(scheduled, eos_token_ids, in_flight)
        except RuntimeError as error:  # a collective failed: which rank, and why
            raise self.ranks.failure(error) from error

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            state.broadcast_message(StepMessage(shutdown=True))
        except RuntimeError:
            logger.warning("a tensor-parallel rank was gone at shutdown")
        self.ranks.close()


def serve_steps(runner: Any) -> None:
    """Ranks 1..: run each step rank 0 sends until the shutdown message."""
    while True:
        message: StepMessage = state.broadcast_message()
        if message.shutdown:
            return
        for swap_out, swap_in in message.swaps:
            runner.swap(list(swap_out), list(swap_in))
        for request_id in message.released:
            runner.release(request_id)
        runner.launch([from_message_item(item) for item in message.scheduled], ())


def _rank_main(rank: int, size: int, port: int, config: EngineConfig, model_dir: str,
               errors: Any, num_threads: int) -> None:
    os.environ.update(state.rank_environment())
    torch.set_num_threads(num_threads)
    from lmfleet.worker.runner.model_runner import ModelRunner

    try:
        state.init_tp_group(rank, size, port, config.model.device,
                            config.parallel.parallel_timeout_s)
        runner = ModelRunner(config, Path(model_dir))
        serve_steps(runner)
    except BaseException as error:  # reported to rank 0, which names this rank
        errors.put((rank, f"{type(error).__name__}: {error}"))
        logger.error("tensor-parallel rank %d failed:\n%s", rank, traceback.format_exc())
        state.destroy_tp_group()
        raise SystemExit(1) from None
    state.destroy_tp_group()
    # A clean stop leaves at once: once seen, the interpreter's teardown of the collective
    # library's threads aborted ("terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
