"""Checks on a raw OpenAI request body that field types alone cannot express.

Both run before the fields are validated (openai_api.py hooks them into the request
models) and fail with a `PydanticCustomError` whose context carries `param`, the path of
the offending value, which the HTTP error handler puts in the error's `param`:

- `check_text(data, fields)`: every string inside the declared fields must be valid
  Unicode. JSON allows escapes like "\\ud800" (a lone surrogate), which Python decodes
  into a str that cannot be encoded to UTF-8: the tokenizer raises TypeError on it, and a
  response or metric label echoing it cannot be written. Such input is a 400 here.
- `check_unsupported(data, features)`: OpenAI (and vLLM) fields that change what is
  generated but that lmfleet does not implement (tool calling, structured output, logit
  bias, ...) are refused with a 400 naming the field, as vLLM does for what it does not
  support, unless their value means "off" (null, [], "none", {"type": "text"}, ...).
  Other unknown fields are still accepted and ignored (clients send provider extras).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic_core import PydanticCustomError


def check_text(data: Any, fields: Iterable[str]) -> None:
    """Raise if a string (or dict key) inside `data[field]` holds a lone surrogate."""
    if not isinstance(data, Mapping):
        return  # not an object: the model's own validation reports it
    for name in fields:
        if name in data:
            _check_value(data[name], name)


def _check_value(value: Any, path: str) -> None:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as error:
            raise PydanticCustomError(
                "invalid_text",
                "{param} must be valid Unicode text: it holds a lone surrogate "
                "({code}) at position {position}",
                {"param": path, "code": f"U+{ord(value[error.start]):04X}",
                 "position": error.start},
            ) from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _check_value(key, path)
            _check_value(item, f"{path}.{key}" if isinstance(key, str) else path)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _check_value(item, f"{path}[{index}]")


# field -> (is the value "off"?, why it is refused otherwise)
Feature = tuple[Callable[[Any], bool], str]


def _absent_or_empty(value: Any) -> bool:
    return value is None or value == [] or value == {}


def _no_tool_choice(value: Any) -> bool:
    # Without tools, "auto" cannot call any: it means the same as "none".
    return value is None or value in ("none", "auto")


def _text_format(value: Any) -> bool:
    return value is None or (isinstance(value, Mapping) and value.get("type") == "text")


TOOLS = "tool (function) calling is not supported"
STRUCTURED = "structured output (guided decoding) is not supported"

CHAT_FEATURES: dict[str, Feature] = {
    "tools": (_absent_or_empty, TOOLS),
    "functions": (_absent_or_empty, TOOLS),
    "tool_choice": (_no_tool_choice, TOOLS),
    "function_call": (_no_tool_choice, TOOLS),
    "response_format": (_text_format, f"{STRUCTURED}; only {{\"type\": \"text\"}} is"),
}
COMPLETION_FEATURES: dict[str, Feature] = {
    "echo": (lambda v: v is None or v is False, "echo (returning the prompt) is not "
             "supported"),
    "suffix": (lambda v: v is None or v == "", "suffix (insertion) is not supported"),
    "best_of": (lambda v: v is None or v == 1, "best_of is not supported; use n"),
}
# Both endpoints.
COMMON_FEATURES: dict[str, Feature] = {
    "logit_bias": (_absent_or_empty, "logit_bias is not supported"),
    "prompt_logprobs": (lambda v: v is None, "prompt_logprobs is not supported"),
    # vLLM's own structured-output fields.
    **{name: (lambda v: v is None, STRUCTURED) for name in (
        "guided_json", "guided_regex", "guided_choice", "guided_grammar",
        "structured_outputs")},
}


def check_unsupported(data: Any, features: Mapping[str, Feature]) -> None:
    """Raise for the first field of `features` in `data` whose value is not "off"."""
    if not isinstance(data, Mapping):
        return
    for name, (is_off, why) in features.items():
        if name in data and not is_off(data[name]):
            raise PydanticCustomError("unsupported", "{param}: {why}",
                                      {"param": name, "why": why})
