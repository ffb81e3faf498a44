"""The GPU throughput benchmark's report logic on a fabricated result: floor, ratios,
headline sections, table and JSON (benchmarks/gpu_throughput_report.py); no GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from benchmarks import gpu_throughput_report as report
from benchmarks.gpu_throughput import A_IN, A_N, B_IN, prompts

ROOT = Path(__file__).resolve().parents[2]
GB = 1e9


def fabricated(with_peers: bool = True) -> dict:
    records = {
        "ceilings": {"step": "ceilings", "device": "NVIDIA H100 80GB HBM3", "copy_TBps": 3.0,
                     "matmul_TFLOPs": 780.0},
        "lmdeploy-A": {"step": "lmdeploy-A", "out_tok_s": 9000.0, "total_tok_s": 27000.0,
                       "wall_s": 7.3},
        "lmdeploy-B": {"step": "lmdeploy-B", "tpot_ms": 6.35, "ttft_ms": 30.0,
                       "startup_s": 40.0, "lmdeploy": "0.18.0"},
    } if with_peers else {}
    return {
        "device": None,
        "peer_records": records,
        "model": {"total_bytes": 16.06 * GB, "embed_tokens_bytes": 1.05 * GB,
                  "tie_word_embeddings": False, "decode_step_bytes": 15.01 * GB},
        "variants": {
            "default": {"test_a_out_tok_s": 4500.0, "test_a_total_tok_s": 13500.0,
                        "test_b_tpot_ms": 10.0, "test_b_ttft_ms": 40.0, "startup_s": 30.0},
            "torch": {"test_a_out_tok_s": 900.0, "test_a_requests": 64, "test_a_reduced": True,
                      "error": "Traceback ...\nRuntimeError: boom"},
        },
        "errors": [{"step": "peers/hf", "error": "no hf-A record"}],
    }


def test_floor_ratios_and_headline_sections():
    result = report.summarize(fabricated())
    floor = 15.01 * GB / 3.0e12 * 1e3
    assert result["floors"]["test_b_tpot_ms"] == pytest.approx(floor)  # 5.00 ms
    assert result["floors"]["test_b_tpot_ms_all_weights"] == pytest.approx(16.06 / 3.0)
    assert result["device"] == "NVIDIA H100 80GB HBM3"
    assert result["ceilings"] == {"copy_TBps": 3.0, "matmul_TFLOPs": 780.0}
    assert result["lmdeploy"]["test_a_out_tok_s"] == 9000.0
    assert result["lmdeploy"]["test_b_tpot_ms"] == 6.35
    assert result["lmdeploy"]["startup_s"] == 40.0
    assert result["lmfleet"]["variant"] == "default"
    assert result["lmfleet"]["test_a_out_tok_s"] == 4500.0
    ratios = result["ratios"]
    assert ratios["test_a_out_tok_s_vs_lmdeploy"] == pytest.approx(0.5)
    assert ratios["test_b_tpot_vs_lmdeploy"] == pytest.approx(10.0 / 6.35)
    assert ratios["test_b_tpot_vs_floor"] == pytest.approx(10.0 / floor)
    assert ratios["lmdeploy_test_b_tpot_vs_floor"] == pytest.approx(6.35 / floor)
    assert ratios["startup_vs_lmdeploy"] == pytest.approx(0.75)
    assert ratios["by_variant"]["torch"]["test_a_out_tok_s_vs_lmdeploy"] == pytest.approx(0.1)
    assert ratios["by_variant"]["torch"]["test_b_tpot_vs_floor"] is None


def test_missing_peers_give_none_not_errors_and_first_variant_stands_in():
    result = fabricated(with_peers=False)
    del result["variants"]["default"]
    result = report.summarize(result)
    assert result["floors"]["test_b_tpot_ms"] is None
    assert result["lmfleet"]["variant"] == "torch"
    assert result["ratios"]["test_a_out_tok_s_vs_lmdeploy"] is None
    text = report.table(result)
    assert "| LMDeploy |" not in text and "| lmfleet torch (A: 64 req) | 900 | n/a" in text


def test_table_rows_and_errors():
    text = report.table(report.summarize(fabricated()))
    lines = text.splitlines()
    assert lines[0].startswith("| engine |") and lines[1].startswith("| --- |")
    rows = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ")}
    assert "0.50x" in rows["lmfleet default"] and "10.00" in rows["lmfleet default"]
    assert "9,000" in rows["LMDeploy"]
    assert "lmfleet torch (A: 64 req)" in rows
    assert "RuntimeError: boom" in text
    assert "5.00" in rows["floor (weights / copy bandwidth)"]
    assert "error in peers/hf" in lines[-1]


def test_json_has_the_headline_keys(tmp_path):
    path = report.write_json(report.summarize(fabricated()), tmp_path)
    data = json.loads(path.read_text())
    assert {"device", "lmfleet", "lmdeploy", "ceilings", "floors", "variants",
            "ratios"} <= set(data)
    for section in ("lmfleet", "lmdeploy"):
        assert {"test_a_out_tok_s", "test_b_tpot_ms", "startup_s"} <= set(data[section])
    assert {"copy_TBps", "matmul_TFLOPs"} <= set(data["ceilings"])


def test_weights_bytes_subtracts_an_untied_embedding(tmp_path):
    save_file({"model.embed_tokens.weight": torch.zeros(100, 8, dtype=torch.bfloat16),
               "lm_head.weight": torch.zeros(100, 8, dtype=torch.bfloat16),
               "model.norm.weight": torch.ones(8, dtype=torch.float32)},
              str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": False}))
    w = report.weights_bytes(tmp_path)
    assert (w["total_bytes"], w["embed_tokens_bytes"]) == (2 * 1600 + 32, 1600)
    assert w["decode_step_bytes"] == 1600 + 32
    (tmp_path / "config.json").write_text(json.dumps({"tie_word_embeddings": True}))
    assert report.weights_bytes(tmp_path)["decode_step_bytes"] == 2 * 1600 + 32


def test_peer_records_keep_the_last_of_each_step(tmp_path):
    path = tmp_path / "results.jsonl"
    path.write_text('{"step": "ceilings", "copy_TBps": 1}\nnot json\n'
                    '{"step": "ceilings", "copy_TBps": 2}\n')
    assert report.peer_records(path) == {"ceilings": {"step": "ceilings", "copy_TBps": 2}}
    assert report.peer_records(tmp_path / "absent.jsonl") == {}


def test_prompts_options_and_help():
    a, b = prompts()
    assert a.shape == (A_N, A_IN) and b.shape == (1, B_IN)
    assert report.parse_options(["enforce_eager=true", "max_num_seqs=32", "x=0.5", "b=triton"]) == {
        "enforce_eager": True, "max_num_seqs": 32, "x": 0.5, "b": "triton"}
    help_text = subprocess.run([sys.executable, str(ROOT / "benchmarks/gpu_throughput.py"),
                                "--help"], capture_output=True, text=True, check=True).stdout
    assert "--peer-bench" in help_text and "--variants" in help_text
