"""How the ranks of one replica run each step.

Rank 0 (stage 0, tensor-parallel rank 0) is the engine's process: it runs the scheduler
and KV accounting, and its runner is wrapped in `DriverRunner`, which turns each call
into a `StepMessage` (messages.py):
- the other ranks of stage 0 get it by broadcast (`serve_stage0`) and run the same step,
  their heads of the same layers; the collectives inside the layers join them;
- under pipeline parallelism, every rank of stage s passes it, with its hidden states, to
  the rank of stage s + 1 with the same tensor-parallel rank (`serve_later_stage`).
The last stage sends the rows that sample back to stage 0, which computes the logits and
(rank 0 only) samples when the engine waits for that step: so up to pp steps are in
flight, each in another stage. Every rank handles its messages in rank 0's order, so
swaps, releases and KV writes happen in the same order everywhere.

Overlapped steps under TP would need rank 0's sampled tokens on the other ranks' devices
(a device broadcast per step, where the message marks placeholder rows); until that
exists the engine runs parallel steps without that overlap (the CPU default anyway).
"""

from __future__ import annotations

import logging
from collections import deque
from typing import Any

from lmfleet.worker.parallel import state
from lmfleet.worker.parallel.messages import StepMessage, from_message_item, to_message_item
from lmfleet.worker.scheduler.base import ScheduledRequest

logger = logging.getLogger(__name__)


class _FinishingStep:
    """A pipeline step on rank 0 whose sampled rows are still to come back: waiting for
    it first tells stage 0's other ranks to compute its logits too."""

    def __init__(self, driver: DriverRunner, launched: Any) -> None:
        self.driver, self.launched = driver, launched
        self.requests, self.row_of = launched.requests, launched.row_of

    def wait(self):
        self.driver._send(StepMessage(finish_oldest=True), to_pipeline=False)
        try:
            return self.launched.wait()
        except RuntimeError as error:  # a transfer failed: which rank, and why
            raise self.driver.ranks.failure(error) from error


class DriverRunner:
    """Rank 0's runner: the local ModelRunner, plus each step sent to the other ranks
    before it runs here (the order of the collectives is the same on every rank)."""

    def __init__(self, runner: Any, ranks: Any) -> None:
        self.runner = runner
        self.ranks = ranks
        self.tp_size = state.get_tp_size()
        self.pp_size = state.get_pp_size()
        self._swaps: list = []
        self._released: list[str] = []
        self._closed = False

    def __getattr__(self, name: str) -> Any:  # device, arch, num_blocks, ...
        return getattr(self.runner, name)

    def dead_ranks(self) -> list[str]:
        """The other ranks whose process has ended ("rank 2 (exit code -9)"), if any."""
        return self.ranks.dead()

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

    def _send(self, message: StepMessage, to_pipeline: bool = True) -> None:
        if self.tp_size > 1:
            state.broadcast_message(message)
        if to_pipeline and self.runner.pipeline is not None:
            self.runner.pipeline.send_message(message)

    def launch(self, scheduled: list[ScheduledRequest], eos_token_ids, in_flight=None):
        if not scheduled:
            return self.runner.launch(scheduled, eos_token_ids, in_flight)
        if any(item.request.num_pending_tokens for item in scheduled):
            raise RuntimeError("overlapped steps are not supported with parallel ranks")
        message = StepMessage(
            tuple(self._swaps), tuple(self._released),
            tuple(to_message_item(item, self.runner.block_size) for item in scheduled))
        self._swaps, self._released = [], []
        try:
            self._send(message)
            launched = self.runner.launch(scheduled, eos_token_ids, in_flight)
        except RuntimeError as error:  # a collective failed: which rank, and why
            raise self.ranks.failure(error) from error
        if self.pp_size > 1 and launched.pending is not None:
            return _FinishingStep(self, launched)
        return launched

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._send(StepMessage(shutdown=True))
            if self.runner.pipeline is not None:
                self.runner.pipeline.flush()
        except RuntimeError:
            logger.warning("a parallel rank was gone at shutdown")
        self.ranks.close()


def _apply(runner: Any, message: StepMessage) -> Any:
    """Run one step message on this rank; returns its launched step."""
    for swap_out, swap_in in message.swaps:
        runner.swap(list(swap_out), list(swap_in))
    for request_id in message.released:
        runner.release(request_id)
    return runner.launch([from_message_item(item) for item in message.scheduled], ())


def serve_stage0(runner: Any) -> None:
    """Stage 0's ranks other than 0: each message rank 0 broadcasts, until shutdown."""
    unfinished: deque = deque()  # pipeline steps whose rows are still to come back
    while True:
        message: StepMessage = state.broadcast_message()
        if message.finish_oldest:
            unfinished.popleft().wait()
            continue
        if runner.pipeline is not None:
            runner.pipeline.send_message(message)
        if message.shutdown:
            return
        launched = _apply(runner, message)
        if runner.pipeline is not None and launched.pending is not None:
            unfinished.append(launched)


def serve_later_stage(runner: Any) -> None:
    """Stages 1..: each message the previous stage passes on, until shutdown."""
    while True:
        message: StepMessage = runner.pipeline.recv_message()
        runner.pipeline.send_message(message)  # a no-op on the last stage
        if message.shutdown:
            return
        _apply(runner, message)
