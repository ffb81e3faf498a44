"""The one-row tensor-core path of the W4A16 matmul (worker/kernels/triton_w4a16_stack.py):
groups stacked as the MMA's rows, each against its own column of x, compared with the
exact product of x and the weights, (code - zero) * scale.

Without CUDA the kernel runs under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors, in float16; on a GPU machine the same tests run
compiled, bfloat16 too.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch, w4a16_matmul  # noqa: E402
from tests.unit.w4_tensors import DEVICE, gpu_tensors  # noqa: E402

DTYPES = [torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,k,group,stack,splits,prefetch", [
    (64, 64, 32, 2, 1, False), (48, 256, 32, 2, 3, True), (40, 256, 64, 4, 1, False),
    (96, 512, 32, 16, 1, True), (32, 128, 128, 1, 1, False)])
def test_matches_the_exact_product(dtype, n, k, group, stack, splits, prefetch):
    """Stacks of 1 to 16 groups; columns past N masked (48, 40 and 96 in tiles of 32);
    K in 1 or 3 splits of whole stacks (4 stacks cut 2 + 1 + 1); the next stack loaded
    when used or prefetched."""
    exact_t, packed, zeros, scales = gpu_tensors(n, k, group, dtype, n + stack, exact=True)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(stack)).to(dtype)
    launch = W4A16Launch("stack", block_n=32, block_k=group, num_warps=4, splits=splits,
                         stack=stack, prefetch=prefetch)
    got = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, group, launch=launch)
    again = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, group, launch=launch)
    assert got.dtype == dtype and got.shape == (1, n)
    expected = (x.float() @ exact_t).to(dtype).float()  # zero and scale in float32
    torch.testing.assert_close(got.float().cpu(), expected, rtol=1e-2, atol=1e-2)
    assert torch.equal(got, again)  # split-K adds in order: repeatable bit for bit


def test_more_rows_or_a_stack_past_k_are_refused():
    _, packed, zeros, scales = gpu_tensors(32, 64, 32, torch.float16, 0)
    for rows, stack in ((2, 2), (1, 4), (1, 3)):
        with pytest.raises(ValueError, match="stack path takes one row"):
            w4a16_matmul(torch.randn(rows, 64, device=DEVICE).half(), packed, zeros, scales,
                         32, launch=W4A16Launch("stack", block_n=32, block_k=32, num_warps=4,
                                                stack=stack))
