"""`lmfleet bench` against a real `lmfleet serve`: a tiny run writes the documented JSON
fields with sane values, and a PNG."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from benchmarks.online import Workload, make_requests
from tests.integration.serve_process import WORKER_TOKEN, start_serve

WORKLOAD = ["--num-requests", "8", "--input-len-mean", "16", "--input-len-range", "4",
            "--output-len-mean", "6", "--output-len-range", "2", "--seed", "3"]
LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms")


@pytest.fixture(scope="module")
def serve():
    with start_serve(["--num-kv-blocks", "256"]) as process:
        yield process


def _bench(*args: str) -> subprocess.CompletedProcess:
    # The token of serve's replicas, for runs that call a worker directly (--grpc).
    return subprocess.run([sys.executable, "-m", "lmfleet.cli", "bench", *args],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "LMFLEET_WORKER_TOKEN": WORKER_TOKEN})


def _expected_output_tokens() -> int:
    workload = Workload(num_requests=8, input_len_mean=16, input_len_range=4,
                        output_len_mean=6, output_len_range=2, seed=3)
    return sum(r.output_len for r in make_requests(workload))


def _check_run(run: dict) -> None:
    assert run["num_requests"] == 8
    assert run["num_succeeded"] == 8 and run["num_failed"] == 0, run["errors"]
    # ignore_eos + max_tokens: every output has exactly the requested length.
    assert run["total_output_tokens"] == _expected_output_tokens()
    for metric in LATENCIES:
        stats = run[metric]
        assert 0 < stats["min"] <= stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]
    assert run["ttft_ms"]["max"] <= run["e2e_ms"]["max"]
    assert run["request_throughput"] > 0 and run["output_token_throughput"] > 0
    assert run["total_token_throughput"] > run["output_token_throughput"]
    assert len(run["samples_ms"]["ttft"]) == 8


@pytest.mark.integration
@pytest.mark.model
def test_tiny_run_writes_json_and_png(serve, tmp_path):
    result = _bench("--url", serve.base_url, *WORKLOAD, "--max-concurrency", "4",
                    "--slo-ttft-ms", "600000", "--slo-tpot-ms", "600000",
                    "--out", str(tmp_path), "--name", "tiny", "--no-progress")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "tiny.json").read_text())
    (run,) = report["runs"]
    assert run["target"] == "router (http)" and run["max_concurrency"] == 4
    _check_run(run)
    # Generous SLO: every request is good.
    assert run["goodput"]["num_good"] == 8 and run["goodput"]["fraction"] == 1.0
    assert run["goodput"]["request_goodput"] == pytest.approx(run["request_throughput"])
    assert report["comparisons"] == []
    assert (tmp_path / "tiny.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "router (http)" in result.stdout


@pytest.mark.integration
@pytest.mark.model
def test_router_and_direct_worker_side_by_side(serve, tmp_path):
    (worker,) = serve.worker_addresses
    result = _bench("--url", serve.base_url, "--grpc", worker, *WORKLOAD,
                    "--max-concurrency", "1", "2", "--slo-ttft-ms", "0.001",
                    "--out", str(tmp_path), "--name", "cmp", "--no-progress", "--warmup", "0")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "cmp.json").read_text())
    assert [(r["kind"], r["max_concurrency"]) for r in report["runs"]] == [
        ("http", 1), ("grpc", 1), ("http", 2), ("grpc", 2)]
    for run in report["runs"]:
        _check_run(run)
        assert run["goodput"]["num_good"] == 0  # nobody meets a 1 µs TTFT
    assert [c["max_concurrency"] for c in report["comparisons"]] == [1, 2]
    for comparison in report["comparisons"]:
        a, b = (r for r in report["runs"]
                if r["max_concurrency"] == comparison["max_concurrency"])
        assert comparison["ttft_ms_mean_diff"] == pytest.approx(
            a["ttft_ms"]["mean"] - b["ttft_ms"]["mean"])


def test_bench_without_a_target_is_a_usage_error():
    result = _bench("--num-requests", "1")
    assert result.returncode == 2
    assert result.stderr.startswith("error: give --url")


@pytest.mark.parametrize("argv, field", [
    (["--input-len-mean", "2", "--input-len-range", "2"], "input_len"),
    (["--request-rate", "0"], "request_rate"),
])
def test_bad_workloads_are_usage_errors(argv, field):
    result = _bench("--url", "http://127.0.0.1:9", *argv)
    assert result.returncode == 2
    assert field in result.stderr
