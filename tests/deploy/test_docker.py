"""What can be checked of the container images without building them (no Docker, no
network here): the Python of each base image satisfies requires-python, they copy every
package folder pyproject.toml installs, the entrypoint is the console script pyproject
declares, the Ray they pin satisfies pyproject and is the chart's rayVersion, and the user
is the non-root uid the chart runs pods as."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet  # a dependency of pytest
from packaging.version import Version

from tests.deploy import helm_render

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; these checks need no more

ROOT = helm_render.ROOT
DOCKERFILES = {"Dockerfile": "cuda", "Dockerfile.cpu": "cpu"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def dockerfile(name: str) -> str:
    return (ROOT / "deploy" / "docker" / name).read_text()


def requirement(name: str) -> SpecifierSet:
    [spec] = [d for d in PYPROJECT["project"]["dependencies"]
              if re.match(rf"{name}\b", d)]
    return SpecifierSet(spec[len(name):])


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_base_images_python_satisfies_requires_python(name):
    text = dockerfile(name)
    [base] = re.findall(r"^ARG BASE_IMAGE=(\S+)$", text, re.M)
    assert re.search(r"^FROM \$\{BASE_IMAGE\}$", text, re.M)
    # The Python each base tag ships is stated on a `# PYTHON=X.Y` line (the python image
    # names it in its tag, which must then agree).
    [stated] = re.findall(r"^# PYTHON=(\d+\.\d+)$", text, re.M)
    tag_python = re.match(r"python:(\d+\.\d+)", base)
    if tag_python:
        assert tag_python.group(1) == stated
    else:
        assert base.startswith("pytorch/pytorch:") and "-cuda" in base
        assert f"Python is {stated}" in text  # the comment that says where it comes from
    assert Version(stated + ".0") in SpecifierSet(PYPROJECT["project"]["requires-python"])


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_image_installs_lmfleet_with_its_entrypoint(name):
    text = dockerfile(name)
    package_dirs = set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())
    copied = set(re.findall(r"^COPY (\S+) \./\1$", text, re.M))
    assert copied == package_dirs
    assert re.search(r"^COPY pyproject.toml README.md \./$", text, re.M)
    assert re.search(r"pip install --no-cache-dir \. ", text)
    [entrypoint] = re.findall(r'^ENTRYPOINT \["(\S+)"\]$', text, re.M)
    assert entrypoint in PYPROJECT["project"]["scripts"]
    # The chart's pods run as uid 1000 and must own the converted default model.
    assert "USER 1000:1000" in text
    values = helm_render.chart().values
    assert values["podSecurityContext"]["runAsUser"] == 1000


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_the_pinned_ray_is_the_charts_and_satisfies_pyproject(name):
    [ray] = re.findall(r'"ray\[default\]==([0-9.]+)"', dockerfile(name))
    assert Version(ray) in requirement("ray")
    assert helm_render.chart().values["fleet"]["kuberay"]["rayVersion"] == ray


def test_the_cpu_image_pins_the_torch_the_makefile_installs():
    [torch] = re.findall(r"torch==([0-9.]+)", dockerfile("Dockerfile.cpu"))
    assert f"torch=={torch}" in (ROOT / "Makefile").read_text()
    assert Version(torch) in requirement("torch")
    [gpu_torch] = re.findall(r"pytorch/pytorch:([0-9.]+)-", dockerfile("Dockerfile"))
    assert Version(gpu_torch) in requirement("torch")


def test_the_charts_default_tags_are_the_ones_the_dockerfiles_build():
    app_version = helm_render.chart().metadata["appVersion"]
    assert app_version == PYPROJECT["project"]["version"]
    for name, suffix in DOCKERFILES.items():
        assert f"lmfleet:{app_version}-{suffix} ." in dockerfile(name)  # the build line
    for example, suffix in (("gpu-default", "cuda"), ("cpu-only", "cpu")):
        text = helm_render.golden_path(example).read_text()
        assert f'image: "lmfleet:{app_version}-{suffix}"' in text


def test_the_build_context_leaves_out_the_venv():
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored


def test_committed_deploy_files_do_not_point_outside_the_repository():
    """Users and CI have no shared folder beside the checkout: the CRD schema is vendored
    under tests/deploy/schemas."""
    needles = ("/work/" + "shared", "../" + "shared")
    for path in [*(ROOT / "deploy").rglob("*"), *(Path(__file__).parent).rglob("*"),
                 ROOT / "docs" / "deploy.md"]:
        if path.is_file() and path.suffix in {".py", ".yaml", ".md", ".json", ".tpl", ".txt",
                                              ""}:
            text = path.read_text(errors="replace")
            assert not [n for n in needles if n in text], path
