"""The fleet config: which models the controller keeps running, how, and how many.

    cluster: default              # state-store namespace (optional)
    controller:                   # optional; ControllerConfig's fields
      reconcile_interval_s: 0.5
    models:
      - name: chat                # the name clients use (required, unique)
        path: default             # model directory, .gguf file or "default"
        min_replicas: 1           # or `replicas: N` for a fixed size
        max_replicas: 3
        tp: 1                     # tensor-parallel ranks per replica (one node)
        pp: 1                     # pipeline stages per replica (same node)
        cpus_per_rank: 1          # CPUs per rank in the replica's placement bundle
        scheduler: mlfq           # fcfs | mlfq
        engine:                   # engine options by key (worker/options.py)
          max_num_seqs: 8
          host_kv_memory: 1GiB
        autoscaling:              # AutoscalingConfig's other fields
          target_load_per_replica: 4
          upscale_delay_s: 2
          downscale_delay_s: 30

Everything is checked when the file is read, before anything starts: unknown keys, bad
values and engine options the worker would reject raise ValueError naming the place
(`models[1].engine.max_num_seqs: ...`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from types import MappingProxyType
from typing import Any, Optional

from lmfleet.cluster.autoscaler import AutoscalingConfig
from lmfleet.cluster.placement import ReplicaPlacement
from lmfleet.worker.model.default_model import DEFAULT_MODEL_ALIASES

SCHEDULERS = ("fcfs", "mlfq")


@dataclass(frozen=True)
class ControllerConfig:
    """How the controller runs its fleet.

    reconcile_interval_s: one round (health checks, heartbeats, scaling) this often.
    health_check_timeout_s: a replica's health check / GetLoad must answer within this.
    unhealthy_after: consecutive failed checks after which a replica is replaced.
    start_timeout_s: a replica not serving this long after its start is replaced.
    drain_timeout_s: a replica being removed finishes its requests for at most this long.
    replica_ttl_s: TTL of the replicas' records in the state store.
    restart_backoff_s: wait after a failed start before the next one (doubles, <= 30 s).
    replica_host: address replicas listen on (default: their node's IP; `lmfleet serve`
        with a Ray cluster of its own: 127.0.0.1, as only its router calls them).
    """

    reconcile_interval_s: float = 0.5
    health_check_timeout_s: float = 2.0
    unhealthy_after: int = 3
    start_timeout_s: float = 600.0
    drain_timeout_s: float = 30.0
    replica_ttl_s: float = 5.0
    restart_backoff_s: float = 1.0
    replica_host: Optional[str] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "replica_host":
                if value is not None and (not isinstance(value, str) or not value):
                    raise ValueError(f"replica_host must be a host name, got {value!r}")
            elif f.name == "unhealthy_after":
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise ValueError(f"unhealthy_after must be an integer >= 1, got {value!r}")
            elif isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise ValueError(f"{f.name} must be a positive number, got {value!r}")
        if self.replica_ttl_s <= self.reconcile_interval_s:
            raise ValueError(f"replica_ttl_s ({self.replica_ttl_s}) must exceed "
                             f"reconcile_interval_s ({self.reconcile_interval_s})")


def check_served_name(name: object) -> None:
    """A model name as clients see it (/v1/models, `model` fields): not empty, no outer
    spaces, and not a filesystem path, which would show every client the server's
    directories. Hugging Face style names ("org/model") are fine. Raises ValueError."""
    if not isinstance(name, str) or not name or name != name.strip():
        raise ValueError(f"invalid model name {name!r}")
    relative = name.startswith(("~", "./", "../", ".\\", "..\\"))
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or relative:
        hint = PurePosixPath(name.replace("\\", "/")).name or "default"
        raise ValueError(f"invalid model name {name!r}: a file path; name the model "
                         f"(e.g. {hint!r})")


@dataclass(frozen=True)
class ModelDeployment:
    """One model of the fleet. `engine` holds engine options by key ({"max_num_seqs": 8},
    worker/options.py), already checked."""

    name: str
    path: str = "default"
    tp: int = 1
    pp: int = 1
    cpus_per_rank: float = 1.0
    scheduler: str = "fcfs"
    engine: Mapping[str, Any] = field(default_factory=dict)
    autoscaling: AutoscalingConfig = field(default_factory=AutoscalingConfig)

    def __post_init__(self) -> None:
        check_served_name(self.name)
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"path must be a model directory, .gguf file or 'default', got "
                             f"{self.path!r}")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler must be one of {', '.join(SCHEDULERS)}, got "
                             f"{self.scheduler!r}")
        ReplicaPlacement(self.tp, self.pp, cpus_per_rank=self.cpus_per_rank)  # checks them
        object.__setattr__(self, "engine", MappingProxyType(dict(self.engine)))

    @property
    def placement(self) -> ReplicaPlacement:
        device = self.engine.get("device") or "cpu"
        return ReplicaPlacement(self.tp, self.pp, use_gpu=device.startswith("cuda"),
                                cpus_per_rank=self.cpus_per_rank)

    def engine_options(self) -> dict[str, Any]:
        """The options a replica's engine is built with (worker/serving.py)."""
        options = {**self.engine, "scheduler": self.scheduler}
        if self.tp > 1:
            options["tensor_parallel_size"] = self.tp
        if self.pp > 1:
            options["pipeline_parallel_size"] = self.pp
        return options


@dataclass(frozen=True)
class FleetConfig:
    models: tuple[ModelDeployment, ...]
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    cluster: str = "default"

    def __post_init__(self) -> None:
        object.__setattr__(self, "models", tuple(self.models))
        if not self.models:
            raise ValueError("a fleet needs at least one model")
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model name {duplicates[0]!r} is used twice")
        if not isinstance(self.cluster, str) or not self.cluster:
            raise ValueError(f"cluster must be a non-empty name, got {self.cluster!r}")

    def model(self, name: str) -> ModelDeployment:
        for deployment in self.models:
            if deployment.name == name:
                return deployment
        raise KeyError(name)


# ---- reading ---------------------------------------------------------------------------

_MODEL_KEYS = ("name", "path", "replicas", "min_replicas", "max_replicas", "tp", "pp",
               "cpus_per_rank", "scheduler", "engine", "autoscaling")
_SCALING_KEYS = tuple(f.name for f in dataclasses.fields(AutoscalingConfig)
                      if f.name not in ("min_replicas", "max_replicas"))


def load_fleet_config(path: str | os.PathLike) -> FleetConfig:
    """Read and check a fleet YAML file; ValueError (naming the file) for anything wrong."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as error:
        raise ValueError(f"cannot read fleet config {path}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML: {error}") from None
    return fleet_config_from_dict(data, source=str(path))


def fleet_config_from_dict(data: Any, source: str = "fleet config") -> FleetConfig:
    """A FleetConfig from parsed YAML/JSON; ValueError `SOURCE: PLACE: problem`."""
    _check_mapping(data, source, ("cluster", "controller", "models"))
    try:
        controller = ControllerConfig(**_check_mapping(
            data.get("controller") or {}, f"{source}: controller",
            tuple(f.name for f in dataclasses.fields(ControllerConfig))))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{source}: controller: {error}") from None
    models = data.get("models")
    if not isinstance(models, list) or not models:
        raise ValueError(f"{source}: models: a list of at least one model is required")
    deployments = [_model(entry, f"{source}: models[{i}]") for i, entry in enumerate(models)]
    try:
        return FleetConfig(tuple(deployments), controller, data.get("cluster", "default"))
    except ValueError as error:
        raise ValueError(f"{source}: {error}") from None


def _model(entry: Any, where: str) -> ModelDeployment:
    entry = _check_mapping(entry, where, _MODEL_KEYS)
    if "name" not in entry:
        raise ValueError(f"{where}: 'name' is required")
    sizes = {"min_replicas", "max_replicas"} & entry.keys()
    if "replicas" in entry and sizes:
        raise ValueError(f"{where}: give 'replicas' or min_replicas/max_replicas, not both")
    scaling = dict(_check_mapping(entry.get("autoscaling") or {}, f"{where}.autoscaling",
                                  _SCALING_KEYS))
    fixed = entry.get("replicas")
    scaling["min_replicas"] = entry.get("min_replicas", 1 if fixed is None else fixed)
    scaling["max_replicas"] = entry.get("max_replicas",
                                        scaling["min_replicas"] if fixed is None else fixed)
    try:
        autoscaling = AutoscalingConfig(**scaling)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    try:
        path = model_path(str(entry.get("path", "default")))
    except ValueError as error:
        raise ValueError(f"{where}.path: {error}") from None
    engine = engine_options(entry.get("engine") or {}, f"{where}.engine")
    try:
        return ModelDeployment(
            name=entry["name"], path=path, tp=entry.get("tp", 1),
            pp=entry.get("pp", 1), cpus_per_rank=entry.get("cpus_per_rank", 1.0),
            scheduler=entry.get("scheduler", "fcfs"), engine=engine, autoscaling=autoscaling)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def model_path(path: str) -> str:
    """A model given as a directory, a .gguf file (user-expanded) or a default alias;
    ValueError when it does not exist."""
    if path in DEFAULT_MODEL_ALIASES:
        return path
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
        raise ValueError(f"model not found: {path} (a directory, a .gguf file or 'default')")
    return expanded


# Engine options a fleet gives per model entry (`scheduler:`, `tp:`, `pp:`), not under
# `engine:`.
MODEL_LEVEL_OPTIONS = ("scheduler", "tensor_parallel_size", "pipeline_parallel_size")


def engine_options(options: Any, where: str) -> dict[str, Any]:
    """A model's `engine:` mapping checked as the engine would (worker/options.py, then the
    config dataclasses' own checks). The model entry's own keys (`scheduler`, `tp`) are
    not engine keys."""
    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.options import check_options

    checked = check_options(options, where, exclude=MODEL_LEVEL_OPTIONS)
    try:
        EngineConfig.from_options("default", **checked)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{where}: {error}") from None
    return checked


def _check_mapping(value: Any, where: str, allowed: tuple[str, ...],
                   normalise: bool = False) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}: expected a mapping, got {type(value).__name__}")
    for key in value:
        name = str(key).replace("-", "_") if normalise else key
        if name not in allowed:
            raise ValueError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")
    return value
