"""bf16 on CUDA, teacher-forced: every position's logits, through the Triton prefill
kernel (the whole sequence in one step) and through the decode CUDA graphs (one token per
step), are as close to Hugging Face's float32 logits as Hugging Face's own bf16 run is.

Why this tolerance: bf16 rounds every activation to 8 bits of mantissa, so two correct
bf16 implementations (different kernels, different summation orders) differ by about as
much as either differs from float32. Free-running greedy text is not compared in bf16: one
near-tie flipped early changes every later token.
"""

from __future__ import annotations

import random

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import ScheduledRequest
from tests.conftest import make_tiny_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TINY = dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024)
LENGTH, PREFIX = 150, 20


@torch.inference_mode()
def lmfleet_logits(engine: LLMEngine, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefill logits (L, V), decode-graph logits for positions PREFIX.. (L - PREFIX, V))."""
    runner = engine.runner
    request = Request("tf", ids, SamplingParams(max_tokens=1))
    assert engine.kv_manager.allocate(request, len(ids))
    batch = runner.inputs.prepare([ScheduledRequest(request, len(ids))], 0)
    prefill = runner.model.compute_logits(runner._eager_forward(batch))  # (L, V)
    decode = []
    for position in range(PREFIX, len(ids)):
        request.num_computed_tokens = position
        bucket = runner.graphs.bucket_for(1)
        runner.inputs.prepare([ScheduledRequest(request, 1)], 1, pad_to=bucket)
        hidden = runner.graphs.replay(bucket)[:1]  # (1, H)
        decode.append(runner.model.compute_logits(hidden)[0])
    return prefill, torch.stack(decode)


def test_bf16_teacher_forced_logits_are_as_close_to_fp32_as_hf_bf16(tmp_path):
    from transformers import AutoModelForCausalLM

    model_dir = make_tiny_model(tmp_path / "llama", "llama", **TINY)
    rng = random.Random(0)
    ids = [rng.randrange(2, TINY["vocab_size"]) for _ in range(LENGTH)]
    reference = {}
    for dtype in (torch.float32, torch.bfloat16):
        hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).cuda().eval()
        with torch.no_grad():
            reference[dtype] = hf(torch.tensor([ids], device="cuda")).logits[0].float()
    engine = LLMEngine(EngineConfig.from_options(str(model_dir), device="cuda",
                                                 dtype="bfloat16"), model_dir=model_dir)
    prefill, decode = lmfleet_logits(engine, ids)
    fp32, hf_bf16 = reference[torch.float32], reference[torch.bfloat16]
    hf_error = (hf_bf16 - fp32).abs().max().item()
    assert hf_error > 0  # bf16 really rounds (else the bound below means nothing)
    prefill_error = (prefill - fp32).abs().max().item()
    decode_error = (decode - fp32[PREFIX:]).abs().max().item()
    assert prefill_error <= 2 * hf_error, (prefill_error, hf_error)
    assert decode_error <= 2 * hf_error, (decode_error, hf_error)
    # Most positions keep fp32's top token (near-ties may flip, as they do for HF bf16).
    agree = (decode.argmax(-1) == fp32[PREFIX:].argmax(-1)).float().mean().item()
    hf_agree = (hf_bf16[PREFIX:].argmax(-1) == fp32[PREFIX:].argmax(-1)).float().mean().item()
    assert agree >= hf_agree - 0.05, (agree, hf_agree)
