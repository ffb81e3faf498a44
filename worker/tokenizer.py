"""Tokenizer loading for a model directory (transformers' fast tokenizers)."""

from __future__ import annotations

from pathlib import Path


def load_tokenizer(model_dir: Path):
    """The directory's tokenizer, with its chat template if it ships one."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model_dir))
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot load a tokenizer from {model_dir}: {error}") from error
