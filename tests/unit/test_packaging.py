"""pyproject.toml lists every package folder, and ships the C sources compiled at run time,
so a non-editable install has everything an editable one has."""

import fnmatch
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+ (every machine here has 3.11)

ROOT = Path(__file__).resolve().parents[2]
SETUPTOOLS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def package_of(folder: Path) -> str:
    """The import name of a source folder, through the package-dir mapping."""
    for name, source in SETUPTOOLS["package-dir"].items():
        try:
            rest = folder.relative_to(ROOT / source)
        except ValueError:
            continue
        return ".".join([name, *rest.parts])
    raise AssertionError(f"{folder} is under no mapped folder")


def source_folders() -> list[Path]:
    return sorted({path.parent for source in SETUPTOOLS["package-dir"].values()
                   for path in (ROOT / source).rglob("*.py")})


def test_every_package_folder_is_listed():
    listed = set(SETUPTOOLS["packages"])
    missing = [package_of(folder) for folder in source_folders()
               if package_of(folder) not in listed]
    assert missing == []
    assert len(source_folders()) >= 12


def test_c_sources_are_package_data():
    c_files = [path for source in SETUPTOOLS["package-dir"].values()
               for path in (ROOT / source).rglob("*.c")]
    assert len(c_files) >= 2  # the decode kernel and the fused ops
    data = SETUPTOOLS["package-data"]
    for path in c_files:
        patterns = data.get(package_of(path.parent), [])
        assert any(fnmatch.fnmatch(path.name, p) for p in patterns), f"{path} is not shipped"


def test_only_the_command_line_imports_the_command_line():
    """The engine, router and fleet are libraries: `lmfleet.cli` builds on them, never the
    other way round (a replica builds its engine from options, not from parsed argv)."""
    importers = [path.relative_to(ROOT) for source in ("worker", "router", "cluster", "proto")
                 for path in (ROOT / source).rglob("*.py")
                 if "lmfleet.cli" in path.read_text()]
    assert importers == []
