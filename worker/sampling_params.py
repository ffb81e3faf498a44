"""Sampling parameters of one request, validated at construction.

Field names and meanings follow vLLM's `SamplingParams` so that OpenAI-API users find
what they know. Every invalid value raises `ValueError` naming the field; nothing here
uses `assert`, because these values come straight from users.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

# A temperature below this is treated as greedy: dividing logits by ~0 overflows, and the
# result equals argmax anyway.
GREEDY_TEMPERATURE_EPS = 1e-5

# Upper bound on top-N logprobs per token, as in the OpenAI API (top_logprobs <= 20).
MAX_LOGPROBS = 20


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token and when to stop.

    max_tokens: generated tokens at most (None: up to the model's context).
    temperature: 0 means greedy (argmax); otherwise logits are divided by it.
    top_p / top_k / min_p: nucleus, top-k (-1 or 0: off) and min-p filtering.
    seed: per-request seed; the same seed gives the same tokens whatever else is batched.
    stop_token_ids: extra token ids that end generation (the token is kept in the output).
    ignore_eos: keep generating past the end-of-sequence token.
    min_tokens: EOS and stop_token_ids are suppressed until this many tokens exist.
    repetition_penalty: HF/vLLM style, >1 discourages tokens seen in prompt or output.
    presence_penalty / frequency_penalty: OpenAI style, over generated tokens only.
    logprobs: return the log-probabilities of the top-N tokens at each step (None: off).
    n: completions per prompt (the LLM front end and the router fan out; the engine
       itself runs single-sequence requests).
    """

    max_tokens: Optional[int] = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: Optional[int] = None
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    min_tokens: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: Optional[int] = None
    n: int = 1

    def __post_init__(self) -> None:
        # Lists are accepted for convenience; a tuple keeps the dataclass hashable.
        if not isinstance(self.stop_token_ids, tuple):
            try:
                stop_token_ids = tuple(self.stop_token_ids or ())
            except TypeError:
                # A bare id (stop_token_ids=2) is not iterable: report it as a bad value
                # naming the field, like every other one, instead of a TypeError.
                raise ValueError(
                    f"invalid sampling parameter stop_token_ids={self.stop_token_ids!r}: "
                    "must be a list of token ids") from None
            object.__setattr__(self, "stop_token_ids", stop_token_ids)
        self._validate()

    def _validate(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"invalid sampling parameter {name}={getattr(self, name)!r}: {why}")

        def number(name: str) -> float:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad(name, "must be a number")
            if not math.isfinite(value):
                raise bad(name, "must be finite")
            return float(value)

        def integer(name: str) -> int:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad(name, "must be an integer")
            return value

        if self.max_tokens is not None and integer("max_tokens") < 1:
            raise bad("max_tokens", "must be at least 1")
        if number("temperature") < 0:
            raise bad("temperature", "must be >= 0")
        if not 0 < number("top_p") <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if integer("top_k") < -1:
            raise bad("top_k", "must be -1 (off), 0 (off) or positive")
        if not 0 <= number("min_p") <= 1:
            raise bad("min_p", "must be in [0, 1]")
        if self.seed is not None:
            integer("seed")
        for token_id in self.stop_token_ids:
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise bad("stop_token_ids", "must be non-negative integers")
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "must be a boolean")
        if integer("min_tokens") < 0:
            raise bad("min_tokens", "must be >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        if number("repetition_penalty") <= 0:
            raise bad("repetition_penalty", "must be > 0")
        if not -2 <= number("presence_penalty") <= 2:
            raise bad("presence_penalty", "must be in [-2, 2]")
        if not -2 <= number("frequency_penalty") <= 2:
            raise bad("frequency_penalty", "must be in [-2, 2]")
        if self.logprobs is not None and not 0 <= integer("logprobs") <= MAX_LOGPROBS:
            raise bad("logprobs", f"must be in [0, {MAX_LOGPROBS}]")
        if integer("n") < 1:
            raise bad("n", "must be at least 1")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @property
    def top_k_enabled(self) -> bool:
        return self.top_k > 0

    @property
    def uses_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )
