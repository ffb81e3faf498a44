"""Tokenizer loading for a model directory (transformers' fast tokenizers), and the
decoding of an output in the context of its prompt."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# Prompt tokens decoded in front of an output, as vLLM's detokenizer and the router's
# (router/tokenizer.py, DETOKENIZE_CONTEXT_TOKENS) do: sentencepiece-style tokenizers
# render a token's leading space only when something precedes it, so an output decoded
# on its own would lose the space that the same tokens have when served.
DECODE_CONTEXT_TOKENS = 5
# What a byte-level tokenizer decodes an incomplete UTF-8 sequence to.
REPLACEMENT_CHAR = "\ufffd"


def load_tokenizer(model_dir: Path):
    """The directory's tokenizer, with its chat template if it ships one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {model_dir}: {error}") from error


def decode_output(tokenizer, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                  skip_special_tokens: bool = True) -> str:
    """The text of `output_token_ids` as it reads after the prompt: what vLLM returns and
    what the router streams for the same tokens."""
    context = list(prompt_token_ids[-DECODE_CONTEXT_TOKENS:])
    prefix = tokenizer.decode(context, skip_special_tokens=skip_special_tokens)
    if REPLACEMENT_CHAR in prefix:  # a prompt ending mid-character: its U+FFFD would stay
        context, prefix = [], ""
    text = tokenizer.decode(context + list(output_token_ids),
                            skip_special_tokens=skip_special_tokens)
    return text[len(prefix):]
