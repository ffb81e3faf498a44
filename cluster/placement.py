"""Where a replica runs: the Ray placement group of one replica's TP x PP ranks.

A replica of a model with tensor-parallel size `tp` and pipeline-parallel size `pp` needs
tp * pp devices, one bundle per rank, rank r in bundle r (ranks ordered stage-major:
bundle = stage * tp + tp_rank). On GPU nodes a bundle is one GPU plus one CPU for the
rank's process; on CPU-only fleets a bundle is `cpus_per_rank` CPUs.

Strategy: a pipeline stage's TP ranks exchange activations every layer, so one stage must
sit on one node; the stages talk once per micro-batch and may spread. With pp == 1 the
whole group is STRICT_PACK (one node); with pp > 1 it is PACK (one node when it fits,
else the fewest nodes Ray finds), which keeps the common single-node case tight.

Until tensor/pipeline parallelism lands in the engine, the controller starts tp = pp = 1
replicas only (`check_supported`), but this module already lays out any tp x pp.
"""

from __future__ import annotations

from dataclasses import dataclass

# What the engine can run today; the parallelism issue lifts this.
SUPPORTED_TP = 1
SUPPORTED_PP = 1


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
        """One resource bundle per rank, rank order."""
        bundle: dict[str, float] = {"CPU": float(self.cpus_per_rank)}
        if self.use_gpu:
            bundle["GPU"] = 1.0
        return [dict(bundle) for _ in range(self.world_size)]

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if self.pp == 1 else "PACK"

    def rank_bundle(self, stage: int, tp_rank: int) -> int:
        """The bundle index of the rank at pipeline `stage` and tensor-parallel `tp_rank`."""
        if not (0 <= stage < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"rank (stage {stage}, tp_rank {tp_rank}) is outside "
                             f"pp={self.pp} x tp={self.tp}")
        return stage * self.tp + tp_rank

    def check_supported(self) -> None:
        """ValueError when the engine cannot run this layout yet."""
        if self.tp != SUPPORTED_TP or self.pp != SUPPORTED_PP:
            raise ValueError(f"tp={self.tp}, pp={self.pp}: the engine runs tp=1, pp=1 only "
                             "until tensor/pipeline parallelism lands")


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
