"""Load a Hugging Face Llama-family directory (config.json + *.safetensors) into our model.

Checkpoint names follow transformers; q/k/v and gate/up are fused here into the
model's `qkv_proj` and `gate_up_proj` slices.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lmfleet.worker.model.arch import ArchConfig, UnsupportedModelError
from lmfleet.worker.model.llama import LlamaForCausalLM

# checkpoint suffix -> (fused parameter suffix, slice index)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0),
    "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0),
    "mlp.up_proj": ("mlp.gate_up_proj", 1),
}


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / name for name in names]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"no *.safetensors weights in {model_dir}")
    return files


def load_model(model_dir: Path, max_positions: int, dtype: torch.dtype,
               device: torch.device) -> LlamaForCausalLM:
    arch = ArchConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions)
    model = model.to_empty(device=device).to(dtype)
    # Rotary tables are buffers built at init: rebuild them for real on the device.
    rotary = type(model.model.rotary)(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)
    model.model.rotary = rotary.to(device)
    if arch.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    split_sizes = {
        "self_attn.qkv_proj": [arch.num_heads * arch.head_dim,
                               arch.num_kv_heads * arch.head_dim,
                               arch.num_kv_heads * arch.head_dim],
        "mlp.gate_up_proj": [arch.intermediate_size, arch.intermediate_size],
    }
    loaded: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as checkpoint:
            for name in checkpoint.keys():
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == "lm_head.weight" and arch.tie_word_embeddings:
                    continue
                target, rows = _target(name, split_sizes)
                if target not in params:
                    raise UnsupportedModelError(f"unexpected weight {name!r} in {path.name}")
                tensor = checkpoint.get_tensor(name)
                param = params[target]
                with torch.no_grad():
                    destination = param if rows is None else param[rows[0] : rows[1]]
                    if destination.shape != tensor.shape:
                        raise UnsupportedModelError(
                            f"weight {name!r} has shape {tuple(tensor.shape)}, "
                            f"expected {tuple(destination.shape)}")
                    destination.copy_(tensor.to(dtype))
                loaded.add(target if rows is None else f"{target}[{rows[0]}]")
    expected = set()
    for name in params:
        fused = next((f for f in split_sizes if name.endswith(f + ".weight")
                      or name.endswith(f + ".bias")), None)
        if fused is None:
            expected.add(name)
        else:
            offsets = _offsets(split_sizes[fused])
            expected.update(f"{name}[{start}]" for start, _ in offsets)
    if arch.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint in {model_dir} lacks weights: {missing[:5]}")
    return model.eval()


def _offsets(sizes: list[int]) -> list[tuple[int, int]]:
    offsets, start = [], 0
    for size in sizes:
        offsets.append((start, start + size))
        start += size
    return offsets


def _target(name: str, split_sizes: dict[str, list[int]]):
    """Checkpoint name -> (our parameter name, row range within it or None)."""
    for suffix, (fused, index) in _FUSED.items():
        marker = f".{suffix}."
        if marker in name:
            prefix, kind = name.split(marker)
            return f"{prefix}.{fused}.{kind}", _offsets(split_sizes[fused])[index]
    return name, None
