"""GGUF blocks kept packed (worker/quant/gguf_blocks.py, gguf_packed.py): dequantization
bit-identical to the gguf package's reference (llama.cpp's formulas) for Q4_0, Q4_1 and
Q8_0, and the row order that undoes llama.cpp's q/k permutation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from lmfleet.worker.quant.gguf_blocks import dequantize_blocks, packed_columns  # noqa: E402
from lmfleet.worker.quant.gguf_packed import unpermute_rows  # noqa: E402


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0"])
def test_dequantization_equals_the_gguf_reference_bit_for_bit(qtype):
    weights = np.random.default_rng(0).standard_normal((6, 128)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    blocks = gguf.quants.quantize(weights, kind)  # (6, 4 x bytes) uint8
    assert blocks.shape == (6, packed_columns(128, qtype))
    expected = gguf.quants.dequantize(blocks, kind)  # (6, 128) float32
    got = dequantize_blocks(torch.from_numpy(blocks), qtype)
    assert np.array_equal(got.numpy(), expected)
    # A tensor-parallel shard of the input features is a column range of the bytes.
    half = packed_columns(64, qtype)
    assert np.array_equal(dequantize_blocks(torch.from_numpy(blocks[:, half:]), qtype).numpy(),
                          expected[:, 64:])


def test_unsupported_types_and_partial_blocks_are_refused():
    with pytest.raises(ValueError, match="unsupported GGUF block type Q4_K"):
        packed_columns(64, "Q4_K")
    with pytest.raises(ValueError, match="not a multiple of the 32-weight"):
        packed_columns(48, "Q4_1")


def llama_cpp_permute(rows: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to q and k rows (its rotary layout)."""
    return (rows.reshape(num_heads, 2, rows.shape[0] // num_heads // 2, *rows.shape[1:])
            .swapaxes(1, 2).reshape(rows.shape))


@pytest.mark.parametrize("rows,heads", [(64, 4), (192, 3), (576, 9)])
def test_unpermuting_restores_hugging_face_row_order(rows, heads):
    hf_rows = np.arange(rows * 2).reshape(rows, 2)
    permuted = llama_cpp_permute(hf_rows, heads)
    assert not np.array_equal(permuted, hf_rows)
    assert np.array_equal(permuted[unpermute_rows(rows, heads).numpy()], hf_rows)
