"""The tensor-parallel layers against the unsharded ones: shard loading and forward.

Single-process tests build every rank's shard (explicit tp_rank / tp_size) from the full
checkpoint tensors and do the collective by hand (concatenate column outputs, sum row
partials); one test runs two real ranks over gloo. At tp = 1 each layer must run exactly
the op of the nn.Linear / nn.Embedding it replaced (bit-identical), as the CPU exactness
tests rely on it.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from lmfleet.worker.model.cpu_linear import TransposedLinear, transpose_linears
from lmfleet.worker.model.parallel_linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, INTER, VOCAB = 32, 8, 4, 2, 48, 50


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def load(layer, name, tensor, shard_id=None):
    param = getattr(layer, name)
    param.weight_loader(param, tensor, shard_id)
    return layer


def test_tp1_layers_are_bit_identical_to_torch_modules():
    x = rand(5, HIDDEN, seed=1)
    w, b = rand(24, HIDDEN, seed=2), rand(24, seed=3)
    reference = nn.Linear(HIDDEN, 24)
    with torch.no_grad():
        reference.weight.copy_(w), reference.bias.copy_(b)
    for klass in (ReplicatedLinear, ColumnParallelLinear):
        layer = load(load(klass(HIDDEN, 24, bias=True, tp_rank=0, tp_size=1), "weight", w),
                     "bias", b)
        assert torch.equal(layer(x), reference(x))
        layer.transpose_weight()  # the CPU pass: the same op as TransposedLinear
        assert torch.equal(layer(x), TransposedLinear(reference)(x))
    row = load(load(RowParallelLinear(HIDDEN, 24, bias=True, tp_rank=0, tp_size=1),
                    "weight", w), "bias", b)
    assert torch.equal(row(x), reference(x))
    embed_w = rand(VOCAB, HIDDEN, seed=4)
    ids = torch.tensor([0, 7, 49, 7])
    embedding = load(VocabParallelEmbedding(VOCAB, HIDDEN, tp_rank=0, tp_size=1), "weight",
                     embed_w)
    assert torch.equal(embedding(ids), F.embedding(ids, embed_w))
    head = load(ParallelLMHead(VOCAB, HIDDEN, tp_rank=0, tp_size=1), "weight", embed_w)
    assert torch.equal(head(x), F.linear(x, embed_w))


@pytest.mark.parametrize("tp", [2, 4])
def test_column_and_merged_shards_concatenate_to_the_full_output(tp):
    x = rand(6, HIDDEN, seed=1)
    gate, up = rand(INTER, HIDDEN, seed=2), rand(INTER, HIDDEN, seed=3)
    gate_b, up_b = rand(INTER, seed=4), rand(INTER, seed=5)
    full_gate, full_up = F.linear(x, gate, gate_b), F.linear(x, up, up_b)  # (T, I) each
    column_parts, gate_parts, up_parts = [], [], []
    for rank in range(tp):
        column = load(load(ColumnParallelLinear(HIDDEN, INTER, True, rank, tp), "weight",
                           gate), "bias", gate_b)
        column_parts.append(column(x))
        merged = MergedColumnParallelLinear(HIDDEN, [INTER, INTER], True, rank, tp)
        for index, (weight, bias) in enumerate([(gate, gate_b), (up, up_b)]):
            load(load(merged, "weight", weight, index), "bias", bias, index)
        out = merged(x)  # (T, 2 I/tp): [gate slice, up slice]
        gate_parts.append(out[:, :INTER // tp])
        up_parts.append(out[:, INTER // tp:])
    torch.testing.assert_close(torch.cat(column_parts, -1), full_gate, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(gate_parts, -1), full_gate, rtol=0, atol=1e-5)
    torch.testing.assert_close(torch.cat(up_parts, -1), full_up, rtol=0, atol=1e-5)


def test_qkv_shards_hold_their_heads():
    tp = 2
    x = rand(3, HIDDEN, seed=1)
    q, k, v = (rand(n * HEAD_DIM, HIDDEN, seed=s) for n, s in ((HEADS, 2), (KV_HEADS, 3),
                                                                (KV_HEADS, 4)))
    full_q, full_k, full_v = (F.linear(x, w) for w in (q, k, v))
    for rank in range(tp):
        layer = QKVParallelLinear(HIDDEN, HEAD_DIM, HEADS, KV_HEADS, False, rank, tp)
        for shard_id, weight in zip("qkv", (q, k, v), strict=True):
            load(layer, "weight", weight, shard_id)
        assert (layer.num_heads, layer.num_kv_heads) == (HEADS // tp, KV_HEADS // tp)
        q_out, k_out, v_out = layer(x).split([2 * HEAD_DIM, HEAD_DIM, HEAD_DIM], dim=-1)
        q_cols = slice(rank * 2 * HEAD_DIM, (rank + 1) * 2 * HEAD_DIM)  # heads 2r, 2r+1
        kv_cols = slice(rank * HEAD_DIM, (rank + 1) * HEAD_DIM)  # KV head r
        torch.testing.assert_close(q_out, full_q[:, q_cols], rtol=0, atol=1e-5)
        torch.testing.assert_close(k_out, full_k[:, kv_cols], rtol=0, atol=1e-5)
        torch.testing.assert_close(v_out, full_v[:, kv_cols], rtol=0, atol=1e-5)


def test_row_partials_sum_to_the_full_output_with_the_bias_once():
    tp = 2
    x = rand(4, INTER, seed=1)
    w, b = rand(HIDDEN, INTER, seed=2), rand(HIDDEN, seed=3)
    partials = []
    for rank in range(tp):
        layer = load(load(RowParallelLinear(INTER, HIDDEN, True, rank, tp), "weight", w),
                     "bias", b)
        assert torch.equal(layer.bias, b)  # whole on every rank, added after the reduce
        shard = x[:, rank * INTER // tp:(rank + 1) * INTER // tp]  # (T, I/tp)
        partials.append(layer._linear(shard, None))
    torch.testing.assert_close(sum(partials) + b, F.linear(x, w, b), rtol=0, atol=1e-5)


def test_vocab_shards_with_padding_embed_and_score_every_id():
    tp, vocab = 4, 50  # 13 rows per shard: the last holds ids 39..49 and 2 padding rows
    weight = rand(vocab, HIDDEN, seed=1)
    ids = torch.arange(vocab)
    x = rand(3, HIDDEN, seed=2)
    embedded, logits = [], []
    for rank in range(tp):
        embedding = load(VocabParallelEmbedding(vocab, HIDDEN, rank, tp), "weight", weight)
        local = ids - embedding.vocab_start
        outside = (local < 0) | (local >= embedding.weight.shape[0])
        embedded.append(F.embedding(local.clamp(0, 12), embedding.weight)
                        .masked_fill(outside[:, None], 0))
        head = load(ParallelLMHead(vocab, HIDDEN, rank, tp), "weight", weight)
        logits.append(head._linear(x, None))  # (T, 13)
    assert torch.equal(embedding.weight[11:], torch.zeros(2, HIDDEN))  # padding rows
    assert torch.equal(sum(embedded), weight)  # one rank's row plus zeros: exact
    torch.testing.assert_close(torch.cat(logits, -1)[:, :vocab], F.linear(x, weight),
                               rtol=0, atol=1e-5)


def test_unsupported_splits_name_the_numbers():
    with pytest.raises(ValueError, match="num_attention_heads=4 is not divisible by "
                                         "tensor_parallel_size=3"):
        QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 4, tp_rank=0, tp_size=3)
    with pytest.raises(ValueError, match="num_key_value_heads=2 is not divisible by "
                                         "tensor_parallel_size=4"):
        QKVParallelLinear(HIDDEN, HEAD_DIM, 4, 2, tp_rank=0, tp_size=4)
    with pytest.raises(ValueError, match="intermediate_size=48 is not divisible by "
                                         "tensor_parallel_size=5"):
        MergedColumnParallelLinear(HIDDEN, [48, 48], tp_rank=0, tp_size=5,
                                   what="intermediate_size")


def test_wrong_checkpoint_shape_is_refused():
    layer = ColumnParallelLinear(HIDDEN, INTER, False, 0, 2)
    with pytest.raises(ValueError, match=r"has shape \(24, 32\), expected \(48, 32\)"):
        load(layer, "weight", rand(INTER // 2, HIDDEN))


def test_weight_loaders_survive_materialization_and_the_transpose_pass():
    with torch.device("meta"):
        model = nn.Sequential(ColumnParallelLinear(HIDDEN, INTER, True, 0, 1),
                              RowParallelLinear(INTER, HIDDEN, False, 0, 1))
    model = model.to_empty(device="cpu").to(torch.float32)
    assert all(hasattr(p, "weight_loader") for p in model.parameters())
    load(model[0], "weight", rand(INTER, HIDDEN)), load(model[0], "bias", rand(INTER))
    load(model[1], "weight", rand(HIDDEN, INTER))
    x = rand(2, HIDDEN, seed=5)
    before = model(x)
    transpose_linears(model)
    assert model[0].weight_t.shape == (HIDDEN, INTER)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)


def _two_rank_worker(rank: int, port: int, results) -> None:
    from lmfleet.worker.parallel import state

    torch.set_num_threads(1)
    state.init_groups(rank, 2, 1, port, timeout_s=30)
    try:
        assert os.environ["NCCL_NVLS_ENABLE"] == "0"
        x = rand(4, INTER, seed=1)
        row = load(load(RowParallelLinear(INTER, HIDDEN, True), "weight",
                        rand(HIDDEN, INTER, seed=2)), "bias", rand(HIDDEN, seed=3))
        shard = x[:, rank * INTER // 2:(rank + 1) * INTER // 2]
        embedding = load(VocabParallelEmbedding(VOCAB, HIDDEN), "weight",
                         rand(VOCAB, HIDDEN, seed=4))
        head = load(ParallelLMHead(VOCAB, HIDDEN), "weight", rand(VOCAB, HIDDEN, seed=4))
        ids = torch.tensor([0, 24, 25, 49])
        results.put((rank, row(shard), embedding(ids), head(rand(3, HIDDEN, seed=5))))
    finally:
        state.destroy_groups()


def test_two_ranks_over_gloo_match_the_unsharded_layers():
    from lmfleet.worker.parallel.state import free_port

    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    process = mp.start_processes(_two_rank_worker, args=(free_port(), results), nprocs=2,
                                 join=False, start_method="spawn")
    outputs = [results.get() for _ in range(2)]
    while not process.join(timeout=30):  # True once every rank exited (raises if one failed)
        pass
    w, b = rand(HIDDEN, INTER, seed=2), rand(HIDDEN, seed=3)
    embed_w = rand(VOCAB, HIDDEN, seed=4)
    ids = torch.tensor([0, 24, 25, 49])
    for _, row, embedded, logits in outputs:  # every rank holds the full results
        torch.testing.assert_close(row, F.linear(rand(4, INTER, seed=1), w, b), rtol=0,
                                   atol=1e-5)
        assert torch.equal(embedded, F.embedding(ids, embed_w))
        torch.testing.assert_close(logits, F.linear(rand(3, HIDDEN, seed=5), embed_w),
                                   rtol=0, atol=1e-5)
