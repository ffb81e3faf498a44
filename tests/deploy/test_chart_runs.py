"""Run what the chart runs: the router and controller containers of the CPU, KubeRay-off
example (`cpu-standalone`), their commands, arguments, environment and fleet ConfigMap
exactly as rendered, started as local processes against a local redis-server, the
controller with the Ray cluster of its own it starts in its pod. One OpenAI request goes
through with the API key from the rendered Secret. A chart that renders but would
crash-loop (a wrong flag, a fleet YAML the controller refuses, a key the router does not
read) fails here.

Only what a laptop cannot have is replaced: the Service DNS name of Redis by the local
server's URL, the ConfigMap mount by a file, the pod's 0.0.0.0 and fixed ports by
127.0.0.1 and free ports (0), and `lmfleet` by this environment's console script."""

from __future__ import annotations

import base64
import contextlib
import os
import re
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.chart_fixtures import example_objects, find
from tests.integration.serve_process import (
    CONTROLLER_READY,
    START_TIMEOUT,
    ServeProcess,
    _pump_stderr,
    first_line,
)
from tests.redis_server import RedisServerMissing, start_redis_server

pytestmark = [pytest.mark.integration, pytest.mark.model]

EXAMPLE = "cpu-standalone"
ROUTER_READY = re.compile(r"^lmfleet router ready http=(?P<http>\S+) grpc=(?P<grpc>\S+)$")
LMFLEET = str(Path(sys.executable).with_name("lmfleet"))


def localise(container: dict, replacements: dict[str, str]) -> list[str]:
    """The container's command + args with the flag values in `replacements` swapped."""
    argv = [*container["command"], *container["args"]]
    assert argv[0] == "lmfleet"
    argv[0] = LMFLEET
    for i, arg in enumerate(argv[:-1]):
        if arg in replacements:
            argv[i + 1] = replacements[arg]
    return argv


def environment(container: dict, secrets: dict[str, dict[str, str]]) -> dict[str, str]:
    """os.environ plus the container's env, secretKeyRefs read from the rendered Secrets."""
    env = dict(os.environ)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
    return env


@contextlib.contextmanager
def started(argv: list[str], env: dict[str, str], ready: re.Pattern):
    import subprocess

    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               stdin=subprocess.DEVNULL, text=True)
    stderr_lines: list[str] = []
    threading.Thread(target=_pump_stderr, args=(process, stderr_lines), daemon=True).start()
    try:
        line = first_line(process, START_TIMEOUT)
        match = ready.match(line)
        assert match, f"unexpected first line from {argv[1]}: {line!r}"
        yield match, stderr_lines
    finally:
        code = ServeProcess("", "", [], process, stderr_lines).stop()
        process.stdout.close()
        assert code == 0, f"{argv[1]} exited {code} on SIGTERM"


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory):
    try:
        server = start_redis_server(tmp_path_factory.mktemp("redis"))
    except RedisServerMissing as error:
        pytest.fail(str(error))
    yield server.url
    server.stop()


def test_the_rendered_router_and_controller_serve_a_request(redis_url, tmp_path):
    started_at = time.monotonic()
    objects = example_objects(EXAMPLE)
    secrets = {s["metadata"]["name"]: {k: base64.b64decode(v).decode()
                                       for k, v in s["data"].items()}
               for s in objects if s["kind"] == "Secret"}
    config = tmp_path / "fleet.yaml"
    config.write_text(find(objects, "ConfigMap", "-fleet")["data"]["fleet.yaml"])
    controller = find(objects, "Deployment", "-controller")["spec"]["template"]["spec"][
        "containers"][0]
    router = find(objects, "Deployment", "-router")["spec"]["template"]["spec"][
        "containers"][0]

    controller_argv = localise(controller, {
        "--redis": redis_url, "--config": str(config), "--metrics-port": "0",
        "--metrics-host": "127.0.0.1"})
    router_argv = localise(router, {"--redis": redis_url, "--host": "127.0.0.1",
                                    "--port": "0", "--grpc-port": "0"})
    # Only the addresses changed: every other flag is the chart's.
    assert len(controller_argv) == 1 + len(controller["args"])
    assert "--ray-address" not in controller_argv
    key = secrets["lmfleet-api-key"]["api-key"]
    assert key not in " ".join(router_argv)

    with started(controller_argv, environment(controller, secrets), CONTROLLER_READY) as (
            _, controller_log):
        with started(router_argv, environment(router, secrets), ROUTER_READY) as (ready, _):
            base = f"http://{ready['http']}"
            deadline = time.monotonic() + 60
            while httpx.get(f"{base}/health", timeout=10).status_code != 200:
                assert time.monotonic() < deadline, "router never saw a healthy replica"
                time.sleep(0.5)
            body = {"model": "default", "max_tokens": 8, "temperature": 0,
                    "messages": [{"role": "user", "content": "Name a planet."}]}
            refused = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)
            assert refused.status_code == 401
            answer = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120,
                                headers={"Authorization": f"Bearer {key}"})
            assert answer.status_code == 200, answer.text
            choice = answer.json()["choices"][0]
            assert choice["message"]["content"] and answer.json()["usage"]["completion_tokens"]
            # The controller's metrics server (what the ServiceMonitor scrapes) answers.
            [metrics_url] = [m[1] for line in controller_log
                             if (m := re.search(r"metrics on (\S+)", line))]
            assert "lmfleet:fleet_replicas" in httpx.get(metrics_url, timeout=10).text
    print(f"chart fleet up, served and stopped in {time.monotonic() - started_at:.1f} s",
          file=sys.stderr)
