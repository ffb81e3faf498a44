"""Text side of the router: tokenizers, chat templates, incremental detokenization, stops.

The worker speaks token ids only; everything about text lives here:

- `ModelTokenizer`: one model's Hugging Face tokenizer with prompt encoding and chat
  template application (loaded from the worker's `ModelInfo.model_path`, which the router
  can read because workers and router share a filesystem in the all-in-one setup; if it
  cannot, the model name is resolved through lmfleet's model cache instead), and, for a
  vision-language model, its image prompt layout (`vision`, read from the same directory).
- `IncrementalDetokenizer`: streamed token ids -> text deltas that never contain broken
  UTF-8, using the prefix/read-offset technique of vLLM and TGI.
- `StopStringMatcher`: cuts the text at the first stop string and holds back any tail
  that could still become one, so a stop string never leaks to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, Optional, get_args

from lmfleet.router.errors import InvalidRequestError
from lmfleet.worker.chat_images import ContentPartError, template_content
from lmfleet.worker.model.vision.vision_info import VisionInfo

logger = logging.getLogger(__name__)

# U+FFFD: what a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT_CHAR = "\ufffd"

# Prompt tokens decoded in front of the first output tokens. Some tokenizers (sentencepiece)
# render a token's leading space only when something precedes it; vLLM uses 5 as well.
DETOKENIZE_CONTEXT_TOKENS = 5

# Chat roles both front doors accept. Not "tool"/"function": tool calling is not
# implemented (request_checks.py), so a conversation cannot hold their results.
ChatRole = Literal["system", "user", "assistant", "developer"]
CHAT_ROLES: tuple[str, ...] = get_args(ChatRole)


class ModelTokenizer:
    """A model's tokenizer as the router uses it. Thread-safe for encode/decode."""

    def __init__(self, hf_tokenizer: Any, model_name: str,
                 vision: Optional[VisionInfo] = None) -> None:
        self.hf = hf_tokenizer
        self.model_name = model_name
        # None for a text-only model: image parts are refused (router/images.py).
        self.vision = vision

    def encode(self, text: str) -> list[int]:
        """Token ids of raw text, with the tokenizer's default special tokens (as `LLM`)."""
        return list(self.hf.encode(text))

    def apply_chat_template(self, messages: Sequence[dict[str, Any]],
                            add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation rendered by the model's chat template.

        Raises InvalidRequestError when the model has no template or the template rejects
        the conversation (e.g. an unsupported role).
        """
        if not messages:
            raise InvalidRequestError("messages must not be empty", param="messages")
        if not getattr(self.hf, "chat_template", None):
            raise InvalidRequestError(
                f"model {self.model_name!r} has no chat template; use /v1/completions",
                param="messages")
        try:
            encoded = self.hf.apply_chat_template(
                list(messages), add_generation_prompt=add_generation_prompt, tokenize=True)
        except Exception as error:  # jinja2 errors raised by the template itself
            raise InvalidRequestError(f"cannot apply the chat template: {error}",
                                      param="messages") from error
        # transformers 5 returns a BatchEncoding here; 4.x returns the list of ids.
        if hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return list(encoded)

    def decode(self, token_ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(list(token_ids), skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """One token rendered on its own (for logprobs); may be a partial character."""
        return self.hf.decode([token_id], skip_special_tokens=False)


def load_model_tokenizer(model_path: str, model_name: str) -> ModelTokenizer:
    """The tokenizer of a worker's model.

    `model_path` is the worker's `ModelInfo.model_path`. If it is not a readable directory
    on this machine, `model_name` is resolved with lmfleet's model cache ("default", a
    .gguf file, or a directory). Raises ValueError if neither works.
    """
    from transformers import AutoTokenizer

    candidates: list[Path] = []
    if model_path and Path(model_path).is_dir():
        candidates.append(Path(model_path))
    else:
        try:
            # Imported lazily: the model cache pulls in the worker package.
            from lmfleet.worker.model.default_model import resolve_model_path

            candidates.append(Path(resolve_model_path(model_name, progress=False)))
        except (ValueError, OSError) as error:
            logger.warning("cannot resolve model %r locally: %s", model_name, error)
    for directory in candidates:
        try:
            return ModelTokenizer(AutoTokenizer.from_pretrained(str(directory)), model_name,
                                  vision=VisionInfo.from_model_dir(directory))
        except (OSError, ValueError) as error:
            logger.warning("cannot load a tokenizer from %s: %s", directory, error)
    raise ValueError(f"no tokenizer for model {model_name!r} (worker path {model_path!r} "
                     "is not readable here and the name does not resolve locally)")


class IncrementalDetokenizer:
    """Turns a stream of output token ids into text deltas.

    Contract: every delta is valid text (no trailing U+FFFD from a character split across
    tokens); after `finish()`, the concatenated deltas equal the text of all output tokens
    decoded in the context of the prompt. Special tokens are skipped by default.

    Technique (vLLM/TGI): keep two offsets into the ids. `prefix_offset..read_offset` is
    text already emitted; decoding `prefix_offset..end` and cutting off the prefix text
    gives the new text. Offsets advance only when the new text does not end in U+FFFD, so
    an incomplete UTF-8 sequence is held back until its last byte arrives.
    """

    def __init__(self, tokenizer: ModelTokenizer, prompt_token_ids: Sequence[int] = (),
                 skip_special_tokens: bool = True) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        context = list(prompt_token_ids[-DETOKENIZE_CONTEXT_TOKENS:])
        # A prompt that ends mid-character would make its own U+FFFD part of the prefix.
        if REPLACEMENT_CHAR in self._decode(context):
            context = []
        self._ids: list[int] = context
        self._prefix_offset = 0
        self._read_offset = len(context)

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special_tokens)

    def add(self, token_ids: Iterable[int]) -> str:
        """Feed new token ids; returns the text they complete (possibly empty)."""
        self._ids.extend(token_ids)
        return self._advance(final=False)

    def finish(self) -> str:
        """Whatever is still held back (an incomplete character is emitted as U+FFFD)."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        new_text = self._decode(self._ids[self._prefix_offset:])
        if len(new_text) <= len(prefix_text):
            return ""  # only special tokens (skipped) or nothing new yet
        if new_text.endswith(REPLACEMENT_CHAR) and not final:
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return new_text[len(prefix_text):]


class StopStringMatcher:
    """Finds stop strings in streamed text without ever releasing part of one.

    `feed(delta)` returns `(text_to_emit, matched)`. Text that could be the start of a
    stop string is held back (the longest such tail); when a stop string completes, the
    text before it is emitted, `matched` is True and the stop string itself is dropped.
    `flush()` releases the held tail at the end of a generation that did not match.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stops = tuple(s for s in stop if s)
        self._held = ""
        self.matched = False

    @property
    def active(self) -> bool:
        return bool(self._stops)

    def feed(self, delta: str) -> tuple[str, bool]:
        if self.matched:
            return "", True
        if not self._stops:
            return delta, False
        text = self._held + delta
        positions = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if positions:
            self._held = ""
            self.matched = True
            return text[:min(positions)], True
        hold = self._partial_match_length(text)
        self._held = text[len(text) - hold:] if hold else ""
        return text[:len(text) - hold], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.matched else held

    def _partial_match_length(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of a stop string."""
        longest = max(len(s) for s in self._stops) - 1
        for length in range(min(len(text), longest), 0, -1):
            tail = text[-length:]
            if any(s.startswith(tail) for s in self._stops):
                return length
        return 0


def flatten_message_content(content: Any, index: int) -> str:
    """OpenAI message content (a string or a list of text parts) as one string: what a
    text-only model's chat template is given."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for part in content:
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                part.get("text"), str):
            raise InvalidRequestError(
                f"messages[{index}].content: only text parts are supported",
                param=f"messages[{index}].content")
        parts.append(part["text"])
    return "".join(parts)


def message_dicts(messages: Sequence[Any]) -> list[dict[str, Any]]:
    """Plain dicts from OpenAI-style message objects (pydantic models) or dicts."""
    return [m if isinstance(m, dict) else m.model_dump(exclude_none=True) for m in messages]


def chat_messages_for_template(messages: Sequence[Any],
                               vision: bool = False) -> list[dict[str, Any]]:
    """Plain dicts for the chat template from OpenAI-style message objects or dicts. A
    text-only model's content is one string; a vision model's (`vision`) a list of text
    and `{"type": "image"}` parts (worker/chat_images.py).

    Raises InvalidRequestError for a role outside CHAT_ROLES (the HTTP models already
    refuse one; gRPC messages arrive here unchecked) or an unsupported content part."""
    result: list[dict[str, Any]] = []
    for index, data in enumerate(message_dicts(messages)):
        if data.get("role") not in CHAT_ROLES:
            raise InvalidRequestError(
                f"messages[{index}].role must be one of {', '.join(CHAT_ROLES)}, got "
                f"{data.get('role')!r}", param=f"messages[{index}].role")
        if vision:
            try:
                content: Any = template_content(data.get("content"), index)
            except ContentPartError as error:
                raise InvalidRequestError(str(error), param=error.where) from None
        else:
            content = flatten_message_content(data.get("content"), index)
        entry: dict[str, Any] = {"role": data.get("role"), "content": content}
        if data.get("name"):
            entry["name"] = data["name"]
        result.append(entry)
    return result


def token_bytes(text: str) -> Optional[list[int]]:
    """UTF-8 bytes of a token's text, as the OpenAI logprobs `bytes` field carries them."""
    return list(text.encode("utf-8"))
