"""A checkpoint's weight quantization, as its config.json's `quantization_config` says."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

GGUF_BLOCK_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}


@dataclass(frozen=True)
class WeightQuantization:
    method: str  # "awq" | "gguf"
    bits: int
    group_size: int  # weights sharing one scale (32 for GGUF blocks)
    block_type: Optional[str] = None  # GGUF: "Q4_0", "Q4_1" or "Q8_0"

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Optional[WeightQuantization]:
        """None for an unquantized checkpoint; ValueError for one this engine cannot run."""
        quant = config.get("quantization_config")
        if not quant:
            return None
        method = str(quant.get("quant_method", "")).lower()
        if method == "gguf":
            block_type = quant.get("block_type")
            if block_type not in GGUF_BLOCK_BITS:
                raise ValueError(f"unsupported GGUF block type {block_type!r}; supported: "
                                 f"{', '.join(GGUF_BLOCK_BITS)}")
            return cls("gguf", GGUF_BLOCK_BITS[block_type], 32, block_type)
        if method != "awq":
            raise ValueError(f"unsupported quantization {method!r}; supported: awq (AutoAWQ "
                             "GEMM checkpoints), gguf (GGUF blocks kept packed)")
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
