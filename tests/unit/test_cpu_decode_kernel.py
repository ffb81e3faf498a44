"""The C decode-attention kernel against torch's attention over the same paged cache, on
small configurations with scattered block ids; its build cache and its fallback."""

import logging
import math

import pytest
import torch
import torch.nn.functional as F

from lmfleet.worker.model import native_build
from lmfleet.worker.model.attention import cpu_kernel
from lmfleet.worker.model.attention.cpu_kernel import load_paged_decode_kernel


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    built = load_paged_decode_kernel(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the kernel must build here (gcc with OpenMP is installed)"
    return built


def reference(q, kv, tables, seq_lens, scale):
    """Per request: gather its context from the blocks, expand GQA, softmax attention."""
    rows = []
    num_heads, num_kv_heads = q.shape[1], kv.shape[3]
    for b, length in enumerate(seq_lens.tolist()):
        context = kv[:, tables[b]].flatten(1, 2)[:, :length]  # (2, L, Hkv, D)
        keys, values = (t.transpose(0, 1).repeat_interleave(num_heads // num_kv_heads, 0)
                        for t in context)  # (Hq, L, D) each
        rows.append(F.scaled_dot_product_attention(q[b][:, None], keys, values,
                                                   scale=scale)[:, 0])  # (Hq, D)
    return torch.stack(rows)


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [
    (9, 3, 64),  # SmolLM2-135M: the AVX-512 path where the CPU has it
    (4, 4, 128),  # no GQA, the wide AVX-512 path
    (6, 2, 24),  # a head size the vector paths do not take: the portable loop
])
def test_kernel_equals_torch_attention(kernel, num_heads, num_kv_heads, head_dim):
    torch.manual_seed(0)
    block_size, num_blocks = 4, 23
    kv = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim)
    # Scattered, unordered blocks; lengths that end mid-block, at a block end, and at 1.
    tables = torch.tensor([[7, 2, 19, 0, 11], [5, 22, 3, 0, 0], [13, 0, 0, 0, 0],
                           [1, 9, 17, 4, 6]])
    seq_lens = torch.tensor([18, 12, 1, 20])
    # Queries as the model hands them over: rows of a wider (T, Hq + Hkv, D) tensor.
    qk = torch.randn(4, num_heads + num_kv_heads, head_dim)
    q = qk[:, :num_heads]
    out = torch.full((5, num_heads, head_dim), float("nan"))
    kernel(q, kv, tables, seq_lens, out[:4], head_dim**-0.5)
    expected = reference(q, kv, tables, seq_lens, head_dim**-0.5)
    torch.testing.assert_close(out[:4], expected, rtol=1e-5, atol=1e-6)
    assert out[4].isnan().all()  # nothing past the decode rows is written
    # A one-token context returns exactly that token's value for every head of the group.
    group = num_heads // num_kv_heads
    single = kv[1, 13, 0].repeat_interleave(group, 0)  # (Hq, D)
    torch.testing.assert_close(out[2], single, rtol=1e-6, atol=1e-6)


def test_kernel_rejects_non_contiguous_rows_and_int32_indices(kernel):
    kv = torch.zeros(2, 4, 4, 1, 16)
    table, lens = torch.zeros(1, 1, dtype=torch.int64), torch.ones(1, dtype=torch.int64)
    q = torch.zeros(1, 2, 32)[:, :, ::2]  # head rows with a stride of 2
    with pytest.raises(ValueError, match="q rows must be contiguous"):
        kernel(q, kv, table, lens, torch.zeros(1, 2, 16), 1.0)
    q = torch.zeros(1, 2, 16)
    with pytest.raises(ValueError, match="must be int64"):
        kernel(q, kv, table.int(), lens, torch.zeros(1, 2, 16), 1.0)


def test_a_build_is_reused_and_other_flags_build_anew(tmp_path):
    assert load_paged_decode_kernel(tmp_path) is not None
    builds = list(tmp_path.glob("paged_decode-*.so"))
    assert len(builds) == 1
    stamp = builds[0].stat().st_mtime_ns
    assert load_paged_decode_kernel(tmp_path) is not None  # loads, does not rebuild
    assert [p.stat().st_mtime_ns for p in tmp_path.glob("paged_decode-*.so")] == [stamp]
    # The name hashes what the build depends on: other flags, another file.
    assert native_build.load_native(cpu_kernel.SOURCE, (*cpu_kernel.CFLAGS, "-DOTHER"),
                                    cpu_kernel.LIBS, tmp_path) is not None
    assert len(list(tmp_path.glob("paged_decode-*.so"))) == 2


def test_no_compiler_means_no_kernel_and_a_log_line(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    with caplog.at_level(logging.WARNING, logger=native_build.__name__):
        assert load_paged_decode_kernel(tmp_path / "fresh") is None
    assert "paged_decode.c could not be built, using torch ops" in caplog.text


def test_loading_the_kernels_leaves_subnormals_alone(kernel, tmp_path):
    # A library linked with -ffast-math would switch this process to flush-to-zero when
    # loaded, changing every later float computation (torch's included).
    from lmfleet.worker.model.cpu_ops import load_cpu_ops

    assert load_cpu_ops(tmp_path) is not None
    tiny = torch.tensor([1e-39], dtype=torch.float32)  # a float32 subnormal
    assert (tiny * 1.0).item() != 0.0
    assert math.ldexp(1.0, -1060) * 1.0 > 0.0  # a float64 subnormal, from CPython's math
