"""The fused CPU ops (cpu_ops.c) against the torch ops they replace: rotary + KV store
bit for bit at exact slots, residual add + RMSNorm to float32 rounding; and the pass."""

import pytest
import torch

from lmfleet.worker.model.arch import ArchConfig
from lmfleet.worker.model.cpu_ops import attach_fused_ops, load_cpu_ops
from lmfleet.worker.model.layers import RMSNorm, RopeStep, RotaryEmbedding, apply_rotary
from lmfleet.worker.model.llama import LlamaForCausalLM


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    built = load_cpu_ops(tmp_path_factory.mktemp("kernels"))
    assert built is not None, "the ops must build here (gcc with OpenMP is installed)"
    return built


def test_rotary_store_kv_is_bit_identical_and_lands_at_its_slots(ops):
    torch.manual_seed(0)
    num_heads, num_kv_heads, head_dim, block_size, num_blocks = 6, 2, 16, 4, 5
    rotary = RotaryEmbedding(head_dim, 64, 10000.0, None)
    positions = torch.tensor([0, 7, 33, 2])
    cos, sin = rotary(positions, torch.float32)  # (T, 1, D)
    qkv = torch.randn(4, (num_heads + 2 * num_kv_heads) * head_dim)
    expected_qk = apply_rotary(qkv[:, :(num_heads + num_kv_heads) * head_dim].reshape(
        4, num_heads + num_kv_heads, head_dim), cos, sin)
    v = qkv[:, (num_heads + num_kv_heads) * head_dim:].reshape(4, num_kv_heads, head_dim)
    v = v.clone()
    kv = torch.zeros(2, num_blocks, block_size, num_kv_heads, head_dim)
    slots = torch.tensor([19, 0, 6, 13])
    ops.rotary_store_kv(qkv, RopeStep(rotary, positions, torch.float32), num_heads,
                        num_kv_heads, kv, slots)
    rotated = qkv[:, :(num_heads + num_kv_heads) * head_dim].view(4, -1, head_dim)
    assert torch.equal(rotated, expected_qk)
    flat = kv.view(2, num_blocks * block_size, num_kv_heads, head_dim)
    assert torch.equal(flat[0, slots], expected_qk[:, num_heads:])
    assert torch.equal(flat[1, slots], v)
    untouched = torch.ones(num_blocks * block_size, dtype=torch.bool)
    untouched[slots] = False
    assert (flat[:, untouched] == 0).all()


@pytest.mark.parametrize("with_delta", [False, True])
def test_add_rms_norm_matches_torch_and_adds_in_place(ops, with_delta):
    torch.manual_seed(1)
    norm = RMSNorm(96, 1e-5)
    norm.weight.data = torch.randn(96)
    x = torch.randn(5, 96) * 3
    delta = torch.randn(5, 96) if with_delta else None
    reference_x = x.clone()
    expected = norm(reference_x, None if delta is None else delta.clone())
    out = ops.add_rms_norm(x, delta, norm.weight.data, norm.eps)
    assert torch.equal(x, reference_x)  # the residual add happened in place, exactly
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)


def test_silu_mul_matches_torch_into_a_contiguous_output(ops):
    torch.manual_seed(2)
    gate_up = torch.randn(7, 2 * 40) * 4
    gate, up = gate_up.split(40, dim=-1)
    expected = torch.nn.functional.silu(gate) * up
    out = ops.silu_mul(gate_up)
    assert out.shape == (7, 40) and out.is_contiguous()
    torch.testing.assert_close(out, expected, rtol=2e-6, atol=1e-6)


def test_fuse_pass_reaches_every_norm_and_attention(ops):
    arch = ArchConfig(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, head_dim=8, vocab_size=50, rms_norm_eps=1e-5,
                      rope_theta=10000.0, rope_scaling=None, max_position_embeddings=64,
                      tie_word_embeddings=False, qkv_bias=False, o_bias=False,
                      mlp_bias=False, sliding_window=None, architecture="LlamaForCausalLM",
                      eos_token_ids=(0,), bos_token_id=None)
    model = attach_fused_ops(LlamaForCausalLM(arch, 64), ops)
    fused = [m for m in model.modules() if getattr(m, "fused_ops", None) is ops]
    # Per layer two norms, the attention and the MLP; and the final norm.
    assert len(fused) == 2 * 4 + 1
