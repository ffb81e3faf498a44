"""Split-K inside one kernel, shared by the W4A16 kernels (triton_w4a16.py,
triton_w4a16_mma.py).

With few rows, tiles over M and N alone leave most of the GPU idle, so K is cut into
splits. Each program writes its float32 partial sum; the last program of a tile to finish
(a counter per tile, taken with an acquire-release atomic) adds the partials in split order
and writes the output: deterministic, in one kernel, no second launch. It resets the
counter, so the counters are zero between launches, and launches on one stream share them
(kernels on a stream run one after another). num_splits chooses how many splits.
"""

import functools

import torch
import triton
import triton.language as tl

MAX_TILES = 1 << 16  # split-K counters per stream
_COUNTERS: dict[tuple, torch.Tensor] = {}


def split_k_counters(device: torch.device) -> torch.Tensor:
    """Zeroed split-K counters, one set per stream (launches on a stream run in order)."""
    if device.type != "cuda":
        key = (str(device), 0)
    else:
        key = (str(device), torch.cuda.current_stream(device).cuda_stream)
    if key not in _COUNTERS:
        _COUNTERS[key] = torch.zeros(MAX_TILES, dtype=torch.int32, device=device)
    return _COUNTERS[key]


def num_splits(tiles: int, chunks: int, device: torch.device, asked: int | None,
               programs_per_sm: int) -> int:
    """Splits of K (each whole chunks): `asked`, or else so that tiles x splits fill the
    multiprocessors at `programs_per_sm`; one where the tiles outnumber the counters,
    whatever was asked."""
    if tiles > MAX_TILES:
        return 1
    if asked is not None:
        return max(1, min(chunks, asked))
    if device.type != "cuda":
        return min(chunks, 2) if tiles < 4 else 1  # the interpreter: exercise splitting
    return _fewest_waves(tiles, chunks, programs_per_sm * _multiprocessors(device.index))


@functools.cache  # called per matmul outside CUDA graphs (eager steps): a loop over K
def _fewest_waves(tiles: int, chunks: int, resident: int) -> int:
    """The splits whose waves of `resident` programs take the fewest steps: waves x (chunks
    a program + one for its start and its partial sum), the fewest splits among equals. A
    last wave of a few programs costs as much as a full one."""
    def cost(splits: int) -> tuple[int, int]:
        per_split = triton.cdiv(chunks, splits)
        programs = tiles * triton.cdiv(chunks, per_split)
        return triton.cdiv(programs, resident) * (per_split + 1), splits

    return min(range(1, chunks + 1), key=cost)


@functools.cache
def _multiprocessors(device_index: int | None) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


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
