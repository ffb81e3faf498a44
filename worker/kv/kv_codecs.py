"""The encoded KV caches by name (`kv_cache_dtype`): int8 codes with scale and zero
(int8_codec.py), fp8 e4m3 codes with a scale (fp8_codec.py). A cache tensor's dtype names
its codec: int8 for the first, uint8 for the second; any float dtype holds plain values."""

from __future__ import annotations

from types import ModuleType
from typing import Optional

import torch

from lmfleet.worker.kv import fp8_codec, int8_codec

CODECS = {"int8": int8_codec, "fp8": fp8_codec}
_BY_STORAGE = {torch.int8: int8_codec, torch.uint8: fp8_codec}


def storage_dtype(name: str) -> torch.dtype:
    return torch.int8 if name == "int8" else fp8_codec.STORAGE_DTYPE


def codec_of(cache: torch.Tensor) -> Optional[ModuleType]:
    """The codec a cache tensor is encoded with, None for plain values."""
    return _BY_STORAGE.get(cache.dtype)
