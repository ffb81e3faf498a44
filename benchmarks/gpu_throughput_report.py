"""Summary, table, JSON and plot of a GPU throughput result (benchmarks/gpu_throughput.py).

Pure functions over the result dict, so they can be tested without a GPU:
  - `peer_records(path)`: the last record of each step in a peer benchmark's results.jsonl;
  - `weights_bytes(model_dir)`: tensor bytes from the safetensors headers (no torch);
  - `summarize(result)`: fills "lmfleet", "lmdeploy", "ceilings", "floors" and "ratios"
    from result["variants"], result["peer_records"] and result["model"];
  - `table(result)`: the markdown table printed last; `plot(result, path)`: the PNG;
  - `parse_options(["key=value", ...])`: engine options, values as int/float/bool/None/str.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Optional


def parse_value(text: str):
    low = text.strip().lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items: list[str]) -> dict:
    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise SystemExit(f"--option expects key=value, got {item!r}")
        options[key.strip()] = parse_value(value)
    return options


def peer_records(path: Path) -> dict[str, dict]:
    """step name -> its last JSON line (a later run of a step replaces an earlier one)."""
    records: dict[str, dict] = {}
    if not Path(path).is_file():
        return records
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if line:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            records[record.get("step", "?")] = record
    return records


def weights_bytes(model_dir: Path) -> dict:
    """Bytes of every tensor in the directory's *.safetensors files, from their headers.

    "decode_step_bytes" is what a batch-1 decode step must read: everything except the
    input embedding table when the output head has its own weights (tie_word_embeddings
    false), since a step reads one row of that table; with tied embeddings the head reads
    the whole table every step, so nothing is subtracted. (The KV cache read at batch 1,
    <= 384 positions of Test B, is ~50 MB for the 8B shape, 0.3%: left out.)
    """
    model_dir = Path(model_dir)
    total = embed = 0
    for path in sorted(model_dir.glob("*.safetensors")):
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(length))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            size = info["data_offsets"][1] - info["data_offsets"][0]
            total += size
            if name.endswith("embed_tokens.weight"):
                embed += size
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tied = bool(config.get("tie_word_embeddings", False))
    return {"total_bytes": total, "embed_tokens_bytes": embed, "tie_word_embeddings": tied,
            "decode_step_bytes": total if tied else total - embed}


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    if a is None or b is None or not b:
        return None
    return a / b


def lmdeploy_summary(records: dict[str, dict]) -> dict:
    a, b = records.get("lmdeploy-A", {}), records.get("lmdeploy-B", {})
    return {"test_a_out_tok_s": a.get("out_tok_s"), "test_a_total_tok_s": a.get("total_tok_s"),
            "test_a_wall_s": a.get("wall_s"), "test_b_tpot_ms": b.get("tpot_ms"),
            "test_b_ttft_ms": b.get("ttft_ms"), "startup_s": b.get("startup_s"),
            "version": b.get("lmdeploy")}


def variant_ratios(v: dict, lmdeploy: dict, floor_ms: Optional[float]) -> dict:
    """Test A: lmfleet/LMDeploy tok/s (> 1: lmfleet faster); TPOT: lmfleet/LMDeploy and
    lmfleet/floor (> 1: lmfleet slower; the floor ratio is >= 1 when measurements hold)."""
    return {
        "test_a_out_tok_s_vs_lmdeploy": _ratio(v.get("test_a_out_tok_s"),
                                               lmdeploy.get("test_a_out_tok_s")),
        "test_b_tpot_vs_lmdeploy": _ratio(v.get("test_b_tpot_ms"), lmdeploy.get("test_b_tpot_ms")),
        "test_b_tpot_vs_floor": _ratio(v.get("test_b_tpot_ms"), floor_ms),
        "startup_vs_lmdeploy": _ratio(v.get("startup_s"), lmdeploy.get("startup_s")),
    }


def summarize(result: dict) -> dict:
    """Fill the headline sections of `result` (in place, and returned)."""
    records = result.get("peer_records", {})
    ceil = records.get("ceilings", {})
    result["ceilings"] = {"copy_TBps": ceil.get("copy_TBps"),
                          "matmul_TFLOPs": ceil.get("matmul_TFLOPs")}
    if ceil.get("device") and not result.get("device"):
        result["device"] = ceil["device"]
    lmdeploy = result["lmdeploy"] = lmdeploy_summary(records)
    model = result.get("model") or {}
    copy = result["ceilings"]["copy_TBps"]
    floor_ms = floor_all_ms = None
    if copy and model.get("decode_step_bytes"):
        # A decode step reads each weight once: bytes / copy bandwidth (read + write counted,
        # as the peer benchmark's own floor does).
        floor_ms = model["decode_step_bytes"] / (copy * 1e12) * 1e3
        floor_all_ms = model["total_bytes"] / (copy * 1e12) * 1e3
    result["floors"] = {"test_b_tpot_ms": floor_ms, "test_b_tpot_ms_all_weights": floor_all_ms,
                        "weights_bytes": model.get("decode_step_bytes")}
    variants = result.get("variants", {})
    name = "default" if "default" in variants else next(iter(variants), None)
    lmfleet = variants.get(name, {}) if name else {}
    result["lmfleet"] = {key: lmfleet.get(key) for key in (
        "test_a_out_tok_s", "test_a_total_tok_s", "test_a_wall_s", "test_b_tpot_ms",
        "test_b_ttft_ms", "startup_s")}
    result["lmfleet"]["variant"] = name
    result["ratios"] = variant_ratios(lmfleet, lmdeploy, floor_ms)
    result["ratios"]["lmdeploy_test_b_tpot_vs_floor"] = _ratio(lmdeploy.get("test_b_tpot_ms"),
                                                               floor_ms)
    result["ratios"]["by_variant"] = {n: variant_ratios(v, lmdeploy, floor_ms)
                                      for n, v in variants.items()}
    return result


def _fmt(value: Optional[float], digits: int = 1, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}{suffix}"


def _rows(result: dict) -> list[tuple[str, dict]]:
    rows = []
    if any(v is not None for k, v in result.get("lmdeploy", {}).items() if k != "version"):
        rows.append(("LMDeploy", result["lmdeploy"]))
    for name, v in result.get("variants", {}).items():
        label = f"lmfleet {name}"
        if v.get("test_a_reduced"):
            label += f" (A: {v.get('test_a_requests')} req)"
        rows.append((label, v))
    return rows


def table(result: dict) -> str:
    floor = result.get("floors", {}).get("test_b_tpot_ms")
    lmdeploy = result.get("lmdeploy", {})
    lines = ["| engine | Test A out tok/s | total tok/s | Test B TPOT ms | TTFT ms | startup s "
             "| A vs LMDeploy | TPOT vs LMDeploy | TPOT vs floor |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for label, v in _rows(result):
        r = variant_ratios(v, lmdeploy, floor)
        lines.append(
            f"| {label} | {_fmt(v.get('test_a_out_tok_s'), 0)} | "
            f"{_fmt(v.get('test_a_total_tok_s'), 0)} | {_fmt(v.get('test_b_tpot_ms'), 2)} | "
            f"{_fmt(v.get('test_b_ttft_ms'), 1)} | {_fmt(v.get('startup_s'), 1)} | "
            f"{_fmt(r['test_a_out_tok_s_vs_lmdeploy'], 2, 'x')} | "
            f"{_fmt(r['test_b_tpot_vs_lmdeploy'], 2, 'x')} | "
            f"{_fmt(r['test_b_tpot_vs_floor'], 2, 'x')} |")
        if v.get("error"):
            lines.append(f"|   ↳ error: {str(v['error']).splitlines()[-1][:120]} "
                         "| | | | | | | | |")
    lines.append(f"| floor (weights / copy bandwidth) | | | {_fmt(floor, 2)} | | | | | |")
    ceil = result.get("ceilings", {})
    weights = result.get("floors", {}).get("weights_bytes")
    lines.append("")
    lines.append(f"device: {result.get('device', '?')}; copy {_fmt(ceil.get('copy_TBps'), 2)} "
                 f"TB/s, bf16 matmul {_fmt(ceil.get('matmul_TFLOPs'), 0)} TFLOP/s; weights "
                 f"read per decode step {_fmt(weights / 1e9 if weights else None, 3)} GB")
    for error in result.get("errors", []):
        lines.append(f"error in {error['step']}: {str(error['error']).splitlines()[-1][:160]}")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _rows(result)
    labels = [label.replace(" (", "\n(") for label, _ in rows]
    colors = ["#888" if label == "LMDeploy" else "#2a7" for label, _ in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for ax, key, title, unit in (
            (axes[0], "test_a_out_tok_s", "Test A: 256 x (512 -> 256 tokens), greedy",
             "output tokens / s"),
            (axes[1], "test_b_tpot_ms", "Test B: batch 1, 128 -> 256 tokens", "TPOT, ms")):
        values = [v.get(key) for _, v in rows]
        heights = [x if x is not None else 0.0 for x in values]
        bars = ax.bar(range(len(rows)), heights, color=colors)
        for bar, value in zip(bars, values, strict=True):
            ax.annotate("n/a" if value is None else f"{value:.0f}" if value >= 100
                        else f"{value:.2f}", (bar.get_x() + bar.get_width() / 2,
                                              bar.get_height()), ha="center", va="bottom")
        ax.set_xticks(range(len(rows)), labels, fontsize=8)
        ax.set_ylabel(unit)
        ax.set_title(title)
    floor = result.get("floors", {}).get("test_b_tpot_ms")
    if floor:
        axes[1].axhline(floor, color="#c44", linestyle="--",
                        label=f"floor: weights / copy bandwidth = {floor:.2f} ms")
        axes[1].legend(loc="upper left", fontsize=8)
    config = result.get("config", {})
    fig.suptitle(f"{result.get('device', '?')}, {config.get('model', '')}"
                 + (" (smoke run: shrunk workload)" if config.get("smoke") else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_json(result: dict, out: Path, name: str = "gpu_throughput") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path
