"""The Triton paged-attention kernels (decode with split-K, varlen prefill) against a plain
torch reference over the same paged cache: scattered block ids, garbage in unused slots,
GQA, odd lengths. Without CUDA they run under the Triton interpreter on tiny shapes."""

import pytest
import torch

# Without CUDA, tests/conftest.py has set TRITON_INTERPRET=1 before triton loads.
pytest.importorskip("triton")

from lmfleet.worker.kernels.triton_paged_attention import (  # noqa: E402
    choose_num_splits,
    paged_decode_attention,
    paged_prefill_attention,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=0, spare=5):
    """A paged cache holding each sequence's keys/values at shuffled block ids.

    Every slot not holding a real token (unused blocks, block tails, table padding targets)
    is garbage: large finite values with NaN mixed in for float32. The cache is a strided
    view (blocks of K and V interleaved, heads padded) into a larger storage.
    """
    gen = torch.Generator().manual_seed(seed)
    needed = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(needed) + spare
    storage = torch.empty(num_blocks, 2, block_size, num_kv_heads, head_dim + 8)
    storage.uniform_(-3e4, 3e4, generator=gen)
    if dtype == torch.float32:
        storage[torch.rand(storage.shape, generator=gen) < 0.1] = float("nan")
    storage = storage.to(dtype)
    kv_cache = storage[..., :head_dim].transpose(0, 1)  # (2, nb, bs, Hkv, D), strided
    ids = torch.randperm(num_blocks, generator=gen)
    max_blocks = max(needed) + 2
    # Padding entries point at arbitrary valid (garbage) blocks.
    tables = torch.randint(0, num_blocks, (len(seq_lens), max_blocks), generator=gen)
    used = 0
    for b, n in enumerate(seq_lens):
        tables[b, :needed[b]] = ids[used:used + needed[b]]
        used += needed[b]
        for pos in range(n):
            blk, off = tables[b, pos // block_size], pos % block_size
            kv_cache[:, blk, off] = torch.randn(2, num_kv_heads, head_dim, generator=gen)
    return kv_cache.to(DEVICE), tables.to(torch.int32).to(DEVICE)


def reference(q, kv_cache, tables, b, seq_len, first_pos, scale):
    """Causal attention of q (n, Hq, D) at positions first_pos.. over sequence b; float64."""
    block_size = kv_cache.shape[2]
    pos = torch.arange(seq_len, device=kv_cache.device)
    blocks = tables[b].long()[pos // block_size]
    keys = kv_cache[0][blocks, pos % block_size].double()  # (L, Hkv, D)
    values = kv_cache[1][blocks, pos % block_size].double()  # (L, Hkv, D)
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)  # (L, Hq, D)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), keys) * scale  # (Hq, n, L)
    q_pos = first_pos + torch.arange(q.shape[0], device=q.device)
    scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), values)  # (n, Hq, D)


def rand_q(rows, num_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    # A strided view, as q would be when split out of a fused qkv projection.
    full = torch.randn(rows, num_heads + 2, head_dim, generator=gen).to(dtype)
    return full.to(DEVICE)[:, 1:num_heads + 1]


DECODE_CASES = [
    # dtype, group, block_size, num_splits, head_dim
    (torch.float32, 1, 16, 1, 32),
    (torch.float32, 3, 4, 3, 16),
    (torch.float32, 4, 64, 3, 32),  # block_size >= BLOCK_N: one block id per tile
    (torch.float16, 4, 8, 1, 32),
    (torch.float16, 1, 16, 3, 32),
    (torch.float32, 8, 16, 2, 16),
]
if DEVICE == "cuda":  # the interpreter multiplies bf16 bit patterns; D=128 is slow there
    DECODE_CASES += [(torch.bfloat16, 4, 16, 4, 128), (torch.float16, 8, 16, 1, 128)]


@pytest.mark.parametrize("dtype,group,block_size,num_splits,head_dim", DECODE_CASES)
def test_decode_matches_reference(dtype, group, block_size, num_splits, head_dim):
    # 5 tokens with 3 splits: splits 1 and 2 get no tile. 0 is a padding row.
    seq_lens = [5, 0, 37, 150]
    num_kv_heads, scale = 2, head_dim ** -0.5
    kv_cache, tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype)
    q = rand_q(len(seq_lens), group * num_kv_heads, head_dim, dtype, seed=1)
    out = torch.full_like(q, float("nan"))
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    paged_decode_attention(q, kv_cache, tables, lens, scale, out, num_splits=num_splits)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    for b, n in enumerate(seq_lens):
        if n:
            want = reference(q[b][None], kv_cache, tables, b, n, n - 1, scale)[0]
            torch.testing.assert_close(out[b].double(), want, atol=ATOL[dtype], rtol=1e-3)


def test_decode_splits_agree():
    """The same launch (fixed num_splits) serves any lengths; splits only regroup the work."""
    kv_cache, tables = make_cache([200, 64, 1], 16, 1, 32, torch.float32, seed=3)
    q = rand_q(3, 4, 32, torch.float32, seed=4)
    lens = torch.tensor([200, 64, 1], dtype=torch.int32, device=DEVICE)
    outs = []
    for splits in (1, 4):
        out = torch.empty_like(q)
        paged_decode_attention(q, kv_cache, tables, lens, 0.2, out, num_splits=splits)
        outs.append(out)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)


PREFILL_CASES = [
    # dtype, group, block_size, head_dim
    (torch.float32, 1, 16, 32),
    (torch.float32, 4, 4, 16),
    (torch.float16, 4, 16, 32),
    (torch.float16, 3, 64, 32),  # block_size >= BLOCK_N
]
if DEVICE == "cuda":  # the interpreter multiplies bf16 bit patterns; D=128 is slow there
    PREFILL_CASES += [(torch.bfloat16, 4, 16, 128), (torch.float16, 1, 16, 128)]


@pytest.mark.parametrize("dtype,group,block_size,head_dim", PREFILL_CASES)
def test_prefill_matches_reference(dtype, group, block_size, head_dim):
    # (query_len, cached history): decode-like rows, a fresh prompt, a prefix hit, a chunk
    # spanning two query blocks, a sequence with no new tokens this step.
    shapes = [(1, 40), (5, 0), (17, 3), (70, 9), (0, 6), (1, 0)]
    seq_lens = [q_len + ctx for q_len, ctx in shapes]
    num_kv_heads, scale = 2, head_dim ** -0.5
    kv_cache, tables = make_cache(seq_lens, block_size, num_kv_heads, head_dim, dtype, seed=2)
    starts = [0]
    for q_len, _ in shapes:
        starts.append(starts[-1] + q_len)
    q = rand_q(starts[-1], group * num_kv_heads, head_dim, dtype, seed=5)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, kv_cache, tables, torch.tensor(starts, dtype=torch.int32, device=DEVICE),
        torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
        max(q_len for q_len, _ in shapes), scale, out)
    for b, (_, ctx) in enumerate(shapes):
        rows = slice(starts[b], starts[b + 1])
        want = reference(q[rows], kv_cache, tables, b, seq_lens[b], ctx, scale)
        torch.testing.assert_close(out[rows].double(), want, atol=ATOL[dtype], rtol=1e-3)


def _decode_args(**change):
    args = dict(q=torch.zeros(2, 4, 32), kv_cache=torch.zeros(2, 4, 16, 2, 32),
                block_tables=torch.zeros(2, 3, dtype=torch.int32),
                seq_lens=torch.ones(2, dtype=torch.int32), scale=1.0, out=torch.zeros(2, 4, 32))
    args.update(change)
    if "q" in change and "out" not in change:
        args["out"] = torch.zeros_like(args["q"])
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.parametrize("change,match", [
    (dict(q=torch.zeros(2, 4, 24), kv_cache=torch.zeros(2, 4, 16, 2, 24)), "power of two"),
    (dict(q=torch.zeros(2, 5, 32)), "multiple"),
    (dict(q=torch.zeros(2, 4, 32, dtype=torch.float16)), "dtype"),
    (dict(seq_lens=torch.ones(2, dtype=torch.int64)), "int32"),
    (dict(kv_cache=torch.zeros(2, 4, 12, 2, 32)), "block_size"),
    (dict(num_splits=0), "num_splits"),
])
def test_decode_rejects_bad_inputs(change, match):
    with pytest.raises(ValueError, match=match):
        paged_decode_attention(**_decode_args(**change))


def test_prefill_rejects_bad_inputs():
    args = _decode_args(q=torch.zeros(2, 4, 32))
    qsl = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    bad_head = _decode_args(q=torch.zeros(2, 5, 32))
    with pytest.raises(ValueError, match="multiple"):
        paged_prefill_attention(bad_head["q"], args["kv_cache"], args["block_tables"], qsl,
                                args["seq_lens"], 1, 1.0, bad_head["out"])
    with pytest.raises(ValueError, match="dtype"):
        paged_prefill_attention(args["q"].half(), args["kv_cache"], args["block_tables"], qsl,
                                args["seq_lens"], 1, 1.0, args["out"].half())
    with pytest.raises(ValueError, match="query_start_loc"):
        paged_prefill_attention(args["q"], args["kv_cache"], args["block_tables"], qsl.long(),
                                args["seq_lens"], 1, 1.0, args["out"])


def test_choose_num_splits():
    assert choose_num_splits(512, 32768, 8) == 1  # a large batch fills the GPU alone
    assert choose_num_splits(1, 32768, 8) > 1  # one long sequence needs splitting
    assert choose_num_splits(1, 100, 8) == 1  # too short to split
    assert choose_num_splits(1, 1 << 20, 1) <= 16
    for batch in (1, 2, 4, 8, 16, 64):  # non-increasing in batch size
        assert choose_num_splits(batch, 8192, 8) >= choose_num_splits(2 * batch, 8192, 8)
    for length in (256, 1024, 4096):  # non-decreasing in context length
        assert choose_num_splits(2, length, 8) <= choose_num_splits(2, 4 * length, 8)


@pytest.mark.parametrize("codec", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_an_encoded_cache_reads_as_its_codec_decodes_it(dtype, codec):
    """Rows of codes + float32 scale (and zero) (kv/kv_codecs.py): decode and prefill equal
    attention over the codec's own decoding of the same cache."""
    from lmfleet.worker.kv.kv_codecs import CODECS

    seq_lens, num_kv_heads, head_dim, scale = [5, 37, 150], 2, 32, 32 ** -0.5
    kv_cache, tables = make_cache(seq_lens, 16, num_kv_heads, head_dim, torch.float32, seed=6)
    # (2, nb, bs, H, D + 8 or D + 4); garbage slots made finite, as the engine's zeros are.
    encoded = CODECS[codec].encode(kv_cache.cpu().nan_to_num().clamp(-1e4, 1e4)).to(DEVICE)
    decoded = CODECS[codec].decode(encoded, dtype)  # what the kernels must read
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    q = rand_q(len(seq_lens), 4 * num_kv_heads, head_dim, dtype, seed=7)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, encoded, tables, lens, scale, out, num_splits=2)
    for b, n in enumerate(seq_lens):
        want = reference(q[b][None], decoded, tables, b, n, n - 1, scale)[0]
        torch.testing.assert_close(out[b].double(), want, atol=ATOL[dtype], rtol=1e-3)
    starts = torch.tensor([0, 1, 6, 23], dtype=torch.int32, device=DEVICE)  # 1, 5, 17 queries
    q = rand_q(23, 4 * num_kv_heads, head_dim, dtype, seed=8)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(q, encoded, tables, starts, lens, 17, scale, out)
    for b, n in enumerate(seq_lens):
        rows = slice(int(starts[b]), int(starts[b + 1]))
        first = n - (rows.stop - rows.start)
        want = reference(q[rows], decoded, tables, b, n, first, scale)
        torch.testing.assert_close(out[rows].double(), want, atol=ATOL[dtype], rtol=1e-3)
