"""The whole engine on the Triton backend (paged attention and fused kernels), run on
CPU under the Triton interpreter (on the GPU where there is one): greedy tokens equal the
torch backend's and Hugging Face's, with chunked prefill, prefix-cache hits and small
blocks."""

from __future__ import annotations

import random

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from tests.conftest import hf_greedy, make_tiny_model

pytest.importorskip("triton")

VOCAB = 256
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("triton") / "llama", "llama",
                           vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=1,
                           max_position_embeddings=256)


def greedy(model_dir, prompts, **options) -> tuple[list[list[int]], LLMEngine]:
    options = {"device": DEVICE, "dtype": "float32", **options}
    engine = LLMEngine(EngineConfig.from_options(str(model_dir), **options),
                       model_dir=model_dir)
    params = SamplingParams(max_tokens=6, min_tokens=6, temperature=0)
    results = {}
    for index, ids in enumerate(prompts):  # in two waves: the second hits the prefix cache
        engine.add_request(Request(str(index), ids, params))
        if index in (2, len(prompts) - 1):
            while engine.has_work():
                for output in engine.step():
                    if output.finished:
                        results[output.request_id] = output.output_token_ids
    return [results[str(i)] for i in range(len(prompts))], engine


def test_triton_backend_equals_torch_backend_and_hf(model_dir):
    rng = random.Random(0)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (3, 21, 37, 9)]
    prompts.append(prompts[2][:33] + [5, 6])  # shares 8 blocks of 4 with prompt 2
    expected, _ = greedy(model_dir, prompts, attention_backend="torch")
    tokens, engine = greedy(model_dir, prompts, attention_backend="triton", block_size=4,
                            max_num_batched_tokens=16)
    assert tokens == expected
    assert engine.kv_manager.prefix_stats.hits >= 32  # prompt 4 read prompt 2's blocks
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    assert [hf_greedy(hf, ids, 6, min_new_tokens=6) for ids in prompts] == expected


@pytest.mark.parametrize("codec,storage", [("int8", torch.int8), ("fp8", torch.uint8)])
def test_encoded_kv_reads_the_same_through_triton_and_torch(model_dir, codec, storage):
    """An int8 or fp8 cache (codes + scale per row): the Triton kernels decode what the
    torch backend decodes, so greedy tokens agree, through prefix hits and chunks."""
    rng = random.Random(1)
    prompts = [[rng.randrange(2, VOCAB) for _ in range(n)] for n in (3, 21, 37, 9)]
    prompts.append(prompts[2][:33] + [5, 6])
    expected, _ = greedy(model_dir, prompts, attention_backend="torch", kv_cache_dtype=codec)
    tokens, engine = greedy(model_dir, prompts, attention_backend="triton", block_size=4,
                            max_num_batched_tokens=16, kv_cache_dtype=codec)
    assert engine.runner.kv_storage.dtype == storage
    assert tokens == expected


def test_triton_backend_refuses_cpu_without_the_interpreter(model_dir, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="needs device='cuda'"):
        LLMEngine(EngineConfig.from_options(str(model_dir), attention_backend="triton"),
                  model_dir=model_dir)
