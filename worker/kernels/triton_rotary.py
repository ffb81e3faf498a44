"""Rotary embedding of q and k plus the paged KV-cache store, in one Triton kernel.

`rotary_store_kv(qkv, cos_table, sin_table, positions, num_heads, num_kv_heads, kv_cache,
slot_mapping)`, the fused path of `Attention.forward` in model/llama.py (and
`CpuOps.rotary_store_kv`):
- qkv (T, (Hq + 2 Hkv) D) float32, float16 or bfloat16: each token's q heads, k heads, v
  heads, D apart; the last dim contiguous, rows may be strided (a view of a wider tensor).
- cos_table, sin_table float32 (P, D), last dim contiguous: `RotaryEmbedding`'s tables
  (emb = cat(freqs, freqs)); both halves are read as stored, nothing assumes they repeat.
- positions (T,) int32 or int64, each in [0, P) (not checked on the device: an out-of-range
  position reads outside the tables).
- kv_cache (2, num_blocks, block_size, Hkv, D) of qkv's dtype, any strides ([0] keys,
  [1] values), e.g. one layer's view of a larger storage. Only the written entries change.
- slot_mapping (T,) int32 or int64: token t's k, v go to block slot // block_size, offset
  slot % block_size. A slot < 0 marks a padding token: its k, v are not written (its q, k
  are still rotated in qkv, which is harmless). Slots >= num_blocks * block_size are the
  caller's bug (not checked on the device).

Effects: q AND k are rotated IN PLACE in qkv (so the rows that follow the fused path read
the same rotated q, k as the torch path's `apply_rotary`); the rotated k and the unrotated
v are written to the cache. v stays unchanged in qkv.

Rounding, as `apply_rotary(x, *RotaryEmbedding.forward(positions, dtype))`: cos and sin are
first rounded to the model dtype, then x * cos and rotate_half(x) * sin are each rounded to
the dtype and their sum is rounded again. Every step is one correctly rounded float32 op
(fused multiply-adds are disabled), so results are bit-identical to the torch path in all
three dtypes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import pdl_options, start_in_chain
from lmfleet.worker.kernels.triton_rounding import (
    check_device,
    check_float,
    round_to,
    rounded,
    soft_bf16,
)


@triton.jit
def _rotary_store_kv_kernel(
    qkv_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, cache_ptr,
    qkv_row_stride, cos_row_stride, sin_row_stride,
    cache_stride_kv, cache_stride_block, cache_stride_offset, cache_stride_head,
    cache_stride_dim,
    num_heads, num_kv_heads, block_size,
    HEAD_DIM: tl.constexpr, HALF_BLOCK: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    SOFT_BF16: tl.constexpr, PDL: tl.constexpr,
):
    start_in_chain(PDL)
    # Program (t, j): token t, heads j * BLOCK_HEADS.. of the q heads followed by the k heads.
    t = tl.program_id(0).to(tl.int64)  # int64: t * row stride may pass 2**31
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)  # (BH,)
    dims = tl.arange(0, HALF_BLOCK)  # (HB,) index within a half
    dim_mask = dims < half  # (HB,)
    mask = (heads < num_heads + num_kv_heads)[:, None] & dim_mask[None, :]  # (BH, HB)

    # RotaryEmbedding.forward: the float32 table rows rounded to the model dtype.
    pos = tl.load(pos_ptr + t).to(tl.int64)
    cos_row = cos_ptr + pos * cos_row_stride
    sin_row = sin_ptr + pos * sin_row_stride
    cos_lo = rounded(tl.load(cos_row + dims, mask=dim_mask, other=0.0), qkv_ptr, SOFT_BF16)
    cos_hi = rounded(tl.load(cos_row + half + dims, mask=dim_mask, other=0.0), qkv_ptr,
                     SOFT_BF16)  # (HB,)
    sin_lo = rounded(tl.load(sin_row + dims, mask=dim_mask, other=0.0), qkv_ptr, SOFT_BF16)
    sin_hi = rounded(tl.load(sin_row + half + dims, mask=dim_mask, other=0.0), qkv_ptr,
                     SOFT_BF16)  # (HB,)

    row = qkv_ptr + t * qkv_row_stride
    lo_ptrs = row + heads[:, None] * HEAD_DIM + dims[None, :]  # (BH, HB) first halves
    x_lo = tl.load(lo_ptrs, mask=mask, other=0.0).to(tl.float32)  # (BH, HB)
    x_hi = tl.load(lo_ptrs + half, mask=mask, other=0.0).to(tl.float32)  # (BH, HB)
    # x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x_hi, x_lo); each product and
    # the sum rounded to the dtype, as the three torch ops store them.
    out_lo = round_to(rounded(x_lo * cos_lo[None, :], qkv_ptr, SOFT_BF16)
                      + rounded(-x_hi * sin_lo[None, :], qkv_ptr, SOFT_BF16),
                      qkv_ptr, SOFT_BF16)  # (BH, HB)
    out_hi = round_to(rounded(x_hi * cos_hi[None, :], qkv_ptr, SOFT_BF16)
                      + rounded(x_lo * sin_hi[None, :], qkv_ptr, SOFT_BF16),
                      qkv_ptr, SOFT_BF16)  # (BH, HB)
    # Both halves were loaded before either store: the rotation is in place per head.
    tl.store(lo_ptrs, out_lo, mask=mask)
    tl.store(lo_ptrs + half, out_hi, mask=mask)

    # The k heads among this program's heads go to the cache, each with its v head.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    kv_head = heads - num_heads  # (BH,) negative for q heads
    is_kv = (kv_head >= 0) & (kv_head < num_kv_heads) & (slot >= 0)  # (BH,) padding: none
    kv_mask = is_kv[:, None] & dim_mask[None, :]  # (BH, HB)
    # A padding slot is negative: clamp so the (masked-off) addresses stay sane.
    safe_slot = tl.maximum(slot, 0)
    block = safe_slot // block_size
    offset = safe_slot % block_size
    k_ptrs = (cache_ptr + block * cache_stride_block + offset * cache_stride_offset
              + kv_head[:, None] * cache_stride_head
              + dims[None, :] * cache_stride_dim)  # (BH, HB) key halves' first elements
    tl.store(k_ptrs, out_lo, mask=kv_mask)
    tl.store(k_ptrs + half * cache_stride_dim, out_hi, mask=kv_mask)
    v_ptrs = lo_ptrs + (num_kv_heads * HEAD_DIM)  # (BH, HB) head h's v: Hkv heads later
    v_lo = tl.load(v_ptrs, mask=kv_mask)  # (BH, HB)
    v_hi = tl.load(v_ptrs + half, mask=kv_mask)  # (BH, HB)
    tl.store(k_ptrs + cache_stride_kv, v_lo, mask=kv_mask)
    tl.store(k_ptrs + cache_stride_kv + half * cache_stride_dim, v_hi, mask=kv_mask)


def _check_index(name: str, tensor: torch.Tensor, tokens: int) -> None:
    if tensor.shape != (tokens,):
        raise ValueError(f"{name} must be ({tokens},), got {tuple(tensor.shape)}")
    if tensor.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be int32 or int64, got {tensor.dtype}")


def rotary_store_kv(qkv: torch.Tensor, cos_table: torch.Tensor, sin_table: torch.Tensor,
                    positions: torch.Tensor, num_heads: int, num_kv_heads: int,
                    kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """qkv (T, (Hq + 2 Hkv) D): q and k rotated in place at `positions` (T,); rotated k and
    v stored at `slot_mapping` (T,) of kv_cache (2, blocks, block_size, Hkv, D); slots < 0
    (padding) are skipped."""
    if qkv.dim() != 2:
        raise ValueError(f"qkv must be (T, (Hq + 2 Hkv) D), got shape {tuple(qkv.shape)}")
    if num_heads <= 0 or num_kv_heads <= 0:
        raise ValueError(f"head counts must be positive, got {num_heads}, {num_kv_heads}")
    tokens, width = qkv.shape
    total_heads = num_heads + 2 * num_kv_heads
    if width % total_heads:
        raise ValueError(f"qkv width {width} is not a multiple of {total_heads} heads")
    head_dim = width // total_heads
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    check_float("qkv", qkv)
    if qkv.stride(1) != 1:
        raise ValueError("qkv must have a contiguous last dim")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != head_dim:
            raise ValueError(f"{name} must be (P, {head_dim}), got {tuple(table.shape)}")
        if table.dtype != torch.float32:
            raise ValueError(f"{name} must be float32, got {table.dtype}")
        if table.stride(1) != 1:
            raise ValueError(f"{name} must have a contiguous last dim")
    _check_index("positions", positions, tokens)
    _check_index("slot_mapping", slot_mapping, tokens)
    if (kv_cache.dim() != 5 or kv_cache.shape[0] != 2 or kv_cache.shape[3] != num_kv_heads
            or kv_cache.shape[4] != head_dim):
        raise ValueError(f"kv_cache must be (2, blocks, block_size, {num_kv_heads}, "
                         f"{head_dim}), got {tuple(kv_cache.shape)}")
    if kv_cache.dtype != qkv.dtype:
        raise ValueError(f"kv_cache dtype {kv_cache.dtype} != qkv dtype {qkv.dtype}")
    check_device(qkv, cos_table, sin_table, positions, kv_cache, slot_mapping)
    if tokens == 0:
        return
    half_block = triton.next_power_of_2(head_dim // 2)
    rotated_heads = num_heads + num_kv_heads
    # About 1024 elements per half per program: several programs per token for many
    # heads, so a small decode batch still spreads over the GPU.
    block_heads = min(triton.next_power_of_2(rotated_heads), max(1, 1024 // half_block))
    grid = (tokens, triton.cdiv(rotated_heads, block_heads))
    _rotary_store_kv_kernel[grid](
        qkv, cos_table, sin_table, positions, slot_mapping, kv_cache,
        qkv.stride(0), cos_table.stride(0), sin_table.stride(0),
        *kv_cache.stride(),
        num_heads, num_kv_heads, kv_cache.shape[2],
        HEAD_DIM=head_dim, HALF_BLOCK=half_block, BLOCK_HEADS=block_heads,
        SOFT_BF16=soft_bf16(qkv.dtype),
        **pdl_options(qkv.device),
        num_warps=4,
        # No fused multiply-adds: x * cos and rotate_half(x) * sin round before their sum,
        # as in torch (this is what keeps float32 bit-identical too).
        enable_fp_fusion=False,
    )
