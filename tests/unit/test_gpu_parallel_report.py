"""benchmarks/gpu_parallel.py's table: what a reader of the result sees per step."""

from benchmarks.gpu_parallel import table


def test_table_names_failures_the_kill_and_the_replacement():
    result = {
        "engine": {"tp2": {"test_a_out_tok_s": 1234.4, "test_b_tpot_ms": 3.456}},
        "lmdeploy": {"tp2": [{"step": "lmdeploy-A", "out_tok_s": 999.0},
                             {"step": "lmdeploy-B", "tpot_ms": 4.0}]},
        "fleet": {"replicas": {"load": {"num_failed": 0, "num_requests": 16,
                                        "output_token_throughput": 221.0},
                               "killed": {"during_load": True, "replaced_after_s": 5.78}},
                  "tp_replica": {"load": {"num_failed": 1, "num_requests": 16,
                                          "output_token_throughput": 100.0},
                                 "killed": {"during_load": False}}},
        "status": {"engine-tp2": "ok", "lmdeploy-tp2": "rc=1", "fleet-replicas": "ok",
                   "fleet-tp_replica": "ok"}}
    lines = table(result).splitlines()
    assert lines[2] == "| lmfleet tp2 | 1234 | 3.46 | ok |"
    assert lines[3] == "| LMDeploy tp2 | 999 | 4.00 | rc=1 |"
    assert lines[4].startswith("| fleet replicas: 0 of 16 failed, killed during the load, "
                               "replaced after 5.8 s | 221 |")
    assert "1 of 16 failed, killed after the load, not replaced" in lines[5]
