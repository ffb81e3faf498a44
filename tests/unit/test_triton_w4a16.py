"""The Triton W4A16 matmul (worker/kernels/triton_w4a16.py) against dequantizing the AWQ
tensors and multiplying (worker/quant/awq_format.py), in float32 and float16.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors; on a GPU machine the same tests run it compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lmfleet.worker.kernels.triton_w4a16 import (  # noqa: E402
    W4A16Launch,
    awq_dequantize,
    w4a16_matmul,
)
from lmfleet.worker.quant.awq_format import dequantize, quantize_rtn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group", [(1, 64, 64, 32), (3, 64, 128, 64), (5, 72, 128, 64),
                                         (33, 136, 96, 32), (260, 40, 64, 32)])
def test_matches_dequantize_then_matmul(dtype, m, n, k, group):
    generator = torch.Generator().manual_seed(m * 1000 + n)
    weight = torch.randn(n, k, generator=generator)  # (out, in)
    qweight, qzeros, scales = quantize_rtn(weight, group)
    x = torch.randn(m, k, generator=generator).to(dtype)
    expected = (x.float() @ dequantize(qweight, qzeros, scales, group).to(dtype).float())
    got = w4a16_matmul(x.to(DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE),
                       scales.to(dtype).to(DEVICE), group)
    assert got.dtype == dtype and got.shape == (m, n)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_shapes_that_do_not_fit_are_refused():
    qweight, qzeros, scales = quantize_rtn(torch.randn(16, 64), 32)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_matmul(torch.randn(2, 32, device=DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE),
                     scales.float().to(DEVICE), 32)
    with pytest.raises(ValueError, match="do not fit"):  # qzeros of another group size
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), qweight.to(DEVICE),
                     qzeros[:1].to(DEVICE), scales.float().to(DEVICE), 32)
    with pytest.raises(ValueError, match="scales must be"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE),
                     scales.to(DEVICE), 32)


@pytest.mark.parametrize("path", ["gemv", "dot"])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_path_and_split_of_k_gives_the_same_product(path, splits):
    """Split-K (partials summed in order) against one pass: 8 groups of 32 cut 1, 3 (3 + 3 +
    2 groups) and 8 ways, by the no-tensor-core and the tl.dot kernels."""
    generator = torch.Generator().manual_seed(7)
    qweight, qzeros, scales = quantize_rtn(torch.randn(48, 256, generator=generator), 32)
    x = torch.randn(3, 256, generator=generator)
    expected = x @ dequantize(qweight, qzeros, scales, 32).float()
    launch = W4A16Launch(path, block_n=16, block_k=16, num_warps=2, splits=splits)
    got = w4a16_matmul(x.to(DEVICE), qweight.to(DEVICE), qzeros.to(DEVICE),
                       scales.float().to(DEVICE), 32, launch=launch)
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_is_the_format_dequantization(dtype):
    """The large-step path's dense weight equals awq_format.dequantize bit for bit."""
    generator = torch.Generator().manual_seed(3)
    qweight, qzeros, scales = quantize_rtn(torch.randn(40, 128, generator=generator), 64)
    got = awq_dequantize(qweight.to(DEVICE), qzeros.to(DEVICE), scales.to(dtype).to(DEVICE), 64)
    assert got.dtype == dtype and got.shape == (128, 40)
    expected = dequantize(qweight, qzeros, scales.to(dtype), 64, dtype)
    assert torch.equal(got.cpu(), expected)


def test_unknown_path_and_too_many_gemv_rows_are_refused():
    qweight, qzeros, scales = quantize_rtn(torch.randn(16, 64), 32)
    args = (qweight.to(DEVICE), qzeros.to(DEVICE), scales.float().to(DEVICE), 32)
    with pytest.raises(ValueError, match="unknown W4A16 path"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), *args,
                     launch=W4A16Launch("mma", block_n=16, block_k=16, num_warps=2))
    with pytest.raises(ValueError, match="at most 16 rows"):
        w4a16_matmul(torch.randn(17, 64, device=DEVICE), *args,
                     launch=W4A16Launch("gemv", block_n=16, block_k=16, num_warps=2))
