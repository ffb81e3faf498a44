"""A LLaVA checkpoint's image path: pixels -> vision tower -> the projector's rows, one per
image position of the prompt, in the language model's hidden size.

LLaVA reads the tower's hidden states at `vision_feature_layer` (one index, or several whose
rows are concatenated), drops the first row under the "default" selection strategy, and maps
them through a two-layer MLP. The image processor is the checkpoint's own (transformers'
AutoImageProcessor, local files only).
"""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from lmfleet.worker.model.arch import UnsupportedModelError
from lmfleet.worker.model.vision.vision_info import ImageError
from lmfleet.worker.model.vision.vision_tower import VisionTower, VisionTowerConfig, activation


class Projector(nn.Module):
    def __init__(self, in_features: int, hidden_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.linear_1 = nn.Linear(in_features, hidden_size, bias=bias)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class LlavaVision(nn.Module):
    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        tower = VisionTowerConfig.from_dict(config["vision_config"])
        layers = config.get("vision_feature_layer", -2)
        layers = [layers] if isinstance(layers, int) else list(layers)
        # transformers indexes hidden_states: [input, layer 1 output, ..., layer L output].
        self.feature_layers = [i if i >= 0 else tower.num_layers + 1 + i for i in layers]
        if not all(0 <= i <= tower.num_layers for i in self.feature_layers):
            raise UnsupportedModelError(f"vision_feature_layer {layers} is outside the "
                                        f"{tower.num_layers}-layer vision tower")
        self.drop_first_row = config.get("vision_feature_select_strategy",
                                         "default") == "default"
        self.vision_tower = VisionTower(tower, max(self.feature_layers))
        text_hidden = config["text_config"]["hidden_size"]
        self.multi_modal_projector = Projector(
            tower.hidden_size * len(self.feature_layers), text_hidden,
            config.get("projector_hidden_act", "gelu"),
            config.get("multimodal_projector_bias", True))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels (B, C, S, S) -> (B, tokens_per_image, H) prompt rows."""
        states = self.vision_tower.hidden_states(pixels)
        features = torch.cat([states[i] for i in self.feature_layers], dim=-1)  # (B, N, Hv*k)
        if self.drop_first_row:
            features = features[:, 1:]
        return self.multi_modal_projector(features)


def vision_weight_name(name: str) -> str | None:
    """A checkpoint name -> this module's parameter name, None if not the image path's.
    Both layouts occur: `vision_tower.vision_model.*` (llava-hf) and `model.vision_tower.*`
    (transformers >= 4.52)."""
    if name.startswith("model."):
        name = name[len("model."):]
    if name.startswith("vision_tower."):
        rest = name[len("vision_tower."):]
        if rest.startswith("vision_model."):
            rest = rest[len("vision_model."):]
        return "vision_tower." + rest
    if name.startswith("multi_modal_projector."):
        return name
    return None


def load_llava_vision(model_dir: Path, files: Sequence[Path], dtype: torch.dtype,
                      device: torch.device) -> LlavaVision:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    with torch.device("meta"):
        module = LlavaVision(config)
    module = module.to_empty(device=device).to(dtype)
    params = dict(module.named_parameters())
    loaded: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as checkpoint:
            for name in checkpoint.keys():
                target = vision_weight_name(name)
                if target is None or target not in params:
                    continue  # the language model's, or tower parts LLaVA never reads
                param = params[target]
                tensor = checkpoint.get_tensor(name)
                if tensor.shape != param.shape:
                    raise UnsupportedModelError(f"weight {name!r} has shape "
                                                f"{tuple(tensor.shape)}, expected "
                                                f"{tuple(param.shape)}")
                with torch.no_grad():
                    param.copy_(tensor.to(dtype))
                loaded.add(target)
    missing = sorted(set(params) - loaded)
    if missing:
        raise UnsupportedModelError(f"checkpoint in {model_dir} lacks weights: {missing[:5]}")
    return module.eval()


class ImageProcessor:
    """Encoded image bytes -> the checkpoint processor's pixel tensor (B, C, S, S)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoImageProcessor

        try:
            self.processor = AutoImageProcessor.from_pretrained(str(model_dir),
                                                                local_files_only=True)
        except (OSError, ValueError) as error:
            raise UnsupportedModelError(f"no usable image processor in {model_dir}: "
                                        f"{error}") from None

    def __call__(self, images: Sequence[bytes]) -> torch.Tensor:
        from PIL import Image

        decoded = []
        for index, data in enumerate(images):
            try:
                decoded.append(Image.open(io.BytesIO(data)).convert("RGB"))
            except (OSError, ValueError) as error:
                raise ImageError(f"image {index}: not a readable image ({error})") from None
        return self.processor(images=decoded, return_tensors="pt")["pixel_values"]
