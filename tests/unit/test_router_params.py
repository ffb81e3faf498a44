"""Request models and GenerationParams: parsing, validation and the worker mapping."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from lmfleet.router.errors import InvalidRequestError
from lmfleet.router.openai_api import ChatCompletionRequest, CompletionRequest
from lmfleet.router.params import INT64_MAX, GenerationParams


@pytest.mark.parametrize("prompt, expected", [
    ("hi", ["hi"]),
    (["a", "b"], ["a", "b"]),
    ([1, 2, 3], [[1, 2, 3]]),
    ([[1, 2], [3]], [[1, 2], [3]]),
])
def test_completion_prompts_come_in_four_shapes(prompt, expected):
    assert CompletionRequest(prompt=prompt).prompts() == expected


@pytest.mark.parametrize("body", [
    {"prompt": []},
    {"prompt": [-1]},
    {"prompt": "x", "max_tokens": 0},
    {"prompt": "x", "temperature": -0.5},
    {"prompt": "x", "top_p": 0},
    {"prompt": "x", "n": 0},
    {"prompt": "x", "max_tokens": "many"},
    {"prompt": 5},
])
def test_invalid_completion_requests_are_rejected(body):
    with pytest.raises(ValidationError):
        CompletionRequest(**body)


def test_unknown_fields_are_ignored():
    request = CompletionRequest(prompt="x", provider_extra={"a": 1}, trace_tag="!")
    assert not hasattr(request, "provider_extra")


@pytest.mark.parametrize("extra, off", [
    ({"best_of": 3}, {"best_of": 1}),
    ({"suffix": "!"}, {"suffix": ""}),
    ({"echo": True}, {"echo": False}),
    ({"logit_bias": {"5": 1.0}}, {"logit_bias": {}}),
    ({"guided_json": {}}, {"guided_json": None}),
])
def test_fields_of_unimplemented_features_are_refused_unless_off(extra, off):
    """They change what is generated: ignoring them would return something else than
    asked for (vLLM refuses what it does not support, too)."""
    (name,) = extra
    with pytest.raises(ValidationError, match=f"{name}: .*not supported"):
        CompletionRequest(prompt="x", **extra)
    CompletionRequest(prompt="x", **off)


def test_chat_top_logprobs_needs_logprobs():
    with pytest.raises(ValidationError, match="top_logprobs requires logprobs"):
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], top_logprobs=2)
    ok = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], logprobs=True,
                               top_logprobs=2)
    assert ok.to_params().logprobs == 2


def test_max_completion_tokens_wins_over_max_tokens_and_completions_default_to_16():
    chat = ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                 max_completion_tokens=7)
    assert chat.to_params().max_tokens == 7
    assert CompletionRequest(prompt="x").to_params().max_tokens == 16
    assert ChatCompletionRequest(messages=[{"role": "user", "content": "x"}]
                                 ).to_params().max_tokens is None


def test_min_tokens_above_max_tokens_is_an_invalid_request():
    with pytest.raises(InvalidRequestError) as error:
        CompletionRequest(prompt="x", max_tokens=2, min_tokens=3).to_params()
    assert error.value.param == "min_tokens"


def test_stop_may_be_one_string_or_a_list():
    assert CompletionRequest(prompt="x", stop="\n").to_params().stop == ("\n",)
    assert CompletionRequest(prompt="x", stop=["a", "b"]).to_params().stop == ("a", "b")


def test_worker_params_set_only_given_fields_and_seed_plus_index():
    params = GenerationParams(temperature=0.8, seed=41, n=2, stop_token_ids=(7,))
    first, second = params.to_worker(0, 10), params.to_worker(1, 10)
    assert (first.seed, second.seed) == (41, 42)
    assert first.max_tokens == 10 and first.temperature == pytest.approx(0.8)
    assert not first.HasField("top_p") and not first.HasField("logprobs")
    assert list(first.stop_token_ids) == [7]


def test_child_seeds_wrap_within_int64():
    assert GenerationParams(seed=INT64_MAX, n=2).child_seed(1) == -(1 << 63)
    assert GenerationParams().child_seed(3) is None


@pytest.mark.parametrize("field, value", [("temperature", float("nan")), ("top_k", -2),
                                          ("min_p", 1.5), ("presence_penalty", 3.0),
                                          ("repetition_penalty", 0.0), ("n", 0)])
def test_generation_params_check_ranges(field, value):
    with pytest.raises(InvalidRequestError) as error:
        GenerationParams(**{field: value})
    assert error.value.param == field
