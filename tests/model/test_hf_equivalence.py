"""Greedy outputs equal Hugging Face transformers' token for token (SmolLM2, float32, CPU),
however the engine batches, chunks, caches prefixes or preempts."""

from __future__ import annotations

import pytest

from lmfleet.worker import LLM, SamplingParams
from tests.conftest import hf_greedy

pytestmark = pytest.mark.model

MAX_NEW_TOKENS = 24

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a land far away,",
    "List three primary colors:",
    "1, 2, 3, 4, 5,",
    "The quick brown fox",
    "Translate to French: Good morning, how are you today?",
    "import numpy as np\nimport torch\n\n# A small neural network in PyTorch\nclass Net(",
    "Q: What is the boiling point of water at sea level?\nA:",
    "Here is a short poem about the sea:\n",
    "Photosynthesis is the process by which plants",
    "SELECT name, age FROM users WHERE",
    "My favourite food is",
    "The three laws of robotics are: 1.",
    "A haiku about autumn leaves falling slowly onto a quiet pond, written by a poet who "
    "has lived by that pond for forty years and watched it through every season:",
    "Hi",
]

SYSTEM_PREFIX = (
    "You are a meticulous assistant for a large logistics company. You answer questions "
    "about shipments, warehouses, customs rules, carriers and delivery windows. Always be "
    "concise, cite the relevant policy section when you know it, never invent tracking "
    "numbers, and ask a clarifying question when the request is ambiguous. Policies: "
    "section 1 covers domestic ground shipping; section 2 covers international air freight; "
    "section 3 covers hazardous materials; section 4 covers returns and refunds.\n\nUser: "
)
SUFFIXES = ["Where is my parcel?", "How do I ship batteries abroad?",
            "Can I return a damaged item?", "What does section 2 cover?"]


@pytest.fixture(scope="module")
def llm_factory(default_model_dir):
    def make(**options) -> LLM:
        return LLM(str(default_model_dir), **options)

    return make


@pytest.fixture(scope="module")
def prompt_ids(tokenizer) -> list[list[int]]:
    return [tokenizer.encode(p) for p in PROMPTS]


@pytest.fixture(scope="module")
def hf_reference(hf_model, prompt_ids) -> list[list[int]]:
    return [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompt_ids]


GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0)


def _assert_same(outputs, reference):
    for index, (output, expected) in enumerate(zip(outputs, reference, strict=True)):
        assert output.output_token_ids == expected, f"prompt {index} differs"


DECODE_PATHS = {
    # The C kernel reading the paged cache in place (the CPU default where it builds).
    "kernel": dict(cpu_kernels=True, dense_decode_cache=False),
    # The dense copy of decoding contexts (the CPU default without the kernel).
    "dense-decode": dict(cpu_kernels=False, dense_decode_cache=True),
    # Gathering from the paged cache (the CUDA default).
    "gather": dict(cpu_kernels=False, dense_decode_cache=False),
}


@pytest.mark.parametrize("path", DECODE_PATHS)
def test_batched_greedy_equals_hf(llm_factory, prompt_ids, hf_reference, path):
    llm = llm_factory(**DECODE_PATHS[path])
    runner = llm.engine.runner
    assert (runner.dense_decode is not None) == (path == "dense-decode")
    assert (runner.backend.cpu_decode_kernel is not None) == (path == "kernel")
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    # The prompts really differ in length, so the batch is ragged.
    assert len({len(ids) for ids in prompt_ids}) > 8
    _assert_same(outputs, hf_reference)


def test_tiny_chunks_equal_hf(llm_factory, prompt_ids, hf_reference):
    # A 7-token step budget splits every prompt of more than 7 tokens into many chunks
    # and interleaves them with other requests' decodes.
    llm = llm_factory(max_num_batched_tokens=7)
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert max(len(ids) for ids in prompt_ids) > 4 * 7
    _assert_same(outputs, hf_reference)


def test_preemption_equals_hf(llm_factory, prompt_ids, hf_reference):
    # 10 blocks of 16 tokens cannot hold 16 requests of up to ~70 tokens at once.
    llm = llm_factory(num_kv_blocks=10)
    outputs = llm.generate(prompt_ids, GREEDY, use_tqdm=False)
    assert llm.engine.scheduler.num_preemptions > 0
    _assert_same(outputs, hf_reference)


def test_shared_prefix_hits_cache_and_equals_hf(llm_factory, tokenizer, hf_model):
    prompts = [tokenizer.encode(SYSTEM_PREFIX + s) for s in SUFFIXES]
    reference = [hf_greedy(hf_model, ids, MAX_NEW_TOKENS) for ids in prompts]
    llm = llm_factory()
    first = llm.generate(prompts[:1], GREEDY, use_tqdm=False)
    rest = llm.generate(prompts[1:], GREEDY, use_tqdm=False)
    stats = llm.engine.kv_manager.prefix_stats
    assert stats.hits > 0
    assert all(o.num_cached_tokens >= 16 * ((len(tokenizer.encode(SYSTEM_PREFIX)) - 16) // 16)
               for o in rest)
    _assert_same(first + rest, reference)


def test_repetition_penalty_equals_hf(llm_factory, prompt_ids, hf_model):
    ids = prompt_ids[4]  # "1, 2, 3, 4, 5," invites repetition
    expected = hf_greedy(hf_model, ids, MAX_NEW_TOKENS, repetition_penalty=1.3)
    llm = llm_factory()
    params = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0, repetition_penalty=1.3)
    assert llm.generate([ids], params, use_tqdm=False)[0].output_token_ids == expected
