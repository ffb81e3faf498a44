"""How fast the GPU streams 4-bit weights in two layouts, with no arithmetic: the bound a
W4A16 decode kernel can reach on each (worker/quant/w4_layout.py).

Each program reads its BN columns' packed words one group (G / 8 int32 a column) at a
time and sums them; nothing else. "strided": a column's words contiguous, columns K / 8
words apart (so a group's step reads BN pieces of G / 2 bytes); "tiled": the BN columns'
words of one group stored as one contiguous block (the layout the kernels read since).
Timed as w4a16_kernels.py times its launches (a CUDA graph over 4 rotating copies, past
the L2), over block sizes, warps, pipeline stages and K splits.

  python3 benchmarks/w4_weight_stream.py --out OUT   (GPU) -> OUT/w4_weight_stream.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # benchmarks.*

from benchmarks import w4a16_kernels  # noqa: E402

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336), "qkv": (6144, 4096)}
WORDS = 16  # a group of 128 k: 16 int32 a column
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}


@triton.jit
def _stream_kernel(w_ptr, out_ptr, K8, groups_per_split, TILED: tl.constexpr,
                   BN: tl.constexpr, W: tl.constexpr, STAGES: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    cols = pid_n * BN + tl.arange(0, BN)  # (BN,)
    words = tl.arange(0, W)  # (W,)
    acc = tl.zeros((BN, W), dtype=tl.int32)
    first = pid_k * groups_per_split
    for group in tl.range(first, first + groups_per_split, num_stages=STAGES):
        if TILED:  # (N / BN, K8 / W, BN, W) blocks
            offsets = ((pid_n * (K8 // W) + group) * (BN * W)
                       + tl.arange(0, BN)[:, None] * W + words[None, :])  # (BN, W)
        else:  # (N, K8)
            offsets = cols[:, None] * K8 + group * W + words[None, :]  # (BN, W)
        acc += tl.load(w_ptr + offsets)
    tl.atomic_add(out_ptr + cols, tl.sum(acc, axis=1))


def time_us(n: int, k: int, tiled: bool, bn: int, warps: int, stages: int,
            splits: int) -> float:
    """One launch's time (w4a16_kernels.time_us: a CUDA graph over rotating copies)."""
    k8 = k // 8
    copies = [torch.randint(-2**31, 2**31 - 1, (n, k8), device="cuda", dtype=torch.int32)
              for _ in range(4)]
    out = torch.zeros(n, device="cuda", dtype=torch.int32)

    def launch(i: int):
        return lambda: _stream_kernel[(n // bn, splits)](
            copies[i], out, k8, k8 // WORDS // splits, TILED=tiled, BN=bn, W=WORDS,
            STAGES=stages, num_warps=warps)

    return w4a16_kernels.time_us(torch, launch, len(copies))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0)
    peak = next((v for key, v in PEAK_BYTES_PER_S.items() if key in device), None)
    result = {"benchmark": "w4_weight_stream", "device": device, "shapes": {}}
    for name, (n, k) in SHAPES.items():
        entry = {"n": n, "k": k, "floor_us": n * k / 2 / peak * 1e6 if peak else None}
        for tiled in (False, True):
            timings = []
            for bn, warps, stages, splits in itertools.product(
                    (64, 128, 256), (4, 8), (2, 3, 4), (1, 2, 4, 8)):
                if (not 100 <= n // bn * splits <= 132 * 16 or (k // 128) % splits
                        or (bn, warps) == (64, 8) or (bn, warps) == (256, 4)):
                    continue
                timings.append({"us": time_us(n, k, tiled, bn, warps, stages, splits),
                                "block_n": bn, "num_warps": warps, "num_stages": stages,
                                "splits": splits})
            entry["tiled" if tiled else "strided"] = sorted(timings, key=lambda t: t["us"])
        result["shapes"][name] = entry
        print(name, {layout: round(entry[layout][0]["us"], 1)
                     for layout in ("strided", "tiled")}, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "w4_weight_stream.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
