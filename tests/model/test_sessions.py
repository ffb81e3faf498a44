"""Chat sessions: each turn prefills only its new tokens and answers exactly as if the
whole history had been sent without a session."""

from __future__ import annotations

import pytest

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams

pytestmark = pytest.mark.model

USER_TURNS = ["Hi! What is the tallest mountain?", "And the second tallest?",
              "Which of the two is harder to climb?", "Why?", "Thanks. Summarise in one line."]
PARAMS = SamplingParams(max_tokens=10, temperature=0)


def run_turn(engine: LLMEngine, request: Request) -> Request:
    engine.add_request(request)
    while engine.has_work():
        engine.step()
    return request


def turn_suffix(tokenizer, text: str, first: bool) -> list[int]:
    prefix = "" if first else "<|im_end|>\n"
    return tokenizer.encode(f"{prefix}<|im_start|>user\n{text}<|im_end|>\n"
                            "<|im_start|>assistant\n")


@pytest.mark.parametrize("policy", ["fcfs", "mlfq"])
def test_five_turns_prefill_only_new_tokens(default_model_dir, tokenizer, policy):
    options = dict(policy=policy, host_kv_memory_bytes=64 << 20)
    engine = LLMEngine(EngineConfig.from_options(str(default_model_dir), **options))
    baseline = LLMEngine(EngineConfig.from_options(str(default_model_dir),
                                                   enable_prefix_caching=False))
    history: list[int] = []
    previous_kv_tokens = 0
    for turn, text in enumerate(USER_TURNS):
        prompt = history + turn_suffix(tokenizer, text, first=turn == 0)
        with_session = run_turn(engine, Request(f"s{turn}", prompt, PARAMS, session_id="chat"))
        without = run_turn(baseline, Request(f"b{turn}", prompt, PARAMS))
        assert with_session.output_token_ids == without.output_token_ids
        new_prompt_tokens = len(prompt) - previous_kv_tokens
        # Prompt tokens computed + one decode step per output token but the last.
        assert with_session.num_prefilled_tokens == (
            new_prompt_tokens + with_session.num_output_tokens - 1), f"turn {turn}"
        if turn:
            assert with_session.num_cached_tokens == previous_kv_tokens
        history = prompt + with_session.output_token_ids
        previous_kv_tokens = len(history) - 1  # the last sampled token was never fed
    assert len(engine.sessions) == 1
    # Between turns the session's KV waits in host memory, not on the device.
    assert engine.kv_manager.num_used_host_blocks > 0
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def test_session_expires_and_frees_its_kv(default_model_dir, tokenizer):
    engine = LLMEngine(EngineConfig.from_options(
        str(default_model_dir), host_kv_memory_bytes=64 << 20, session_ttl_s=1e-9))
    prompt = turn_suffix(tokenizer, USER_TURNS[0], first=True)
    run_turn(engine, Request("a", prompt, PARAMS, session_id="chat"))
    assert engine.sessions.expire() == 1
    assert len(engine.sessions) == 0
    engine.kv_manager.begin_step()
    assert engine.kv_manager.num_used_host_blocks == 0


def test_lru_bound_drops_oldest_session(default_model_dir, tokenizer):
    engine = LLMEngine(EngineConfig.from_options(
        str(default_model_dir), host_kv_memory_bytes=64 << 20, max_sessions=2))
    for index in range(3):
        prompt = turn_suffix(tokenizer, f"Session number {index}.", first=True)
        run_turn(engine, Request(f"r{index}", prompt, PARAMS, session_id=f"chat-{index}"))
    assert len(engine.sessions) == 2
    # The oldest session is gone: its next turn prefills everything again.
    prompt = turn_suffix(tokenizer, "Session number 0.", first=True) + [28, 29]
    request = run_turn(engine, Request("again", prompt, PARAMS, session_id="chat-0"))
    assert request.num_cached_tokens < len(prompt) - 2
