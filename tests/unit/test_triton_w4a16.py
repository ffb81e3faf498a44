"""The Triton W4A16 kernels (worker/kernels/triton_w4a16.py), on AWQ tensors repacked into
the GPU layout (worker/quant/w4_layout.py), against dequantizing AutoAWQ's tensors and
multiplying (worker/quant/awq_format.py), in float32 and float16.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors; on a GPU machine the same tests run them compiled.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from lmfleet.worker.kernels.triton_w4a16 import (  # noqa: E402
    W4A16Launch,
    w4_dequantize,
    w4a16_matmul,
)
from lmfleet.worker.quant.awq_format import quantize_rtn  # noqa: E402
from lmfleet.worker.quant.w4_layout import COLUMN_TILE, repack_for_gpu  # noqa: E402
from tests.unit.w4_tensors import DEVICE, gpu_tensors  # noqa: E402


def untiled(packed: torch.Tensor, out_features: int) -> torch.Tensor:
    """The stored tiles -> (out, in / 8): column n's words in k order, contiguous."""
    tiles, groups, tile, per_group = packed.shape
    return (packed.permute(0, 2, 1, 3).reshape(tiles * tile, groups * per_group)
            [:out_features])

def test_repacked_layout_holds_consecutive_k_of_one_column_in_column_tiles():
    generator = torch.Generator().manual_seed(0)
    qweight, qzeros, scales = quantize_rtn(torch.randn(80, 64, generator=generator), 32)
    packed, zeros, _ = repack_for_gpu(qweight, qzeros, scales, torch.float32)
    from lmfleet.worker.quant.awq_format import unpack

    codes = unpack(qweight)  # (in, out)
    tile = COLUMN_TILE
    # 80 columns: two tiles of 64, the second padded; 2 groups of 32 k = 4 words each
    assert packed.shape == (2, 2, tile, 4) and zeros.shape == (2, 80)
    for n, p, j in [(0, 0, 0), (3, 1, 7), (79, 7, 4), (70, 5, 1), (64, 4, 3)]:
        word = int(packed[n // tile, p // 4, n % tile, p % 4])
        assert (word >> (4 * j)) & 0xF == int(codes[8 * p + j, n])
    assert not packed[1, :, 80 - tile:].any()  # the padding columns
    assert torch.equal(untiled(packed, 80)[3], packed[0, :, 3].reshape(8))
    assert torch.equal(zeros, unpack(qzeros).float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m,n,k,group", [(1, 64, 64, 32), (3, 64, 128, 64), (5, 72, 128, 64),
                                         (33, 136, 96, 32), (260, 40, 64, 32)])
def test_matches_dequantize_then_matmul(dtype, m, n, k, group):
    weight_t, packed, zeros, scales = gpu_tensors(n, k, group, dtype, m * 1000 + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m)).to(dtype)
    expected = x.float() @ weight_t
    got = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, group)
    assert got.dtype == dtype and got.shape == (m, n)
    tolerance = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float().cpu(), expected, rtol=tolerance, atol=tolerance)


def test_shapes_that_do_not_fit_are_refused():
    _, packed, zeros, scales = gpu_tensors(16, 64, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_matmul(torch.randn(2, 32, device=DEVICE), packed, zeros, scales, 32)
    with pytest.raises(ValueError, match="do not fit"):  # zeros of another group size
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), packed, zeros[:1], scales, 32)
    with pytest.raises(ValueError, match="must be"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), packed, zeros, scales.half(), 32)
    with pytest.raises(ValueError, match="do not fit"):  # words not in column tiles
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), untiled(packed, 16), zeros,
                     scales, 32)


@pytest.mark.parametrize("path,block_m,block_k,stages", [
    ("gemv", 0, 16, 2), ("gemv", 0, 16, 1), ("gemv", 0, 64, 2), ("dot", 0, 16, 2),
    ("dot", 16, 32, 2)])
@pytest.mark.parametrize("splits", [1, 3, 8])
def test_every_path_and_split_of_k_gives_the_same_product(path, block_m, block_k, stages,
                                                         splits):
    """Split-K (partials added in order by the tile's last program) against one pass: 8
    groups of 32 cut 1, 3 (3 + 3 + 2 groups) and 8 ways, twice in a row (the counters
    reset themselves); the decode kernel with one group a step or two (4 steps cut 1, 3
    and 4 ways), with and without prefetching the next step; tl.dot with the rows' block
    by the step's size and given (16 rows, 32 of K a step)."""
    weight_t, packed, zeros, scales = gpu_tensors(48, 256, 32, torch.float32, 7)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(7))
    expected = x @ weight_t
    launch = W4A16Launch(path, block_n=16, block_k=block_k, num_warps=2, num_stages=stages,
                         splits=splits, block_m=block_m)
    first = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, 32, launch=launch)
    again = w4a16_matmul(x.to(DEVICE), packed, zeros, scales, 32, launch=launch)
    torch.testing.assert_close(first.cpu(), expected, rtol=1e-4, atol=1e-4)
    assert torch.equal(first, again)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_dequantize_kernel_is_the_format_dequantization(dtype):
    """The large-step path's dense weight equals awq_format.dequantize bit for bit."""
    weight_t, packed, zeros, scales = gpu_tensors(40, 128, 64, dtype, 3)
    got = w4_dequantize(packed, zeros, scales, 64)
    assert got.dtype == dtype and got.shape == (40, 128)
    assert torch.equal(got.float().cpu(), weight_t.t())


def test_unknown_path_and_too_many_gemv_rows_are_refused():
    _, packed, zeros, scales = gpu_tensors(16, 64, 32, torch.float32, 0)
    with pytest.raises(ValueError, match="unknown W4A16 path"):
        w4a16_matmul(torch.randn(2, 64, device=DEVICE), packed, zeros, scales, 32,
                     launch=W4A16Launch("wmma", block_n=16, block_k=16, num_warps=2))
    with pytest.raises(ValueError, match="at most 16 rows"):
        w4a16_matmul(torch.randn(17, 64, device=DEVICE), packed, zeros, scales, 32,
                     launch=W4A16Launch("gemv", block_n=16, block_k=16, num_warps=2))


def test_more_tiles_than_split_k_counters_run_unsplit():
    """A launch asking for splits still gets one split where the tiles outnumber the
    counters (a counter per tile), instead of writing past them."""
    from lmfleet.worker.kernels.triton_split_k import MAX_TILES, num_splits

    assert num_splits(MAX_TILES, 8, torch.device(DEVICE), 4, 4) == 4
    assert num_splits(MAX_TILES + 1, 8, torch.device(DEVICE), 4, 4) == 1
