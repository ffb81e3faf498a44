"""SamplingParams validation: every bad value is a ValueError naming its field."""

from __future__ import annotations

import math
import re

import pytest

from lmfleet.worker.sampling_params import SamplingParams

INVALID = [
    ("max_tokens", 0),
    ("max_tokens", -1),
    ("max_tokens", 1.5),
    ("max_tokens", "16"),
    ("max_tokens", True),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "0.7"),
    ("temperature", None),
    ("top_p", 0.0),
    ("top_p", -0.5),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", None),
    ("min_p", -0.01),
    ("min_p", 1.5),
    ("seed", 1.5),
    ("seed", "1234"),
    ("seed", True),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.0]),
    ("stop_token_ids", [True]),
    ("stop_token_ids", ["2"]),
    ("stop_token_ids", 2),
    ("ignore_eos", 1),
    ("ignore_eos", "yes"),
    ("min_tokens", -1),
    ("min_tokens", 1.5),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("presence_penalty", 2.01),
    ("presence_penalty", -2.01),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -2.01),
    ("logprobs", -1),
    ("logprobs", 21),
    ("logprobs", True),
    ("n", 0),
    ("n", 2.0),
]


@pytest.mark.parametrize(("name", "value"), INVALID,
                         ids=[f"{n}={v!r}" for n, v in INVALID])
def test_invalid_value_raises_value_error_naming_the_field(name, value):
    with pytest.raises(ValueError, match=rf"\b{name}="):
        SamplingParams(**{name: value})


def test_min_tokens_above_max_tokens_names_min_tokens():
    with pytest.raises(ValueError, match=r"\bmin_tokens=5.*max_tokens \(4\)"):
        SamplingParams(max_tokens=4, min_tokens=5)


VALID_EDGES = [
    ("max_tokens", 1),
    ("max_tokens", None),
    ("temperature", 0),
    ("temperature", 0.0),
    ("temperature", 100.0),
    ("top_p", 1.0),
    ("top_p", 1e-9),
    ("top_k", -1),
    ("top_k", 0),
    ("top_k", 1),
    ("min_p", 0.0),
    ("min_p", 1.0),
    ("seed", 0),
    ("seed", 2**63 - 1),
    ("stop_token_ids", []),
    ("stop_token_ids", [0]),
    ("stop_token_ids", None),
    ("ignore_eos", True),
    ("min_tokens", 16),  # equal to the default max_tokens
    ("repetition_penalty", 1e-3),
    ("presence_penalty", -2.0),
    ("presence_penalty", 2.0),
    ("frequency_penalty", -2.0),
    ("frequency_penalty", 2.0),
    ("logprobs", 0),
    ("logprobs", 20),
    ("n", 1),
    ("n", 64),
]


@pytest.mark.parametrize(("name", "value"), VALID_EDGES,
                         ids=[f"{n}={v!r}" for n, v in VALID_EDGES])
def test_valid_edge_value_is_accepted(name, value):
    params = SamplingParams(**{name: value})
    expected = tuple(value or ()) if name == "stop_token_ids" else value
    assert getattr(params, name) == expected


def test_min_tokens_is_unbounded_without_max_tokens():
    assert SamplingParams(max_tokens=None, min_tokens=10_000).min_tokens == 10_000


def test_stop_token_ids_list_becomes_a_tuple_so_params_stay_hashable():
    params = SamplingParams(stop_token_ids=[5, 9])
    assert params.stop_token_ids == (5, 9)
    assert hash(params) == hash(SamplingParams(stop_token_ids=(5, 9)))


def test_defaults_follow_vllm():
    params = SamplingParams()
    assert (params.max_tokens, params.temperature, params.top_p, params.top_k) == (16, 1.0, 1.0,
                                                                                   -1)
    assert (params.min_p, params.seed, params.n, params.logprobs) == (0.0, None, 1, None)
    assert not params.greedy


@pytest.mark.parametrize(("temperature", "greedy"), [(0.0, True), (1e-6, True), (1e-5, False),
                                                      (0.7, False)])
def test_tiny_temperatures_count_as_greedy(temperature, greedy):
    assert SamplingParams(temperature=temperature).greedy is greedy


@pytest.mark.parametrize(("top_k", "enabled"), [(-1, False), (0, False), (1, True), (50, True)])
def test_top_k_minus_one_and_zero_both_mean_off(top_k, enabled):
    assert SamplingParams(top_k=top_k).top_k_enabled is enabled


@pytest.mark.parametrize(("changes", "uses"), [
    ({}, False),
    ({"repetition_penalty": 1.1}, True),
    ({"presence_penalty": 0.5}, True),
    ({"frequency_penalty": -0.5}, True),
])
def test_uses_penalties_only_when_one_is_set(changes, uses):
    assert SamplingParams(**changes).uses_penalties is uses


def test_message_shows_the_offending_value():
    with pytest.raises(ValueError, match=re.escape("top_p=1.5")):
        SamplingParams(top_p=1.5)
