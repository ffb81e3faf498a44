"""Machine-code cost of the W4A16 decode kernels, counted without a GPU: each kernel is
compiled for sm_90 (Hopper) by Triton's bundled ptxas, disassembled with its nvdisasm, and
the instructions of its main loop (one step of K) are counted by kind and divided by the
weights a thread handles in that step.

The decode kernels are bound by instruction issue as much as by memory (an Nsight Compute
profile of the gemv kernel on an H100 showed half the DRAM bandwidth and half the SMs'
compute throughput in use), so instructions a weight is the number to cut between GPU
runs.

  python3 benchmarks/w4a16_sass.py --out benchmarks/results/w4a16_sass.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GROUP = 128
# (kernel, BLOCK_N, num_warps, GROUPS a step (stack: groups stacked), BLOCK_M, options): the
# configurations the H100 sweep picked, and the mma kernel's row tiles; options "p" permutes
# x in registers, "w" scales the weights in 16 bits (SCALE_16)
CONFIGS = [("gemv", 128, 2, 1, 1, ""), ("gemv", 256, 4, 1, 1, ""), ("gemv", 128, 4, 2, 1, ""),
           ("mma", 256, 8, 1, 16, ""), ("mma", 64, 4, 1, 16, "p"), ("mma", 64, 4, 1, 16, "pw"),
           ("mma", 128, 8, 1, 16, "p"), ("mma", 256, 8, 1, 16, "p"),
           ("mma", 128, 8, 1, 32, "p"), ("mma", 256, 8, 1, 64, "p"),
           ("mma", 256, 8, 1, 64, "pw"), ("mma", 128, 8, 1, 128, "p"),
           ("stack", 64, 4, 2, 1, ""), ("stack", 128, 4, 2, 1, ""), ("stack", 32, 4, 4, 1, "")]
POINTERS = {"x_ptr": "*bf16", "w_ptr": "*i32", "zeros_ptr": "*bf16", "scales_ptr": "*bf16",
            "partial_ptr": "*fp32", "out_ptr": "*bf16", "counter_ptr": "*i32"}


def compile_kernel(kind: str, block_n: int, warps: int, groups: int, block_m: int,
                   options: str):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lmfleet.worker.kernels import triton_w4a16, triton_w4a16_mma, triton_w4a16_stack
    from lmfleet.worker.quant.w4_layout import COLUMN_TILE

    if kind == "stack":
        fn = triton_w4a16_stack.w4a16_stack_kernel
        constants = {"GROUP": GROUP, "TILE": COLUMN_TILE, "BLOCK_N": block_n, "STACK": groups,
                     "OFFSET": 128.0, "SPLIT_K": True, "PREFETCH": False, "PDL": False}
    elif kind == "gemv":
        fn = triton_w4a16._w4a16_gemv_kernel
        constants = {"GROUP": GROUP, "TILE": COLUMN_TILE, "GROUPS": groups,
                     "BLOCK_N": block_n, "PREFETCH": False, "SPLIT_K": True,
                     "PDL": False}
    else:
        fn = triton_w4a16_mma.w4a16_mma_kernel
        constants = {"GROUP": GROUP, "TILE": COLUMN_TILE, "BLOCK_N": block_n,
                     "BLOCK_M": block_m,
                     "OFFSET": 128.0, "SPLIT_K": True,
                     "PERMUTE_X": "p" in options, "PREFETCH": False,
                     "SCALE_16": "w" in options, "PDL": False}
    signature = {name: POINTERS.get(name, "constexpr" if name in constants else "i32")
                 for name in fn.arg_names}
    aligned = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
               if name in POINTERS or name.startswith("stride") or name in ("N", "K")}
    return triton.compile(ASTSource(fn, signature, constants, aligned),
                          target=GPUTarget("cuda", 90, 32),
                          options={"num_warps": warps, "num_stages": 2})


def loop_counts(sass: str) -> collections.Counter:
    """Instructions by kind in the longest backward branch's body: the main loop."""
    lines = sass.splitlines()
    labels = {line[:-1]: i for i, line in enumerate(lines) if re.match(r"\.L_x_\d+:$", line)}
    start, end = 0, -1
    for i, line in enumerate(lines):
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        first = labels.get(target.group(1), i) if target else i
        if first < i and i - first > end - start:
            start, end = first, i
    counts = collections.Counter()
    for line in lines[start:end + 1]:
        op = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", line)
        if op:
            counts[op.group(1)] += 1
    return counts


def measure(kind: str, block_n: int, warps: int, groups: int, block_m: int,
            options: str) -> dict:
    import triton

    compiled = compile_kernel(kind, block_n, warps, groups, block_m, options)
    tools = Path(triton.__path__[0]) / "backends" / "nvidia" / "bin"
    with tempfile.TemporaryDirectory() as folder:
        cubin = Path(folder) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([tools / "cuobjdump", "--dump-resource-usage", cubin],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tools / "nvdisasm", "-c", cubin], capture_output=True,
                              text=True, check=True).stdout
    counts = loop_counts(sass)
    weights_a_thread = block_n * GROUP * groups // (warps * 32)
    return {"kernel": kind, "block_n": block_n, "num_warps": warps, "groups_a_step": groups,
            "block_m": block_m, "permute_x": "p" in options, "weights_16": "w" in options,
            "spills": int(re.search(r"STACK:(\d+)", usage).group(1)),
            "registers": int(re.search(r"REG:(\d+)", usage).group(1)),
            "loop_instructions": sum(counts.values()),
            "instructions_a_weight": round(sum(counts.values()) / weights_a_thread, 2),
            "instructions_a_weight_row": round(
                sum(counts.values()) / weights_a_thread / block_m, 3),
            "by_kind": dict(counts.most_common(12))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the results here as JSON")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_throughput import ensure_lmfleet_importable

    ensure_lmfleet_importable()
    import triton

    rows = [measure(*config) for config in CONFIGS]
    for row in rows:
        print(f"{row['kernel']:5} BN {row['block_n']:3} BM {row['block_m']:3} "
              f"{row['num_warps']}w {row['groups_a_step']} group(s)/step"
              f"{' x permuted' if row['permute_x'] else ''}"
              f"{' 16-bit weights' if row['weights_16'] else ''}: {row['registers']} registers, "
              f"{row['spills']} B stack, {row['instructions_a_weight']} instructions a weight,"
              f" {row['instructions_a_weight_row']} a weight-row", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(
            {"benchmark": "w4a16_sass", "target": "sm_90", "triton": triton.__version__,
             "group_size": GROUP, "activations": "bfloat16", "kernels": rows},
            indent=1) + "\n")


if __name__ == "__main__":
    main()
