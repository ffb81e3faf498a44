"""Helpers for the Helm chart tests: each example rendered once per process."""

from __future__ import annotations

import functools
from typing import Any

from tests.deploy import helm_render

EXAMPLES = helm_render.example_names()


@functools.cache
def rendered_example(name: str) -> dict[str, str]:
    return helm_render.render(helm_render.example_values(name))


def example_objects(name: str) -> list[dict[str, Any]]:
    return helm_render.objects(rendered_example(name))


def find(objects: list[dict[str, Any]], kind: str, name_suffix: str = "") -> dict[str, Any]:
    """The one object of `kind` whose name ends with `name_suffix`."""
    matches = [o for o in objects
               if o["kind"] == kind and o["metadata"]["name"].endswith(name_suffix)]
    assert len(matches) == 1, (kind, name_suffix, [o["metadata"]["name"] for o in matches])
    return matches[0]


def find_all(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]
