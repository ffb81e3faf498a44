"""Activation-aware scales for AWQ (the AWQ paper's search, written for this project).

Input channels that carry large activations matter most to a layer's output, so before
rounding, each group of linears sharing one input X is rescaled: W' = W diag(s), and the
op that produces X divides by s (RMSNorm weights for q/k/v and gate/up; up_proj's output
rows for down_proj, since down's input is silu(gate) * up). The product is unchanged in
exact arithmetic; after rounding W', the salient channels keep more precision. s =
mean|X|^alpha per channel, with alpha chosen on a grid to minimise the error of the
group's rounded outputs on calibration tokens. o_proj is rescaled only without grouped
query attention (its input channels must map one to one onto v_proj's outputs).

Then each weight's range is clipped per group of input features (except q and k, whose
errors the softmax magnifies): of the shrink factors 1, 0.95, ..., 0.5 of the group's
largest magnitude, the one whose rounded weights give the smallest error on the
calibration inputs, per output feature and group.

Activations are captured by running transformers' model on the calibration text; the
search works on the checkpoint's tensors by name and returns them modified, ready for
round-to-nearest (awq_writer.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Optional

import torch

from lmfleet.worker.quant.awq_format import dequantize, quantize_rtn

DEFAULT_CALIBRATION = Path(__file__).with_name("calibration.txt")
GRID = 20  # alpha in 0, 1/20, ..., 19/20
MAX_TOKENS = 4096
CLIP_GRID = 20  # shrink factors 1 - i / CLIP_GRID for i = 0 .. CLIP_GRID / 2
CLIP_TOKENS = 512  # calibration tokens the clipping search scores on


def calibration_ids(model_dir: Path, text: str) -> list[int]:
    """The calibration text as the model's tokenizer splits it (at most MAX_TOKENS)."""
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(model_dir))
    return tokenizer(text).input_ids[:MAX_TOKENS]


def capture_inputs(model_dir: Path, token_ids: list[int], device: str = "cpu"
                   ) -> dict[str, torch.Tensor]:
    """The input (tokens, in) of each layer's q_proj, o_proj, gate_proj and down_proj on
    the calibration tokens, keyed by the checkpoint prefix ("model.layers.3.mlp.down_proj")."""
    import transformers

    ids = torch.tensor([token_ids], device=device)  # (1, L)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=torch.float32).to(device)
    captured: dict[str, torch.Tensor] = {}
    hooks = []
    for index, layer in enumerate(model.model.layers):
        for module, name in ((layer.self_attn.q_proj, "self_attn.q_proj"),
                             (layer.self_attn.o_proj, "self_attn.o_proj"),
                             (layer.mlp.gate_proj, "mlp.gate_proj"),
                             (layer.mlp.down_proj, "mlp.down_proj")):
            key = f"model.layers.{index}.{name}"

            def hook(_module, args, key=key):
                captured[key] = args[0].detach().reshape(-1, args[0].shape[-1]).float()

            hooks.append(module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for handle in hooks:
        handle.remove()
    return captured


def _rounded(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    """W (out, in) as round-to-nearest stores it, back in float32."""
    return dequantize(*quantize_rtn(weight, group_size), group_size).t()  # (out, in)


def best_scales(x: torch.Tensor, weights: list[torch.Tensor], group_size: int
                ) -> torch.Tensor:
    """s (in,) minimising sum ||X W^T - (X / s) Q(W s)^T||^2 over the grid of alpha."""
    mean_abs = x.abs().mean(dim=0).clamp(min=1e-8)  # (in,)
    expected = [x @ w.t() for w in weights]  # (tokens, out) each
    best, best_error = torch.ones_like(mean_abs), float("inf")
    for step in range(GRID):
        scales = mean_abs.pow(step / GRID).clamp(min=1e-4)  # (in,)
        scales = scales / (scales.max() * scales.min()).sqrt()
        error = 0.0
        for weight, want in zip(weights, expected, strict=True):
            effective = _rounded(weight * scales, group_size) / scales  # (out, in)
            error += (x @ effective.t() - want).pow(2).mean().item()
        if error < best_error:
            best, best_error = scales, error
    return best


def clip_weight(weight: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """weight (out, in) with each (output feature, group) clipped to +-r * its largest
    magnitude, r chosen to minimise that group's rounded output error on x (tokens, in)."""
    out_features, in_features = weight.shape
    num_groups = in_features // group_size
    step = max(1, x.shape[0] // CLIP_TOKENS)
    x = x[::step].reshape(-1, num_groups, group_size)  # (n, G, g)
    groups = weight.reshape(out_features, num_groups, group_size)  # (out, G, g)
    largest = groups.abs().amax(dim=-1, keepdim=True)  # (out, G, 1)
    best = largest.clone()
    best_error = torch.full(largest.shape, float("inf"))
    for step_index in range(CLIP_GRID // 2 + 1):
        bound = largest * (1 - step_index / CLIP_GRID)  # (out, G, 1)
        clipped = torch.maximum(torch.minimum(groups, bound), -bound)
        rounded = _rounded(clipped.reshape(out_features, in_features), group_size)
        delta = rounded.reshape(out_features, num_groups, group_size) - groups
        error = torch.einsum("ngk,ogk->nog", x, delta).pow(2).mean(dim=0)  # (out, G)
        better = error[..., None] < best_error
        best_error = torch.where(better, error[..., None], best_error)
        best = torch.where(better, bound, best)
    return torch.maximum(torch.minimum(groups, best), -best).reshape(weight.shape)


def apply_scales(tensors: dict[str, torch.Tensor], captured: dict[str, torch.Tensor],
                 num_layers: int, grouped_query: bool, group_size: int,
                 on_layer: Optional[Callable[[int], None]] = None, clip: bool = True) -> None:
    """Search and fold the scales of every layer into `tensors` (in place), then (`clip`)
    clip the rescaled weights."""

    def rescale(producer: str, rows: bool, consumers: list[str], x: torch.Tensor) -> None:
        weights = [tensors[f"{name}.weight"].float() for name in consumers]
        scales = best_scales(x, weights, group_size)  # (in,)
        for name, weight in zip(consumers, weights, strict=True):
            scaled = weight * scales  # (out, in)
            if clip and not name.endswith(("q_proj", "k_proj")):
                scaled = clip_weight(scaled, x / scales, group_size)
            tensors[f"{name}.weight"] = scaled
        if rows:  # a linear's output rows produce the input channels
            producer_weight = tensors[f"{producer}.weight"].float()
            tensors[f"{producer}.weight"] = producer_weight / scales[:, None]
            if f"{producer}.bias" in tensors:
                tensors[f"{producer}.bias"] = tensors[f"{producer}.bias"].float() / scales
        else:  # an RMSNorm's weight
            tensors[f"{producer}.weight"] = tensors[f"{producer}.weight"].float() / scales

    for index in range(num_layers):
        prefix = f"model.layers.{index}"
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        rescale(f"{prefix}.input_layernorm", False,
                [f"{attn}.q_proj", f"{attn}.k_proj", f"{attn}.v_proj"],
                captured[f"{attn}.q_proj"])
        if not grouped_query:
            rescale(f"{attn}.v_proj", True, [f"{attn}.o_proj"], captured[f"{attn}.o_proj"])
        rescale(f"{prefix}.post_attention_layernorm", False,
                [f"{mlp}.gate_proj", f"{mlp}.up_proj"], captured[f"{mlp}.gate_proj"])
        rescale(f"{mlp}.up_proj", True, [f"{mlp}.down_proj"], captured[f"{mlp}.down_proj"])
        if on_layer is not None:
            on_layer(index)
