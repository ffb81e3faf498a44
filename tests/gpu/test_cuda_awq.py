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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_swept_launch_gives_the_product_at_full_tile_sizes(dtype, monkeypatch):
    """The sweep's candidate launches (benchmarks/w4a16_kernels.py) at the tile sizes the GPU
    runs, which the unit tests' small tiles do not reach (wgmma takes 64-row tiles): each
    against the dequantized weight times x, for the row counts each path takes."""
    from pathlib import Path

    from lmfleet.worker.kernels.triton_w4a16 import w4a16_matmul
    from tests.unit.w4_tensors import gpu_tensors

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2] / "benchmarks"))
    from w4a16_kernels import GROUP, candidates

    weight_t, packed, zeros, scales = gpu_tensors(1024, 1024, GROUP, dtype, 11)
    for rows in (1, 4, 16, 64, 256):
        x = torch.randn(rows, 1024, generator=torch.Generator().manual_seed(rows)).to(dtype)
        expected = x.float() @ weight_t
        for launch in candidates(rows, quick=True):
            got = w4a16_matmul(x.cuda(), packed, zeros, scales, GROUP, launch=launch)
            error = (got.float().cpu() - expected).norm() / expected.norm()
            assert error < 1e-2, f"{launch}: relative error {error:.2e}"  # bf16 ulp: 2^-8
