"""The step message: what rank 0 sends the other ranks of its replica for each step.

Plain data (pickled), no method names or engine objects: the scheduled requests' new
token ids, positions and block ids, and the swaps and releases since the last message.
Every rank rebuilds `ScheduledRequest`s from it and calls the same `ModelRunner.launch`,
so `StepInputs.prepare` fills identical token ids, positions, slot mappings and block
tables on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Optional

from lmfleet.worker.kv.manager import blocks_for_tokens
from lmfleet.worker.scheduler.base import ScheduledRequest


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
    """One event of rank 0's runner, in the order it happened there."""

    # (swap_out, swap_in) of each runner.swap since the last message, in call order: done
    # before this step's forward, the first time any rank touches those blocks.
    swaps: tuple[tuple[BlockCopies, BlockCopies], ...] = ()
    released: tuple[str, ...] = ()  # request ids finished since the last message
    scheduled: tuple[ScheduledItem, ...] = ()  # decodes and prefill chunks, engine order
    # Stage 0 only, under pipeline parallelism: compute the logits of the oldest step whose
    # sampled rows are still to come back from the last stage (instead of a step).
    finish_oldest: bool = False
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
