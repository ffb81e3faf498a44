"""The two things the chart needs from lmfleet's commands beyond what a laptop needs: the
controller's metrics server listening on the pod's address (`--metrics-host`), and the
Redis password from the environment (LMFLEET_REDIS_PASSWORD, filled from a Secret) rather
than inside the `--redis` URL, where it would show in the pod spec, `ps` and error
messages."""

from __future__ import annotations

from types import SimpleNamespace

import prometheus_client
import pytest

from lmfleet.cli.commands import controller as controller_command
from lmfleet.cli.main import build_parser
from lmfleet.cluster.state.redis_store import PASSWORD_ENV, RedisStore


def test_controller_metrics_listen_on_loopback_unless_told_otherwise(monkeypatch):
    parser = build_parser()
    base = ["controller", "--config", "f.yaml", "--redis", "redis://r:6379"]
    assert parser.parse_args(base).metrics_host == "127.0.0.1"
    assert parser.parse_args([*base, "--metrics-host", "0.0.0.0"]).metrics_host == "0.0.0.0"

    bound = {}

    def start_http_server(port, addr, registry):
        bound.update(port=port, addr=addr, text=prometheus_client.generate_latest(registry))
        return SimpleNamespace(server_port=9090), None

    monkeypatch.setattr(prometheus_client, "start_http_server", start_http_server)
    controller = SimpleNamespace(snapshot=dict)
    assert controller_command._serve_metrics(controller, 9090, "0.0.0.0") == 9090
    assert bound["addr"] == "0.0.0.0" and bound["port"] == 9090
    assert b"lmfleet:fleet_replicas" in bound["text"]


def _password(store: RedisStore):
    return store._client.connection_pool.connection_kwargs.get("password")


@pytest.mark.parametrize("url, env, expected", [
    ("redis://redis:6379/0", None, None),
    ("redis://redis:6379/0", "from-secret", "from-secret"),
    ("redis://:in-url@redis:6379/0", "from-secret", "in-url"),  # the URL's own wins
    ("redis://redis:6379/0", "", None),
])
def test_the_redis_password_comes_from_the_environment(monkeypatch, url, env, expected):
    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    if env is not None:
        monkeypatch.setenv(PASSWORD_ENV, env)
    store = RedisStore(url, cluster="c")  # connects lazily: nothing is contacted
    try:
        assert _password(store) == expected
        assert "from-secret" not in repr(store)
    finally:
        store.close()
