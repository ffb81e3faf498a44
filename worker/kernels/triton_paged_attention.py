"""Paged attention over the KV cache in Triton: batched decode and varlen prefill ("extend").

Contract (both entry points):
- kv_cache (2, num_blocks, block_size, num_kv_heads, head_dim): [0] keys, [1] values; any
  strides except the last dim, which must be contiguous. block_size is a power of two.
- block_tables (B, max_blocks) int32: token p of row b lives at block block_tables[b, p //
  block_size], offset p % block_size. Entries past a row's length are never read.
- seq_lens (B,) int32 on the device: keys 0..seq_len-1 are visible (all already cached).
- q, out (..., num_heads, head_dim), same dtype as the cache (float16, bfloat16 or float32),
  or an encoded cache decoded to q's dtype as each tile is read: int8, rows of head_dim + 8
  (codes, float32 scale and zero: kv/int8_codec.py), or uint8, rows of head_dim + 4 (fp8
  e4m3 codes, float32 scale: kv/fp8_codec.py);
  num_heads is a multiple of num_kv_heads (query head h reads kv head h // group); head_dim
  is a power of two in [16, 256]. Unsupported inputs raise ValueError.
- Scores and softmax are float32 (exp2, log2(e) folded into the scale); float32 inputs use
  IEEE dots (not tf32), 16-bit inputs use tensor-core dots with float32 accumulation.

paged_decode_attention: one query per row, grid (B, num_kv_heads, num_splits). A program
packs the `group` query heads sharing one kv head into the rows of one tile, so each K/V
tile is read once per kv head. num_splits > 1 ("flash decoding") splits each row's tiles
evenly among splits, computed in-kernel from seq_len, so one launch fits any seq_lens (CUDA
graphs); partials go to a float32 workspace and a second kernel combines them.

paged_prefill_attention: causal attention of each sequence's new tokens (the last query_len
positions) over its whole context, read through block_tables. Grid (q blocks, Bp, kv heads);
a program's BLOCK_M rows are BLOCK_M // group consecutive queries x the group's heads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from lmfleet.worker.kernels.triton_pdl import pdl_options, start_in_chain

_LOG2E = 1.4426950408889634
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
# Encoded caches by storage dtype: the kernels' KV_CODEC and the bytes after the codes.
_KV_CODECS = {torch.int8: 1, torch.uint8: 2}
_KV_EXTRA_BYTES = {torch.int8: 8, torch.uint8: 4}


@triton.jit
def _kv_token_offsets(bt_row_ptr, start, seq_end, stride_blk, stride_tok,
                      BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr):
    """(BLOCK_N,) int64 cache offsets of tokens start.. (in bounds past seq_end; callers mask)."""
    if BLOCK_SIZE >= BLOCK_N:
        # Tiles are aligned and no larger than a block: one block id per tile. start <
        # seq_end, so this entry belongs to the row.
        blk = tl.load(bt_row_ptr + start // BLOCK_SIZE).to(tl.int64)
        tok = (start % BLOCK_SIZE) + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        offs = blk * stride_blk + tok * stride_tok  # (BLOCK_N,)
    else:
        offs_n = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        # int64: block id * block stride overflows int32 on large caches.
        blk = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=offs_n < seq_end,
                      other=0).to(tl.int64)  # (BLOCK_N,)
        offs = blk * stride_blk + (offs_n % BLOCK_SIZE) * stride_tok  # (BLOCK_N,)
    return offs


@triton.jit
def _load_kv_tile(head_ptr, tok, offs_d, n_mask, HEAD_DIM: tl.constexpr,
                  KV_CODEC: tl.constexpr):
    """(BLOCK_N, HEAD_DIM) keys or values of the tokens at offsets `tok`. KV_CODEC 1 (int8)
    and 2 (fp8) rows are decoded to float32 by their codec's formula: (code + 128) * scale
    + zero, code * scale. (if/else, not early returns: the compiler builds the code after a
    returning constexpr branch for every KV_CODEC.)"""
    if KV_CODEC == 0:
        tile = tl.load(head_ptr + tok[:, None] + offs_d[None, :], mask=n_mask[:, None],
                       other=0.0)
    else:
        codes = tl.load(head_ptr + tok[:, None] + offs_d[None, :], mask=n_mask[:, None],
                        other=0)  # (BLOCK_N, HEAD_DIM) raw bytes
        params = (head_ptr + tok + HEAD_DIM).to(tl.pointer_type(tl.float32))  # (BLOCK_N,)
        scale = tl.load(params, mask=n_mask, other=0.0)  # (BLOCK_N,)
        if KV_CODEC == 1:
            zero = tl.load(params + 1, mask=n_mask, other=0.0)  # (BLOCK_N,)
            tile = (codes.to(tl.float32) + 128.0) * scale[:, None] + zero[:, None]
        else:
            values = codes.to(tl.float8e4nv, bitcast=True).to(tl.float32)  # (BLOCK_N, D)
            tile = values * scale[:, None]
    return tile


@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, seq_lens_ptr, out_ptr, part_o_ptr, part_lse_ptr,
    qk_scale,
    stride_qb, stride_qh, stride_blk, stride_tok, stride_kvh, stride_btb, stride_ob, stride_oh,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_CODEC: tl.constexpr, PDL: tl.constexpr,
):
    start_in_chain(PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP

    offs_h = tl.arange(0, BLOCK_H)  # (BLOCK_H,) query rows; rows >= GROUP are padding
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    head = kvh * GROUP + offs_h  # (BLOCK_H,)
    h_mask = offs_h < GROUP  # (BLOCK_H,)
    q = tl.load(q_ptr + b * stride_qb + head[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None], other=0.0)  # (BLOCK_H, HEAD_DIM)

    seq_len = tl.load(seq_lens_ptr + b)
    # This split's tiles: the row's tiles divided evenly; late splits may get none.
    num_tiles = tl.cdiv(seq_len, BLOCK_N)
    tiles_per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    tile_lo = split * tiles_per_split
    tile_hi = tl.minimum(tile_lo + tiles_per_split, num_tiles)

    bt_row = bt_ptr + b * stride_btb
    k_head = k_ptr + kvh * stride_kvh
    v_head = v_ptr + kvh * stride_kvh
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)  # (BLOCK_H,) running max, log2 units
    l_i = tl.zeros([BLOCK_H], tl.float32)  # (BLOCK_H,) running sum of exp2
    acc = tl.zeros([BLOCK_H, HEAD_DIM], tl.float32)  # (BLOCK_H, HEAD_DIM)
    for tile in range(tile_lo, tile_hi):
        start = tile * BLOCK_N
        offs_n = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_mask = offs_n < seq_len  # (BLOCK_N,) every tile in range has >= 1 valid token
        tok = _kv_token_offsets(bt_row, start, seq_len, stride_blk, stride_tok,
                                BLOCK_SIZE, BLOCK_N)  # (BLOCK_N,)
        k = _load_kv_tile(k_head, tok, offs_d, n_mask, HEAD_DIM,
                          KV_CODEC).to(q.dtype)  # (BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_H, BLOCK_N)
        qk = tl.where(n_mask[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # (BLOCK_H,) finite
        alpha = tl.exp2(m_i - m_new)  # (BLOCK_H,) 0 on the first tile
        p = tl.exp2(qk - m_new[:, None])  # (BLOCK_H, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_kv_tile(v_head, tok, offs_d, n_mask, HEAD_DIM,
                          KV_CODEC).to(q.dtype)  # (BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # Empty split or padding row (seq_len 0): acc == 0 and l_i == 0 -> zeros, no NaN.
    l_safe = tl.where(l_i > 0, l_i, 1.0)  # (BLOCK_H,)
    o = acc / l_safe[:, None]  # (BLOCK_H, HEAD_DIM)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + b * stride_ob + head[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=h_mask[:, None])
    else:
        # Workspace (B, num_heads, NUM_SPLITS, HEAD_DIM) and lse (B, num_heads, NUM_SPLITS).
        # An empty split gets a hugely negative (finite) lse: weight 0 unless all are empty.
        lse = tl.where(l_i > 0, m_i + tl.log2(l_safe), -1.0e30)  # (BLOCK_H,)
        row = (b * num_heads + head) * NUM_SPLITS + split  # (BLOCK_H,)
        tl.store(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], o,
                 mask=h_mask[:, None])
        tl.store(part_lse_ptr + row, lse, mask=h_mask)


@triton.jit
def _decode_reduce_kernel(
    part_o_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
    PDL: tl.constexpr,
):
    start_in_chain(PDL)
    b = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    offs_s = tl.arange(0, SPLITS_P2)  # (SPLITS_P2,)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    s_mask = offs_s < NUM_SPLITS
    row = (b * num_heads + head) * NUM_SPLITS + offs_s  # (SPLITS_P2,)
    lse = tl.load(part_lse_ptr + row, mask=s_mask, other=float("-inf"))  # (SPLITS_P2,)
    o = tl.load(part_o_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None],
                other=0.0)  # (SPLITS_P2, HEAD_DIM)
    # lse_max >= -1e30 is finite; all-empty rows get equal weights over zero partials -> 0.
    lse_max = tl.max(lse, axis=0)
    w = tl.exp2(lse - lse_max)  # (SPLITS_P2,)
    res = tl.sum(o * w[:, None], axis=0) / tl.sum(w, axis=0)  # (HEAD_DIM,)
    tl.store(out_ptr + b * stride_ob + head * stride_oh + offs_d,
             res.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, bt_ptr, qsl_ptr, seq_lens_ptr, out_ptr,
    qk_scale,
    stride_qt, stride_qh, stride_blk, stride_tok, stride_kvh, stride_btb, stride_ot, stride_oh,
    GROUP: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, KV_CODEC: tl.constexpr,
):
    qblk = tl.program_id(0)
    b = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(qsl_ptr + b)
    q_len = tl.load(qsl_ptr + b + 1) - q_start
    if qblk * BLOCK_Q >= q_len:
        return  # the grid is sized for the longest query run
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # cached history before this step's tokens

    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,) row = query (r // GROUP) x head (r % GROUP)
    offs_d = tl.arange(0, HEAD_DIM)  # (HEAD_DIM,)
    q_idx = qblk * BLOCK_Q + offs_m // GROUP  # (BLOCK_M,) query index within the sequence
    head = kvh * GROUP + offs_m % GROUP  # (BLOCK_M,)
    m_mask = (offs_m // GROUP < BLOCK_Q) & (q_idx < q_len)  # (BLOCK_M,)
    pos = ctx_len + q_idx  # (BLOCK_M,) absolute position; row sees keys 0..pos
    row = (q_start + q_idx).to(tl.int64)  # (BLOCK_M,) token row in q / out
    q_off = row[:, None] * stride_qt + head[:, None] * stride_qh  # (BLOCK_M, 1)
    q = tl.load(q_ptr + q_off + offs_d[None, :], mask=m_mask[:, None],
                other=0.0)  # (BLOCK_M, HEAD_DIM)

    # Keys past the block's last query are masked for every row: stop there.
    kv_end = ctx_len + tl.minimum(q_len, (qblk + 1) * BLOCK_Q)
    bt_row = bt_ptr + b * stride_btb
    k_head = k_ptr + kvh * stride_kvh
    v_head = v_ptr + kvh * stride_kvh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # (BLOCK_M,) log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)  # (BLOCK_M,)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)  # (BLOCK_M, HEAD_DIM)
    for start in range(0, kv_end, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        n_mask = offs_n < kv_end  # (BLOCK_N,)
        tok = _kv_token_offsets(bt_row, start, kv_end, stride_blk, stride_tok,
                                  BLOCK_SIZE, BLOCK_N)  # (BLOCK_N,)
        k = _load_kv_tile(k_head, tok, offs_d, n_mask, HEAD_DIM,
                          KV_CODEC).to(q.dtype)  # (BLOCK_N, HEAD_DIM)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N)
        # Causal; key 0 is visible to every row (pos >= 0), so m_new is finite from tile 0.
        visible = (offs_n[None, :] <= pos[:, None]) & n_mask[None, :]  # (BLOCK_M, BLOCK_N)
        qk = tl.where(visible, qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, axis=1))  # (BLOCK_M,)
        alpha = tl.exp2(m_i - m_new)  # (BLOCK_M,)
        p = tl.exp2(qk - m_new[:, None])  # (BLOCK_M, BLOCK_N)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = _load_kv_tile(v_head, tok, offs_d, n_mask, HEAD_DIM,
                          KV_CODEC).to(q.dtype)  # (BLOCK_N, HEAD_DIM)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = acc / l_i[:, None]  # (BLOCK_M, HEAD_DIM) l_i > 0 for every row
    o_off = row[:, None] * stride_ot + head[:, None] * stride_oh  # (BLOCK_M, 1)
    tl.store(out_ptr + o_off + offs_d[None, :], o.to(out_ptr.dtype.element_ty),
             mask=m_mask[:, None])


def _is_pow2(n: int) -> bool:
    return n >= 1 and (n & (n - 1)) == 0


def _check_common(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                  seq_lens: torch.Tensor, out: torch.Tensor, batch: int) -> tuple[int, int]:
    """Validate the shared inputs; return (num_kv_heads, group)."""
    if q.dim() != 3 or kv_cache.dim() != 5 or kv_cache.shape[0] != 2:
        raise ValueError("expected q (T, num_heads, head_dim) and kv_cache "
                         "(2, num_blocks, block_size, num_kv_heads, head_dim)")
    if q.dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {q.dtype}; use float16, bfloat16 or float32")
    if kv_cache.dtype not in (q.dtype, *_KV_CODECS) or out.dtype != q.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, kv_cache {kv_cache.dtype}, "
                         f"out {out.dtype}")
    if out.shape != q.shape:
        raise ValueError(f"out shape {tuple(out.shape)} != q shape {tuple(q.shape)}")
    _, _, block_size, num_kv_heads, head_dim = kv_cache.shape
    head_dim -= _KV_EXTRA_BYTES.get(kv_cache.dtype, 0)  # an encoded row's scale (and zero)
    num_heads = q.shape[1]
    if q.shape[2] != head_dim:
        raise ValueError(f"q head_dim {q.shape[2]} != cache head_dim {head_dim}")
    if not _is_pow2(head_dim) or not 16 <= head_dim <= 256:
        raise ValueError(f"head_dim must be a power of two in [16, 256], got {head_dim}")
    if not _is_pow2(block_size):
        raise ValueError(f"block_size must be a power of two, got {block_size}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads {num_heads} is not a multiple of "
                         f"num_kv_heads {num_kv_heads}")
    if q.stride(-1) != 1 or out.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("q, out and kv_cache need a contiguous last dim")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32:
        raise ValueError("block_tables and seq_lens must be int32")
    if block_tables.dim() != 2 or block_tables.shape[0] != batch or seq_lens.shape != (batch,):
        raise ValueError(f"expected block_tables ({batch}, max_blocks) and seq_lens ({batch},)")
    if block_tables.stride(-1) != 1:
        raise ValueError("block_tables needs a contiguous last dim")
    if len({t.device for t in (q, kv_cache, block_tables, seq_lens, out)}) != 1:
        raise ValueError("all tensors must be on the same device")
    return num_kv_heads, num_heads // num_kv_heads


def _launch_config(dtype: torch.dtype, head_dim: int,
                   decode: bool = False) -> tuple[str, int, int, int]:
    """(dot precision, BLOCK_N, num_warps, num_stages) for H100. Decode in 16 bits runs two
    stages: on an H100 it read the cache at 2.4 TB/s that way against 2.0 with three
    (batch 64, 530-token contexts; the same 2.8 TB/s either way at batch 256)."""
    wide = dtype == torch.float32 or head_dim > 128  # twice the registers and shared memory
    precision = "ieee" if dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit
    stages = 2 if wide or decode else 3
    return precision, 32 if head_dim > 128 else 64, 8 if wide else 4, stages


def choose_num_splits(batch_size: int, max_seq_len: int, num_kv_heads: int,
                      num_sms: int = 132) -> int:
    """Splits per (row, kv head) so the decode grid covers ~2 waves of num_sms programs while
    each split keeps >= 256 tokens; at most 16. Non-increasing in batch_size and
    num_kv_heads, non-decreasing in max_seq_len; 1 once B * num_kv_heads >= 2 * num_sms."""
    programs = max(1, batch_size * num_kv_heads)
    want = -(-2 * num_sms // programs)  # ceil: programs needed for ~2 waves
    by_length = max(1, max_seq_len // 256)
    return max(1, min(want, by_length, 16))


def paged_decode_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, out: torch.Tensor,
                           num_splits: int = 1) -> None:
    """out[b, h] = softmax(scale * q[b, h] . K_b^T) V_b over keys 0..seq_lens[b]-1.

    q, out (B, num_heads, head_dim). Rows with seq_len 0 get zeros. num_splits > 1
    allocates a float32 workspace of B * num_heads * num_splits * (head_dim + 1) floats
    (from the graph's pool under CUDA-graph capture).
    """
    batch = q.shape[0] if q.dim() == 3 else -1
    num_kv_heads, group = _check_common(q, kv_cache, block_tables, seq_lens, out, batch)
    if not isinstance(num_splits, int) or num_splits < 1:
        raise ValueError(f"num_splits must be a positive int, got {num_splits}")
    if batch == 0:
        return
    num_heads, head_dim = q.shape[1], q.shape[2]
    precision, block_n, num_warps, num_stages = _launch_config(q.dtype, head_dim, decode=True)
    if num_splits > 1:
        part_o = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32,
                             device=q.device)
        part_lse = torch.empty((batch, num_heads, num_splits), dtype=torch.float32,
                               device=q.device)
    else:
        part_o = part_lse = out  # unused: the kernel writes out directly
    pdl = pdl_options(q.device)
    # K and V are kv_cache[0], kv_cache[1]: same strides, different base pointers.
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q, kv_cache[0], kv_cache[1], block_tables, seq_lens, out, part_o, part_lse,
        scale * _LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_H=max(16, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_N=block_n, BLOCK_SIZE=kv_cache.shape[2], NUM_SPLITS=num_splits,
        DOT_PRECISION=precision, KV_CODEC=_KV_CODECS.get(kv_cache.dtype, 0),
        **pdl,
        num_warps=num_warps, num_stages=num_stages,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_o, part_lse, out, out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, NUM_SPLITS=num_splits,
            SPLITS_P2=triton.next_power_of_2(num_splits), **pdl,
            num_warps=1 if head_dim <= 64 else 2,
        )


def paged_prefill_attention(q: torch.Tensor, kv_cache: torch.Tensor, block_tables: torch.Tensor,
                            query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                            max_query_len: int, scale: float, out: torch.Tensor) -> None:
    """Causal varlen attention of new tokens over their cached context.

    q, out (Tq, num_heads, head_dim): sequence b's rows are query_start_loc[b] ..
    query_start_loc[b+1]-1 (int32, (Bp+1,)), at positions seq_len - query_len .. seq_len-1.
    max_query_len (python int) must be >= every query_len; it only sizes the grid.
    """
    batch = seq_lens.shape[0] if seq_lens.dim() == 1 else -1
    num_kv_heads, group = _check_common(q, kv_cache, block_tables, seq_lens, out, batch)
    if query_start_loc.dtype != torch.int32 or query_start_loc.shape != (batch + 1,):
        raise ValueError(f"query_start_loc must be int32 of shape ({batch + 1},)")
    if query_start_loc.device != q.device:
        raise ValueError("all tensors must be on the same device")
    if not isinstance(max_query_len, int) or max_query_len < 0:
        raise ValueError(f"max_query_len must be a non-negative int, got {max_query_len}")
    if batch == 0 or max_query_len == 0 or q.shape[0] == 0:
        return
    head_dim = q.shape[2]
    precision, block_n, num_warps, num_stages = _launch_config(q.dtype, head_dim)
    # BLOCK_M rows = BLOCK_Q queries x group heads; at least one query per program.
    block_m = max(64, triton.next_power_of_2(group))
    block_q = block_m // group
    grid = (triton.cdiv(max_query_len, block_q), batch, num_kv_heads)
    _prefill_kernel[grid](
        q, kv_cache[0], kv_cache[1], block_tables, query_start_loc, seq_lens, out,
        scale * _LOG2E,
        q.stride(0), q.stride(1), kv_cache.stride(1), kv_cache.stride(2), kv_cache.stride(3),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, BLOCK_Q=block_q, BLOCK_M=block_m, HEAD_DIM=head_dim, BLOCK_N=block_n,
        BLOCK_SIZE=kv_cache.shape[2], DOT_PRECISION=precision,
        KV_CODEC=_KV_CODECS.get(kv_cache.dtype, 0), num_warps=num_warps, num_stages=num_stages,
    )
