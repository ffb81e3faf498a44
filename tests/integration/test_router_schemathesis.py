"""Property-based API contract test: schemathesis generates requests from the live router's
/openapi.json and checks every response: no 5xx, a documented status code, a documented
content type, and a body that matches the documented schema.

Generated bodies are valid by the schema; a few fields are then bounded (max_tokens,
n, number of prompts/messages) so the run stays short on a CPU worker. The number of
examples per operation is bounded too.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.integration.test_router_helpers import start_router
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance,
          response_schema_conformance]
EXAMPLES = {"POST /v1/completions": 40, "POST /v1/chat/completions": 40}
DEFAULT_EXAMPLES = 5
MAX_TOKENS = 3


@pytest.fixture(scope="module")
def router(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", "256"]) as worker, \
            start_router([worker]) as router:
        yield router


@pytest.fixture(scope="module")
def schema(router):
    return schemathesis.openapi.from_url(f"{router.base_url}/openapi.json", timeout=60)


def bound(case):
    """Keep generated requests cheap: few tokens, few completions, few prompts."""
    body = case.body
    if isinstance(body, dict):
        for field in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(field), int):
                body[field] = min(body[field], MAX_TOKENS)
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = MAX_TOKENS  # chat would otherwise run to the context
        if isinstance(body.get("min_tokens"), int):
            body["min_tokens"] = min(body["min_tokens"], MAX_TOKENS)
        if isinstance(body.get("n"), int):
            body["n"] = min(body["n"], 2)
        for field in ("prompt", "messages"):
            value = body.get(field)
            if isinstance(value, list) and value and not isinstance(value[0], int):
                body[field] = value[:2]
    return case


def test_the_live_api_matches_its_openapi_schema(schema, router):
    operations = [result.ok() for result in schema.get_all_operations()]
    labels = {f"{op.method.upper()} {op.path}" for op in operations}
    assert {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
            "GET /health", "GET /metrics"} <= labels
    for operation in operations:
        label = f"{operation.method.upper()} {operation.path}"

        @given(case=operation.as_strategy().map(bound), data=st.data())
        @settings(max_examples=EXAMPLES.get(label, DEFAULT_EXAMPLES), deadline=None,
                  phases=[Phase.explicit, Phase.generate], derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def check(case, data):
            case.call_and_validate(base_url=router.base_url, checks=CHECKS, timeout=120)

        check()
