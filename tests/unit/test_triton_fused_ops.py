"""The Triton fused ops (worker/kernels) against the torch code they replace (layers.py):
residual add + RMSNorm, rotary + paged KV store, SiLU * up, in float32, float16 and
bfloat16.

Without CUDA the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported) on CPU tensors; on a GPU machine the same tests run the compiled
kernels on cuda. bfloat16 runs under the interpreter too: the kernels round bfloat16 by
hand there (triton_rounding.py), since the interpreter's own cast truncates.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from lmfleet.worker.kernels.triton_activation import silu_mul  # noqa: E402
from lmfleet.worker.kernels.triton_rms_norm import add_rms_norm  # noqa: E402
from lmfleet.worker.kernels.triton_rotary import rotary_store_kv  # noqa: E402
from lmfleet.worker.kernels.triton_rounding import round_to, soft_bf16  # noqa: E402
from lmfleet.worker.model.layers import RMSNorm, RotaryEmbedding, apply_rotary  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# float32: ~1e-6 relative; 16-bit: about 1 ulp (relative spacing <= 2**-10 for float16,
# 2**-7 for bfloat16).
TOLERANCE = {torch.float32: dict(rtol=1e-6, atol=1e-6),
             torch.float16: dict(rtol=1e-3, atol=1e-3),
             torch.bfloat16: dict(rtol=8e-3, atol=8e-3)}


@triton.jit
def _round_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, SOFT_BF16: tl.constexpr):
    cols = tl.arange(0, BLOCK)  # (BLOCK,)
    mask = cols < n  # (BLOCK,)
    x = tl.load(x_ptr + cols, mask=mask)  # (BLOCK,) float32
    tl.store(y_ptr + cols, round_to(x, y_ptr, SOFT_BF16), mask=mask)


# numpy warns when float32 -> float16 overflows to inf under the interpreter (as intended).
@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_to_is_torchs_round_to_nearest_even(dtype):
    torch.manual_seed(0)
    edges = [1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11,
             torch.finfo(dtype).max, 3.3961776e38, 3.4028235e38, float("inf"), -float("inf"),
             0.0, -0.0, 1e-40, -1e-40, 6e-8, 1e-8, 65520.0]
    raw_bits = torch.randint(-2**31, 2**31 - 1, (500,), dtype=torch.int32)
    x = torch.cat([torch.tensor(edges), torch.randn(500) * 100, raw_bits.view(torch.float32)])
    x = torch.cat([x[~x.isnan()], torch.tensor([float("nan")])]).to(DEVICE)  # (N,)
    y = torch.empty(x.shape, dtype=dtype, device=DEVICE)  # (N,)
    _round_kernel[(1,)](x, y, x.numel(), triton.next_power_of_2(x.numel()), soft_bf16(dtype))
    expected = x.to(dtype)  # (N,)
    same = (y.view(torch.int16) == expected.view(torch.int16)) | (y.isnan() & expected.isnan())
    assert same.all(), x[~same]


# --- residual add + RMSNorm -------------------------------------------------------------


def _rows(tokens, hidden, dtype, strided, scale=1.0):
    """(T, H) random rows; with `strided`, a view of a wider tensor (row stride > H)."""
    wide = torch.randn(tokens, hidden + (8 if strided else 0), device=DEVICE) * scale
    return wide.to(dtype)[:, 3:3 + hidden] if strided else wide.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_delta", [False, True])
@pytest.mark.parametrize("hidden,strided", [(96, False), (128, True)])
def test_add_rms_norm_matches_rmsnorm_and_adds_in_place(dtype, with_delta, hidden, strided):
    torch.manual_seed(1)
    norm = RMSNorm(hidden, 1e-5).to(device=DEVICE, dtype=dtype)
    norm.weight.data = torch.randn(hidden, device=DEVICE).to(dtype)
    x = _rows(5, hidden, dtype, strided, scale=3.0)  # (T, H)
    delta = _rows(5, hidden, dtype, strided) if with_delta else None  # (T, H)
    reference_x = x.clone()
    expected = norm(reference_x, None if delta is None else delta.clone())  # (T, H)
    before = x.clone()
    out = add_rms_norm(x, delta, norm.weight.data, norm.eps)  # (T, H)
    # The residual add happened in place, rounded exactly as x.add_(delta).
    assert torch.equal(x, reference_x)
    if delta is None:
        assert torch.equal(x, before)
    assert out.dtype == expected.dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    if dtype != torch.float32:  # 16-bit: nearly all bit-identical, the rest 1 ulp apart
        assert (out == expected).float().mean() > 0.95


def test_add_rms_norm_promotes_like_torch_for_a_float32_weight():
    torch.manual_seed(2)
    norm = RMSNorm(64, 1e-6).to(DEVICE)  # float32 weight over bfloat16 activations
    norm.weight.data = torch.randn(64, device=DEVICE)
    x = torch.randn(3, 64, device=DEVICE).to(torch.bfloat16)  # (T, H)
    expected = norm(x.clone())  # (T, H) float32
    out = add_rms_norm(x, None, norm.weight.data, norm.eps)
    assert out.dtype == torch.float32
    # float32 out, but each is weight times a bfloat16-rounded value: 1 bf16 ulp of slack
    # for the rare element where the inverse RMS's last bit (sum order) flips that rounding.
    torch.testing.assert_close(out, expected, **TOLERANCE[torch.bfloat16])
    assert (out == expected).float().mean() > 0.95


def test_add_rms_norm_rejects_bad_inputs():
    x = torch.randn(2, 32, device=DEVICE)
    weight = torch.ones(32, device=DEVICE)
    with pytest.raises(ValueError, match="delta shape"):
        add_rms_norm(x, torch.randn(2, 16, device=DEVICE), weight, 1e-5)
    with pytest.raises(ValueError, match="delta dtype"):
        add_rms_norm(x, torch.randn(2, 32, device=DEVICE).half(), weight, 1e-5)
    with pytest.raises(ValueError, match="weight must be"):
        add_rms_norm(x, None, torch.ones(16, device=DEVICE), 1e-5)
    with pytest.raises(ValueError, match="contiguous"):
        add_rms_norm(torch.randn(32, 2, device=DEVICE).t(), None, weight, 1e-5)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        add_rms_norm(x.double(), None, weight, 1e-5)


# --- rotary + paged KV store ------------------------------------------------------------

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 6, 2, 16, 4, 5
SENTINEL = -1000.0  # exact in every dtype, far from any rotated value


def _cache_storage(layout, dtype):
    """A 3-layer storage filled with a sentinel, and layer 1's (2, blocks, bs, Hkv, D) view."""
    shape = (NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    if layout == "layer_major":  # (L, 2, ...)[1]: contiguous within the layer
        storage = torch.full((3, 2, *shape), SENTINEL, dtype=dtype, device=DEVICE)
        return storage, storage[1]
    storage = torch.full((2, 3, *shape), SENTINEL, dtype=dtype, device=DEVICE)  # (2, L, ...)
    return storage, storage[:, 1]  # keys and values a whole storage half apart


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("layout", ["layer_major", "kv_major"])
def test_rotary_store_kv_matches_apply_rotary_and_write_kv(dtype, index_dtype, layout):
    torch.manual_seed(3)
    tokens, q_heads_kv = 5, NUM_HEADS + NUM_KV_HEADS
    width = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    rotary = RotaryEmbedding(HEAD_DIM, 64, 10000.0, None).to(DEVICE)
    positions = torch.tensor([0, 7, 33, 2, 63], device=DEVICE)
    slots = torch.tensor([19, 0, -1, 6, 13], device=DEVICE)  # token 2 is padding
    wide = (torch.randn(tokens, width + 24, device=DEVICE) * 2).to(dtype)  # (T, W + 24)
    qkv = wide[:, 8:8 + width]  # (T, W), row stride W + 24

    # The torch path (llama.py without fused ops): apply_rotary on q and k, then write_kv.
    cos, sin = rotary(positions, dtype)  # (T, 1, D) each
    qk = qkv[:, :q_heads_kv * HEAD_DIM].reshape(tokens, q_heads_kv, HEAD_DIM)
    expected_qk = apply_rotary(qk, cos, sin)  # (T, Hq + Hkv, D)
    v = qkv[:, q_heads_kv * HEAD_DIM:].reshape(tokens, NUM_KV_HEADS, HEAD_DIM).clone()
    expected_wide = wide.clone()
    expected_wide[:, 8:8 + q_heads_kv * HEAD_DIM] = expected_qk.reshape(tokens, -1)
    expected_storage, expected_cache = _cache_storage(layout, dtype)
    real = slots >= 0
    # write_kv's indexed copy, through a view so it lands in the storage.
    flat = expected_cache.view(2, NUM_BLOCKS * BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    flat.index_copy_(1, slots[real], torch.stack((expected_qk[real, NUM_HEADS:], v[real])))

    storage, cache = _cache_storage(layout, dtype)
    rotary_store_kv(qkv, rotary.cos_table, rotary.sin_table, positions.to(index_dtype),
                    NUM_HEADS, NUM_KV_HEADS, cache, slots.to(index_dtype))
    # Bit-identical in every dtype: q and k rotated in place, v and the margins untouched.
    assert torch.equal(wide, expected_wide)
    # Only the 4 real tokens' k and v entries of layer 1 were written (padding wrote
    # nothing); everything else keeps the sentinel.
    assert torch.equal(storage, expected_storage)
    assert (storage == SENTINEL).sum() == storage.numel() - 4 * 2 * NUM_KV_HEADS * HEAD_DIM


def test_rotary_store_kv_rejects_bad_inputs():
    rotary = RotaryEmbedding(HEAD_DIM, 8, 10000.0, None).to(DEVICE)
    width = (NUM_HEADS + 2 * NUM_KV_HEADS) * HEAD_DIM
    qkv = torch.randn(2, width, device=DEVICE)
    positions = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    slots = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, device=DEVICE)
    tables = (rotary.cos_table, rotary.sin_table)
    with pytest.raises(ValueError, match="multiple of"):
        rotary_store_kv(qkv, *tables, positions, NUM_HEADS + 1, NUM_KV_HEADS, cache, slots)
    with pytest.raises(ValueError, match="kv_cache dtype"):
        rotary_store_kv(qkv, *tables, positions, NUM_HEADS, NUM_KV_HEADS, cache.half(), slots)
    with pytest.raises(ValueError, match="kv_cache must be"):
        rotary_store_kv(qkv, *tables, positions, NUM_HEADS, NUM_KV_HEADS, cache[0], slots)
    with pytest.raises(ValueError, match="slot_mapping must be"):
        rotary_store_kv(qkv, *tables, positions, NUM_HEADS, NUM_KV_HEADS, cache, slots[:1])
    with pytest.raises(ValueError, match="positions must be int32 or int64"):
        rotary_store_kv(qkv, *tables, positions.float(), NUM_HEADS, NUM_KV_HEADS, cache,
                        slots)
    with pytest.raises(ValueError, match="cos_table must be float32"):
        rotary_store_kv(qkv, tables[0].half(), tables[1], positions, NUM_HEADS,
                        NUM_KV_HEADS, cache, slots)


# --- SiLU * up --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter,strided", [(40, True), (1100, False)])  # 1100: 2 col tiles
def test_silu_mul_matches_gated_mlp(dtype, inter, strided):
    torch.manual_seed(4)
    wide = torch.randn(3, 2 * inter + (16 if strided else 0), device=DEVICE) * 4
    gate_up = wide.to(dtype)[:, 5:5 + 2 * inter] if strided else wide.to(dtype)  # (T, 2I)
    before = gate_up.clone()
    gate, up = gate_up.clone().split(inter, dim=-1)  # (T, I) each
    expected = F.silu(gate, inplace=True).mul_(up)  # GatedMLP's math, (T, I)
    out = silu_mul(gate_up)  # (T, I)
    assert out.shape == (3, inter) and out.is_contiguous() and out.dtype == dtype
    assert torch.equal(gate_up, before)  # the input is left as it was
    torch.testing.assert_close(out, expected, **TOLERANCE[dtype])
    if dtype != torch.float32:  # 16-bit: nearly all bit-identical, the rest 1 ulp apart
        assert (out == expected).float().mean() > 0.95


def test_silu_mul_rejects_bad_inputs_and_handles_no_tokens():
    with pytest.raises(ValueError, match=r"\(T, 2I\)"):
        silu_mul(torch.randn(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="contiguous"):
        silu_mul(torch.randn(8, 2, device=DEVICE).t())
    assert silu_mul(torch.randn(0, 8, device=DEVICE)).shape == (0, 4)
