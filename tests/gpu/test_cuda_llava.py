"""LLaVA on CUDA: float32 greedy tokens equal transformers' on the CPU, for a batch mixing
text-only and image prompts, whole and in chunks that end inside images, with the decode
steps that follow still in CUDA graphs (image positions never enter one).

Run on the device machine; skipped where CUDA is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.model.test_llava import hf_greedy, make_engine, run
from tests.vision_model import TOKENS_PER_IMAGE, image_bytes, make_tiny_llava

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("llava"))  # word-level tokenizer


def test_cuda_llava_float32_equals_hf(llava):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    hf = (LlavaForConditionalGeneration.from_pretrained(str(llava), dtype=torch.float32).eval(),
          AutoImageProcessor.from_pretrained(str(llava)))
    image_token = 600  # the word-level tokenizer's 600 words, then <image>
    rng = random.Random(0)

    def text(n: int) -> list[int]:
        return [rng.randrange(3, 600) for _ in range(n)]

    image = [image_token] * TOKENS_PER_IMAGE
    cat, dog = image_bytes(1), image_bytes(2, (50, 20), "JPEG")
    prompts = [(text(5) + image + text(9), [cat]), (text(30), []),
               (text(2) + image + text(3) + image + text(4), [dog, cat])]
    expected = [hf_greedy(hf, ids, images) for ids, images in prompts]
    for options in ({}, {"max_num_batched_tokens": 12}, {"enforce_eager": True}):
        engine = make_engine(llava, device="cuda", dtype="float32", **options)
        assert [tokens for tokens, _ in run(engine, prompts)] == expected, options
        if not options:
            assert engine.runner.graphs is not None  # decodes still replay graphs
