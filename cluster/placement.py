"""Where a replica runs: the Ray placement group of one replica's TP x PP ranks.

A replica of a model with tensor-parallel size `tp` and pipeline-parallel size `pp` has
tp * pp ranks, one bundle each (a GPU on GPU nodes, `cpus_per_rank` CPUs), in rank order:
stage-major, bundle = stage * tp + tp_rank. The replica actor is rank 0 in bundle 0 and
starts the other ranks as Ray actors in theirs (cluster/rank_actors.py). With pp == 1 the
bundles are STRICT_PACK (one node: the ranks all-reduce in every layer); with pp > 1 they
are PACK, so a replica too large for one node may put its stages on several (they pass
activations once per step).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaPlacement:
    """The resources of one replica.

    tp, pp: tensor- and pipeline-parallel sizes (>= 1).
    use_gpu: one GPU per rank (engine --device cuda); else CPU bundles.
    cpus_per_rank: CPUs per rank's bundle (the rank's process and its threads).
    """

    tp: int = 1
    pp: int = 1
    use_gpu: bool = False
    cpus_per_rank: float = 1.0

    def __post_init__(self) -> None:
        for name in ("tp", "pp"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if isinstance(self.cpus_per_rank, bool) or not isinstance(
                self.cpus_per_rank, (int, float)) or self.cpus_per_rank <= 0:
            raise ValueError(f"cpus_per_rank must be > 0, got {self.cpus_per_rank!r}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def bundles(self) -> list[dict[str, float]]:
        """One bundle per rank, in rank order."""
        bundle: dict[str, float] = {"CPU": float(self.cpus_per_rank)}
        if self.use_gpu:
            bundle["GPU"] = 1.0
        return [dict(bundle) for _ in range(self.world_size)]

    def rank0_resources(self) -> dict[str, float]:
        """What the replica actor (rank 0) asks for: its bundle."""
        return self.bundles()[0]

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if self.pp == 1 else "PACK"

    def rank_bundle(self, stage: int, tp_rank: int) -> int:
        """The bundle index of the rank at pipeline `stage` and tensor-parallel `tp_rank`."""
        if not (0 <= stage < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"rank (stage {stage}, tp_rank {tp_rank}) is outside "
                             f"pp={self.pp} x tp={self.tp}")
        return stage * self.tp + tp_rank


def unplaceable_reason(placement: ReplicaPlacement,
                       nodes: list[dict[str, float]]) -> str | None:
    """Why a replica with `placement` can never be placed on a cluster whose alive nodes
    have the `nodes` total resources (Ray's `node["Resources"]`), or None when it fits
    an empty cluster. Only the layout is checked, not what other replicas hold now."""
    bundles = placement.bundles()
    needed: dict[str, float] = {}
    for bundle in bundles:
        for name, amount in bundle.items():
            needed[name] = needed.get(name, 0.0) + amount

    def fits(have: dict[str, float], want: dict[str, float]) -> bool:
        return all(have.get(name, 0.0) >= amount for name, amount in want.items())

    if placement.strategy == "STRICT_PACK":
        if any(fits(node, needed) for node in nodes):
            return None
        where = "one node"
    else:  # PACK: every bundle fits some node and the cluster holds them all
        total: dict[str, float] = {}
        for node in nodes:
            for name, amount in node.items():
                total[name] = total.get(name, 0.0) + amount
        if all(any(fits(node, b) for node in nodes) for b in bundles) and fits(total, needed):
            return None
        where = "the cluster"
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0)
               for name in needed}
    layout = (f"{placement.world_size} rank(s) (tp={placement.tp}, pp={placement.pp}) on "
              f"{'GPUs' if placement.use_gpu else 'CPUs'}")
    return (f"cannot be placed: a replica needs {_amounts(needed)} on {where} for "
            f"{layout}, but the largest of the Ray cluster's {len(nodes)} node(s) has "
            f"{_amounts(largest)}" + (" (no GPU: run with --device cpu, or on a GPU node)"
                                      if placement.use_gpu and not largest.get("GPU") else ""))


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))
