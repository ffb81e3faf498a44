"""The OpenAI protocol as vLLM serves it: request, response and stream-chunk models.

Requests accept unknown fields and ignore them (clients send provider-specific extras),
except the known fields of features lmfleet does not implement (tools, structured output,
...: request_checks.py), which are refused unless "off". Known fields are validated
strictly: a wrong JSON type is a 400 (`"stream": "yes"` is not true, `"max_tokens": "5"`
is not 5), and text must be valid Unicode (no lone surrogates). Field constraints are
declared here so that /openapi.json describes what the server really accepts;
`GenerationParams` re-checks the same ranges for the gRPC door. Errors are
`{"error": {"message", "type", "param", "code"}}` with the HTTP status as `code`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from lmfleet.router.params import (
    FLOAT32_MAX,
    INT64_MAX,
    INT64_MIN,
    MAX_LOGPROBS,
    MAX_N,
    GenerationParams,
)
from lmfleet.router.request_checks import (
    CHAT_FEATURES,
    COMMON_FEATURES,
    COMPLETION_FEATURES,
    Feature,
    check_text,
    check_unsupported,
)
from lmfleet.router.tokenizer import ChatRole

TokenId = Annotated[int, Field(ge=0, le=(1 << 32) - 1)]
Int32 = Annotated[int, Field(ge=-(1 << 31), le=(1 << 31) - 1)]
TokenCount = Annotated[int, Field(ge=1, le=(1 << 32) - 1)]
Probability = Annotated[float, Field(ge=0, le=1, allow_inf_nan=False)]
Penalty = Annotated[float, Field(ge=-2, le=2, allow_inf_nan=False)]


class _Request(BaseModel):
    # Unknown fields are accepted and ignored, as vLLM and OpenAI do. Strict: JSON types
    # are not coerced, so `"stream": "yes"` or `"n": 2.0` is a 400, never a guess.
    model_config = ConfigDict(extra="ignore", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Request):
    include_usage: Optional[bool] = False


class _SamplingFields(_Request):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: Optional[str] = Field(
        None, description="A name from /v1/models; may be omitted when only one is served.")
    max_tokens: Optional[TokenCount] = Field(
        None, description="Clamped to the context left after the prompt.")
    temperature: Optional[Annotated[float, Field(ge=0, le=FLOAT32_MAX,
                                                 allow_inf_nan=False)]] = None
    top_p: Optional[Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)]] = None
    top_k: Optional[Annotated[int, Field(ge=-1, le=(1 << 31) - 1)]] = None
    min_p: Optional[Probability] = None
    stop: Optional[Union[str, list[str]]] = None
    stop_token_ids: Optional[list[TokenId]] = None
    n: Optional[Annotated[int, Field(ge=1, le=MAX_N)]] = 1
    seed: Optional[Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX)]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    ignore_eos: Optional[bool] = False
    min_tokens: Optional[Annotated[int, Field(ge=0, le=(1 << 32) - 1)]] = None
    presence_penalty: Optional[Penalty] = None
    frequency_penalty: Optional[Penalty] = None
    repetition_penalty: Optional[Annotated[float, Field(gt=0, le=FLOAT32_MAX,
                                                        allow_inf_nan=False)]] = None
    priority: Optional[Int32] = 0
    session_id: Optional[str] = Field(
        None, description="Chat session: its turns go to the same replica.")
    user: Optional[str] = None
    skip_special_tokens: Optional[bool] = True

    # Fields of unimplemented features this endpoint refuses unless "off".
    _features: ClassVar[Mapping[str, Feature]] = COMMON_FEATURES

    @model_validator(mode="before")
    @classmethod
    def _check_raw(cls, data: Any) -> Any:
        check_unsupported(data, cls._features)
        check_text(data, cls.model_fields)
        return data

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: Optional[int], logprobs: Optional[int]) -> GenerationParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return GenerationParams(
            max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
            top_k=self.top_k, min_p=self.min_p, seed=self.seed, stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()), ignore_eos=bool(self.ignore_eos),
            min_tokens=self.min_tokens, repetition_penalty=self.repetition_penalty,
            presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
            logprobs=logprobs, n=self.n or 1,
            skip_special_tokens=self.skip_special_tokens is not False)


# ---- /v1/chat/completions ---------------------------------------------------------------


class ImageURL(_Request):
    url: str = Field(description="A base64 data URL (data:image/png;base64,...); http(s) "
                     "only where the router fetches them (--allow-image-urls).")
    detail: Optional[str] = Field(None, description="Accepted and ignored.")


class ContentPart(_Request):
    """A text part, or (vision models) an image part: router/images.py."""

    type: str
    text: Optional[str] = None
    image_url: Optional[ImageURL] = None


class ChatMessage(_Request):
    role: ChatRole
    content: Optional[Union[str, list[ContentPart]]] = None
    name: Optional[str] = None


class ChatCompletionRequest(_SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Optional[TokenCount] = Field(
        None, description="Preferred over max_tokens when both are given.")
    logprobs: Optional[bool] = False
    top_logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None
    add_generation_prompt: Optional[bool] = True

    _features: ClassVar[Mapping[str, Feature]] = {**COMMON_FEATURES, **CHAT_FEATURES}

    @model_validator(mode="after")
    def _check(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def to_params(self) -> GenerationParams:
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return self._params(max_tokens, logprobs)


class ChatMessageOut(_Response):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: Optional[list[int]] = None


class ChatLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatChoiceLogprobs(_Response):
    content: Optional[list[ChatLogprob]] = None


FinishReason = Optional[Literal["stop", "length", "abort"]]


class ChatCompletionChoice(_Response):
    index: int
    message: ChatMessageOut
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: FinishReason = None


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class UsageInfo(_Response):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: Optional[PromptTokensDetails] = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatCompletionChoice]
    usage: UsageInfo


class DeltaMessage(_Response):
    role: Optional[Literal["assistant"]] = None
    content: Optional[str] = None


class ChatCompletionStreamChoice(_Response):
    index: int
    delta: DeltaMessage
    logprobs: Optional[ChatChoiceLogprobs] = None
    finish_reason: FinishReason = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatCompletionStreamChoice]
    usage: Optional[UsageInfo] = None


# ---- /v1/completions --------------------------------------------------------------------

Prompt = Union[str, Annotated[list[str], Field(min_length=1)],
               Annotated[list[TokenId], Field(min_length=1)],
               Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]]


class CompletionRequest(_SamplingFields):
    prompt: Prompt = Field(description="Text, texts, token ids, or lists of token ids.")
    logprobs: Optional[Annotated[int, Field(ge=0, le=MAX_LOGPROBS)]] = None

    _features: ClassVar[Mapping[str, Feature]] = {**COMMON_FEATURES, **COMPLETION_FEATURES}

    def prompts(self) -> list[Union[str, list[int]]]:
        """The prompt as a list of prompts (each text or token ids)."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        if all(isinstance(p, int) for p in self.prompt):
            return [list(self.prompt)]
        return [p if isinstance(p, str) else list(p) for p in self.prompt]

    def to_params(self) -> GenerationParams:
        # OpenAI's completions default is 16 tokens; chat's is "up to the context".
        max_tokens = self.max_tokens if self.max_tokens is not None else 16
        return self._params(max_tokens, self.logprobs)


class CompletionLogprobs(_Response):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Optional[float]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Optional[dict[str, float]]] = Field(default_factory=list)


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: Optional[CompletionLogprobs] = None
    finish_reason: FinishReason = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionChunk(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Optional[UsageInfo] = None


# ---- /v1/models and errors --------------------------------------------------------------


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmfleet"
    root: Optional[str] = None
    max_model_len: Optional[int] = None
    num_replicas: int = 0


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(_Response):
    message: str
    type: str
    param: Optional[str] = None
    code: int


class ErrorResponse(_Response):
    error: ErrorInfo


def error_body(message: str, error_type: str, status: int,
               param: Optional[str] = None) -> dict[str, Any]:
    return ErrorResponse(error=ErrorInfo(message=message, type=error_type, param=param,
                                         code=status)).model_dump()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
