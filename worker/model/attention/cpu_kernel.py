"""The CPU decode-attention kernel (paged_decode.c): built with the system C compiler on
first use, cached, and called through ctypes.

Contract:
- `load_paged_decode_kernel(build_dir)` returns a `PagedDecodeKernel`, or None when it
  cannot be had here (not Linux/macOS x86-64 or arm64 with a C compiler that knows
  OpenMP); the reason is logged once and the caller keeps the torch path.
- The shared object is named by a hash of the source, the compiler flags, the compiler's
  version and this CPU's model and flags (it is built with -march=native), so a cache
  directory shared between machines or upgrades never loads a stale or foreign build.
  It is written under a temporary name and renamed into place, so concurrent builders
  (several workers starting at once) each end with a whole file.
- `PagedDecodeKernel.__call__` takes float32 CPU tensors laid out as the C file says and
  writes the decode rows' attention output in place; it runs on torch's thread count and
  releases the GIL (ctypes does) while it runs.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

import torch

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("paged_decode.c")
# -ffast-math: reductions may reassociate and exp comes from the vector math library;
# the kernel never meets infinities or NaNs of its own (it visits real keys only).
CFLAGS = ("-O3", "-march=native", "-mprefer-vector-width=512", "-ffast-math", "-fopenmp",
          "-shared", "-fPIC")
LIBS = ("-lmvec", "-lm")

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def _cpu_signature() -> str:
    """CPU model and feature flags (what -march=native compiles for)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keys = ("model name", "flags", "Features", "CPU part")
    wanted = [line for line in lines if line.split(":")[0].strip() in keys]
    return "\n".join(dict.fromkeys(wanted))  # the first CPU's lines (all cores agree)


def _compiler() -> Optional[str]:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        partial = Path(tmp) / target.name
        subprocess.run([compiler, *CFLAGS, str(SOURCE), "-o", str(partial), *LIBS],
                       check=True, capture_output=True, text=True, timeout=120)
        os.replace(partial, target)


def load_paged_decode_kernel(build_dir: Path) -> Optional[PagedDecodeKernel]:
    compiler = _compiler()
    if compiler is None or platform.system() not in ("Linux", "Darwin"):
        logger.info("CPU decode-attention kernel unavailable: no C compiler on this system")
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), *CFLAGS, *LIBS, version,
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        target = build_dir / f"paged_decode-{key}.so"
        if not target.exists():
            _build(compiler, target)
        return PagedDecodeKernel(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("CPU decode-attention kernel unavailable, using torch attention: %s",
                       str(detail).strip()[:500])
        return None


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
        for name, tensor in (("q", q[0]), ("out", out[0])):
            if not tensor.is_contiguous():
                raise ValueError(f"paged decode kernel: {name} rows must be contiguous")
        if not (kv.is_contiguous() and block_tables.is_contiguous()
                and seq_lens.is_contiguous()):
            raise ValueError("paged decode kernel: kv, block_tables, seq_lens must be contiguous")
        status = self._fn(q.data_ptr(), q.stride(0), kv.data_ptr(), num_blocks,
                          block_tables.data_ptr(), block_tables.shape[1], seq_lens.data_ptr(),
                          out.data_ptr(), out.stride(0), batch, num_heads, num_kv_heads,
                          head_dim, block_size, scale, torch.get_num_threads())
        if status != 0:
            raise MemoryError("paged decode kernel: out of memory for attention scores")
