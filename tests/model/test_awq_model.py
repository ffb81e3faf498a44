"""An AWQ checkpoint written by `write_awq_checkpoint` (round-to-nearest, group 32) runs in
the engine with its packed weights: greedy tokens equal Hugging Face transformers' on the
same model with the dequantized weights written back as a plain checkpoint, at tp = 1 and
tp = 2 (each rank holding its shard of the packed tensors)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

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
                 "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    config = EngineConfig.from_options(str(out), block_size=8, num_kv_blocks=64)
    engine = LLMEngine(config, model_dir=out)
    assert engine.runner.arch.quantization.group_size == 32
    assert len(run_engine(engine, PROMPTS[:2])) == 2
    # Again into the same directory, and a group size that does not divide 64 inputs.
    assert main(["quantize", str(reference), "--out", str(out), "--quiet"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["quantize", str(reference), "--out", str(tmp_path / "g"), "--group-size",
                 "48", "--quiet"]) == 2
    assert "not a multiple of the group size 48" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main(["quantize", str(out), "--out", str(tmp_path / "again"), "--quiet"]) == 2
    assert "already quantized" in capsys.readouterr().err
