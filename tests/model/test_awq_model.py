"""An AWQ checkpoint written by `write_awq_checkpoint` (round-to-nearest, group 32) runs in
the engine with its packed weights: greedy tokens equal Hugging Face transformers' on the
same model with the dequantized weights written back as a plain checkpoint, at tp = 1 and
tp = 2 (each rank holding its shard of the packed tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.quant.awq_writer import (
    write_awq_checkpoint,
    write_dequantized_checkpoint,
)
from tests.conftest import make_tiny_model
from tests.model.test_tiny_models import PROMPTS, hf_reference, run_engine

pytestmark = pytest.mark.model
GROUP = 32


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """(the AWQ directory, a plain directory holding its dequantized weights)."""
    root = tmp_path_factory.mktemp("awq")
    plain = make_tiny_model(root / "plain", "llama")
    awq = write_awq_checkpoint(plain, root / "awq", group_size=GROUP)
    reference = write_dequantized_checkpoint(awq, root / "dequantized")
    return awq, reference


def test_awq_checkpoint_holds_packed_projections_and_autoawq_config(models):
    awq, _ = models
    tensors = load_file(str(awq / "model.safetensors"))
    assert tensors["model.layers.0.self_attn.q_proj.qweight"].shape == (64, 64 // 8)
    assert tensors["model.layers.1.mlp.down_proj.scales"].shape == (128 // GROUP, 64)
    assert "model.layers.0.mlp.up_proj.weight" not in tensors
    assert tensors["lm_head.weight"].dtype == torch.float32  # not quantized
    config = json.loads((awq / "config.json").read_text())["quantization_config"]
    assert config == {"quant_method": "awq", "bits": 4, "group_size": GROUP,
                      "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


@pytest.mark.parametrize("tp", [1, 2])
def test_awq_engine_greedy_equals_hf_on_the_dequantized_weights(models, tp):
    awq, reference = models
    expected = hf_reference(reference, PROMPTS)
    config = EngineConfig.from_options(str(awq), block_size=8, num_kv_blocks=64,
                                       tensor_parallel_size=tp, max_num_batched_tokens=16)
    engine = LLMEngine(config, model_dir=awq)
    try:
        model = getattr(engine.runner, "runner", engine.runner).model
        qkv = model.model.layers[0].self_attn.qkv_proj
        assert qkv.qweight.dtype == torch.int32 and not hasattr(qkv, "weight")
        assert run_engine(engine, PROMPTS) == expected
    finally:
        engine.close()


def test_quantize_command_writes_a_checkpoint_the_engine_loads(models, tmp_path, capsys):
    from lmfleet.cli.main import main

    _, reference = models
    out = tmp_path / "q"
    assert main(["quantize", str(reference), "--out", str(out), "--group-size", "32",
                 "--rtn", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = EngineConfig.from_options(str(out), block_size=8, num_kv_blocks=64)
    engine = LLMEngine(config, model_dir=out)
    assert engine.runner.arch.quantization.group_size == 32
    assert len(run_engine(engine, PROMPTS[:2])) == 2
    # Again into the same directory, and a group size that does not divide 64 inputs.
    assert main(["quantize", str(reference), "--out", str(out), "--rtn", "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["quantize", str(reference), "--out", str(tmp_path / "g"), "--group-size",
                 "48", "--rtn", "--quiet"]) == 2
    assert "not a multiple of the group size 48" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main(["quantize", str(out), "--out", str(tmp_path / "again"), "--rtn",
                 "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err


@pytest.fixture(scope="module")
def chat_sized_model(tmp_path_factory, default_model_dir) -> Path:
    """A tiny model with the default model's vocabulary and tokenizer, so calibration text
    tokenizes into ids it embeds."""
    import shutil

    model_dir = make_tiny_model(tmp_path_factory.mktemp("awq") / "vocab", "llama",
                                vocab_size=49152, num_key_value_heads=4)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (default_model_dir / name).is_file():
            shutil.copy(default_model_dir / name, model_dir / name)
    return model_dir


def test_folded_scales_leave_the_unquantized_model_unchanged(chat_sized_model, tmp_path):
    """The search's scales, folded into the norms, v_proj and up_proj rows and multiplied
    into the consumers, keep the float model's logits (before any rounding)."""
    import transformers

    from lmfleet.worker.quant.awq_search import (
        DEFAULT_CALIBRATION,
        apply_scales,
        calibration_ids,
        capture_inputs,
    )

    ids = calibration_ids(chat_sized_model, DEFAULT_CALIBRATION.read_text())
    tensors = load_file(str(chat_sized_model / "model.safetensors"))
    captured = capture_inputs(chat_sized_model, ids)
    apply_scales(tensors, captured, 2, grouped_query=False, group_size=GROUP, clip=False)
    # The search moved something: some input channel's scale is far from 1.
    original = load_file(str(chat_sized_model / "model.safetensors"))
    norm = "model.layers.0.input_layernorm.weight"
    assert (tensors[norm] / original[norm] - 1).abs().max() > 0.05
    scaled = tmp_path / "scaled"
    scaled.mkdir()
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(scaled / "model.safetensors"), metadata={"format": "pt"})
    (scaled / "config.json").write_text((chat_sized_model / "config.json").read_text())
    prompt = torch.tensor([ids[:40]])
    logits = []
    for model_dir in (chat_sized_model, scaled):
        model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                                  dtype=torch.float32)
        with torch.no_grad():
            logits.append(model(prompt).logits)
    torch.testing.assert_close(logits[1], logits[0], rtol=1e-4, atol=1e-4)


def test_quantize_with_scale_search_loads_and_runs_its_weights(chat_sized_model, tmp_path):
    from lmfleet.cli.main import main

    out = tmp_path / "searched"
    assert main(["quantize", str(chat_sized_model), "--out", str(out), "--group-size",
                 str(GROUP), "--quiet", "--device", "cpu"]) == 0
    reference = write_dequantized_checkpoint(out, tmp_path / "reference")
    prompts = [p[:12] for p in PROMPTS[:3]]
    config = EngineConfig.from_options(str(out), block_size=8, num_kv_blocks=64)
    assert run_engine(LLMEngine(config, model_dir=out), prompts) == hf_reference(reference,
                                                                                  prompts)
    assert main(["quantize", str(chat_sized_model), "--out", str(tmp_path / "x"), "--rtn",
                 "--calibration", "text.txt", "--quiet"]) == 2
