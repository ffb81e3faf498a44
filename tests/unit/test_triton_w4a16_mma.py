"""The tensor-core path of the W4A16 matmul (worker/kernels/triton_w4a16_mma.py), against
the exact product of x and the weights, (code - zero) * scale, or against dequantizing
AutoAWQ's tensors and multiplying (worker/quant/awq_format.py) where the kernel rounds
each weight as that dequantization does.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors, in float16 (the interpreter has no bfloat16 numpy
type); on a GPU machine the same tests run compiled, bfloat16 too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch, w4a16_matmul  # noqa: E402
from lmfleet.worker.kernels.triton_w4a16_mma import offset_bits  # noqa: E402
from tests.unit.w4_tensors import DEVICE, gpu_tensors  # noqa: E402

DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,n,k,group,splits,block_m,permute_x,prefetch", [
    (1, 64, 64, 32, 1, 0, False, False), (1, 48, 256, 64, 3, 0, True, True),
    (3, 40, 128, 64, 2, 0, False, True), (16, 32, 256, 128, 1, 0, True, False),
    (40, 32, 128, 64, 2, 16, False, False), (40, 40, 128, 32, 1, 32, True, True)])
def test_matches_the_exact_product(dtype, m, n, k, group, splits, block_m, permute_x,
                                   prefetch):
    """One row, a few, 16 in one tile and 40 in tiles of 16 and 32 (the last
    padded); column tiles past N masked (48 and 40 columns in tiles of 32); K split 1, 2
    and 3 ways (4 groups cut 2 + 2, 3 + 1); x gathered in the tile's k order, or loaded in
    k order and permuted; each group loaded when used, or the next prefetched by hand."""
    exact_t, packed, zeros, scales = gpu_tensors(n, k, group, dtype, m * 100 + n, exact=True)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    launch = W4A16Launch("mma", block_n=32, block_k=group, num_warps=4, splits=splits,
                         block_m=block_m, permute_x=permute_x, prefetch=prefetch)
    got = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, group, launch=launch)
    again = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, group, launch=launch)
    assert got.dtype == dtype and got.shape == (m, n)
    # the kernel applies zero and scale in float32 (not to a rounded weight) and rounds
    # the sum once: the exact product rounded, within an ulp of x's dtype (2^-7 bfloat16)
    expected = (x.float() @ exact_t).to(dtype).float()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(got, again)  # split-K adds in order: repeatable bit for bit


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m,block_m,splits", [(1, 0, 1), (5, 0, 2), (40, 32, 1)])
def test_weights_scaled_in_16_bits_are_the_format_dequantization(dtype, m, block_m, splits):
    """weights_16: each weight (code - zero) * scale rounded to x's dtype, as the format's
    dequantization (and so the reference) rounds it, then summed by the MMA in float32."""
    weight_t, packed, zeros, scales = gpu_tensors(40, 256, 64, dtype, m)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(dtype)
    launch = W4A16Launch("mma", block_n=32, block_k=64, num_warps=4, splits=splits,
                         block_m=block_m, permute_x=True, weights_16=True)
    got = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, 64, launch=launch)
    expected = (x.float() @ weight_t).to(dtype).float()
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2)


def test_float32_activations_take_the_exact_path():
    """Tensor cores take 16-bit operands: a float32 step asked for "mma" is multiplied by
    the float32 kernels, as exact as without the launch."""
    weight_t, packed, zeros, scales = gpu_tensors(32, 64, 32, torch.float32, 5)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(5))
    got = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, 32,
                       launch=W4A16Launch("mma", block_n=32, block_k=32, num_warps=4))
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.cpu(), x @ weight_t, rtol=1e-4, atol=1e-4)


def test_row_tiles_under_sixteen_and_other_dtypes_are_refused():
    _, packed, zeros, scales = gpu_tensors(32, 64, 32, torch.float16, 0)
    for block_m in (8, 48):
        with pytest.raises(ValueError, match="power of two >= 16"):
            w4a16_matmul(torch.randn(17, 64, device=DEVICE).half(), packed, zeros, scales, 32,
                         launch=W4A16Launch("mma", block_n=32, block_k=32, num_warps=4,
                                            block_m=block_m))
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        offset_bits(torch.float32)
    assert offset_bits(torch.bfloat16) == (0x43004300, 128.0)  # 128 + code in each half
