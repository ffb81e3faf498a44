"""IncrementalDetokenizer on the default model's real tokenizer (byte-level BPE, where
emoji and CJK characters span several tokens)."""

from __future__ import annotations

import pytest

from lmfleet.router.tokenizer import REPLACEMENT_CHAR, IncrementalDetokenizer, ModelTokenizer

pytestmark = pytest.mark.model

TEXT = "Hi 😀 你好世界 🎉 done, naïve café 🇫🇷!"


@pytest.fixture(scope="module")
def model_tokenizer(tokenizer):
    return ModelTokenizer(tokenizer, "default")


def stream(detokenizer, ids, step=1):
    deltas = [detokenizer.add(ids[i:i + step]) for i in range(0, len(ids), step)]
    return deltas, detokenizer.finish()


def test_the_text_really_splits_characters_across_tokens(model_tokenizer):
    ids = model_tokenizer.encode(TEXT)
    assert any(REPLACEMENT_CHAR in model_tokenizer.decode([t]) for t in ids)


@pytest.mark.parametrize("step", [1, 2, 3, 5])
def test_deltas_never_break_characters_and_concatenate_to_the_full_text(model_tokenizer,
                                                                        step):
    ids = model_tokenizer.encode(TEXT)
    deltas, tail = stream(IncrementalDetokenizer(model_tokenizer), ids, step)
    assert all(REPLACEMENT_CHAR not in d for d in deltas)
    assert tail == ""
    assert "".join(deltas) == model_tokenizer.decode(ids) == TEXT


def test_a_character_is_held_back_until_its_last_token(model_tokenizer):
    ids = model_tokenizer.encode("ab 😀")
    emoji_start = next(i for i, t in enumerate(ids)
                       if REPLACEMENT_CHAR in model_tokenizer.decode(ids[:i + 1]))
    detokenizer = IncrementalDetokenizer(model_tokenizer)
    assert detokenizer.add(ids[:emoji_start]) == model_tokenizer.decode(ids[:emoji_start])
    held = [detokenizer.add([t]) for t in ids[emoji_start:-1]]
    assert held == [""] * len(held)
    assert detokenizer.add(ids[-1:]).endswith("😀")


def test_an_incomplete_character_at_the_end_is_released_by_finish(model_tokenizer):
    ids = model_tokenizer.encode("ok 😀")[:-1]  # the emoji's last byte never comes
    detokenizer = IncrementalDetokenizer(model_tokenizer)
    deltas, tail = stream(detokenizer, ids)
    assert "".join(deltas) == "ok"
    assert tail.endswith(REPLACEMENT_CHAR)
    assert "".join(deltas) + tail == model_tokenizer.decode(ids)


def test_special_tokens_are_skipped(model_tokenizer, tokenizer):
    ids = model_tokenizer.encode("The end.") + [tokenizer.eos_token_id]
    deltas, tail = stream(IncrementalDetokenizer(model_tokenizer), ids)
    assert "".join(deltas) + tail == "The end."


def test_prompt_context_does_not_leak_into_the_output(model_tokenizer):
    prompt = model_tokenizer.encode("Tell me: 你好")
    output = model_tokenizer.encode(" 世界 🎉 and more")
    deltas, tail = stream(IncrementalDetokenizer(model_tokenizer, prompt), output)
    assert "".join(deltas) + tail == model_tokenizer.decode(output)
