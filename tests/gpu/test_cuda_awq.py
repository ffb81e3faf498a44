"""An AWQ checkpoint on CUDA: the Triton W4A16 kernels (the no-tensor-core path for steps
of a few rows, tl.dot for more, dequantize + matmul for large prefills) give the same
greedy tokens in float32 as the CPU engine and as Hugging Face transformers on the
dequantized weights, with decode steps as CUDA graphs and eagerly.

Run on the device machine; skipped where CUDA is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from lmfleet.worker.quant.awq_writer import write_awq_checkpoint, write_dequantized_checkpoint
from tests.conftest import hf_greedy, make_tiny_model
from tests.gpu.test_cuda_engine import TINY, run_engine

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_cuda_awq_float32_equals_cpu_and_hf_on_dequantized_weights(tmp_path):
    plain = make_tiny_model(tmp_path / "plain", "llama", **TINY)
    awq = write_awq_checkpoint(plain, tmp_path / "awq", group_size=64)
    rng = random.Random(1)
    # 12 prompts of up to 90 tokens: one prefill step of several hundred rows (the
    # dequantize path), decode steps of 12 down to 1 rows (tl.dot, then the gemv path).
    prompts = [[rng.randrange(2, TINY["vocab_size"]) for _ in range(rng.randrange(3, 90))]
               for _ in range(12)]
    cpu = run_engine(awq, prompts, 12, device="cpu", dtype="float32")
    assert run_engine(awq, prompts, 12, device="cuda", dtype="float32") == cpu
    assert run_engine(awq, prompts, 12, device="cuda", dtype="float32",
                      enforce_eager=True, max_num_batched_tokens=64) == cpu
    from transformers import AutoModelForCausalLM

    reference = write_dequantized_checkpoint(awq, tmp_path / "dequantized")
    hf = AutoModelForCausalLM.from_pretrained(str(reference), dtype=torch.float32).eval()
    assert [hf_greedy(hf, ids, 12, min_new_tokens=12) for ids in prompts[:4]] == cpu[:4]
