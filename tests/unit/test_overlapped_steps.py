"""Overlapped steps (engine.py): step N is launched before step N-1's tokens are read
back. Whatever the sampling options, stops, aborts, preemption or swapping, every request
gets exactly the tokens of the plain step-by-step engine, and no KV block leaks."""

from __future__ import annotations

import random

import pytest

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.request import PLACEHOLDER_TOKEN, Request
from lmfleet.worker.sampling_params import SamplingParams
from tests.conftest import make_tiny_model

VOCAB = 256


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("overlap") / "llama", "llama",
                           vocab_size=VOCAB, max_position_embeddings=256)


def sampling(index: int) -> SamplingParams:
    kinds = [
        dict(max_tokens=12, temperature=0),
        dict(max_tokens=5 + index, temperature=0, stop_token_ids=[105, 200, 17]),
        dict(max_tokens=9, temperature=0.8, seed=index, top_p=0.9),
        dict(max_tokens=7, temperature=0, logprobs=2),
        dict(max_tokens=8, temperature=0, repetition_penalty=1.3),
        dict(max_tokens=10, min_tokens=4, temperature=0),
    ]
    return SamplingParams(**kinds[index % len(kinds)])


def run(model_dir, overlap: bool, abort_at_step: int = 3, **options):
    rng = random.Random(1)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(3, 60))]
               for _ in range(14)]
    engine = LLMEngine(EngineConfig.from_options(str(model_dir), overlap_steps=overlap,
                                                 **options), model_dir=model_dir)
    for index, ids in enumerate(prompts):
        engine.add_request(Request(str(index), ids, sampling(index),
                                   session_id="chat" if index == 3 else None))
    results, steps, saw_placeholder = {}, 0, False
    while engine.has_work():
        steps += 1
        if steps == abort_at_step:
            engine.abort("5")
        saw_placeholder |= any(PLACEHOLDER_TOKEN in r.token_ids
                               for r in engine.requests.values())
        for output in engine.step():
            assert PLACEHOLDER_TOKEN not in output.output_token_ids
            if output.finished and output.request_id != "5":
                logprobs = [round(lp.logprob, 4) for lp in output.logprobs or []]
                results[output.request_id] = (output.output_token_ids, output.finish_reason,
                                              logprobs)
    engine.sessions.drop("chat")
    assert engine.kv_manager.num_free_blocks == engine.kv_manager.num_blocks
    return results, saw_placeholder


@pytest.mark.parametrize("options", [
    {},
    # Preemption by recompute, chunked prefill, many small blocks.
    dict(num_kv_blocks=24, block_size=4, max_num_seqs=6, max_num_batched_tokens=20),
    # MLFQ reordering every step, with swaps to a host tier.
    dict(policy="mlfq", mlfq_base_quantum_s=1e-6, mlfq_num_queues=3, max_num_seqs=4,
         num_kv_blocks=40, block_size=4, host_kv_memory_bytes=1 << 22),
], ids=["plain", "preempting", "mlfq-swapping"])
def test_overlapped_steps_give_the_same_tokens(model_dir, options):
    plain, _ = run(model_dir, overlap=False, **options)
    overlapped, saw_placeholder = run(model_dir, overlap=True, **options)
    assert saw_placeholder, "the overlapped run never had a token in flight"
    assert overlapped == plain
    reasons = {reason for _, reason, _ in plain.values()}
    assert {"stop", "length"} <= reasons  # both kinds of stop were exercised
