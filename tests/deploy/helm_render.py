"""Rendering the lmfleet Helm chart with the real Helm engine, offline.

helm-python-sdk (import name `helm_python`) binds Helm v4's Go SDK through a C library in
its wheel: no `helm` binary, no cluster, no network. Used by the tests in this folder and
by `make helm-golden`, which rewrites the golden files:

    python -m tests.deploy.helm_render      # deploy/helm/examples/NAME.rendered.yaml

Each example is `deploy/helm/examples/NAME.values.yaml`; its golden file is what
`helm template lmfleet deploy/helm/lmfleet -n lmfleet -f NAME.values.yaml` prints (every
manifest under a `# Source:` line, in template order; NOTES.txt left out).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = ROOT / "deploy" / "helm" / "lmfleet"
EXAMPLES_DIR = ROOT / "deploy" / "helm" / "examples"
RELEASE = "lmfleet"
NAMESPACE = "lmfleet"
NOTES = "lmfleet/templates/NOTES.txt"


@functools.lru_cache(maxsize=1)
def chart():
    """The chart, loaded once per process (a native handle; charts are immutable)."""
    import helm_python

    return helm_python.Chart.load(str(CHART_DIR))


def example_names() -> list[str]:
    return sorted(p.name.removesuffix(".values.yaml")
                  for p in EXAMPLES_DIR.glob("*.values.yaml"))


def example_values(name: str) -> dict[str, Any]:
    """An example's values, parsed by Helm's own YAML reader (as `helm -f` would)."""
    import helm_python

    return helm_python.values_from_yaml((EXAMPLES_DIR / f"{name}.values.yaml").read_text())


def render(values: dict[str, Any] | None = None) -> dict[str, str]:
    """Template path -> rendered text, as `helm install` would render it (the values are
    checked against values.schema.json first: HelmValuesError when they do not fit)."""
    return chart().render(values or {}, name=RELEASE, namespace=NAMESPACE, is_install=True)


def manifest(rendered: dict[str, str]) -> str:
    """The rendered templates as one multi-document YAML stream (`helm template`'s form)."""
    parts = []
    for path in sorted(rendered):
        text = rendered[path].strip()
        if path == NOTES or not _has_content(text):
            continue
        for document in _documents(text):
            parts.append(f"---\n# Source: {path}\n{document}\n")
    return "".join(parts)


def objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Every Kubernetes object the render produced."""
    return [doc for doc in yaml.safe_load_all(manifest(rendered)) if doc]


def golden_path(name: str) -> Path:
    return EXAMPLES_DIR / f"{name}.rendered.yaml"


def _has_content(text: str) -> bool:
    return any(line.strip() and not line.lstrip().startswith("#")
               for line in text.splitlines())


def _documents(text: str) -> list[str]:
    """A template's text split on `---` lines into its non-empty documents."""
    documents, current = [], []
    for line in text.splitlines():
        if line.strip() == "---":
            documents.append("\n".join(current).strip())
            current = []
        else:
            current.append(line)
    documents.append("\n".join(current).strip())
    return [d for d in documents if _has_content(d)]


def main() -> int:
    for name in example_names():
        path = golden_path(name)
        path.write_text(manifest(render(example_values(name))))
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
