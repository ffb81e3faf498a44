"""Rounding to the model dtype inside the fused Triton kernels, shared by triton_rms_norm,
triton_rotary and triton_activation; plus the input checks their wrappers share.

The kernels compute in float32 and round every intermediate that torch would store in the
model dtype, in torch's order, so their results match the eager torch path bit for bit
where torch's own op is exactly rounded. `round_to` is that rounding: round to nearest
even, as torch's casts and 16-bit arithmetic do.

Why not always `x.to(dtype)`: on the GPU that cast is round-to-nearest-even (cvt.rn), but
Triton's interpreter (TRITON_INTERPRET=1, the CPU tests) truncates float32 -> bfloat16.
Under the interpreter bfloat16 is therefore rounded here by integer arithmetic on the
float32 bits, which gives the same bits as the GPU's cvt.rn; compiled kernels keep the
native cast (SOFT_BF16 is a compile-time flag, False on the GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Read once, when this module is imported, like triton.jit reads it for the kernels.
INTERPRET = bool(triton.knobs.runtime.interpret)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def soft_bf16(dtype: torch.dtype) -> bool:
    """Whether kernels writing `dtype` must round it by hand (bfloat16 under the interpreter)."""
    return INTERPRET and dtype == torch.bfloat16


def check_device(*tensors: torch.Tensor) -> None:
    """ValueError unless all tensors are on one device the kernels can run on."""
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(f"tensors must be on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if device.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton kernels need CUDA tensors (or TRITON_INTERPRET=1), got {device}")


def check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {tensor.dtype}")


@triton.jit
def round_to(x, like_ptr, SOFT_BF16: tl.constexpr):
    """float32 x -> the element type of `like_ptr`, rounded to nearest even."""
    if SOFT_BF16:
        bits = x.to(tl.uint32, bitcast=True)
        # Add just under half an ulp of bfloat16, plus one when the kept part is odd (ties
        # to even), then drop the low 16 bits; overflow carries into the exponent (-> inf).
        rounded = (bits + (0x7FFF + ((bits >> 16) & 1))) >> 16
        rounded = tl.where(x != x, (bits >> 16) | 0x40, rounded)  # NaN stays a quiet NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(like_ptr.dtype.element_ty)


@triton.jit
def rounded(x, like_ptr, SOFT_BF16: tl.constexpr):
    """float32 x rounded to the element type of `like_ptr`, back in float32 (exact)."""
    return round_to(x, like_ptr, SOFT_BF16).to(tl.float32)
