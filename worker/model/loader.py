"""Load a Hugging Face Llama-family directory (config.json + *.safetensors) into our model.

Checkpoint names follow transformers. The loader is generic: each checkpoint tensor goes
to its parameter's own `weight_loader` (parallel_linear.py), which takes this rank's shard
and, for the fused `qkv_proj` and `gate_up_proj`, the slice named by the shard id.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from lmfleet.worker.model.arch import ArchConfig, UnsupportedModelError
from lmfleet.worker.model.llama import LlamaForCausalLM
from lmfleet.worker.model.parallel_linear import MergedColumnParallelLinear, QKVParallelLinear
from lmfleet.worker.parallel.stages import PipelineStage
from lmfleet.worker.quant import methods

# checkpoint suffix -> (fused parameter suffix, shard id)
_FUSED = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
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
               device: torch.device, stage: PipelineStage | None = None) -> LlamaForCausalLM:
    """The model, or under pipeline parallelism the part of it `stage` holds."""
    arch = ArchConfig.from_model_dir(model_dir)
    with torch.device("meta"):
        model = LlamaForCausalLM(arch, max_positions, stage)
    model = model.to_empty(device=device).to(dtype)
    # Rotary tables are buffers built at init: rebuild them for real on the device.
    rotary = type(model.model.rotary)(arch.head_dim, max_positions, arch.rope_theta,
                                      arch.rope_scaling)
    model.model.rotary = rotary.to(device)
    if arch.tie_word_embeddings and model.lm_head is not None:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())  # a tied lm_head.weight is not listed
    loaded: set[str] = set()
    for path in safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as checkpoint:
            for stored in checkpoint.keys():
                name = language_model_name(stored)
                if name is None:
                    continue  # a vision-language checkpoint's image path (model/vision/)
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                if name == "lm_head.weight" and arch.tie_word_embeddings:
                    continue
                if not model.holds_weight(name):
                    continue  # another pipeline stage's
                target, shard_id = _target(name)
                if target not in params:
                    raise UnsupportedModelError(f"unexpected weight {name!r} in {path.name}")
                param = params[target]
                weight_loader = getattr(param, "weight_loader", _default_loader)
                try:
                    weight_loader(param, checkpoint.get_tensor(stored), shard_id)
                except ValueError as error:  # a shape that does not fit
                    raise UnsupportedModelError(f"weight {name!r} {error}") from None
                loaded.add(_key(target, shard_id))
    expected = {_key(name, shard) for name, param in params.items()
                for shard in _shard_ids(param)}
    missing = sorted(expected - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint in {model_dir} lacks weights: {missing[:5]}")
    for module in model.modules():
        if getattr(module, "quant", None) is not None:
            methods.finalize(module, dtype)  # e.g. AWQ's GPU layout
    return model.eval()


def language_model_name(name: str) -> str | None:
    """A checkpoint name -> the language model's name for it (`model.*`, `lm_head.*`), None
    for a LLaVA checkpoint's vision tower and projector. LLaVA stores the language model
    as `language_model.model.*` + `language_model.lm_head.*` (llava-hf) or
    `model.language_model.*` + `lm_head.*` (transformers >= 4.52)."""
    if name.startswith("language_model."):
        return name[len("language_model."):]
    if name.startswith("model.language_model."):
        return "model." + name[len("model.language_model."):]
    if name.startswith(("vision_tower.", "multi_modal_projector.", "model.vision_tower.",
                        "model.multi_modal_projector.")):
        return None
    return name


def _default_loader(param: torch.nn.Parameter, loaded: torch.Tensor, shard_id=None) -> None:
    """Parameters outside the parallel layers (norms): the whole tensor on every rank."""
    if param.shape != loaded.shape:
        raise ValueError(f"has shape {tuple(loaded.shape)}, expected {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(loaded.to(param.dtype))


def _shard_ids(param: torch.nn.Parameter) -> tuple:
    """The shard ids a checkpoint must fill this parameter with (None: one whole tensor)."""
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    if isinstance(owner, QKVParallelLinear):
        return ("q", "k", "v")
    if isinstance(owner, MergedColumnParallelLinear):
        return tuple(range(len(owner.local_sizes)))
    return (None,)


def _key(name: str, shard_id) -> str:
    return name if shard_id is None else f"{name}[{shard_id}]"


def _target(name: str):
    """Checkpoint name -> (our parameter name, shard id within it or None)."""
    for suffix, (fused, shard_id) in _FUSED.items():
        marker = f".{suffix}."
        if marker in name:
            prefix, kind = name.split(marker)
            return f"{prefix}.{fused}.{kind}", shard_id
    return name, None
