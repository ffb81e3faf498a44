"""Engine options have one definition (worker/options.py over worker/config.py's fields),
from which LLM's keywords, the worker/serve flags and a fleet YAML's `engine:` derive."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.options import (
    add_engine_flags,
    check_options,
    engine_options,
    from_namespace,
)


def test_every_option_is_taken_by_the_engine_under_its_key_with_its_default():
    options = engine_options()
    assert len({o.key for o in options}) == len(options) > 20
    defaults = {o.key: o.default for o in options}
    config = EngineConfig.from_options("default", **defaults)
    for opt in options:
        owner = next(c for c in (config.model, config.cache, config.scheduler, config.parallel)
                     if hasattr(c, opt.field))
        if opt.key != "max_num_batched_tokens":  # None: the device decides
            assert getattr(owner, opt.field) == opt.default, opt.key


def test_a_yaml_engine_section_is_parsed_and_checked_per_kind():
    parsed = check_options({"max_num_seqs": 8, "max-model-len": 512, "mlfq_starvation_s": 2,
                            "overlap_steps": "off", "cpu_kernels": None,
                            "enable_prefix_caching": False, "host_kv_memory": "1GiB",
                            "scheduler": "mlfq"}, "models[0].engine")
    assert parsed == {"max_num_seqs": 8, "max_model_len": 512, "mlfq_starvation_s": 2.0,
                      "overlap_steps": False, "cpu_kernels": None,
                      "enable_prefix_caching": False, "host_kv_memory": 1 << 30,
                      "scheduler": "mlfq"}
    bad = [({"max_num_seqs": "eight"}, "max_num_seqs: expected an int"),
           ({"max_num_seqs": True}, "max_num_seqs: expected an int"),
           ({"max_num_seqs": 2.5}, "max_num_seqs: expected an int"),
           ({"enforce_eager": "yes"}, "enforce_eager: expected true or false"),
           ({"overlap_steps": "sometimes"}, "overlap_steps: expected auto, on or off"),
           ({"attention_backend": "flash"}, "'flash' is not one of auto, triton, torch"),
           ({"host_kv_memory": "lots"}, "invalid size"),
           ({"max_num_sequences": 8}, "unknown key 'max_num_sequences'")]
    for options, message in bad:
        with pytest.raises(ValueError, match=message) as error:
            check_options(options, "models[0].engine")
        assert str(error.value).startswith("models[0].engine")
    with pytest.raises(ValueError, match="unknown key 'scheduler'"):
        check_options({"scheduler": "mlfq"}, "engine", exclude=("scheduler",))


def test_flags_are_made_for_every_option_and_parse_to_typed_values():
    parser = argparse.ArgumentParser()
    add_engine_flags(parser)
    flags = {a.option_strings[0] for a in parser._actions if a.option_strings}
    assert {o.flag for o in engine_options()} <= flags
    argv = ["--device", "cuda", "--max-num-seqs", "8", "--mlfq-deadline-slack", "0.5",
            "--enforce-eager", "--no-enable-prefix-caching", "--overlap-steps", "off",
            "--host-kv-memory", "4KiB", "--scheduler", "mlfq", "--cpu-kernels", "auto"]
    assert from_namespace(parser.parse_args(argv)) == {
        "device": "cuda", "max_num_seqs": 8, "mlfq_deadline_slack": 0.5,
        "enforce_eager": True, "enable_prefix_caching": False, "overlap_steps": False,
        "host_kv_memory": 4096, "scheduler": "mlfq"}
    assert from_namespace(parser.parse_args([])) == {}


def test_serve_takes_the_same_engine_flags_as_worker():
    from lmfleet.cli import main as cli

    parser = cli.build_parser()
    commands = parser._subparsers._group_actions[0].choices
    for command in ("worker", "serve"):
        flags = {s for a in commands[command]._actions for s in a.option_strings}
        assert {o.flag for o in engine_options()} <= flags, command


def test_the_command_line_reads_the_options_without_importing_torch():
    code = ("import sys; from lmfleet.cli import main as cli; cli.build_parser(); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == "False"
