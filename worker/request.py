"""A request as the engine tracks it, and what the engine reports back.

One token-budget model covers prefill, chunked prefill, prefix hits and decode (as in
vLLM v1): `num_computed_tokens` catches up with `num_tokens` a step at a time, and a
request samples a new token only in the step where it catches up.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Optional

from lmfleet.worker.model.vision.vision_info import ImageSpan
from lmfleet.worker.sampling_params import SamplingParams


def validate_prompt(prompt_token_ids: list[int], max_model_len: int, vocab_size: int) -> None:
    """Raise ValueError if a prompt can never run: empty, no room left in the context for a
    generated token, or a token id outside the vocabulary."""
    if not prompt_token_ids:
        raise ValueError("prompt is empty: at least one token is required")
    if len(prompt_token_ids) >= max_model_len:
        raise ValueError(
            f"prompt has {len(prompt_token_ids)} tokens but the model's context is "
            f"{max_model_len} tokens (room for at least one generated token is needed)")
    for token_id in prompt_token_ids:
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not (
                0 <= token_id < vocab_size):
            raise ValueError(f"prompt token id {token_id!r} is outside the vocabulary "
                             f"[0, {vocab_size})")


class RequestStatus(enum.Enum):
    WAITING = "waiting"  # not scheduled yet, or preempted and waiting to be resumed
    RUNNING = "running"  # holds device KV blocks and is scheduled each step
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS or a stop token (the router also uses it for stop strings)
    LENGTH = "length"  # max_tokens or the model's context reached
    ABORT = "abort"  # aborted by the caller


@dataclass(frozen=True)
class TokenLogprobs:
    """Log-probability of the sampled token and of the top-N alternatives at one step."""

    token_id: int
    logprob: float
    top_token_ids: tuple[int, ...]
    top_logprobs: tuple[float, ...]


@dataclass
class Request:
    """Mutable per-request state owned by the engine (scheduler and KV manager update it)."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    arrival_time: float = field(default_factory=time.monotonic)
    # Larger is more important; the FCFS scheduler preempts the lowest priority first,
    # then the latest arrival. MLFQ uses it to shift the starting queue.
    priority: int = 0
    session_id: Optional[str] = None
    # Seed actually used by the sampler (the user's seed, or one drawn at admission).
    sampling_seed: int = 0
    # Encoded images (PNG, JPEG, ...) of a vision-language model's prompt, in the order of
    # their runs of image tokens (model/vision/vision_info.py); the engine fills `image_spans`.
    images: tuple[bytes, ...] = ()
    image_spans: list[ImageSpan] = field(default_factory=list)

    status: RequestStatus = RequestStatus.WAITING
    finish_reason: Optional[FinishReason] = None
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    # Prompt + output; kept as one list so the runner never concatenates per step.
    token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    # Prompt tokens served from the prefix cache the first time the request was scheduled.
    num_cached_tokens: int = -1
    # Tokens the model actually computed for this request (prefills + decodes), all runs.
    num_prefilled_tokens: int = 0
    num_preemptions: int = 0
    # Device KV blocks in order: block i holds tokens [i*block_size, (i+1)*block_size).
    block_ids: list[int] = field(default_factory=list)
    # Chained hashes of the full blocks of token_ids computed so far (prefix caching).
    block_hashes: list[bytes] = field(default_factory=list)
    # How many of block_ids (from the start) are registered in the prefix cache.
    num_registered_blocks: int = 0
    # Host-memory blocks holding this request's computed KV while it is swapped out
    # (then block_ids is empty); block i again holds tokens [i*bs, (i+1)*bs).
    host_block_ids: list[int] = field(default_factory=list)
    # Sampled tokens still on the device (overlapped steps): each sits at the end of
    # token_ids as PLACEHOLDER_TOKEN until the engine reads it back.
    num_pending_tokens: int = 0

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        """Outputs sampled so far, including ones still on the device."""
        return len(self.output_token_ids) + self.num_pending_tokens

    @property
    def output_is_complete(self) -> bool:
        """max_tokens outputs exist (some maybe still on the device): nothing to schedule."""
        max_tokens = self.sampling_params.max_tokens
        return max_tokens is not None and self.num_output_tokens >= max_tokens

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet (the whole prompt before a prefill)."""
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    @property
    def is_swapped(self) -> bool:
        """Its computed KV lives in host memory and must be swapped in before it runs."""
        return bool(self.host_block_ids)

    def append_output_token(self, token_id: int, logprobs: Optional[TokenLogprobs]) -> None:
        self.output_token_ids.append(token_id)
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def append_placeholder(self) -> None:
        """A token was sampled on the device and is not read back yet: its slot in
        token_ids exists (so the next step can be scheduled) but holds no id."""
        self.token_ids.append(PLACEHOLDER_TOKEN)
        self.num_pending_tokens += 1

    def resolve_placeholder(self, token_id: int, logprobs: Optional[TokenLogprobs]) -> None:
        """The oldest pending token arrived: it fills its placeholder."""
        position = len(self.token_ids) - self.num_pending_tokens
        self.token_ids[position] = token_id
        self.num_pending_tokens -= 1
        self.output_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)

    def drop_placeholder(self) -> None:
        """Forget the newest pending token (its step's result is discarded)."""
        self.token_ids.pop()
        self.num_pending_tokens -= 1


# Stands for a sampled token that is still on the device (never a valid token id).
PLACEHOLDER_TOKEN = -1


@dataclass
class CompletionOutput:
    """One of the n completions of a prompt."""

    index: int
    output_token_ids: list[int]
    text: str = ""
    finish_reason: Optional[str] = None
    logprobs: Optional[list[TokenLogprobs]] = None


@dataclass
class RequestOutput:
    """What the engine reports about a request after a step, and what `LLM.generate` returns.

    From `LLMEngine.step()`: `new_token_ids` holds the tokens produced by that step,
    `output_token_ids` all tokens so far, and `finish_reason` is set once finished.
    From `LLM.generate()`: `text` is the decoded output and `outputs` holds all n
    completions (the top-level fields mirror `outputs[0]`).
    """

    request_id: str
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    finish_reason: Optional[str] = None
    new_token_ids: list[int] = field(default_factory=list)
    text: str = ""
    prompt: Optional[str] = None
    logprobs: Optional[list[TokenLogprobs]] = None
    num_cached_tokens: int = 0
    outputs: list[CompletionOutput] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
