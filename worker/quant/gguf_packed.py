"""A GGUF model's projection weights kept as its blocks: the checkpoint that
`LLM("default", quantization="gguf")` serves.

Next to the float32 directory a GGUF file converts into (model/gguf_convert.py), this
writes `<that directory>-gguf-packed`: the same config, tokenizer and non-projection
tensors, with each decoder projection's weight replaced by its GGUF block rows
(`<name>.qblocks`, uint8) and `quantization_config: {quant_method: gguf, block_type}`.
llama.cpp stores q and k rows permuted for its rotary layout; the rows are put back in
Hugging Face order (whole rows of blocks move, so the blocks stay as they are).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lmfleet.worker.quant.gguf_blocks import FORMATS

# GGUF tensor name (after "blk.N.") -> Hugging Face module (after "model.layers.N.")
PROJECTIONS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
               "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
               "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
               "ffn_down": "mlp.down_proj"}


def packed_dir(plain_dir: Path) -> Path:
    return plain_dir.with_name(plain_dir.name + "-gguf-packed")


def unpermute_rows(rows: int, num_heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's q/k permutation: index (rows,) into its rows."""
    half = rows // num_heads // 2
    order = torch.arange(rows).reshape(num_heads, half, 2)  # llama.cpp row of (h, i, j)
    return order.transpose(1, 2).reshape(rows)


def read_projection_blocks(gguf_path: Path, config: dict) -> tuple[dict, str]:
    """{HF name.qblocks: uint8 (out, in / 32 x bytes)} of every decoder projection, in HF
    row order, and their one block type."""
    import gguf

    reader = gguf.GGUFReader(str(gguf_path))
    blocks, types = {}, set()
    heads = {"attn_q": config["num_attention_heads"],
             "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"]}
    for tensor in reader.tensors:
        parts = tensor.name.split(".")
        if len(parts) != 4 or parts[0] != "blk" or parts[2] not in PROJECTIONS:
            continue
        qtype = tensor.tensor_type.name
        types.add(qtype)
        data = torch.from_numpy(np.array(tensor.data))  # (out, in / 32 x bytes) uint8
        if parts[2] in heads:
            data = data[unpermute_rows(data.shape[0], heads[parts[2]])]
        blocks[f"model.layers.{parts[1]}.{PROJECTIONS[parts[2]]}.qblocks"] = data.contiguous()
    unsupported = sorted(types - set(FORMATS))
    if unsupported or len(types) != 1:
        raise ValueError(f"{gguf_path.name}: projections in {', '.join(sorted(types))}; "
                         f"serving GGUF blocks packed needs one of {', '.join(FORMATS)} "
                         "throughout (serve it without quantization='gguf' instead)")
    return blocks, types.pop()


def write_packed_checkpoint(gguf_path: Path, plain_dir: Path, out_dir: Path) -> Path:
    """Write `out_dir` (see the module doc) from the GGUF file and its float32 conversion."""
    config = json.loads((plain_dir / "config.json").read_text())
    blocks, block_type = read_projection_blocks(gguf_path, config)
    tensors = load_file(str(plain_dir / "model.safetensors"))
    for name in blocks:
        del tensors[name.replace(".qblocks", ".weight")]
    tensors.update(blocks)
    staging = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(plain_dir, staging, ignore=shutil.ignore_patterns("*.safetensors*"))
    save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
    config["quantization_config"] = {"quant_method": "gguf", "block_type": block_type}
    (staging / "config.json").write_text(json.dumps(config, indent=2))
    staging.rename(out_dir)
    return out_dir
