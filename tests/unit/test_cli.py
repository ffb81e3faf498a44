"""The `lmfleet` command line: help, error reporting and `models` (no model is loaded)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lmfleet.cli import main as cli


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lmfleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_top_level_help_lists_commands():
    r = _run("--help")
    assert r.returncode == 0, r.stderr
    assert "usage: lmfleet" in r.stdout
    for command in ("convert", "models"):
        assert command in r.stdout


@pytest.mark.parametrize("command", ["convert", "models"])
def test_subcommand_help(command):
    r = _run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"usage: lmfleet {command}" in r.stdout


def test_convert_help_documents_options():
    r = _run("convert", "--help")
    assert "--gguf FILE" in r.stdout and "--out DIR" in r.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert"], "the following arguments are required: --gguf"),
        (["convert", "--gguf", "/no/such/model.gguf", "--out", "/tmp/x"], "GGUF file not found"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["convert", "--gguf", "x.gguf", "--bogus"], "unrecognized arguments: --bogus"),
        (["controller", "--config", "/no/fleet.yaml", "--redis", "redis://127.0.0.1:1"],
         "cannot read fleet config /no/fleet.yaml"),
        (["controller", "--config", "f.yaml", "--redis", "memory://"], "needs a Redis URL"),
        (["serve", "--config", "/no/fleet.yaml"], "cannot read fleet config"),
        (["serve", "--replicas", "2", "--min-replicas", "1"], "not both"),
        # A served name is shown to every client (/v1/models): never a server file path.
        (["worker", "--port", "0", "--model-name", "/srv/models/llama"], "a file path"),
        (["serve", "--model-name", "/srv/models/llama"], "a file path"),
    ],
)
def test_bad_invocations_print_one_line_and_exit_2(args, message):
    r = _run(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in r.stderr


def test_non_gguf_file_is_a_usage_error(tmp_path):
    fake = tmp_path / "fake.gguf"
    fake.write_bytes(b"nope")
    r = _run("convert", "--gguf", str(fake), "--out", str(tmp_path / "out"), "-q")
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: not a GGUF file (bad magic b'nope'): {fake}"
    assert not (tmp_path / "out").exists()


def test_no_command_prints_help_and_exits_2():
    r = _run()
    assert r.returncode == 2
    assert "usage: lmfleet" in r.stderr


def test_models_reports_cache_state(tmp_path):
    r = _run("models", env={"LMFLEET_CACHE": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "default (alias SmolLM2-135M-Instruct)" in r.stdout
    assert str(tmp_path / "models" / "SmolLM2-135M-Instruct") in r.stdout
    assert "converted: no" in r.stdout


def test_main_returns_exit_code_in_process(capsys):
    assert cli.main(["convert", "--gguf", "/no/such.gguf"]) == 2
    assert capsys.readouterr().err.startswith("error: GGUF file not found")


def test_parser_registers_each_subcommand():
    parser = cli.build_parser()
    args = parser.parse_args(["convert", "--gguf", "a.gguf", "--out", "d"])
    assert args.func is cli._cmd_convert and args.gguf == "a.gguf" and args.out == "d"
    assert parser.parse_args(["models"]).func is cli._cmd_models


def worker_options(*flags: str) -> dict:
    """The engine options `lmfleet worker` would build its engine with."""
    from lmfleet.cli.commands.worker import parse_worker_argv
    from lmfleet.worker.options import from_namespace

    return from_namespace(parse_worker_argv(["--port", "0", *flags]))


@pytest.mark.parametrize("option", ["dense_decode_cache", "cpu_kernels", "overlap_steps"])
def test_worker_auto_on_off_flags_map_to_engine_options(option):
    flag = "--" + option.replace("_", "-")
    assert option not in worker_options()
    assert option not in worker_options(flag, "auto")
    assert worker_options(flag, "on")[option] is True
    assert worker_options(flag, "off")[option] is False
    with pytest.raises(ValueError, match=flag[2:]):
        worker_options(flag, "sometimes")


def test_worker_gpu_engine_flags_map_to_engine_options_the_engine_accepts():
    from lmfleet.cli.commands.worker import parse_worker_argv
    from lmfleet.worker.config import EngineConfig

    options = worker_options("--attention-backend", "triton", "--enforce-eager")
    assert options["attention_backend"] == "triton" and options["enforce_eager"] is True
    config = EngineConfig.from_options("default", **options)
    assert config.model.attention_backend == "triton" and config.model.enforce_eager
    assert "enforce_eager" not in worker_options()
    assert worker_options("--no-enable-prefix-caching")["enable_prefix_caching"] is False
    with pytest.raises(ValueError, match="attention-backend"):
        parse_worker_argv(["--port", "0", "--attention-backend", "flash"])


def test_worker_mlfq_order_flags_map_to_engine_options_the_engine_accepts():
    from lmfleet.worker.config import EngineConfig

    assert "mlfq_queue_order" not in worker_options()
    chosen = worker_options("--scheduler", "mlfq", "--mlfq-queue-order", "arrival",
                            "--mlfq-last-queue", "round_robin", "--host-kv-memory", "1GiB")
    assert (chosen["mlfq_queue_order"], chosen["mlfq_last_queue"]) == ("arrival", "round_robin")
    config = EngineConfig.from_options("default", **chosen)
    assert config.scheduler.policy == "mlfq" and config.cache.host_kv_memory_bytes == 1 << 30
    assert (config.scheduler.mlfq_queue_order,
            config.scheduler.mlfq_last_queue) == ("arrival", "round_robin")
    with pytest.raises(ValueError, match="mlfq-queue-order"):
        worker_options("--mlfq-queue-order", "fifo")
    with pytest.raises(ValueError, match="host-kv-memory"):
        worker_options("--host-kv-memory", "lots")


def test_worker_deadline_lane_flags_map_to_the_scheduler_config():
    from lmfleet.worker.config import EngineConfig

    def scheduler(*flags: str):
        options = worker_options("--scheduler", "mlfq", *flags)
        return EngineConfig.from_options("default", **options).scheduler

    default = scheduler()
    assert (default.mlfq_deadline_s, default.mlfq_deadline_slack) == (None, 1.0)
    chosen = scheduler("--mlfq-deadline-s", "90", "--mlfq-deadline-slack", "0")
    assert (chosen.mlfq_deadline_s, chosen.mlfq_deadline_slack) == (90.0, 0.0)
    with pytest.raises(ValueError, match="mlfq_deadline_slack"):
        scheduler("--mlfq-deadline-slack", "-0.5")
