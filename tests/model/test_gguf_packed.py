"""The default model served with its GGUF blocks packed (`quantization="gguf"`): every
projection's blocks, in Hugging Face row order, dequantize to exactly the float32 weights
of the usual conversion; greedy text equals the unquantized engine's at tp = 1 and 3; the
option refuses models it cannot serve."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from lmfleet.worker import LLM, SamplingParams
from lmfleet.worker.model.default_model import embedded_gguf_path
from lmfleet.worker.quant.gguf_blocks import dequantize_blocks
from lmfleet.worker.quant.gguf_packed import read_projection_blocks
from tests.conftest import make_tiny_model

pytestmark = pytest.mark.model
PROMPTS = ["The capital of France is", "Write a haiku about rain.", "1, 2, 3, 4,",
           "def add(a, b):"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def test_packed_blocks_dequantize_to_the_converted_weights(default_model_dir):
    config = json.loads((default_model_dir / "config.json").read_text())
    blocks, block_type = read_projection_blocks(embedded_gguf_path(), config)
    assert block_type == "Q4_1" and len(blocks) == 7 * config["num_hidden_layers"]
    converted = load_file(str(default_model_dir / "model.safetensors"))
    for name, packed in blocks.items():
        weight = converted[name.replace(".qblocks", ".weight")]
        assert torch.equal(dequantize_blocks(packed, block_type), weight), name


@pytest.fixture(scope="module")
def expected_text(default_model_dir) -> list[str]:
    with LLM("default", max_model_len=256) as llm:
        return [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("tp", [1, 3])
def test_gguf_packed_greedy_text_equals_the_float32_engine(expected_text, tp):
    with LLM("default", quantization="gguf", tensor_parallel_size=tp,
             max_model_len=256) as llm:
        runner = getattr(llm.engine.runner, "runner", llm.engine.runner)
        qkv = runner.model.model.layers[0].self_attn.qkv_proj
        assert qkv.qblocks.dtype == torch.uint8 and qkv.quant.block_type == "Q4_1"
        texts = [o.outputs[0].text for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert texts == expected_text


def test_quantization_option_refuses_what_it_cannot_serve(tmp_path):
    plain = make_tiny_model(tmp_path / "plain", "llama")
    with pytest.raises(ValueError, match="give 'default' or a .gguf file"):
        LLM(str(plain), quantization="gguf")
    with pytest.raises(ValueError, match="needs an AWQ checkpoint"):
        LLM(str(plain), quantization="awq")
    with pytest.raises(ValueError, match="is not one of awq, gguf|unknown quantization"):
        LLM("default", quantization="int3")
