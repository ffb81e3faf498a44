"""One completion's text as it streams (router/generation.py drives it): the events a
generation yields, and the per-completion state that turns worker token chunks into them
(incremental detokenizing, stop strings and stop tokens, counts, and the per-model TTFT,
ITL, TPOT and end-to-end metrics).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Optional, Union

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.metrics import RouterMetrics
from lmfleet.router.model_replicas import ModelReplicas
from lmfleet.router.params import GenerationParams
from lmfleet.router.tokenizer import IncrementalDetokenizer, StopStringMatcher


@dataclass
class TextChunk:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list[worker_pb2.TokenLogprob]


@dataclass
class ChoiceEnd:
    index: int
    finish_reason: str
    completion_tokens: int
    cached_tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


Event = Union[TextChunk, ChoiceEnd, Usage]


@dataclass
class RequestState:
    """Shared by the completions of one request (for the TTFT metric)."""

    arrival: float
    first_token_seen: bool = False


class ChoiceStream:
    """Text state of one completion on one attempt: detokenizer, stops, counts, ITL."""

    def __init__(self, index: int, model: ModelReplicas, prompt: list[int],
                 params: GenerationParams, stop_token_ids: set[int], emit,
                 metrics: RouterMetrics, state: RequestState) -> None:
        self.index = index
        self.model = model
        self.detokenizer = IncrementalDetokenizer(model.tokenizer, prompt,
                                                  params.skip_special_tokens)
        self.stops = StopStringMatcher(params.stop)
        self.stop_token_ids = stop_token_ids
        self.emit = emit
        self.metrics = metrics
        self.state = state
        self.prompt_len = len(prompt)
        self.token_ids: list[int] = []  # produced so far, over every attempt
        self.num_tokens = 0
        self.first_token_time: Optional[float] = None
        self.last_token_time: Optional[float] = None

    @property
    def started(self) -> bool:
        return self.num_tokens > 0

    def on_chunk(self, chunk: worker_pb2.GenerateChunk) -> bool:
        """Handle new tokens; True when a stop string ended the completion."""
        token_ids = list(chunk.token_ids)
        if not token_ids:
            return False
        self._observe_latency(len(token_ids))
        self.token_ids.extend(token_ids)
        self.num_tokens += len(token_ids)
        # A stop token ends generation; like vLLM, its text is not part of the output.
        text_ids = token_ids[:-1] if token_ids[-1] in self.stop_token_ids else token_ids
        text, matched = self.stops.feed(self.detokenizer.add(text_ids))
        self.emit(TextChunk(self.index, text, token_ids, list(chunk.logprobs)))
        if matched:
            self._end("stop", 0)
        return matched

    def on_complete(self, complete: worker_pb2.GenerateComplete) -> None:
        text, matched = self.stops.feed(self.detokenizer.finish())
        text += self.stops.flush()
        if text:
            self.emit(TextChunk(self.index, text, [], []))
        reason = "stop" if matched else (complete.finish_reason or "stop")
        self._end(reason, complete.cached_tokens)

    def _end(self, reason: str, cached_tokens: int) -> None:
        self._observe_finished(reason)
        self.emit(ChoiceEnd(self.index, reason, self.num_tokens, cached_tokens))

    def _observe_finished(self, reason: str) -> None:
        """Per finished completion, as vLLM per finished (child) request."""
        metrics, name = self.metrics, self.model.name
        now = asyncio.get_running_loop().time()
        metrics.generation_tokens.labels(name).inc(self.num_tokens)
        metrics.record_success(name, reason)
        metrics.e2e.labels(name).observe(now - self.state.arrival)
        metrics.request_prompt_tokens.observe(name, self.model.max_model_len, self.prompt_len)
        metrics.request_generation_tokens.observe(name, self.model.max_model_len,
                                                  self.num_tokens)
        # vLLM: decode time / (generated tokens - 1), 0 for fewer than two tokens.
        tpot = 0.0
        if self.num_tokens > 1 and self.first_token_time is not None:
            tpot = (self.last_token_time - self.first_token_time) / (self.num_tokens - 1)
        metrics.tpot.labels(name).observe(tpot)

    def _observe_latency(self, num_tokens: int) -> None:
        now = asyncio.get_running_loop().time()
        if self.first_token_time is None:
            self.first_token_time = now
        if not self.state.first_token_seen:
            self.state.first_token_seen = True
            self.metrics.ttft.labels(self.model.name).observe(now - self.state.arrival)
        if self.last_token_time is not None:
            per_token = (now - self.last_token_time) / num_tokens
            for _ in range(min(num_tokens, 64)):
                self.metrics.itl.labels(self.model.name).observe(per_token)
        self.last_token_time = now

