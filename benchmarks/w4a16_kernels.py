"""The W4A16 kernels (worker/kernels/triton_w4a16.py) on the GPU: a sweep of launches over
the Llama-3-8B layer shapes and step sizes, beside the bf16 matmul and the 4-bit floor.

For each shape (N x K) and row count M it times every candidate launch of the paths that
apply (gemv for M <= 8, mma for M <= 16, tl.dot for 4 < M <= 1024, dequantize + matmul
for M >= 256), the bf16 torch.matmul of the same shape, and the floor: the 4-bit weight's
bytes at the GPU's peak memory bandwidth. Timing replays a CUDA graph of REPS calls, rotating over
enough weight copies (> 2 x L2) that each call reads its weight from HBM, as a decode
step reading 32 layers does. On Hopper the calls launch with programmatic dependent launch
as in the engine (worker/kernels/triton_pdl.py), so each starts loading while the one
before ends; LMFLEET_PDL=0 times them one after another, as the committed table was.

  python3 benchmarks/w4a16_kernels.py --out $OUT [--write-table] [--quick]
Writes OUT/w4a16_kernels.json and, with --write-table, the fastest launch per shape and M
into worker/kernels/w4a16_configs/<GPU>.json (what w4a16_matmul reads; entries of shapes
and M not measured are kept). The plot is made from the JSON by `--plot
OUT/w4a16_kernels.json PNG` (no GPU needed).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096),
          "down": (4096, 14336)}  # name -> (N, K) of Llama-3-8B
ROWS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
GROUP = 128
REPS = 16
PEAK_BYTES_PER_S = {"H100": 3.35e12, "H200": 4.8e12}  # HBM3 / HBM3e, SXM datasheets


def candidates(rows: int, quick: bool):
    from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch

    if rows <= 8:
        for bn, warps, pps, bk, stages in itertools.product(
                (64, 128, 256), (2, 4), (4, 8), (GROUP, 2 * GROUP), (1, 2)):
            if (2 + (stages > 1)) * bn * bk // 8 > 128 * 32 * warps:
                continue  # (BN, BK / 8) tiles (2, or 3 prefetching) over 128 registers a thread
            if not quick or (warps, pps, bk, stages) == (2, 8, GROUP, 1):
                yield W4A16Launch("gemv", bn, bk, warps, num_stages=stages,
                                  programs_per_sm=pps)
    if rows == 1:
        for bn, warps, stack, pps, stages in itertools.product((32, 64, 128), (4, 8), (2, 4),
                                                              (2, 4), (1, 3)):
            if bn * stack > 256 or (warps == 8 and bn * stack < 256):
                continue  # over 128 stacked 16-bit weights a thread, or 8 warps on too few
            if not quick or (bn, warps, stack, pps, stages) == (64, 4, 2, 4, 3):
                yield W4A16Launch("stack", bn, GROUP, warps, num_stages=stages,
                                  programs_per_sm=pps, stack=stack, prefetch=stages == 1)
    if rows <= 16:
        for bn, warps, pps, stages in itertools.product((64, 128, 256), (4, 8), (2, 4),
                                                        (1, 3, 4)):
            if not quick or (bn, warps, pps, stages) in ((64, 4, 4, 3), (64, 4, 4, 1)):
                # stages 1: the next group prefetched by hand, else by Triton's pipeliner
                yield W4A16Launch("mma", bn, GROUP, warps, num_stages=stages,
                                  programs_per_sm=pps, permute_x=True, prefetch=stages == 1)
        for bn, warps in ((64, 4), (256, 8)):  # x gathered in the tile's k order
            if not quick or bn == 64:
                yield W4A16Launch("mma", bn, GROUP, warps, num_stages=3, programs_per_sm=4)
        for bn, pps in itertools.product((64, 128, 256), (2, 4)):
            if not quick or (bn, pps) == (64, 4):
                yield W4A16Launch("mma", bn, GROUP, 4, num_stages=3, programs_per_sm=pps,
                                  permute_x=True, weights_16=True)
    elif rows <= 1024:
        for bn, warps, bm, stages in itertools.product((128, 256), (4, 8), (16, 32, 64, 128),
                                                        (1, 3, 4)):
            if bm > rows or bm * 8 < rows or bn * bm > 128 * 64 * warps // 4:
                continue  # tiles of a few rows over many, or over 64 fp32 sums a thread
            if not quick or ((warps, stages) == (8, 3) and (bn == 256 or bm == 128)):
                yield W4A16Launch("mma", bn, GROUP, warps, num_stages=stages, block_m=bm,
                                  permute_x=True, prefetch=stages == 1)
            if stages == 3 and warps == 8 and (not quick or bn == 256 or bm == 128):
                yield W4A16Launch("mma", bn, GROUP, warps, num_stages=stages, block_m=bm,
                                  permute_x=True, weights_16=True)
    if 4 < rows <= 1024:
        for bn, bk, warps, bm in itertools.product((64, 128), (64, 128), (4, 8), (0, 128)):
            if bm and rows < 256:
                continue
            if not quick or (bk, warps, bm) == (64, 4, 0):
                yield W4A16Launch("dot", bn, bk, warps, num_stages=3, block_m=bm)
    if rows >= 256:
        for bn, bk in itertools.product((128, 256), (32, 64)):
            if not quick or bk == 64:
                yield W4A16Launch("dequant", bn, bk, 4)


def time_us(torch, make_call, copies: int) -> float:
    """Mean time of one call, from a CUDA graph of REPS calls over rotating copies."""
    calls = [make_call(i % copies) for i in range(REPS)]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for call in calls[:copies]:
            call()  # compile and warm outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    graph.replay()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / (5 * REPS) * 1e6


def measure_shape(torch, n: int, k: int, rows_list: list[int], quick: bool,
                  peak: float | None, l2_bytes: int, on_entry,
                  paths: list[str] | None = None) -> dict:
    """Times every launch at each M; `on_entry(shape)` after each M (partial saves).
    `paths`: only launches of these paths, and the GPU's tabled launch (so a table written
    from this sweep keeps it where nothing timed here beats it)."""
    from lmfleet.worker.kernels.triton_w4a16 import w4a16_matmul
    from lmfleet.worker.kernels.w4a16_tuning import tuned_launch
    from lmfleet.worker.quant.w4_layout import COLUMN_TILE

    packed_bytes = k * n // 2 + 2 * (k // GROUP) * n * 2  # codes, bf16 zeros and scales
    copies = max(2, -(-4 * l2_bytes // packed_bytes))  # 4-bit copies past 2 x L2 twice
    gen = torch.Generator(device="cuda").manual_seed(0)
    tiles = (-(-n // COLUMN_TILE), k // GROUP, COLUMN_TILE, GROUP // 8)  # the GPU layout
    qweights = [torch.randint(-2**31, 2**31 - 1, tiles, device="cuda", dtype=torch.int32,
                              generator=gen) for _ in range(copies)]
    qzeros = [torch.randint(0, 16, (k // GROUP, n), device="cuda", generator=gen).to(
        torch.bfloat16) for _ in range(copies)]
    scales = [torch.rand(k // GROUP, n, device="cuda", dtype=torch.bfloat16,
                         generator=gen) / 64 for _ in range(copies)]
    dense_copies = max(2, -(-2 * l2_bytes // (k * n * 2)))
    dense = [torch.randn(k, n, device="cuda", dtype=torch.bfloat16, generator=gen)
             for _ in range(dense_copies)]
    shape = {"n": n, "k": k, "packed_bytes": packed_bytes,
             "floor_us": packed_bytes / peak * 1e6 if peak else None, "rows": {}}
    for rows in rows_list:
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16, generator=gen)

        def bf16_call(i, x=x):
            return lambda: x @ dense[i]

        entry = {"bf16_us": time_us(torch, bf16_call, dense_copies), "launches": []}
        launches = list(candidates(rows, quick))
        if paths:
            tabled = tuned_launch(x.device, rows, n, k, GROUP)
            launches = [launch for launch in launches if launch.path in paths]
            launches += [tabled] if tabled and tabled not in launches else []
        for launch in launches:
            def w4_call(i, x=x, launch=launch):
                return lambda: w4a16_matmul(x, qweights[i], qzeros[i], scales[i], GROUP,
                                            launch=launch)
            try:
                us = time_us(torch, w4_call, copies)
            except Exception as error:  # a launch that does not compile: recorded
                entry["launches"].append({**dataclasses.asdict(launch),
                                          "error": str(error)[:120]})
                continue
            entry["launches"].append({**dataclasses.asdict(launch), "us": us})
        timed = [launch for launch in entry["launches"] if "us" in launch]
        entry["best"] = min(timed, key=lambda launch: launch["us"])
        shape["rows"][str(rows)] = entry
        on_entry(shape)
        best = entry["best"]
        print(f"{n}x{k} M={rows}: bf16 {entry['bf16_us']:.1f} us, best {best['path']} "
              f"{best['us']:.1f} us ({best['block_n']}/{best['block_k']}/"
              f"{best['num_warps']}w/{best['programs_per_sm']}pps/bm{best['block_m']}), "
              f"floor {shape['floor_us'] or 0:.1f} us", flush=True)
    return shape


def sweep(args) -> dict:
    import torch

    device_name = torch.cuda.get_device_name()
    peak = next((bw for key, bw in PEAK_BYTES_PER_S.items() if key in device_name), None)
    l2_bytes = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 << 20)
    result = {"benchmark": "w4a16_kernels", "device": device_name,
              "capability": list(torch.cuda.get_device_capability()), "group_size": GROUP,
              "peak_bytes_per_s": peak, "torch": torch.__version__, "shapes": {}}
    for name in args.shapes:
        n, k = SHAPES[name]
        def keep(shape, name=name):  # partial results survive a timeout
            result["shapes"][name] = shape
            save(result, Path(args.out), args.write_table)

        measure_shape(torch, n, k, args.rows, args.quick, peak, l2_bytes, keep, args.paths)
        torch.cuda.empty_cache()
    return result


def save(result: dict, out: Path, write_table: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "w4a16_kernels.json").write_text(json.dumps(result, indent=1))
    if write_table:
        from lmfleet.worker.kernels.w4a16_tuning import table_path

        path = table_path(result["device"])
        path.parent.mkdir(parents=True, exist_ok=True)
        existing = json.loads(path.read_text()) if path.is_file() else None
        path.write_text(json.dumps(table(result, existing), indent=1) + "\n")
        (out / path.name).write_text(path.read_text())


def table(result: dict, existing: dict | None = None) -> dict:
    """The tuned-launch table w4a16_tuning.py reads: `existing` (the GPU's table, same
    group size) with the measured shapes and row counts replaced, so a sweep of a few row
    counts keeps the others."""
    from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch

    fields = {field.name for field in dataclasses.fields(W4A16Launch)}
    same = existing and existing.get("group_size") == result["group_size"]
    launches = {shape: dict(by_rows) for shape, by_rows in
                (existing["launches"].items() if same else ())}
    for shape in result["shapes"].values():
        name = f"{shape['n']}x{shape['k']}"
        by_rows = launches.get(name, {})
        for rows, entry in shape["rows"].items():
            by_rows[rows] = {key: value for key, value in entry["best"].items()
                             if key in fields}
        launches[name] = dict(sorted(by_rows.items(), key=lambda item: int(item[0])))
    capability = result.get("capability") or (existing or {}).get("capability")
    return {"device": result["device"], "capability": capability,
            "group_size": result["group_size"], "measured_by": "benchmarks/w4a16_kernels.py",
            "launches": launches}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = len(result["shapes"])
    figure, axes = plt.subplots(1, count, figsize=(4 * count, 3.6))
    for axis, (name, shape) in zip(axes, result["shapes"].items(), strict=True):
        entries = sorted(shape["rows"].items(), key=lambda item: int(item[0]))
        rows = [int(m) for m, _ in entries]
        axis.plot(rows, [e["bf16_us"] for _, e in entries], "o-", label="bf16 matmul")
        axis.plot(rows, [e["best"]["us"] for _, e in entries], "s-",
                  label="W4A16 (best launch)")
        if shape["floor_us"]:
            axis.axhline(shape["floor_us"], color="grey", ls="--", label="4-bit bytes / peak BW")
        axis.set(xscale="log", yscale="log", xlabel="rows M",
                 title=f"{name} {shape['n']}x{shape['k']}")
    axes[0].set_ylabel("µs per matmul")
    axes[0].legend(fontsize=7)
    figure.suptitle(f"W4A16 kernels vs bf16, group {result['group_size']}, {result['device']}")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--rows", type=lambda text: [int(m) for m in text.split(",")],
                        default=list(ROWS))
    parser.add_argument("--shapes", type=lambda text: text.split(","), default=list(SHAPES),
                        help=f"layer shapes to sweep, of {','.join(SHAPES)}")
    parser.add_argument("--quick", action="store_true", help="a few launches per path")
    parser.add_argument("--paths", type=lambda text: text.split(","), default=None,
                        help="only these paths' launches, beside the GPU's tabled one")
    parser.add_argument("--write-table", action="store_true")
    parser.add_argument("--plot", nargs=2, metavar=("JSON", "PNG"))
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu_throughput import ensure_lmfleet_importable

    ensure_lmfleet_importable()
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return
    if not args.out:
        parser.error("--out is needed for a sweep")
    if set(args.shapes) - set(SHAPES):
        parser.error(f"unknown shapes {sorted(set(args.shapes) - set(SHAPES))}")
    sweep(args)


if __name__ == "__main__":
    main()
