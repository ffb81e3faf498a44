"""AWQ W4A16: the AutoAWQ checkpoint format written from its spec (packing order, zero
points, per-group scales), round-to-nearest quantization, and the quantized parallel
linear layers' shards against the unsharded dequantized layer."""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.model.parallel_linear import (
    MergedColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
)
from lmfleet.worker.quant.awq_format import dequantize, pack, quantize_rtn, unpack
from lmfleet.worker.quant.config import WeightQuantization

AWQ32 = WeightQuantization("awq", 4, 32)


def reference_pack(codes: torch.Tensor) -> torch.Tensor:
    """AutoAWQ's packing loop as its GEMM format describes it: for each packed column,
    nibble i takes output column 8 * col + order_map[i]."""
    order_map = [0, 2, 4, 6, 1, 3, 5, 7]
    packed = torch.zeros(codes.shape[0], codes.shape[1] // 8, dtype=torch.int64)
    for col in range(codes.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= codes[:, col * 8 + order_map[i]].to(torch.int64) << (i * 4)
    return packed.to(torch.int32)


def reference_dequantize(qweight, qzeros, scales, group: int) -> torch.Tensor:
    """W^T[k, n] = (code[k, n] - zero[k // g, n]) * scale[k // g, n], element by element."""
    codes, zeros = unpack(qweight), unpack(qzeros)
    out = torch.empty(codes.shape)
    for k in range(codes.shape[0]):
        for n in range(codes.shape[1]):
            out[k, n] = float(codes[k, n] - zeros[k // group, n]) * float(scales[k // group, n])
    return out


def test_packing_follows_autoawqs_order_and_round_trips():
    codes = torch.randint(0, 16, (5, 24), generator=torch.Generator().manual_seed(0))
    assert torch.equal(pack(codes), reference_pack(codes))
    assert torch.equal(unpack(pack(codes)), codes.to(torch.int32))
    # Output column 1 sits in nibble 4, column 4 in nibble 2 (bits 8-11), column 7 in 7.
    one_hot = torch.zeros(1, 8, dtype=torch.int32)
    one_hot[0, 1] = 1
    assert pack(one_hot).item() == 1 << 16
    one_hot[0, 1], one_hot[0, 4] = 0, 3
    assert pack(one_hot).item() == 3 << 8
    one_hot[0, 4], one_hot[0, 7] = 0, 15
    assert pack(one_hot).item() == -(1 << 28)  # 0xF0000000 as int32
    with pytest.raises(ValueError, match="do not pack"):
        pack(torch.zeros(2, 12, dtype=torch.int32))


def test_rtn_codes_dequantize_within_half_a_step():
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(1))  # (out, in)
    qweight, qzeros, scales = quantize_rtn(weight, 32)
    assert (qweight.shape, qzeros.shape, scales.shape) == ((64, 2), (2, 2), (2, 16))
    assert qweight.dtype == qzeros.dtype == torch.int32 and scales.dtype == torch.float16
    dequantized = dequantize(qweight, qzeros, scales, 32)  # (in, out)
    assert torch.allclose(dequantized, reference_dequantize(qweight, qzeros, scales, 32))
    step = scales.float().repeat_interleave(32, dim=0)  # (in, out)
    # Half a step, plus the fp16 rounding of the stored scale over up to 15 steps.
    assert ((dequantized - weight.t()).abs() <= step * 0.5 + step * 15 * 2**-11).all()
    codes = unpack(qweight)
    assert codes.min() == 0 and codes.max() == 15  # each group spans the whole range
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        quantize_rtn(torch.randn(8, 48), 32)


def test_checkpoint_quantization_configs():
    config = {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                      "zero_point": True, "version": "GEMM"}}
    assert WeightQuantization.from_config(config) == WeightQuantization("awq", 4, 128)
    assert WeightQuantization.from_config({}) is None
    with pytest.raises(ValueError, match="unsupported quantization 'gptq'"):
        WeightQuantization.from_config({"quantization_config": {"quant_method": "gptq"}})
    with pytest.raises(ValueError, match="4-bit GEMM"):
        WeightQuantization.from_config({"quantization_config": {
            "quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}})


def quantized(out_features: int, in_features: int, seed: int):
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return quantize_rtn(weight, 32)


def load_all(layer, tensors: dict, shard_id=None) -> None:
    for name, tensor in tensors.items():
        param = getattr(layer, name)
        param.weight_loader(param, tensor, shard_id)


def as_params(qweight, qzeros, scales) -> dict:
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales}


def materialized(layer):
    return layer.to_empty(device="cpu").float()


@pytest.mark.parametrize("tp", [1, 2])
def test_column_merged_and_qkv_shards_concatenate_to_the_dequantized_output(tp):
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(2))  # (T, in)
    gate, up = quantized(64, 64, 3), quantized(64, 64, 4)
    full = torch.cat([x @ dequantize(*gate, 32), x @ dequantize(*up, 32)], dim=-1)  # (T, 128)
    q, k, v = quantized(64, 64, 5), quantized(32, 64, 6), quantized(32, 64, 7)
    full_qkv = torch.cat([x @ dequantize(*t, 32) for t in (q, k, v)], dim=-1)
    merged_parts, qkv_parts = [], []
    for rank in range(tp):
        with torch.device("meta"):
            merged = MergedColumnParallelLinear(64, [64, 64], tp_rank=rank, tp_size=tp,
                                                quant=AWQ32)
            qkv = QKVParallelLinear(64, 16, 4, 2, tp_rank=rank, tp_size=tp, quant=AWQ32)
        merged, qkv = materialized(merged), materialized(qkv)
        for index, tensors in enumerate((gate, up)):
            load_all(merged, as_params(*tensors), index)
        for shard, tensors in zip("qkv", (q, k, v), strict=True):
            load_all(qkv, as_params(*tensors), shard)
        merged_parts.append(merged(x).view(3, 2, -1))  # (T, part, I/tp)
        qkv_parts.append(qkv(x))
    # Rank r holds slice r of each part.
    assert torch.allclose(torch.cat(merged_parts, dim=-1).reshape(3, -1), full, atol=1e-5)
    sizes = [64 // tp, 32 // tp, 32 // tp]
    by_part = [torch.cat([p.split(sizes, -1)[i] for p in qkv_parts], -1) for i in range(3)]
    assert torch.allclose(torch.cat(by_part, -1), full_qkv, atol=1e-5)


def test_row_partials_sum_to_the_dequantized_output():
    x = torch.randn(3, 128, generator=torch.Generator().manual_seed(8))
    down = quantized(64, 128, 9)
    partial = []
    for rank in range(2):
        with torch.device("meta"):
            row = RowParallelLinear(128, 64, tp_rank=rank, tp_size=2, quant=AWQ32)
        row = materialized(row)
        load_all(row, as_params(*down))
        partial.append(row._linear(x[:, rank * 64:(rank + 1) * 64], None))
    assert torch.allclose(partial[0] + partial[1], x @ dequantize(*down, 32), atol=1e-5)


def test_splits_that_break_packing_or_groups_are_refused():
    with pytest.raises(ValueError, match="not a multiple of the group size 32"):
        RowParallelLinear(64, 64, tp_rank=0, tp_size=4, quant=AWQ32)  # 16 inputs per rank
    with pytest.raises(ValueError, match="not a multiple of 8"):
        QKVParallelLinear(64, 4, 16, 4, tp_rank=0, tp_size=4, quant=AWQ32)  # 4 per part


def test_clipping_never_raises_the_rounded_output_error_and_clips_outliers():
    from lmfleet.worker.quant.awq_search import _rounded, clip_weight

    generator = torch.Generator().manual_seed(10)
    weight = torch.randn(16, 64, generator=generator)
    weight[3, 5] = 12.0  # one outlier stretches its group's rounding step
    x = torch.randn(256, 64, generator=generator)
    clipped = clip_weight(weight, x, 32)
    assert clipped[3, 5] < 12.0 and clipped.abs().max() <= weight.abs().max()

    def error(w):  # output error of the rounded weight against the original
        return (x @ (_rounded(w, 32) - weight).t()).pow(2).mean()

    assert error(clipped) <= error(weight)
