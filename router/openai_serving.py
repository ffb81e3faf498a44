"""Generation events -> OpenAI responses: whole JSON bodies and SSE streams.

`OpenAIFormatter` is one request's view: the chat or completions shape, its id/created/
model, whether logprobs were asked for. `collect()` builds the non-streaming body;
`sse()` yields `data: <json>\n\n` frames ending with `data: [DONE]\n\n`, a usage chunk
with `choices: []` first when `stream_options.include_usage` is set, and an error frame
`data: {"error": {...}}` if the generation fails after the response started.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any, Optional

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.choice_stream import ChoiceEnd, Event, TextChunk, Usage
from lmfleet.router.errors import RouterError
from lmfleet.router.openai_api import (
    ChatChoiceLogprobs,
    ChatCompletionChoice,
    ChatCompletionResponse,
    ChatLogprob,
    ChatMessageOut,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    TopLogprob,
    UsageInfo,
    error_body,
)
from lmfleet.router.tokenizer import ModelTokenizer, token_bytes

logger = logging.getLogger(__name__)


class _Choice:
    """Accumulated output of one choice (non-streaming) or its running text offset."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.chat_logprobs: list[ChatLogprob] = []
        self.completion_logprobs = CompletionLogprobs()
        self.text_offset = 0
        self.finish_reason: Optional[str] = None


class OpenAIFormatter:
    def __init__(self, chat: bool, request_id: str, created: int, model: str,
                 tokenizer: ModelTokenizer, logprobs: bool, include_usage: bool = False
                 ) -> None:
        self.chat = chat
        self.request_id = request_id
        self.created = created
        self.model = model
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.include_usage = include_usage
        self._choices: dict[int, _Choice] = {}

    def _choice(self, index: int) -> _Choice:
        return self._choices.setdefault(index, _Choice())

    # ---- logprobs ------------------------------------------------------------------------
    def _chat_logprobs(self, entries: list[worker_pb2.TokenLogprob]) -> list[ChatLogprob]:
        result = []
        for entry in entries:
            text = self.tokenizer.token_text(entry.token_id)
            top = [TopLogprob(token=(t := self.tokenizer.token_text(tid)), logprob=lp,
                              bytes=token_bytes(t))
                   for tid, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=False)]
            result.append(ChatLogprob(token=text, logprob=entry.logprob,
                                      bytes=token_bytes(text), top_logprobs=top))
        return result

    def _completion_logprobs(self, choice: _Choice, entries: list[worker_pb2.TokenLogprob]
                             ) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for entry in entries:
            text = self.tokenizer.token_text(entry.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(entry.logprob)
            result.top_logprobs.append({
                self.tokenizer.token_text(tid): lp
                for tid, lp in zip(entry.top_token_ids, entry.top_logprobs, strict=False)})
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
        return result

    def _accumulate_logprobs(self, choice: _Choice,
                             entries: list[worker_pb2.TokenLogprob]) -> None:
        if self.chat:
            choice.chat_logprobs.extend(self._chat_logprobs(entries))
            return
        part = self._completion_logprobs(choice, entries)
        merged = choice.completion_logprobs
        for name in ("text_offset", "token_logprobs", "tokens", "top_logprobs"):
            getattr(merged, name).extend(getattr(part, name))

    @staticmethod
    def usage_info(usage: Usage) -> UsageInfo:
        details = (PromptTokensDetails(cached_tokens=usage.cached_tokens)
                   if usage.cached_tokens else None)
        return UsageInfo(prompt_tokens=usage.prompt_tokens,
                         completion_tokens=usage.completion_tokens,
                         total_tokens=usage.total_tokens, prompt_tokens_details=details)

    # ---- whole response ------------------------------------------------------------------
    async def collect(self, events: AsyncIterator[Event]) -> dict[str, Any]:
        usage = None
        async with contextlib.aclosing(events) as stream:
            async for event in stream:
                if isinstance(event, TextChunk):
                    choice = self._choice(event.index)
                    choice.text.append(event.text)
                    if self.logprobs and event.logprobs:
                        self._accumulate_logprobs(choice, event.logprobs)
                elif isinstance(event, ChoiceEnd):
                    self._choice(event.index).finish_reason = event.finish_reason
                elif isinstance(event, Usage):
                    usage = event
        assert usage is not None, "a finished generation always reports usage"
        indices = sorted(self._choices)
        if self.chat:
            return ChatCompletionResponse(
                id=self.request_id, created=self.created, model=self.model,
                choices=[ChatCompletionChoice(
                    index=i, message=ChatMessageOut(content="".join(self._choices[i].text)),
                    logprobs=(ChatChoiceLogprobs(content=self._choices[i].chat_logprobs)
                              if self.logprobs else None),
                    finish_reason=self._choices[i].finish_reason) for i in indices],
                usage=self.usage_info(usage)).model_dump()
        return CompletionResponse(
            id=self.request_id, created=self.created, model=self.model,
            choices=[CompletionChoice(
                index=i, text="".join(self._choices[i].text),
                logprobs=self._choices[i].completion_logprobs if self.logprobs else None,
                finish_reason=self._choices[i].finish_reason) for i in indices],
            usage=self.usage_info(usage)).model_dump()

    # ---- SSE -----------------------------------------------------------------------------
    def _frame(self, choices: list[dict[str, Any]], usage: Optional[UsageInfo] = None) -> str:
        body: dict[str, Any] = {
            "id": self.request_id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.created, "model": self.model, "choices": choices}
        if self.include_usage:
            body["usage"] = usage.model_dump() if usage is not None else None
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def _chunk_choice(self, index: int, text: Optional[str], role: bool = False,
                      logprobs: Optional[list[worker_pb2.TokenLogprob]] = None,
                      finish_reason: Optional[str] = None) -> dict[str, Any]:
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            lp = (ChatChoiceLogprobs(content=self._chat_logprobs(logprobs)).model_dump()
                  if self.logprobs and logprobs else None)
            return {"index": index, "delta": delta, "logprobs": lp,
                    "finish_reason": finish_reason}
        lp = (self._completion_logprobs(self._choice(index), logprobs).model_dump()
              if self.logprobs and logprobs else None)
        return {"index": index, "text": text or "", "logprobs": lp,
                "finish_reason": finish_reason}

    async def sse(self, events: AsyncIterator[Event]) -> AsyncIterator[str]:
        started: set[int] = set()
        try:
            async with contextlib.aclosing(events) as stream:
                async for event in stream:
                    if isinstance(event, TextChunk):
                        if self.chat and event.index not in started:
                            started.add(event.index)  # the role comes first, alone
                            yield self._frame([self._chunk_choice(event.index, "", role=True)])
                        if event.text or (self.logprobs and event.logprobs):
                            yield self._frame([self._chunk_choice(event.index, event.text,
                                                                  logprobs=event.logprobs)])
                    elif isinstance(event, ChoiceEnd):
                        if self.chat and event.index not in started:
                            started.add(event.index)
                            yield self._frame([self._chunk_choice(event.index, "", role=True)])
                        yield self._frame([self._chunk_choice(
                            event.index, None if self.chat else "",
                            finish_reason=event.finish_reason)])
                    elif isinstance(event, Usage) and self.include_usage:
                        yield self._frame([], usage=self.usage_info(event))
        except RouterError as error:
            body = error_body(error.message, error.error_type, error.http_status, error.param)
            yield f"data: {json.dumps(body)}\n\n"
        except Exception:  # a bug: the client still gets a well-formed end of stream
            logger.exception("streaming a response failed")
            body = error_body("internal error", "InternalServerError", 500)
            yield f"data: {json.dumps(body)}\n\n"
        yield "data: [DONE]\n\n"

