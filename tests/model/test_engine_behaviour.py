"""What a user of `LLM` / `LLMEngine` relies on, on the embedded SmolLM2 model: seeded
sampling, n completions, stop conditions, logprobs, input errors and aborts.

One engine serves the whole module (max_model_len=64 keeps the context check cheap to
reach); every test leaves it idle, with all KV blocks free.
"""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker import LLM, SamplingParams
from lmfleet.worker.request import Request

pytestmark = pytest.mark.model

MAX_MODEL_LEN = 64
VOCAB_SIZE = 49152
EOS = 2  # <|im_end|>
PROMPT = "The capital of France is"
GREEDY = SamplingParams(temperature=0, max_tokens=8)
SEEDED = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=1234, max_tokens=8)


@pytest.fixture(scope="module")
def single_thread():
    """On a small shared CPU, extra torch threads mostly wait for each other (measured
    here: one thread ran this model ~20x faster than two under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def llm(default_model_dir, single_thread) -> LLM:
    return LLM(str(default_model_dir), max_model_len=MAX_MODEL_LEN, num_kv_blocks=64)


@pytest.fixture(scope="module")
def reference(llm) -> list[int]:
    """Greedy tokens for PROMPT from the fresh engine, before any test touched it."""
    return generate_one(llm, PROMPT, GREEDY).output_token_ids


@pytest.fixture(autouse=True)
def engine_left_idle(llm):
    yield
    engine = llm.engine
    assert not engine.has_work()
    assert engine.requests == {}
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks


def generate_one(llm: LLM, prompt, params: SamplingParams):
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    return output


# ---- seeds --------------------------------------------------------------------------------


def test_seeded_sampling_repeats_across_generate_calls(llm):
    first = generate_one(llm, "Once upon a time", SEEDED).output_token_ids
    second = generate_one(llm, "Once upon a time", SEEDED).output_token_ids
    assert len(first) == 8
    assert first == second


def test_another_seed_gives_other_tokens(llm):
    tokens = generate_one(llm, "Once upon a time", SEEDED).output_token_ids
    other = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=4321, max_tokens=8)
    assert generate_one(llm, "Once upon a time", other).output_token_ids != tokens


def test_seeded_request_is_unaffected_by_what_it_is_batched_with(llm):
    alone = generate_one(llm, "Once upon a time", SEEDED).output_token_ids
    batch = [
        ("The capital of France is", SamplingParams(temperature=0, max_tokens=8)),
        ("1, 2, 3, 4, 5,", SamplingParams(temperature=1.3, seed=5, max_tokens=8)),
        ("My favourite food is", SamplingParams(temperature=0.7, seed=6, max_tokens=8,
                                               repetition_penalty=1.3, presence_penalty=0.5,
                                               frequency_penalty=0.5)),
        ("Once upon a time", SEEDED),
        ("def fibonacci(n):", SamplingParams(temperature=1.0, min_p=0.2, max_tokens=5)),
        ("SELECT name FROM", SamplingParams(temperature=0, logprobs=5, max_tokens=10)),
    ]
    outputs = llm.generate([p for p, _ in batch], [s for _, s in batch], use_tqdm=False)
    assert outputs[3].output_token_ids == alone


def test_n_completions_differ_from_each_other_and_repeat_with_a_seed(llm):
    params = SamplingParams(temperature=0.8, seed=7, max_tokens=6, n=3)
    first = generate_one(llm, "Once upon a time", params)
    again = generate_one(llm, "Once upon a time", params)
    completions = [c.output_token_ids for c in first.outputs]
    assert [c.index for c in first.outputs] == [0, 1, 2]
    assert len({tuple(c) for c in completions}) == 3
    assert [c.output_token_ids for c in again.outputs] == completions
    assert first.output_token_ids == completions[0]


# ---- stopping -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def short_answer_prompt(llm) -> list[int]:
    return llm.apply_chat_template(
        [{"role": "user", "content": "Answer with one word: is the sky blue?"}])


def test_eos_ends_generation_with_stop(llm, short_answer_prompt):
    output = generate_one(llm, short_answer_prompt, SamplingParams(temperature=0, max_tokens=20))
    assert output.finish_reason == "stop"
    assert output.output_token_ids[-1] == EOS
    assert len(output.output_token_ids) < 12  # short enough for the min_tokens test below


def test_min_tokens_prevents_eos_before_it(llm, short_answer_prompt):
    params = SamplingParams(temperature=0, max_tokens=16, min_tokens=12)
    output = generate_one(llm, short_answer_prompt, params)
    assert len(output.output_token_ids) >= 12
    assert EOS not in output.output_token_ids[:12]


def test_stop_token_id_ends_generation_and_is_kept_last(llm, reference):
    stop = reference[2]
    expected = reference[: reference.index(stop) + 1]
    assert len(expected) < len(reference)  # the stop token really cuts the output short
    output = generate_one(llm, PROMPT, SamplingParams(temperature=0, max_tokens=8,
                                                      stop_token_ids=[stop]))
    assert output.output_token_ids == expected
    assert output.finish_reason == "stop"


def test_max_tokens_ends_generation_with_length(llm):
    output = generate_one(llm, PROMPT, SamplingParams(temperature=0, max_tokens=3,
                                                      ignore_eos=True))
    assert len(output.output_token_ids) == 3
    assert output.finish_reason == "length"


def test_reaching_the_context_ends_generation_with_length(llm):
    prompt = [28] * (MAX_MODEL_LEN - 3)
    output = generate_one(llm, prompt, SamplingParams(temperature=0, max_tokens=16,
                                                      ignore_eos=True))
    assert len(output.output_token_ids) == 3
    assert output.finish_reason == "length"


# ---- logprobs -----------------------------------------------------------------------------


def test_logprobs_give_top_n_per_token_led_by_the_greedy_choice(llm, reference):
    output = generate_one(llm, PROMPT, SamplingParams(temperature=0, max_tokens=8, logprobs=3))
    assert output.output_token_ids == reference
    assert len(output.logprobs) == len(reference)
    for token_id, entry in zip(reference, output.logprobs, strict=True):
        assert entry.token_id == token_id
        assert len(entry.top_token_ids) == len(entry.top_logprobs) == 3
        assert entry.top_token_ids[0] == token_id
        assert entry.logprob == entry.top_logprobs[0]
        assert list(entry.top_logprobs) == sorted(entry.top_logprobs, reverse=True)
        assert entry.top_logprobs[0] <= 0.0


def test_no_logprobs_unless_asked(llm):
    assert generate_one(llm, PROMPT, GREEDY).logprobs is None


# ---- bad input ----------------------------------------------------------------------------

BAD_CALLS = {
    "empty token prompt": (lambda llm: llm.generate([[]]), "prompt is empty"),
    "empty text prompt": (lambda llm: llm.generate(""), "prompt is empty"),
    "no prompts": (lambda llm: llm.generate([]), "no prompts given"),
    "prompt as long as the context": (
        lambda llm: llm.generate([[28] * MAX_MODEL_LEN]),
        rf"prompt has {MAX_MODEL_LEN} tokens but the model's context is {MAX_MODEL_LEN}"),
    "token id past the vocabulary": (
        lambda llm: llm.generate([[28, VOCAB_SIZE]]),
        rf"prompt token id {VOCAB_SIZE} is outside the vocabulary \[0, {VOCAB_SIZE}\)"),
    "negative token id": (lambda llm: llm.generate([[-1]]), "outside the vocabulary"),
    "one bad prompt among good ones": (
        lambda llm: llm.generate(["Hello", "World", [VOCAB_SIZE + 5]]), "outside the vocabulary"),
    "prompt of the wrong type": (lambda llm: llm.generate(123), "prompts must be a string"),
    "bad sampling value": (lambda llm: llm.generate(PROMPT, SamplingParams(top_p=1.5)),
                           r"top_p=1\.5"),
    "sampling_params list of the wrong length": (
        lambda llm: llm.generate(["a", "b"], [GREEDY]),
        "sampling_params must be one SamplingParams or 2 of them"),
    "chat message without a role": (
        lambda llm: llm.chat([{"content": "hi"}]), "'role' and 'content'"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_input_raises_value_error_and_the_llm_keeps_working(llm, reference, case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call(llm)
    assert not llm.engine.has_work()  # nothing of the bad call was admitted
    assert generate_one(llm, PROMPT, GREEDY).output_token_ids == reference


@pytest.mark.parametrize(("model", "message"), [
    ("/nonexistent/lmfleet-model", "no such file or directory"),
    ("no-such-model", "unknown model 'no-such-model'"),
])
def test_unknown_model_raises_value_error(model, message):
    with pytest.raises(ValueError, match=message):
        LLM(model)


def test_cpu_kernels_asked_for_where_they_cannot_run_raise_value_error(default_model_dir):
    with pytest.raises(ValueError, match="cpu_kernels=True needs device='cpu' and dtype"):
        LLM(str(default_model_dir), dtype="bfloat16", cpu_kernels=True)


# ---- abort and block accounting -----------------------------------------------------------


@pytest.mark.parametrize("steps_before_abort", [0, 2])
def test_abort_ends_the_request_with_abort_and_frees_its_blocks(llm, steps_before_abort):
    engine = llm.engine
    prompt = llm.tokenizer.encode(PROMPT)
    engine.add_request(Request("to-abort", prompt, SamplingParams(temperature=0, max_tokens=30,
                                                                  ignore_eos=True)))
    for _ in range(steps_before_abort):
        engine.step()
    if steps_before_abort:
        assert engine.kv_manager.num_free_blocks < engine.kv_manager.num_blocks
    assert engine.abort("to-abort")
    outputs = engine.step()
    assert [(o.request_id, o.finish_reason) for o in outputs] == [("to-abort", "abort")]
    assert len(outputs[0].output_token_ids) == steps_before_abort
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    assert not engine.has_work()
    assert not engine.abort("to-abort")  # already gone


def test_all_blocks_are_free_after_every_request_finishes(llm):
    prompts = ["Once upon a time", "1, 2, 3, 4, 5,", PROMPT, "SELECT name FROM"]
    params = SamplingParams(temperature=0.9, seed=3, max_tokens=5, n=2)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert [len(o.outputs) for o in outputs] == [2, 2, 2, 2]
    kv_manager = llm.engine.kv_manager
    assert kv_manager.num_free_blocks == kv_manager.num_blocks
    assert kv_manager.pool.ref_counts == [0] * kv_manager.num_blocks
