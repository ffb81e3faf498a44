"""Tuned W4A16 launches per GPU model, read from JSON tables measured by
benchmarks/w4a16_kernels.py (the approach vLLM takes for its MoE kernels).

A table `w4a16_configs/<device name>.json` holds, for one group size and each layer shape
"NxK" it was measured on, the fastest launch at each measured row count M. A matmul of M
rows takes the entry of the smallest measured M >= its M (the largest measured M past
the end). A GPU without a table of its own takes the table of a GPU of the same compute
capability (an H200 the H100's: the same multiprocessors, more bandwidth), which beats
the untuned defaults by far; shapes and group sizes no table has use
triton_w4a16.default_launch.
"""

from __future__ import annotations

import bisect
import functools
import json
import logging
from pathlib import Path

import torch

from lmfleet.worker.kernels.triton_w4a16 import W4A16Launch

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).resolve().parent / "w4a16_configs"


def table_path(device_name: str) -> Path:
    return CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ".json")


@functools.cache
def _table(path: Path) -> tuple[int, dict[tuple[int, int], tuple[list[int], list]]]:
    """-> (group size, {(N, K): (sorted Ms, launches)}); group size 0 when no table."""
    if not path.is_file():
        return 0, {}
    raw = json.loads(path.read_text())
    shapes = {}
    for shape, by_rows in raw["launches"].items():
        n, k = (int(part) for part in shape.split("x"))
        rows = sorted(int(m) for m in by_rows)
        shapes[(n, k)] = (rows, [W4A16Launch(**by_rows[str(m)]) for m in rows])
    return int(raw["group_size"]), shapes


def tuned_launch(device: torch.device, rows: int, n: int, k: int,
                 group_size: int) -> W4A16Launch | None:
    """The measured launch for this GPU and shape, or None where nothing was measured."""
    if device.type != "cuda":
        return None
    return launch_from_table(_device_table_path(device.index), rows, n, k, group_size)


@functools.cache
def _device_table_path(device_index: int | None) -> Path:
    name = torch.cuda.get_device_name(device_index)
    path = table_for(name, torch.cuda.get_device_capability(device_index))
    if path is not None and path != table_path(name):
        logger.info("W4A16: no launch table for %s; using %s's (same compute capability)",
                    name, path.stem)
    return path or table_path(name)  # no table: launch_from_table finds no file


def table_for(device_name: str, capability: tuple[int, int],
              config_dir: Path = CONFIG_DIR) -> Path | None:
    """The GPU's own table, else the first (by name) of a GPU of the same compute
    capability, else None."""
    own = config_dir / table_path(device_name).name  # table_path names it in CONFIG_DIR
    if own.is_file():
        return own
    for path in sorted(config_dir.glob("*.json")):
        if tuple(json.loads(path.read_text()).get("capability") or ()) == tuple(capability):
            return path
    return None


def launch_from_table(path: Path, rows: int, n: int, k: int,
                      group_size: int) -> W4A16Launch | None:
    table_group, shapes = _table(path)
    entry = shapes.get((n, k)) if table_group == group_size else None
    if entry is None:
        return None
    measured_rows, launches = entry
    index = min(bisect.bisect_left(measured_rows, rows), len(launches) - 1)
    return launches[index]
