"""Split-K inside one kernel, shared by the W4A16 kernels (triton_w4a16.py,
triton_w4a16_mma.py).

With few rows, tiles over M and N alone leave most of the GPU idle, so K is cut into
splits. Each program writes its float32 partial sum; the last program of a tile to finish
(a counter per tile, taken with an acquire-release atomic) adds the partials in split order
and writes the output: deterministic, in one kernel, no second launch. It resets the
counter, so the counters are zero between launches, and launches on one stream share them
(kernels on a stream run one after another).
"""

import triton
import triton.language as tl


@triton.jit
def finish_split_k(acc, rows, cols, row_mask, col_mask, partial_ptr, out_ptr, counter_ptr,
                   tile, pid_k, splits, stride_ps, stride_om, SPLIT_K: tl.constexpr):
    """Store acc (BM, BN), or under split-K its partial, the last program the total."""
    offsets = rows[:, None] * stride_om + cols[None, :]  # (BM, BN)
    mask = row_mask[:, None] & col_mask[None, :]
    if SPLIT_K:
        tl.store(partial_ptr + pid_k * stride_ps + offsets, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial stored before the count
        arrived = tl.atomic_add(counter_ptr + tile, 1, sem="acq_rel")
        if arrived == splits - 1:
            total = tl.zeros(acc.shape, dtype=tl.float32)
            for split in range(0, splits):
                total += tl.load(partial_ptr + split * stride_ps + offsets, mask=mask,
                                 other=0.0, cache_modifier=".cg")  # from L2, not a stale L1
            tl.store(out_ptr + offsets, total.to(out_ptr.dtype.element_ty), mask=mask)
            tl.store(counter_ptr + tile, 0)
    else:
        tl.store(out_ptr + offsets, acc.to(out_ptr.dtype.element_ty), mask=mask)
