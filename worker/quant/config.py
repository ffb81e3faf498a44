"""A checkpoint's weight quantization, as its config.json's `quantization_config` says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional


@dataclass(frozen=True)
class WeightQuantization:
    method: str  # "awq"
    bits: int
    group_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Optional[WeightQuantization]:
        """None for an unquantized checkpoint; ValueError for one this engine cannot run."""
        quant = config.get("quantization_config")
        if not quant:
            return None
        method = str(quant.get("quant_method", "")).lower()
        if method != "awq":
            raise ValueError(f"unsupported quantization {method!r}; supported: awq (AutoAWQ "
                             "GEMM checkpoints)")
        bits = quant.get("bits", quant.get("w_bit"))
        group_size = quant.get("group_size", quant.get("q_group_size"))
        version = str(quant.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not quant.get("zero_point", True):
            raise ValueError(f"unsupported AWQ checkpoint (bits={bits}, version={version!r}, "
                             f"zero_point={quant.get('zero_point')}); supported: 4-bit GEMM "
                             "with zero points")
        if not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"invalid AWQ group_size {group_size!r}")
        return cls("awq", bits, group_size)
