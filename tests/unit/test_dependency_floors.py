"""The dependency floors in pyproject.toml are versions the committed gRPC stubs accept.

The stubs in proto/v1 refuse to import with an older runtime: `*_pb2_grpc.py` raise unless
grpcio >= GRPC_GENERATED_VERSION, and `*_pb2.py` call ValidateProtobufRuntimeVersion, which
needs a protobuf of the same major version, not older than the one that generated them.
A floor below that installs fine and then fails at import (seen with grpcio 1.84), so the
floors are read from pyproject.toml and checked against the stubs here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (every machine here has 3.11)

ROOT = Path(__file__).resolve().parents[2]
STUBS = ROOT / "proto" / "v1"
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# grpcio and the packages released with it (their own stubs check grpcio the same way;
# grpcio-tools regenerates ours, stamping its version into them).
GRPC_PACKAGES = ("grpcio", "grpcio-health-checking", "grpcio-reflection", "grpcio-tools")


def requirements() -> dict[str, Requirement]:
    lines = [*PROJECT["dependencies"],
             *(line for extra in PROJECT["optional-dependencies"].values() for line in extra)]
    return {(r := Requirement(line)).name: r for line in lines}


def floor(requirement: Requirement) -> Version:
    floors = [Version(s.version) for s in requirement.specifier if s.operator in (">=", "==")]
    assert floors, f"{requirement} declares no lower bound"
    return max(floors)


def grpc_generated_versions() -> dict[str, Version]:
    found = {}
    for path in sorted(STUBS.glob("*_pb2_grpc.py")):
        match = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.M)
        assert match, f"{path.name} has no GRPC_GENERATED_VERSION"
        found[path.name] = Version(match[1])
    return found


def protobuf_gencode_versions() -> dict[str, Version]:
    found = {}
    pattern = re.compile(r"ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,"
                         r"\s*(\d+),\s*(\d+),\s*(\d+),\s*'([^']*)'")
    for path in sorted(STUBS.glob("*_pb2.py")):
        match = pattern.search(path.read_text())
        assert match, f"{path.name} has no protobuf runtime version check"
        found[path.name] = Version(f"{match[1]}.{match[2]}.{match[3]}{match[4]}")
    return found


def test_the_stubs_are_found():
    assert len(grpc_generated_versions()) >= 2 and len(protobuf_gencode_versions()) >= 2


@pytest.mark.parametrize("package", GRPC_PACKAGES)
def test_grpc_floors_are_what_the_stubs_require(package):
    needed = max(grpc_generated_versions().values())
    declared = requirements()[package]
    assert floor(declared) >= needed, f"{declared}: the stubs need {package}>={needed}"


def test_protobuf_range_is_what_the_stubs_require():
    declared = requirements()["protobuf"]
    for name, gencode in protobuf_gencode_versions().items():
        assert floor(declared) >= gencode, f"{declared}: {name} needs protobuf>={gencode}"
        other_major = Version(f"{gencode.major + 1}")
        assert not declared.specifier.contains(other_major), \
            f"{declared} allows protobuf {other_major}; {name} needs major {gencode.major}"


@pytest.mark.integration
def test_the_stubs_work_with_exactly_the_declared_floors(tmp_path):
    """Install the floors of grpcio, its health/reflection packages and protobuf (pip,
    from the same index as the rest) ahead of the environment's, then import every stub
    and make a real call with them: the floors are not only declared but work."""
    import os
    import subprocess
    import sys

    pins = [f"{name}=={floor(requirements()[name])}" for name in
            ("grpcio", "grpcio-health-checking", "grpcio-reflection", "protobuf")]
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(tmp_path), *pins],
                   check=True, timeout=600)
    check = """
import asyncio, grpc, google.protobuf
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from lmfleet.proto.v1 import serving_pb2, serving_pb2_grpc, worker_pb2, worker_pb2_grpc

async def main():
    server = grpc.aio.server()
    health_pb2_grpc.add_HealthServicer_to_server(health.aio.HealthServicer(), server)
    reflection.enable_server_reflection(["grpc.health.v1.Health"], server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        reply = await health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=30)
    await server.stop(None)
    print(grpc.__version__, google.protobuf.__version__, reply.status)

asyncio.run(main())
"""
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    grpc_version, protobuf_version, status = out.stdout.split()
    assert (grpc_version, protobuf_version) == (pins[0].split("==")[1], pins[3].split("==")[1])
    assert status == "1"  # SERVING
