"""`GenerationParams`: one request's generation settings, whichever front door it came from.

The OpenAI models (openai_api.py) and the gRPC servicer (grpc_api.py) both build one of
these; generation.py turns it into worker.proto `SamplingParams` per sub-request. `None`
means "the worker's default" (proto3 `optional` fields are left unset for it).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.errors import InvalidRequestError

# Completions per prompt at most (OpenAI allows up to 128; every one is a worker request).
MAX_N = 64
# Top-N logprobs per token at most, as in the OpenAI API and the worker.
MAX_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
# Sampling floats travel as proto `float`: larger magnitudes would turn into infinity.
FLOAT32_MAX = 3.4e38


@dataclass(frozen=True)
class GenerationParams:
    max_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[int] = None
    min_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    min_tokens: Optional[int] = None
    repetition_penalty: Optional[float] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[int] = None
    n: int = 1
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        self._check_ranges()
        if not 1 <= self.n <= MAX_N:
            raise InvalidRequestError(f"n must be between 1 and {MAX_N}", param="n")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
        if (self.min_tokens is not None and self.max_tokens is not None
                and self.min_tokens > self.max_tokens):
            raise InvalidRequestError(
                f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                param="min_tokens")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise InvalidRequestError(f"logprobs must be between 0 and {MAX_LOGPROBS}",
                                      param="logprobs")

    def _check_ranges(self) -> None:
        # Same ranges as the worker's SamplingParams, checked here so that a bad value is
        # a 400 / INVALID_ARGUMENT before any replica is involved.
        def check(name: str, ok, why: str) -> None:
            value = getattr(self, name)
            if value is None:
                return
            if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
                raise InvalidRequestError(f"{name} must be a finite 32-bit number "
                                          f"(got {value!r})", param=name)
            if not ok(value):
                raise InvalidRequestError(f"{name} {why} (got {value!r})", param=name)

        check("temperature", lambda v: v >= 0, "must be >= 0")
        check("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]")
        check("top_k", lambda v: v >= -1, "must be -1 (off), 0 (off) or positive")
        check("min_p", lambda v: 0 <= v <= 1, "must be in [0, 1]")
        check("min_tokens", lambda v: v >= 0, "must be >= 0")
        check("repetition_penalty", lambda v: v > 0, "must be > 0")
        check("presence_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        check("frequency_penalty", lambda v: -2 <= v <= 2, "must be in [-2, 2]")
        check("seed", lambda v: INT64_MIN <= v <= INT64_MAX, "must fit in 64 bits")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequestError("stop_token_ids must be non-negative",
                                      param="stop_token_ids")

    def replace(self, **changes) -> GenerationParams:
        return dataclasses.replace(self, **changes)

    def child_seed(self, index: int) -> Optional[int]:
        """Seed of completion `index` of n: seed + index (wrapped into int64), so each
        completion differs and the whole set is reproducible for a given seed."""
        if self.seed is None:
            return None
        value = (self.seed + index - INT64_MIN) % (1 << 64) + INT64_MIN
        return value

    def to_worker(self, index: int, max_tokens: Optional[int]) -> worker_pb2.SamplingParams:
        """worker.proto SamplingParams for completion `index`, with `max_tokens` already
        clamped to the context left after the prompt."""
        proto = worker_pb2.SamplingParams(stop_token_ids=list(self.stop_token_ids),
                                          ignore_eos=self.ignore_eos)
        optional = {
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "seed": self.child_seed(index),
            "min_tokens": self.min_tokens,
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logprobs": self.logprobs,
        }
        for name, value in optional.items():
            if value is not None:
                setattr(proto, name, value)
        return proto
