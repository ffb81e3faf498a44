"""Where a replica runs: the Ray placement group of one replica's TP x PP ranks.

A replica of a model with tensor-parallel size `tp` and pipeline-parallel size `pp` needs
tp * pp devices (GPUs on GPU nodes, `cpus_per_rank` CPUs each otherwise). The group is
one bundle holding every rank's devices on one node (STRICT_PACK), and the rank-0 actor
takes all of it: it starts the other ranks as its own processes (worker/parallel/ranks.py),
which so see the GPUs Ray gave it, and a rank that dies takes the replica down as one
unit for the controller to replace. A replica therefore never spans nodes; its stages
talk over the node's own links (NVLink, shared memory).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ReplicaPlacement:
    """The resources of one replica.

    tp, pp: tensor- and pipeline-parallel sizes (>= 1).
    use_gpu: one GPU per rank (engine --device cuda); else CPU bundles.
    cpus_per_rank: CPUs per rank (the rank's process and its threads).
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
        """The resource bundles: one, holding every rank's devices."""
        bundle: dict[str, float] = {"CPU": float(self.cpus_per_rank * self.world_size)}
        if self.use_gpu:
            bundle["GPU"] = float(self.world_size)
        return [bundle]

    def rank0_resources(self) -> dict[str, float]:
        """What the rank-0 actor asks for: its whole bundle."""
        return self.bundles()[0]

    @property
    def strategy(self) -> str:
        return "STRICT_PACK"


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

    if any(fits(node, needed) for node in nodes):
        return None
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0)
               for name in needed}
    layout = (f"{placement.world_size} rank(s) (tp={placement.tp}, pp={placement.pp}) on "
              f"{'GPUs' if placement.use_gpu else 'CPUs'}")
    return (f"cannot be placed: a replica needs {_amounts(needed)} on one node for "
            f"{layout}, but the largest of the Ray cluster's {len(nodes)} node(s) has "
            f"{_amounts(largest)}" + (" (no GPU: run with --device cpu, or on a GPU node)"
                                      if placement.use_gpu and not largest.get("GPU") else ""))


def _amounts(resources: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in sorted(resources.items()))
