"""`lmfleet router` argument handling and RouterConfig validation (no servers started)."""

from __future__ import annotations

import pytest

from lmfleet.cli.commands.router import _policies
from lmfleet.cli.main import main
from lmfleet.router.server import RouterConfig


def test_policy_flags_set_a_default_and_per_model_overrides():
    assert _policies(None) == ("least_loaded", ())
    assert _policies(["round_robin", "chat=session_affinity"]) == (
        "round_robin", (("chat", "session_affinity"),))


@pytest.mark.parametrize("argv, message", [
    (["--worker", "no-port"], "not HOST:PORT"),
    (["--worker", "h:1", "--policy", "random"], "unknown routing policy"),
    (["--worker", "h:1", "--policy", "m=random"], "unknown routing policy"),
    (["--worker", "h:1", "--max-in-flight", "0"], "max_in_flight"),
    (["--worker", "h:1", "--port", "70000"], "http_port"),
    (["--worker", "h:1", "--max-body-bytes", "0"], "max_body_bytes"),
])
def test_bad_arguments_exit_2_with_one_error_line(capsys, argv, message):
    assert main(["router", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_router_needs_a_worker(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["router"])
    assert exit_info.value.code == 2
    assert "--worker" in capsys.readouterr().err


def test_config_is_frozen_and_keeps_workers_as_a_tuple():
    config = RouterConfig(workers=["127.0.0.1:1", "127.0.0.1:2"], http_port=0, grpc_port=0)
    assert config.workers == ("127.0.0.1:1", "127.0.0.1:2")
    with pytest.raises(AttributeError):
        config.http_port = 1  # type: ignore[misc]
    with pytest.raises(ValueError, match="at least one worker"):
        RouterConfig(workers=())
