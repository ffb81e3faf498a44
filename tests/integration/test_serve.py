"""`lmfleet serve`: Ray replicas, controller and router behind one endpoint, as a real
subprocess (free ports, a real local Ray cluster, real workers)."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from lmfleet.cli.commands import serve as serve_command
from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from tests.integration.serve_process import WORKER_TOKEN, start_serve
from tests.integration.test_router_helpers import worker_load


def server_test(test):
    """Starts real workers (SmolLM2) and the router."""
    return pytest.mark.integration(pytest.mark.model(test))

# A small KV cache keeps several workers light on a shared machine.
SMALL_KV = ["--num-kv-blocks", "128"]
MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def serve():
    with start_serve(["--replicas", "2", *SMALL_KV]) as process:
        yield process


def _gone(pid: int, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    serve_command.add_parser(parser.add_subparsers())
    return parser.parse_args(["serve", *argv])


@server_test
def test_ready_line_names_the_model_and_two_workers_started(serve):
    assert serve.models == ["default"]
    assert len(serve.worker_addresses) == 2
    assert len(set(serve.worker_addresses)) == 2
    assert len(set(serve.worker_pids)) == 2
    assert set(serve.worker_pids) <= set(serve.descendant_pids())


@server_test
def test_replicas_listen_on_loopback_and_need_the_worker_token(serve):
    # Issue 19 item 7: a local fleet's replicas are reachable from this machine only, and
    # even from here Drain/Generate/... need the token serve shares with its router.
    for address in serve.worker_addresses:
        assert address.startswith("127.0.0.1:"), address
        with grpc.insecure_channel(address) as channel:
            with pytest.raises(grpc.RpcError) as refused:
                worker_pb2_grpc.WorkerStub(channel).Drain(worker_pb2.DrainRequest(),
                                                          timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=""), timeout=30)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert worker_load(address, WORKER_TOKEN).draining is False


@server_test
def test_models_endpoint_lists_default_with_two_replicas(serve):
    response = httpx.get(f"{serve.base_url}/v1/models", timeout=30)
    assert response.status_code == 200
    cards = response.json()["data"]
    assert [(c["id"], c["num_replicas"]) for c in cards] == [("default", 2)]
    # The controller's numbers are on the same /metrics as the router's.
    metrics = httpx.get(f"{serve.base_url}/metrics", timeout=30).text.splitlines()
    for line in ('lmfleet:fleet_replicas{model_name="default",state="ready"} 2.0',
                 'lmfleet:fleet_replica_starts_total{model_name="default"} 2.0',
                 'lmfleet:autoscaler_desired_replicas{model_name="default"} 2.0'):
        assert line in metrics, line


@server_test
def test_chat_completion_equals_offline_greedy(serve, default_model_dir):
    import openai

    from lmfleet.worker import LLM, SamplingParams

    client = openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="unused", max_retries=0,
                           timeout=120)
    answer = client.chat.completions.create(model="default", messages=MESSAGES,
                                            temperature=0, max_tokens=24)
    llm = LLM(str(default_model_dir))
    offline = llm.generate([llm.apply_chat_template(MESSAGES)],
                           SamplingParams(temperature=0, max_tokens=24), use_tqdm=False)[0]
    assert answer.choices[0].message.content == offline.text
    assert answer.usage.completion_tokens == len(offline.output_token_ids)


@server_test
def test_sigterm_exits_0_and_stops_every_worker_and_ray():
    with start_serve(["--replicas", "2", *SMALL_KV]) as serve:
        pids = serve.descendant_pids()
        assert len(serve.worker_pids) == 2 and set(serve.worker_pids) <= set(pids)
        assert serve.stop(signal.SIGTERM) == 0
    assert all(_gone(pid) for pid in pids), pids
    assert any("stopping replicas" in line for line in serve.stderr_lines)


@server_test
def test_two_models_behind_one_endpoint(default_model_dir):
    # The same weights twice: once as the embedded model, once as a directory.
    with start_serve(["--model", "default", "--model", str(default_model_dir),
                      *SMALL_KV]) as serve:
        second = default_model_dir.name
        assert serve.models == ["default", second]
        cards = httpx.get(f"{serve.base_url}/v1/models", timeout=30).json()["data"]
        assert sorted(c["id"] for c in cards) == sorted(["default", second])
        texts = []
        for model in ("default", second):
            response = httpx.post(f"{serve.base_url}/v1/completions", timeout=120, json={
                "model": model, "prompt": "The sky is", "max_tokens": 8, "temperature": 0})
            assert response.status_code == 200, response.text
            texts.append(response.json()["choices"][0]["text"])
        assert texts[0] == texts[1] and texts[0]
        missing = httpx.post(f"{serve.base_url}/v1/completions", timeout=30, json={
            "model": "nope", "prompt": "x", "max_tokens": 1})
        assert missing.status_code == 404
        pids = serve.descendant_pids()
        assert serve.stop(signal.SIGINT) == 0
    assert all(_gone(pid) for pid in pids), pids


@server_test
def test_a_worker_failing_at_start_up_is_reported_with_its_stderr(tmp_path):
    empty = tmp_path / "not-a-model"
    empty.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", "serve", "--model", str(empty),
         "--port", "0", "--grpc-port", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    assert "error: model 'not-a-model'" in result.stderr
    assert "no config.json" in result.stderr  # the worker's own error
    assert result.stdout == ""


@pytest.mark.parametrize("argv, message", [
    (["--model", "/no/such/dir"], "model not found"),
    (["--model", "default", "--model", "default"], "used twice"),
    (["--model-name", "a", "--model-name", "b"], "--model-name"),
    (["--replicas", "0"], "--replicas"),
    (["--replicas", "2", "--max-replicas", "3"], "not both"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas/--max-replicas"),
    (["--config", "fleet.yaml", "--max-num-seqs", "4"], "drop --max-num-seqs"),
])
def test_bad_model_arguments_are_value_errors(argv, message):
    with pytest.raises(ValueError, match=message):
        serve_command.fleet_config(_parse(*argv))


def test_flags_become_a_fleet_forwarding_the_engine_flags_given(tmp_path):
    model_dir = tmp_path / "my-model"
    model_dir.mkdir()
    fleet = serve_command.fleet_config(_parse(
        "--model", "default", "--model", str(model_dir), "--replicas", "3",
        "--max-num-seqs", "4", "--scheduler", "mlfq", "--device", "cpu",
        "--drain-timeout", "7"))
    assert [(m.name, m.path, m.autoscaling.min_replicas, m.autoscaling.max_replicas)
            for m in fleet.models] == [("default", "default", 3, 3),
                                       ("my-model", str(model_dir), 3, 3)]
    assert dict(fleet.models[0].engine) == {"max_num_seqs": 4, "device": "cpu"}
    assert fleet.models[0].scheduler == "mlfq"
    assert fleet.controller.drain_timeout_s == 7.0
    scaled = serve_command.fleet_config(_parse("--min-replicas", "1", "--max-replicas", "3"))
    assert (scaled.models[0].autoscaling.min_replicas,
            scaled.models[0].autoscaling.max_replicas) == (1, 3)
    named = serve_command.fleet_config(_parse("--model", "default", "--model-name", "chat"))
    assert named.models[0].name == "chat"
    parallel = serve_command.fleet_config(_parse("--tensor-parallel-size", "3",
                                                 "--pipeline-parallel-size", "2"))
    assert (parallel.models[0].tp, parallel.models[0].pp) == (3, 2)
    assert parallel.models[0].placement.bundles() == [{"CPU": 1.0}] * 6
    options = parallel.models[0].engine_options()
    assert (options["tensor_parallel_size"], options["pipeline_parallel_size"]) == (3, 2)
    from lmfleet.worker.model.default_model import served_model_name

    assert served_model_name("/models/llama.Q4_0.gguf") == "llama.Q4_0"
    assert served_model_name("/models/Llama-3-8B/") == "Llama-3-8B"
    assert served_model_name("SmolLM2-135M-Instruct") == served_model_name("default") == "default"


@server_test
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without "
                    "a GPU, where a CUDA model cannot be placed")
def test_a_model_no_node_can_hold_is_reported_at_once_and_the_others_are_served(tmp_path):
    config = tmp_path / "fleet.yaml"
    config.write_text("models:\n"
                      "  - {name: small, path: default, engine: {num_kv_blocks: 64}}\n"
                      "  - {name: big, path: default, engine: {device: cuda}}\n")
    # Without the check serve would wait for 'big' until --start-timeout (600 s).
    with start_serve(["--config", str(config)]) as serve:
        assert serve.models == ["small"]
        errors = [i for i, line in enumerate(serve.stderr_lines)
                  if "error: model 'big': cannot be placed" in line]
        assert errors and "0 GPU" in serve.stderr_lines[errors[0]]
        answer = httpx.post(f"{serve.base_url}/v1/completions", timeout=120, json={
            "model": "small", "prompt": "The sky is", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        assert httpx.post(f"{serve.base_url}/v1/completions", timeout=30, json={
            "model": "big", "prompt": "x", "max_tokens": 1}).status_code == 404


@server_test
@pytest.mark.parametrize("flags", [["--tensor-parallel-size", "3"],
                                   ["--pipeline-parallel-size", "2"]], ids=["tp3", "pp2"])
def test_a_parallel_replica_answers_with_the_single_rank_greedy_text(default_model_dir,
                                                                      flags):
    # --tensor-parallel-size 3 (the default model's 9 heads and 3 KV heads divide by 3), or
    # two pipeline stages of 15 layers: one Ray replica whose rank-0 actor starts the other
    # ranks as Ray actors in the replica's placement group, one bundle each, over gloo.
    from lmfleet.worker import LLM, SamplingParams

    prompts = [[504, 3458, 282, 4649, 314], [1645, 1848, 314, 253, 1345, 28, 1205, 359]]
    with LLM(str(default_model_dir), max_model_len=256) as llm:
        expected = [o.text for o in llm.generate(prompts, SamplingParams(
            max_tokens=10, temperature=0, ignore_eos=True), use_tqdm=False)]
    with start_serve([*flags, "--max-model-len", "256", "--num-kv-blocks", "64"]) as serve:
        response = httpx.post(f"{serve.base_url}/v1/completions", timeout=300, json={
            "prompt": prompts, "max_tokens": 10, "temperature": 0, "ignore_eos": True})
        assert response.status_code == 200, response.text
        choices = sorted(response.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == expected
        assert len(rank_actor_pids()) == int(flags[1]) - 1


def rank_actor_pids() -> list[int]:
    """The processes of the running rank actors (Ray titles them `ray::RankActor.run`)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if cmdline.read_bytes().startswith(b"ray::RankActor.run"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue  # ended meanwhile
    return pids


@server_test
def test_killing_a_rank_of_a_tensor_parallel_replica_brings_it_back_whole(default_model_dir):
    body = {"prompt": [504, 3458, 282, 4649, 314], "max_tokens": 6, "temperature": 0,
            "ignore_eos": True}
    with start_serve(["--tensor-parallel-size", "3", "--max-model-len", "256",
                      "--num-kv-blocks", "64", "--log-level", "info"]) as serve:
        before = httpx.post(f"{serve.base_url}/v1/completions", json=body, timeout=300)
        assert before.status_code == 200, before.text
        (pid,) = serve.worker_pids
        ranks = rank_actor_pids()
        assert len(ranks) == 2, ranks
        os.kill(ranks[0], signal.SIGKILL)
        # Rank 0 exits with it; the controller replaces the replica; a request sent now
        # waits for the replacement (the router's replica wait) and gets the same text.
        after = httpx.post(f"{serve.base_url}/v1/completions", json=body, timeout=300)
        assert after.status_code == 200, after.text
        assert after.json()["choices"][0]["text"] == before.json()["choices"][0]["text"]
        assert _gone(pid)
        assert any("rank(s) died" in line for line in serve.stderr_lines)
