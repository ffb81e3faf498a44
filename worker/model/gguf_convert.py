"""GGUF → Hugging Face directory conversion.

`convert_gguf(gguf_path, out_dir)` turns a Llama-family GGUF file (any quantization
transformers can dequantize) into a plain Hugging Face model directory:

    config.json               no `quantization_config`: the weights are plain float32
    generation_config.json
    model.safetensors         float32; transformers shards files over 50 GB into
                              model-0000k-of-0000n.safetensors + model.safetensors.index.json
    tokenizer.json, tokenizer_config.json, chat_template.jinja (when the GGUF has one)
    lmfleet_source.json       where the weights came from (file, size, mtime, architecture)

The dequantization is transformers' own (`from_pretrained(..., gguf_file=...)`), so a
model loaded from the directory gives exactly the logits of the model transformers loads
straight from the GGUF; the engine's exactness tests rely on that.

Atomicity: everything is written into a hidden sibling directory
`.<name>.partial-<host>-<pid>-<random>` and renamed into place at the end, so `out_dir`
either does not exist or is complete. Partial directories left by a killed process of
this host are swept by the next conversion into the same place.

Heavy imports (torch, transformers, gguf) happen inside the functions, so importing this
module costs nothing (the CLI's `--help` and `lmfleet models` stay fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# GGUF `general.architecture` values whose tensors transformers maps onto a Llama-shaped
# model (mistral is Llama plus an optional sliding window). Others (qwen2 with its qkv
# biases, gemma, phi3, ...) are refused: the engine only implements the Llama block.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("llama", "mistral")

_GGUF_MAGIC = b"GGUF"
_NUM_STAGES = 5
# transformers' "no limit" sentinel for tokenizer.model_max_length (VERY_LARGE_INTEGER).
_NO_LENGTH_LIMIT = 10**12


def read_gguf_architecture(gguf_path: str | Path) -> str:
    """Return the GGUF file's `general.architecture` (e.g. "llama").

    Raises FileNotFoundError if the file does not exist and ValueError if it is not a
    GGUF file or carries no architecture. Only the header is parsed (memory-mapped).
    """
    path = Path(gguf_path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {path}")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != _GGUF_MAGIC:
        raise ValueError(f"not a GGUF file (bad magic {magic!r}): {path}")
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:  # gguf raises assorted errors on truncated/corrupt files
        raise ValueError(f"cannot read GGUF file {path}: {e}") from e
    field = reader.fields.get("general.architecture")
    if field is None or not field.data:
        raise ValueError(f"GGUF file has no general.architecture: {path}")
    # parts[data[0]] is the string's bytes; this works on every gguf release, unlike
    # ReaderField.contents() which only recent ones have.
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def check_supported_architecture(arch: str, gguf_path: str | Path) -> None:
    """Raise ValueError naming `arch` unless it is in SUPPORTED_ARCHITECTURES."""
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r} in {gguf_path}: lmfleet serves "
            f"Llama-family models ({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = True) -> Path:
    """Convert a Llama-family GGUF file into a Hugging Face directory at `out_dir`.

    Returns `out_dir` (absolute). `out_dir` must not exist or be an empty directory;
    its parent is created if needed. If another process creates `out_dir` while this one
    converts, the rename fails and FileExistsError is raised (the other result is kept;
    `resolve_model_path` uses it). With `progress`, stages are printed to stderr and
    transformers shows its dequantization bar; without, both are silent.

    Raises FileNotFoundError (no such file), ValueError (not GGUF, unsupported
    architecture), FileExistsError (`out_dir` exists and is not empty).
    """
    src = Path(gguf_path).expanduser().resolve()
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and not _is_empty_dir(out):
        raise FileExistsError(
            f"output directory already exists and is not empty: {out} (remove it or choose another)"
        )
    stage = _StagePrinter(progress, f"{src.name} -> {out}")

    stage("reading GGUF metadata")
    arch = read_gguf_architecture(src)
    check_supported_architecture(arch, src)

    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_stale_partials(out)
    tmp = out.parent / f".{out.name}.partial-{_host()}-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        with _transformers_progress(progress):
            stage("loading tokenizer and chat template")
            tokenizer = _load_tokenizer(src)
            stage("dequantizing weights to float32")
            model = _load_model(src)
        if tokenizer.model_max_length >= _NO_LENGTH_LIMIT:
            # GGUF tokenizers carry no limit; the model's context is the honest one.
            tokenizer.model_max_length = model.config.max_position_embeddings
        stage("writing safetensors, config and tokenizer")
        _save(model, tokenizer, tmp)
        (tmp / "lmfleet_source.json").write_text(
            json.dumps(_source_info(src, arch), indent=2) + "\n", encoding="utf-8"
        )
        stage("finalizing")
        _normalize_modes(tmp)
        try:
            # POSIX rename replaces an empty directory atomically and fails on a
            # non-empty one, which is exactly the "someone else finished first" case.
            os.rename(tmp, out)
        except OSError as e:
            if out.exists() and not _is_empty_dir(out):
                raise FileExistsError(f"output directory appeared meanwhile: {out}") from e
            raise
    except BaseException:
        # Includes KeyboardInterrupt: never leave a partial directory behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stage.done()
    return out


def _load_tokenizer(src: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)


def _load_model(src: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        str(src.parent), gguf_file=src.name, dtype=torch.float32
    )


def _save(model: Any, tokenizer: Any, out: Path) -> None:
    """Save `model` and `tokenizer` as a plain (unquantized) Hugging Face directory."""
    # The weights are already dequantized; the gguf quantization_config only records
    # where they came from, and save_pretrained refuses to save while it is present.
    # Dropping it also lets from_pretrained(out) load the directory as plain float32.
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    # save_pretrained writes safetensors and stores tied weights once (safetensors
    # rejects shared tensors); it shards only above 50 GB by default.
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


def _normalize_modes(directory: Path) -> None:
    """Give every file the mode the umask allows (safetensors writes 0600 files).

    A shared cache must be readable by the other users the umask admits. The directory's
    own mode, fresh from mkdir, is 0o777 & ~umask: read it instead of calling os.umask(),
    which briefly changes process-wide state.
    """
    file_mode = directory.stat().st_mode & 0o666
    for entry in directory.iterdir():
        if entry.is_file():
            entry.chmod(file_mode)


def _source_info(src: Path, arch: str) -> dict[str, Any]:
    import transformers

    st = src.stat()
    return {
        "source": str(src),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "architecture": arch,
        "dtype": "float32",
        "transformers_version": transformers.__version__,
    }


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _host() -> str:
    # Sanitized so it can sit inside a file name (and be parsed back by the sweeper).
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname()) or "host"


def _sweep_stale_partials(out: Path) -> None:
    """Remove `.<name>.partial-<this host>-<pid>-*` dirs whose process is gone.

    A killed conversion (SIGKILL, power loss) cannot clean up after itself; without
    this the cache would collect model-sized garbage. Other hosts' partials (a shared
    cache on NFS) are left alone: their pids mean nothing here.
    """
    prefix = f".{out.name}.partial-{_host()}-"
    for entry in out.parent.glob(f"{prefix}*"):
        pid_text = entry.name[len(prefix) :].split("-", 1)[0]
        if pid_text.isdigit() and not _pid_alive(int(pid_text)):
            shutil.rmtree(entry, ignore_errors=True)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return True  # unknown: keep the directory rather than delete live work
    return True


@contextlib.contextmanager
def _transformers_progress(enabled: bool) -> Iterator[None]:
    """Enable or silence transformers' tqdm bars for the block, then restore the setting."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    if enabled:
        hf_logging.enable_progress_bar()
    else:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        else:
            hf_logging.disable_progress_bar()


class _StagePrinter:
    """Prints `[convert k/N] <stage>` lines to stderr (stdout stays clean for results)."""

    def __init__(self, enabled: bool, what: str) -> None:
        self.enabled = enabled
        self.what = what
        self.k = 0

    def __call__(self, message: str) -> None:
        self.k += 1
        if self.enabled:
            if self.k == 1:
                print(f"[convert] {self.what}", file=sys.stderr, flush=True)
            print(f"[convert {self.k}/{_NUM_STAGES}] {message}", file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.enabled:
            print("[convert] done", file=sys.stderr, flush=True)
