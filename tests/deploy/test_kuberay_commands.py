"""The shell glue of the RayCluster's containers, run for real with bash: KubeRay hands
each Ray container its generated `ray start ... --block` in $KUBERAY_GEN_RAY_START_CMD
(we set ray.io/overwrite-container-cmd, so our command runs as written). The head must
start Ray without --block (or it would never reach the controller) and then exec the
controller joining that Ray; a worker must run KubeRay's command unchanged, --block
included (so the pod lives as long as its raylet). `ray` and `lmfleet` are stubs that
record their arguments; nothing starts."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from lmfleet.cli.main import build_parser
from tests.deploy.chart_fixtures import example_objects, find

STUB = """#!/bin/sh
for arg in "$@"; do printf '%s\\0' "$arg"; done > "$STUB_LOG/$(basename "$0")"
"""
# What KubeRay generates (rayStartParams as --key=value, booleans bare; JSON quoted).
HEAD_CMD = ("ray start --head --dashboard-host=0.0.0.0 --num-cpus=0 --num-gpus=0 "
            "--metrics-export-port=8080 --block --dashboard-agent-listen-port=52365 "
            """--resources='{"head": 1}'""")
WORKER_CMD = ("ray start --address=lmfleet-head-svc.lmfleet.svc.cluster.local:6379 "
              "--num-cpus=2 --num-gpus=2 --metrics-export-port=8080 --block")


def run_container(container: dict, generated: str, tmp_path: Path) -> dict[str, list[str]]:
    """Run the container's command with stubbed `ray`/`lmfleet`; their argv by name."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    bin_dir.mkdir(parents=True)
    log.mkdir()
    for name in ("ray", "lmfleet"):
        (bin_dir / name).write_text(STUB)
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "STUB_LOG": str(log),
           "KUBERAY_GEN_RAY_START_CMD": generated}
    subprocess.run(container["command"] + container["args"], env=env, check=True, timeout=30)
    return {p.name: p.read_text().split("\0")[:-1] for p in log.iterdir()}


@pytest.mark.parametrize("name", ["gpu-default", "external-redis"])
def test_the_head_starts_ray_in_the_background_then_execs_the_controller(name, tmp_path):
    cluster = find(example_objects(name), "RayCluster")
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    [head] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    calls = run_container(head, HEAD_CMD, tmp_path)
    assert calls["ray"] == ["start", "--head", "--dashboard-host=0.0.0.0", "--num-cpus=0",
                            "--num-gpus=0", "--metrics-export-port=8080",
                            "--dashboard-agent-listen-port=52365", '--resources={"head": 1}']
    args = build_parser().parse_args(calls["lmfleet"])
    assert (args.command, args.ray_address, args.config) == (
        "controller", "auto", "/etc/lmfleet/fleet.yaml")


def test_a_worker_runs_kuberays_command_as_it_is(tmp_path):
    cluster = find(example_objects("two-models-tp2"), "RayCluster")
    for i, group in enumerate(cluster["spec"]["workerGroupSpecs"]):
        [worker] = group["template"]["spec"]["containers"]
        calls = run_container(worker, WORKER_CMD, tmp_path / str(i))
        assert calls == {"ray": WORKER_CMD.split()[1:]}


def test_the_head_stops_when_ray_fails_to_start(tmp_path):
    [head] = find(example_objects("gpu-default"), "RayCluster")["spec"]["headGroupSpec"][
        "template"]["spec"]["containers"]
    with pytest.raises(subprocess.CalledProcessError):
        run_container(head, "false --block", tmp_path)
    assert not (tmp_path / "log" / "lmfleet").exists()  # the controller never started
