"""The served-path benchmark (benchmarks/gpu_router_path.py): its differences and table on
fabricated runs, and a whole run on the CPU with a tiny model (real engine, real serve)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_router_path import added, table

ROOT = Path(__file__).resolve().parents[2]


def run(target: str, concurrency: int, ttft: float, tpot: float, tok_s: float) -> dict:
    stats = {"mean": ttft, "p50": ttft - 1, "p99": ttft + 1}
    return {"target": target, "max_concurrency": concurrency, "num_succeeded": 4,
            "ttft_ms": stats, "tpot_ms": {"mean": tpot, "p50": tpot, "p99": tpot},
            "itl_ms": {"mean": tpot, "p50": tpot, "p99": tpot},
            "output_token_throughput": tok_s}


def test_added_is_each_served_setup_minus_the_engine_alone():
    runs = [run("offline", 1, 10.0, 6.0, 160.0), run("worker", 1, 12.0, 6.5, 150.0),
            run("router", 1, 15.0, 6.5, 140.0), run("router", 8, 30.0, 8.0, 900.0)]
    rows = added(runs)
    # C = 8 has no offline run: nothing to subtract from.
    assert [(r["target"], r["max_concurrency"]) for r in rows] == [("worker", 1), ("router", 1)]
    assert rows[1]["ttft_ms_mean_added"] == pytest.approx(5.0)
    assert rows[1]["tpot_ms_mean_added"] == pytest.approx(0.5)
    assert rows[0]["output_tok_s_ratio"] == pytest.approx(150 / 160)
    text = table({"runs": runs, "added": rows})
    assert "| router | 1 | +5.0 | +5.0 | +0.50 |" in text
    order = [text.index(f"| {row} |") for row in ("offline | 1", "worker | 1", "router | 8")]
    assert order == sorted(order)


@pytest.mark.integration
@pytest.mark.model
def test_a_cpu_run_measures_all_three_setups(tmp_path):
    from tests.conftest import make_tiny_model
    from tests.integration.test_served_text import add_metaspace_tokenizer

    model = make_tiny_model(tmp_path / "llama", "llama")
    add_metaspace_tokenizer(model)
    out = tmp_path / "out"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_router_path.py"), "--out",
                    str(out), "--model-dir", str(model), "--device", "cpu", "--dtype",
                    "float32", "--concurrencies", "1", "2", "--input-len", "8",
                    "--output-len", "3", "--min-requests", "2", "--num-requests-per-stream",
                    "1", "--token-id-low", "3", "--token-id-high", "500"],
                   check=True, timeout=600, stdout=subprocess.PIPE, text=True)
    result = json.loads((out / "gpu_router_path.json").read_text())
    assert result["errors"] == []
    runs = {(r["target"], r["max_concurrency"]): r for r in result["runs"]}
    assert set(runs) == {(t, c) for t in ("offline", "worker", "router") for c in (1, 2)}
    assert all(r["num_succeeded"] == r["num_requests"] == 2 for r in runs.values())
    assert all(r["total_output_tokens"] == 6 for r in runs.values())
    assert len(result["added"]) == 4
    assert (out / "gpu_router_path.png").stat().st_size > 0
