"""Write an AutoAWQ-format (GEMM, 4-bit, zero point) checkpoint from a plain one.

The decoder layers' seven projections (q, k, v, o, gate, up, down) become `qweight`,
`qzeros` and `scales` (awq_format.py); embeddings, norms, the LM head and biases stay as
they are; config.json gains AutoAWQ's `quantization_config`. Round-to-nearest per group
of input features, optionally after the activation-aware scale search (awq_search.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lmfleet.worker.model.loader import safetensors_files
from lmfleet.worker.quant.awq_format import BITS, dequantize, quantize_rtn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Files besides the weights and config.json that a model directory carries along.
_CARRIED = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "tokenizer.model", "vocab.json", "merges.txt")


def is_quantized_projection(name: str) -> bool:
    parts = name.split(".")
    return (len(parts) >= 3 and parts[-1] == "weight" and parts[-2] in PROJECTIONS
            and ".layers." in name)


def quantization_config(group_size: int) -> dict:
    return {"quant_method": "awq", "bits": BITS, "group_size": group_size,
            "zero_point": True, "version": "gemm", "modules_to_not_convert": None}


def write_awq_checkpoint(model_dir: Path, out_dir: Path, group_size: int = 128,
                         on_tensor: Optional[Callable[[str], None]] = None,
                         device: str = "cpu", calibration: Optional[list[int]] = None,
                         on_layer: Optional[Callable[[int], None]] = None) -> Path:
    """Quantize `model_dir` into `out_dir` (created): round-to-nearest, after the
    activation-aware scale search on the `calibration` token ids when given
    (awq_search.py; `on_layer(index)` after each layer's search). `on_tensor(name)` after
    each tensor is written; `device`: where the rounding and search run."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        raise ValueError(f"{model_dir} is already quantized")
    tensors = {}
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as checkpoint:
            for name in checkpoint.keys():
                tensors[name] = checkpoint.get_tensor(name)
    if calibration is not None:
        from lmfleet.worker.quant.awq_search import apply_scales, capture_inputs

        captured = capture_inputs(model_dir, calibration, device)
        grouped_query = (config.get("num_key_value_heads") or config["num_attention_heads"]
                         ) != config["num_attention_heads"]
        with torch.no_grad():
            apply_scales(tensors, captured, config["num_hidden_layers"], grouped_query,
                         group_size, on_layer)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, tensor in tensors.items():
        if is_quantized_projection(name):
            base = name[:-len(".weight")]
            try:
                quantized = quantize_rtn(tensor.to(device), group_size)
            except ValueError as error:
                raise ValueError(f"{name}: {error}") from None
            qweight, qzeros, scales = (t.cpu() for t in quantized)
            written.update({f"{base}.qweight": qweight, f"{base}.qzeros": qzeros,
                            f"{base}.scales": scales})
        else:
            written[name] = tensor.contiguous()
        if on_tensor is not None:
            on_tensor(name)
    save_file(written, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = quantization_config(group_size)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _carry_files(model_dir, out_dir)
    return out_dir


def write_dequantized_checkpoint(awq_dir: Path, out_dir: Path) -> Path:
    """The plain float32 checkpoint holding exactly the weights an AWQ directory encodes
    (for tools that cannot read AWQ, e.g. a reference run of transformers)."""
    from safetensors.torch import load_file

    awq_dir, out_dir = Path(awq_dir), Path(out_dir)
    config = json.loads((awq_dir / "config.json").read_text())
    group_size = config.pop("quantization_config")["group_size"]
    tensors = {}
    for path in safetensors_files(awq_dir):
        tensors.update(load_file(str(path)))
    plain = {}
    for name, tensor in tensors.items():
        if name.endswith(".qweight"):
            base = name[:-len(".qweight")]
            weight_t = dequantize(tensor, tensors[f"{base}.qzeros"], tensors[f"{base}.scales"],
                                  group_size)  # (in, out)
            plain[f"{base}.weight"] = weight_t.t().contiguous()
        elif not name.endswith((".qzeros", ".scales")):
            plain[name] = tensor
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(plain, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    _carry_files(awq_dir, out_dir)
    return out_dir


def _carry_files(source: Path, out_dir: Path) -> None:
    """Copy the tokenizer and generation files a model directory carries along."""
    for name in _CARRIED:
        if (source / name).is_file():
            shutil.copy(source / name, out_dir / name)
