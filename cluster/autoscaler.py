"""Autoscaling decisions for one model: `Autoscaler`, pure logic on an injectable clock.

    scaler = Autoscaler("default", AutoscalingConfig(min_replicas=1, max_replicas=4))
    decision = scaler.decide(loads, num_starting=0)   # every reconcile round
    # start decision.num_to_start replicas, drain and remove decision.num_to_stop

The controller owns the replicas; this module only says how many to start or stop, so it
holds no Ray, gRPC or thread and is tested on a fake clock. The only state it keeps is
when the current wish to scale up or down began (see `Autoscaler.decide`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Optional


def _is_int(value: object) -> bool:
    # bool is a subclass of int, but `max_replicas=True` is a mistake, not a count.
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


@dataclass(frozen=True)
class AutoscalingConfig:
    """How one model scales. Invalid values raise ValueError naming the field and value.

    Loads are (running + waiting requests) per ready replica; delays are in seconds and
    0 means act in the round the need is seen (math.inf means never). Float fields accept
    ints and are stored as floats.
    """

    min_replicas: int = 1
    max_replicas: int = 1
    target_load_per_replica: float = 4.0
    target_kv_usage: float = 0.9
    upscale_delay_s: float = 2.0
    downscale_delay_s: float = 30.0
    max_starting: int = 2

    def __post_init__(self) -> None:
        def bad(field: str, rule: str) -> ValueError:
            value = getattr(self, field)
            return ValueError(f"AutoscalingConfig.{field} must be {rule}, got {value!r}")

        for field in ("min_replicas", "max_replicas", "max_starting"):
            if not _is_int(getattr(self, field)):
                raise bad(field, "an int")
        for field in ("target_load_per_replica", "target_kv_usage", "upscale_delay_s",
                      "downscale_delay_s"):
            if not _is_number(getattr(self, field)):
                raise bad(field, "a number")
            object.__setattr__(self, field, float(getattr(self, field)))
        if self.min_replicas < 0:
            raise bad("min_replicas", ">= 0")
        if self.max_replicas < 1:
            raise bad("max_replicas", ">= 1")
        if self.max_replicas < self.min_replicas:
            raise bad("max_replicas", f">= min_replicas ({self.min_replicas})")
        # Comparisons are written so that NaN fails them.
        if not (0 < self.target_load_per_replica < math.inf):
            raise bad("target_load_per_replica", "a finite number > 0")
        if not (0 < self.target_kv_usage <= 1):
            raise bad("target_kv_usage", "in (0, 1]")
        for field in ("upscale_delay_s", "downscale_delay_s"):
            if not getattr(self, field) >= 0:
                raise bad(field, ">= 0")
        if self.max_starting < 1:
            raise bad("max_starting", ">= 1")


@dataclass(frozen=True)
class ReplicaLoad:
    """One ready replica's load: request counts (non-negative ints) and KV-cache usage
    (a number in [0, 1]). Anything else raises ValueError."""

    replica_id: str
    num_running: int
    num_waiting: int
    kv_cache_usage: float

    def __post_init__(self) -> None:
        if not isinstance(self.replica_id, str) or not self.replica_id:
            raise ValueError(f"ReplicaLoad.replica_id must be a non-empty str, "
                             f"got {self.replica_id!r}")
        for field in ("num_running", "num_waiting"):
            value = getattr(self, field)
            if not _is_int(value) or value < 0:
                raise ValueError(f"ReplicaLoad.{field} must be an int >= 0, got {value!r} "
                                 f"(replica {self.replica_id})")
        usage = self.kv_cache_usage
        if not _is_number(usage) or not (0 <= usage <= 1):
            raise ValueError(f"ReplicaLoad.kv_cache_usage must be in [0, 1], got {usage!r} "
                             f"(replica {self.replica_id})")
        object.__setattr__(self, "kv_cache_usage", float(usage))

    @property
    def load(self) -> int:
        return self.num_running + self.num_waiting


@dataclass(frozen=True)
class ScalingDecision:
    """What one `Autoscaler.decide` round concluded; see its docstring for the rules."""

    model: str
    num_ready: int
    num_starting: int
    current: int
    raw_desired: int
    desired: int
    num_to_start: int
    num_to_stop: int
    total_load: int
    mean_kv_usage: float
    reason: str

    def as_log_fields(self) -> dict:
        """The model and every number of the decision (not `reason`, which is the
        message), as a flat dict for a structured log line."""
        fields = asdict(self)
        del fields["reason"]
        return fields


class Autoscaler:
    """One model's scaling decisions. Not thread-safe: one caller (the controller's
    reconcile loop) calls `decide` once per round."""

    def __init__(self, model: str, config: AutoscalingConfig,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not isinstance(config, AutoscalingConfig):
            raise ValueError(f"config must be an AutoscalingConfig, got {config!r}")
        self.model = model
        self.config = config
        self._clock = clock
        self._up_since: Optional[float] = None     # first round with raw > current
        self._down_since: Optional[float] = None   # first round with raw < current
        self._down_max = 0                         # largest raw since _down_since

    def decide(self, loads: Sequence[ReplicaLoad], num_starting: int) -> ScalingDecision:
        """One round's decision, given the loads of the model's ready replicas (one each,
        distinct replica_ids) and how many of its replicas are starting (an int >= 0).
        Bad input raises ValueError. current = len(loads) + num_starting.

        1. raw_desired = ceil(total_load / target_load_per_replica), raised to
           num_ready + 1 when mean_kv_usage > target_kv_usage, clamped to
           [min_replicas, max_replicas]. With no ready replica the load is unknown:
           raw_desired = max(current, min_replicas), clamped to max_replicas. (So scaling
           up from zero ready replicas is only ever to min_replicas.)
        2. Bounds are restored at once: current < min_replicas starts the difference,
           current > max_replicas stops the difference (even while replicas start).
        3. Upscale: once raw_desired > current has held in every round for
           >= upscale_delay_s (timed from the first such round), desired = raw_desired.
        4. Downscale: once raw_desired < current has held in every round for
           >= downscale_delay_s, desired = the largest raw_desired seen since it began
           (a brief dip does not undershoot). While num_starting > 0 no replica is stopped
           and desired stays current; the timer keeps running, so the stop comes in the
           first round without starting replicas.
        5. num_to_start = desired - current capped by max_starting - num_starting (never
           negative; a capped upscale keeps desired and its elapsed timer, so it goes on
           as soon as starts finish); num_to_stop = current - desired. desired == current
           when nothing is to change.
        6. A round that starts or stops replicas resets both timers, so the next change
           waits its own full delay.
        """
        cfg = self.config
        now = self._clock()
        loads = tuple(loads)
        self._check_input(loads, num_starting)
        num_ready = len(loads)
        current = num_ready + num_starting
        total_load = sum(item.load for item in loads)
        mean_kv = sum(item.kv_cache_usage for item in loads) / num_ready if num_ready else 0.0
        by_kv = False
        if num_ready == 0:
            raw = min(max(current, cfg.min_replicas), cfg.max_replicas)
        else:
            raw = math.ceil(total_load / cfg.target_load_per_replica)
            if mean_kv > cfg.target_kv_usage and num_ready + 1 > raw:
                raw, by_kv = num_ready + 1, True
            raw = min(max(raw, cfg.min_replicas), cfg.max_replicas)

        # A timer runs only while its condition holds in every round.
        if raw > current:
            self._up_since = now if self._up_since is None else self._up_since
        else:
            self._up_since = None
        if raw < current:
            if self._down_since is None:
                self._down_since, self._down_max = now, raw
            self._down_max = max(self._down_max, raw)
        else:
            self._down_since = None

        why = (f"kv usage {mean_kv:.2f} > {cfg.target_kv_usage}" if by_kv
               else f"load {total_load} > {current} x {cfg.target_load_per_replica}")
        desired = current
        reason = f"steady at {current} (load {total_load}, kv usage {mean_kv:.2f})"
        if num_ready == 0:
            reason = f"no ready replica, load unknown: holding {current}"
        if current < cfg.min_replicas:
            desired = cfg.min_replicas
            reason = f"below min_replicas: {current} -> {desired}"
        elif current > cfg.max_replicas:
            desired = cfg.max_replicas
            reason = f"above max_replicas: {current} -> {desired}"

        if self._up_since is not None:
            waited = now - self._up_since
            if waited >= cfg.upscale_delay_s and raw > desired:
                desired = raw
                reason = f"{why} for {waited:.1f} s: {current} -> {desired}"
            elif desired == current:
                reason = (f"{why} for {waited:.1f} s of {cfg.upscale_delay_s} s: "
                          f"holding {current}")
        elif self._down_since is not None:
            waited = now - self._down_since
            target = min(self._down_max, current)
            if waited < cfg.downscale_delay_s:
                if desired == current:
                    reason = (f"load {total_load} <= {raw} x {cfg.target_load_per_replica} "
                              f"for {waited:.1f} s of {cfg.downscale_delay_s} s: "
                              f"holding {current}")
            elif num_starting > 0:
                if desired == current:
                    reason = (f"waiting for {num_starting} starting before {current} -> "
                              f"{target}")
            elif target < desired:
                desired = target
                reason = (f"load {total_load} <= {desired} x {cfg.target_load_per_replica} "
                          f"for {waited:.1f} s: {current} -> {desired}")

        num_to_start = num_to_stop = 0
        if desired > current:
            num_to_start = max(0, min(desired - current, cfg.max_starting - num_starting))
            if num_to_start < desired - current:
                reason += (f" (starting {num_to_start} now, {num_starting} already starting, "
                           f"max_starting {cfg.max_starting})")
        elif desired < current:
            num_to_stop = current - desired
        if num_to_start or num_to_stop:
            self._up_since = self._down_since = None
        return ScalingDecision(
            model=self.model, num_ready=num_ready, num_starting=num_starting,
            current=current, raw_desired=raw, desired=desired, num_to_start=num_to_start,
            num_to_stop=num_to_stop, total_load=total_load, mean_kv_usage=mean_kv,
            reason=reason)

    def _check_input(self, loads: tuple, num_starting: int) -> None:
        if not _is_int(num_starting) or num_starting < 0:
            raise ValueError(f"num_starting must be an int >= 0, got {num_starting!r} "
                             f"(model {self.model})")
        seen = set()
        for item in loads:
            if not isinstance(item, ReplicaLoad):
                raise ValueError(f"loads must hold ReplicaLoad, got {item!r} "
                                 f"(model {self.model})")
            if item.replica_id in seen:
                raise ValueError(f"replica {item.replica_id!r} appears twice in loads "
                                 f"(model {self.model})")
            seen.add(item.replica_id)
