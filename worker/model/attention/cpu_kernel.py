"""The CPU decode-attention kernel (paged_decode.c), built on first use by native_build.py
and called through ctypes.

`load_paged_decode_kernel(build_dir)` returns a `PagedDecodeKernel`, or None where it
cannot be built (the reason is logged; the caller keeps the torch path).
`PagedDecodeKernel.__call__` takes float32 CPU tensors laid out as the C file says and
writes the decode rows' attention output in place; it runs on torch's thread count and
releases the GIL (ctypes does) while it runs.
"""

from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Optional

import torch

from lmfleet.worker.model.native_build import load_native

SOURCE = Path(__file__).with_name("paged_decode.c")
# Never -ffast-math: a library linked with it switches the whole process to
# flush-to-zero when loaded (tests/unit/test_cpu_decode_kernel.py checks that it does not).
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp")
LIBS = ("-lmvec", "-lm")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def load_paged_decode_kernel(build_dir: Path) -> Optional[PagedDecodeKernel]:
    library = load_native(SOURCE, CFLAGS, LIBS, build_dir)
    return None if library is None else PagedDecodeKernel(library)


class PagedDecodeKernel:
    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.paged_decode_attention_f32
        self._fn.restype = ctypes.c_int
        self._fn.argtypes = [_ptr, _i64, _ptr, _i64, _ptr, _i64, _ptr, _ptr, _i64, _i64, _i64,
                             _i64, _i64, _i64, ctypes.c_float, ctypes.c_int]

    @staticmethod
    def supports(q: torch.Tensor) -> bool:
        return q.device.type == "cpu" and q.dtype == torch.float32

    def __call__(self, q: torch.Tensor, kv: torch.Tensor, block_tables: torch.Tensor,
                 seq_lens: torch.Tensor, out: torch.Tensor, scale: float) -> None:
        """q (Bd, Hq, D) with contiguous rows; kv (2, num_blocks, block_size, Hkv, D)
        contiguous; block_tables (Bd, nb) and seq_lens (Bd,) contiguous int64; out (Bd, Hq, D)
        with contiguous rows, written in place."""
        batch, num_heads, head_dim = q.shape
        _, num_blocks, block_size, num_kv_heads, _ = kv.shape
        for name, tensor in (("q", q), ("out", out)):
            if tensor.stride(2) != 1 or tensor.stride(1) != head_dim:
                raise ValueError(f"paged decode kernel: {name} rows must be contiguous")
        if not (kv.is_contiguous() and block_tables.is_contiguous()
                and seq_lens.is_contiguous()):
            raise ValueError("paged decode kernel: kv, block_tables, seq_lens must be contiguous")
        if block_tables.dtype != torch.int64 or seq_lens.dtype != torch.int64:
            raise ValueError("paged decode kernel: block_tables and seq_lens must be int64")
        status = self._fn(q.data_ptr(), q.stride(0), kv.data_ptr(), num_blocks,
                          block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                          out.data_ptr(), out.stride(0), batch, num_heads, num_kv_heads,
                          head_dim, block_size, scale, torch.get_num_threads())
        if status != 0:
            raise MemoryError("paged decode kernel: out of memory for attention scores")
