"""Tensor and pipeline parallelism on CUDA (NCCL): greedy tokens at tp=2, pp=2 and
tp=2 x pp=2 equal one GPU's in float32, with CUDA graphs (the all-reduce inside the
captured decode graphs) and with both attention backends.

Run on a machine with several GPUs; skipped where fewer than the case needs are present.
"""

from __future__ import annotations

import pytest
import torch

from tests.gpu.test_cuda_engine import model_dir, prompts, run_engine  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.gpu]


def needs_gpus(count: int):
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return pytest.mark.skipif(available < count, reason=f"needs {count} GPUs")


@needs_gpus(2)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("tp,pp", [(2, 1), (1, 2)])
def test_two_gpus_float32_equal_one(model_dir, prompts, backend, tp, pp):  # noqa: F811
    options = dict(device="cuda", dtype="float32", attention_backend=backend,
                   max_num_batched_tokens=64, num_kv_blocks=256)
    expected = run_engine(model_dir, prompts, 16, **options)
    got = run_engine(model_dir, prompts, 16, tensor_parallel_size=tp,
                     pipeline_parallel_size=pp, **options)
    assert got == expected


@needs_gpus(4)
def test_four_gpus_tp2_pp2_float32_equal_one(model_dir, prompts):  # noqa: F811
    options = dict(device="cuda", dtype="float32", num_kv_blocks=256)
    expected = run_engine(model_dir, prompts, 16, **options)
    assert run_engine(model_dir, prompts, 16, tensor_parallel_size=2,
                      pipeline_parallel_size=2, **options) == expected


@needs_gpus(2)
def test_two_gpus_bfloat16_mostly_agree_with_one(model_dir, prompts):  # noqa: F811
    """bf16 row-parallel sums round differently from one GPU's: most greedy tokens agree."""
    options = dict(device="cuda", dtype="bfloat16", num_kv_blocks=256)
    expected = run_engine(model_dir, prompts, 16, **options)
    got = run_engine(model_dir, prompts, 16, tensor_parallel_size=2, **options)
    same = sum(a == b for e, g in zip(expected, got, strict=True)
               for a, b in zip(e, g, strict=True))
    assert same >= 0.8 * len(prompts) * 16
