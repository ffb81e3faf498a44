"""vLLM-compatible metrics end to end: a real `lmfleet router` process in front of a real
worker (SmolLM2) exports, after one completion, every `vllm:*` series vLLM defines that
lmfleet has the data for, under vLLM's names, types, buckets and `model_name` label, and
every series vLLM's own Grafana dashboard queries.
"""

from __future__ import annotations

import contextlib

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from lmfleet.router.metrics import E2E_BUCKETS, ITL_BUCKETS, TTFT_BUCKETS
from tests.deploy.test_dashboard import vllm_dashboard_series_missing
from tests.integration.test_router_helpers import openai_client, start_router, wait_until
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 1024
MAX_TOKENS = 8
# vLLM's build_1_2_5_buckets(max_model_len) for max_model_len 1024.
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)

# name as exposed (counters with _total) -> (type, buckets for histograms)
VLLM_SERIES = {
    "vllm:num_requests_running": ("gauge", None),
    "vllm:num_requests_waiting": ("gauge", None),
    "vllm:kv_cache_usage_perc": ("gauge", None),
    "vllm:time_to_first_token_seconds": ("histogram", TTFT_BUCKETS),
    "vllm:inter_token_latency_seconds": ("histogram", ITL_BUCKETS),
    "vllm:request_time_per_output_token_seconds": ("histogram", ITL_BUCKETS),
    "vllm:e2e_request_latency_seconds": ("histogram", E2E_BUCKETS),
    "vllm:request_queue_time_seconds": ("histogram", E2E_BUCKETS),
    "vllm:request_prompt_tokens": ("histogram", TOKEN_BUCKETS),
    "vllm:request_generation_tokens": ("histogram", TOKEN_BUCKETS),
    "vllm:prompt_tokens_total": ("counter", None),
    "vllm:generation_tokens_total": ("counter", None),
    "vllm:request_success_total": ("counter", None),
    "vllm:num_preemptions_total": ("counter", None),
    "vllm:prefix_cache_queries_total": ("counter", None),
    "vllm:prefix_cache_hits_total": ("counter", None),
}


def test_buckets_are_vllms():
    """The lists in vLLM's vllm/v1/metrics/loggers.py, restated."""
    assert TTFT_BUCKETS == (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75,
                            1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
    assert ITL_BUCKETS == (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0,
                           2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
    assert E2E_BUCKETS == (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0,
                           40.0, 50.0, 60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


@pytest.fixture(scope="module")
def scrape(default_model_dir):
    """(model name, /metrics text) after one completion of MAX_TOKENS tokens."""
    with contextlib.ExitStack() as stack:
        worker = stack.enter_context(start_worker(
            default_model_dir, ["--max-model-len", str(MAX_MODEL_LEN)]))
        router = stack.enter_context(start_router([worker]))
        client = openai_client(router)
        model = client.models.list().data[0].id
        response = client.completions.create(
            model=model, prompt="The capital of France is", max_tokens=MAX_TOKENS,
            temperature=0, extra_body={"ignore_eos": True})
        assert response.usage.completion_tokens == MAX_TOKENS

        def text() -> str:
            return httpx.get(f"{router.base_url}/metrics", timeout=30).text

        # The load-report series appear once the router polled the worker's load.
        assert wait_until(lambda: "\nvllm:num_requests_running{" in text(), timeout=30)
        yield model, text()


def _families(text: str) -> dict:
    return {family.name: family for family in text_string_to_metric_families(text)}


def _exposed(family) -> str:
    """The family's name as a scrape shows it (the parser strips counters' _total)."""
    return family.name + "_total" if family.type == "counter" else family.name


@pytest.mark.parametrize("name", sorted(VLLM_SERIES))
def test_every_vllm_series_is_exported_with_vllms_type_buckets_and_label(scrape, name):
    model, text = scrape
    kind, buckets = VLLM_SERIES[name]
    by_name = {_exposed(f): f for f in _families(text).values()}
    assert name in by_name, name
    family = by_name[name]
    assert family.type == kind
    samples = [s for s in family.samples if s.labels.get("model_name") == model]
    assert samples, f"{name} has no sample labelled model_name={model!r}"
    if kind == "histogram":
        les = [s.labels["le"] for s in samples if s.name.endswith("_bucket")]
        assert les == [str(float(b)) for b in buckets] + ["+Inf"]
        (count,) = [s.value for s in samples if s.name.endswith("_count")]
        assert count >= 1
    # Counters are exported as NAME_total, as vLLM's.
    if kind == "counter":
        assert any(line.startswith(f"{name}{{") for line in text.splitlines())


def test_the_counts_match_the_completion(scrape):
    model, text = scrape
    values = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.labels.get("model_name") == model:
                key = (s.name, tuple(sorted((k, v) for k, v in s.labels.items()
                                            if k not in ("model_name", "replica"))))
                values[key] = values.get(key, 0) + s.value
    assert values[("vllm:generation_tokens_total", ())] == MAX_TOKENS
    assert values[("vllm:request_success_total", (("finished_reason", "length"),))] == 1
    assert values[("vllm:request_generation_tokens_sum", ())] == MAX_TOKENS
    assert values[("vllm:request_prompt_tokens_sum", ())] == values[
        ("vllm:prompt_tokens_total", ())] > 0
    assert values[("vllm:request_time_per_output_token_seconds_count", ())] == 1
    assert values[("vllm:inter_token_latency_seconds_count", ())] >= 1
    assert values[("vllm:prefix_cache_queries_total", ())] >= values[
        ("vllm:prefix_cache_hits_total", ())]


def test_vllms_own_dashboard_finds_every_series_it_queries(scrape):
    model, text = scrape
    exported = {s.name for f in text_string_to_metric_families(text) for s in f.samples
                if s.labels.get("model_name") == model}
    assert not vllm_dashboard_series_missing(exported)
