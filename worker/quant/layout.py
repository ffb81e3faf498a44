"""How a linear layer's stored parameter maps onto its features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class ParamLayout:
    """Which axes of a stored parameter are the layer's output and input features, and
    how many output features one stored element along the output axis covers (tensor
    parallelism shards each axis in stored elements)."""

    out_dim: int
    in_dim: Optional[int]  # None: a bias
    out_pack: int = 1
