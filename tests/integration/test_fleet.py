"""The fleet on a real local Ray cluster, in the test process (tests/integration/
fleet_harness.py): autoscaling under a spike with two models scaling on their own, and
replicas killed (Ray actor kill, SIGKILL) with requests in flight.

Every completion is greedy on token-id prompts and compared with the offline engine's
text for the same prompt, so "succeeded" always means "succeeded with the right answer".
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from lmfleet.cluster.fleet_config import fleet_config_from_dict
from tests.integration.fleet_harness import in_process_fleet

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = [[504, 3458, 282, 4649, 314], [1645, 1848, 314, 253, 1345, 28],
           [20323, 30, 1205, 359, 346], [1318, 2016, 282, 260, 2372, 314]]
ENGINE = {"max_num_seqs": 2, "num_kv_blocks": 64, "max_model_len": 256}
WAIT_S = 240.0  # bound on every wait for replicas (loading on a busy 2-core machine)


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    """One local Ray cluster for the module (each fleet uses it and leaves it running),
    sized for the largest fleet here."""
    from lmfleet.cluster.ray_cluster import init_ray, shutdown_ray

    init_ray(fleet_config_from_dict(SPIKE_FLEET))
    yield
    shutdown_ray()


@pytest.fixture(scope="module")
def expected(default_model_dir) -> dict[tuple[int, ...], dict[int, str]]:
    """prompt -> max_tokens -> the offline greedy text."""
    from lmfleet.worker import LLM, SamplingParams

    llm = LLM(str(default_model_dir), max_model_len=256)
    texts: dict[tuple[int, ...], dict[int, str]] = {}
    for max_tokens in (12, 48):
        outputs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens,
                                                       ignore_eos=True), use_tqdm=False)
        for prompt, output in zip(PROMPTS, outputs, strict=True):
            texts.setdefault(tuple(prompt), {})[max_tokens] = output.text
    return texts


@dataclass
class StreamResult:
    prompt: tuple[int, ...]
    text: str = ""
    chunks: int = 0
    error: str = ""
    finish_reason: str = ""
    first_chunk_at: float = field(default=float("inf"))


def stream_completion(base_url: str, model: str, prompt: list[int],
                      max_tokens: int) -> StreamResult:
    """One streaming /v1/completions; never raises (transport errors become `error`)."""
    result = StreamResult(tuple(prompt))
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "ignore_eos": True}
    try:
        with httpx.stream("POST", f"{base_url}/v1/completions", json=body,
                          timeout=120) as response:
            if response.status_code != 200:
                response.read()
                result.error = f"HTTP {response.status_code}: {response.text}"
                return result
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                frame = json.loads(line[len("data: "):])
                if "error" in frame:
                    result.error = frame["error"]["message"]
                    continue
                choice = frame["choices"][0]
                if choice["text"]:
                    result.text += choice["text"]
                    result.chunks += 1
                    result.first_chunk_at = min(result.first_chunk_at, time.monotonic())
                result.finish_reason = choice["finish_reason"] or result.finish_reason
    except httpx.HTTPError as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


# ---- autoscaling -------------------------------------------------------------------------

SPIKE_FLEET = {
    "controller": {"reconcile_interval_s": 0.3, "replica_ttl_s": 3.0},
    "models": [
        {"name": "a", "min_replicas": 1, "max_replicas": 3, "engine": ENGINE,
         "autoscaling": {"target_load_per_replica": 2, "upscale_delay_s": 0.5,
                         "downscale_delay_s": 4, "max_starting": 2}},
        {"name": "b", "min_replicas": 1, "max_replicas": 2, "scheduler": "mlfq",
         "engine": ENGINE | {"max_num_seqs": 4},
         "autoscaling": {"target_load_per_replica": 6, "upscale_delay_s": 0.5,
                         "downscale_delay_s": 4}},
    ],
}


class Traffic:
    """`clients` threads sending completions to `model` until stopped; keeps results."""

    def __init__(self, base_url: str, model: str, clients: int) -> None:
        self.results: list[StreamResult] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(base_url, model, i))
                         for i in range(clients)]
        for thread in self._threads:
            thread.start()

    def _client(self, base_url: str, model: str, index: int) -> None:
        sent = 0
        while not self._stop.is_set():
            prompt = PROMPTS[(index + sent) % len(PROMPTS)]
            self.results.append(stream_completion(base_url, model, prompt, 12))
            sent += 1

    def stop(self) -> list[StreamResult]:
        self._stop.set()
        for thread in self._threads:
            thread.join(180)
        return self.results


def check_all_correct(results: list[StreamResult], expected, max_tokens: int) -> None:
    assert results
    wrong = [(r.error, r.text) for r in results
             if r.error or r.text != expected[r.prompt][max_tokens]]
    assert not wrong, wrong[:3]


def load_until(fleet, model: str, clients: int, size: int, other: str,
               other_sizes: list[int]) -> list[StreamResult]:
    """`clients` streams of requests to `model` until it has settled at `size` READY
    replicas (none starting or draining); the `other` model's READY counts seen meanwhile
    go to `other_sizes`. Returns the requests' results."""
    def settled() -> bool:
        other_sizes.append(len(fleet.ready(other)))
        return fleet.settled_at(model) == size

    traffic = Traffic(fleet.base_url, model, clients)
    try:
        reached = fleet.wait_for(settled, WAIT_S)
    finally:
        results = traffic.stop()
    assert reached, fleet.controller.snapshot()
    return results


def test_a_spike_scales_one_model_to_max_and_back_while_the_other_stays(expected):
    with in_process_fleet(fleet_config_from_dict(SPIKE_FLEET)) as fleet:
        assert (len(fleet.ready("a")), len(fleet.ready("b"))) == (1, 1)
        b_sizes: list[int] = []
        spike_results = load_until(fleet, "a", 8, 3, "b", b_sizes)
        # A trickle goes on while "a" scales in: replicas drain under live requests.
        trickle_results = load_until(fleet, "a", 1, 1, "b", b_sizes)
        snapshot = fleet.controller.snapshot()
        assert snapshot["a"].starts == 3 and snapshot["a"].stops == {"scale_in": 2}
        assert set(b_sizes) == {1} and snapshot["b"].starts == 1
        check_all_correct(spike_results, expected, 12)
        check_all_correct(trickle_results, expected, 12)

        # Now "b" takes a burst: it scales on its own, "a" stays at its minimum.
        a_sizes: list[int] = []
        burst_results = load_until(fleet, "b", 12, 2, "a", a_sizes)
        load_until(fleet, "b", 0, 1, "a", a_sizes)
        assert set(a_sizes) == {1}
        check_all_correct(burst_results, expected, 12)
        decisions = fleet.controller.snapshot()["b"]
        assert decisions.starts == 2 and decisions.stops == {"scale_in": 1}


# ---- failures ----------------------------------------------------------------------------

FAILURE_FLEET = {
    "controller": {"reconcile_interval_s": 0.3, "replica_ttl_s": 3.0,
                   "health_check_timeout_s": 1.0},
    "models": [{"name": "f", "replicas": 2, "engine": ENGINE}],
}


@pytest.mark.parametrize("kill, stop_reason", [
    ("ray_kill", "died"), ("sigkill", "died"),
    # A frozen process answers nothing: it fails its health checks and is replaced.
    ("sigstop", "unhealthy")])
def test_a_replica_killed_mid_stream_loses_no_request_and_is_replaced(
        kill, stop_reason, expected):
    with in_process_fleet(fleet_config_from_dict(FAILURE_FLEET)) as fleet:
        assert fleet.wait_for(lambda: len(fleet.router.registry.get("f").replicas) == 2,
                              WAIT_S)
        victim = next(r for r in fleet.controller.replicas("f") if r.replica_id == "f-0")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(8)]
        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(stream_completion, fleet.base_url, "f", p, 48)
                       for p in prompts]
            # Kill once the victim is generating (some streams have started).
            assert fleet.wait_for(lambda: victim.last_load is not None
                                  and victim.last_load.num_running > 0
                                  and victim.last_load.num_waiting > 0, WAIT_S)
            killed_at = time.monotonic()
            if kill == "ray_kill":
                import ray

                ray.kill(victim.actor, no_restart=True)
            else:
                os.kill(victim.pid, signal.SIGKILL if kill == "sigkill" else signal.SIGSTOP)
            results = [f.result(timeout=300) for f in futures]  # none hangs

        # The victim was generating (and had requests waiting): the streams it was serving
        # resumed on the other replica (prompt + the tokens already sent), the waiting ones
        # went there too, and every greedy stream is token-identical to an undisturbed run.
        assert [r.error for r in results] == [""] * len(results)
        assert any(r.first_chunk_at < killed_at for r in results)
        check_all_correct(results, expected, 48)

        def restored() -> bool:
            ready = fleet.ready("f")
            return len(ready) == 2 and "f-0" not in ready

        assert fleet.wait_for(restored, WAIT_S), fleet.controller.snapshot()
        assert fleet.controller.snapshot()["f"].stops == {stop_reason: 1}
        again = stream_completion(fleet.base_url, "f", PROMPTS[0], 12)
        assert (again.error, again.text) == ("", expected[tuple(PROMPTS[0])][12])


SOLO_FLEET = {
    "controller": {"reconcile_interval_s": 0.3, "replica_ttl_s": 3.0,
                   "health_check_timeout_s": 1.0},
    "models": [{"name": "s", "replicas": 1, "engine": ENGINE}],
}


def test_requests_sent_while_the_only_replica_is_replaced_wait_for_it(expected):
    # The router waits for a replica up to replica_wait_s (bounded here by WAIT_S, for a
    # replacement loading on a busy machine) and keeps the model while it has none.
    with in_process_fleet(fleet_config_from_dict(SOLO_FLEET), replica_wait_s=WAIT_S) as fleet:
        registry = fleet.router.registry
        assert fleet.wait_for(lambda: len(registry.get("s").replicas) == 1, WAIT_S)
        (victim,) = fleet.controller.replicas("s")
        import ray

        ray.kill(victim.actor, no_restart=True)
        # Sent once the router knows the model has no replica that can serve (without
        # the wait: an immediate 503, or a 404 once the store dropped the replica).
        assert fleet.wait_for(lambda: "s" in registry.models
                              and registry.models["s"].num_healthy == 0, WAIT_S)
        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            results = list(pool.map(lambda p: stream_completion(fleet.base_url, "s", p, 12),
                                    PROMPTS))
        assert [r.error for r in results] == [""] * len(PROMPTS)
        assert [r.text for r in results] == [expected[tuple(p)][12] for p in PROMPTS]
        assert fleet.controller.snapshot()["s"].stops == {"died": 1}
        assert victim.replica_id not in fleet.ready("s")
