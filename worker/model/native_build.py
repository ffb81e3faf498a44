"""Build a C source with the system compiler on first use and load it with ctypes.

Contract of `load_native(source, flags, libs, build_dir)`:
- Returns the loaded `ctypes.CDLL`, or None when it cannot be had here (no C compiler,
  a compiler without what the flags ask, an unsupported system); the reason is logged as
  a warning and callers keep their torch path.
- The shared object is named by a hash of the source, the flags, the compiler's version
  and this CPU's model and feature flags (sources are built with -march=native), so a
  cache directory shared between machines or upgrades never loads a stale or foreign
  build. It is written under a temporary name and renamed into place, so concurrent
  builders (several workers starting at once) each end with a whole file.
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

logger = logging.getLogger(__name__)


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


def load_native(source: Path, flags: tuple[str, ...], libs: tuple[str, ...],
                build_dir: Path) -> Optional[ctypes.CDLL]:
    compiler = _compiler()
    if compiler is None or platform.system() not in ("Linux", "Darwin"):
        logger.warning("%s: no C compiler on this system, using torch ops", source.name)
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
        key = hashlib.sha256("\0".join([source.read_text(), *flags, *libs, version,
                                        _cpu_signature()]).encode()).hexdigest()[:16]
        target = build_dir / f"{source.stem}-{key}.so"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
                partial = Path(tmp) / target.name
                subprocess.run([compiler, *flags, "-shared", "-fPIC", str(source), "-o",
                                str(partial), *libs],
                               check=True, capture_output=True, text=True, timeout=120)
                os.replace(partial, target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as error:
        detail = getattr(error, "stderr", "") or error
        logger.warning("%s could not be built, using torch ops: %s", source.name,
                       str(detail).strip()[:500])
        return None
