"""Where a replica runs: the Ray placement group of one replica's TP x PP ranks.

A replica of a model with tensor-parallel size `tp` and pipeline-parallel size `pp` needs
tp * pp devices (GPUs on GPU nodes, `cpus_per_rank` CPUs each otherwise).

With pp == 1 (what the engine runs today) the group is one bundle holding every rank's
devices (tp GPUs and tp x cpus_per_rank CPUs) on one node, and the rank-0 actor takes all
of it: it starts the other tp - 1 ranks as its own processes (worker/parallel/ranks.py),
which so see the GPUs Ray gave it, and a rank that dies takes the replica down as one
unit for the controller to replace. With pp > 1 there would be one bundle per rank (ranks
ordered stage-major: bundle = stage * tp + tp_rank), PACK: a stage's TP ranks exchange
activations every layer, the stages only once per micro-batch; `check_supported` refuses
pp > 1 until pipeline parallelism lands.
"""

from __future__ import annotations

from dataclasses import dataclass

# What the engine can run today: tensor parallelism, not yet pipeline stages.
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
        """The resource bundles: with pp == 1 one holding every rank's devices, else one
        per rank in rank order."""
        ranks = self.tp if self.pp == 1 else 1
        bundle: dict[str, float] = {"CPU": float(self.cpus_per_rank * ranks)}
        if self.use_gpu:
            bundle["GPU"] = float(ranks)
        return [dict(bundle) for _ in range(self.world_size // ranks)]

    def rank0_resources(self) -> dict[str, float]:
        """What the rank-0 actor asks for: its whole bundle."""
        return self.bundles()[0]

    @property
    def strategy(self) -> str:
        return "STRICT_PACK" if self.pp == 1 else "PACK"

    def rank_bundle(self, stage: int, tp_rank: int) -> int:
        """The bundle index of the rank at pipeline `stage` and tensor-parallel `tp_rank`."""
        if not (0 <= stage < self.pp and 0 <= tp_rank < self.tp):
            raise ValueError(f"rank (stage {stage}, tp_rank {tp_rank}) is outside "
                             f"pp={self.pp} x tp={self.tp}")
        return 0 if self.pp == 1 else stage * self.tp + tp_rank

    def check_supported(self) -> None:
        """ValueError when the engine cannot run this layout yet."""
        if self.pp != SUPPORTED_PP:
            raise ValueError(f"pp={self.pp}: the engine runs pp=1 only until pipeline "
                             "parallelism lands (tp may be any size the model's heads allow)")


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
