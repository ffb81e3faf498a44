"""The other ranks of a parallel replica, as Ray actors in the replica's placement group.

The controller reserves one bundle per rank (rank r = stage * tp + tp_rank in bundle r,
one GPU each on GPU nodes); the replica actor is rank 0 in bundle 0 and, while its engine
starts, starts rank r in bundle r (`RayRanks`, the engine's `start_ranks`). The ranks
meet at rank 0's node address; each runs `worker.parallel.ranks.run_rank`. They are the
replica actor's own actors, so Ray ends them when it ends, and a rank whose actor dies is
seen by the replica's rank watch, which takes the whole replica down for the controller
to replace.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# How long rank 0 waits for the other ranks to report why a step or the start failed.
FAILURE_REPORT_S = 5.0


class RankActor:
    """One rank other than 0. Construct through `rank_actor_class()`."""

    def pid(self) -> int:
        return os.getpid()

    def run(self, rank: int, config: Any, model_dir: str, port: int, host: str) -> None:
        """Join the groups at host:port, load this rank's shard and run steps until the
        shutdown message (blocks for the replica's life)."""
        from lmfleet.worker.parallel import state
        from lmfleet.worker.parallel.ranks import run_rank

        os.environ.update(state.rank_environment())
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # Ray shows this actor one GPU (its bundle's): device 0 of its own view.
        cuda_device = 0 if config.model.device == "cuda" else None
        run_rank(rank, config, model_dir, port, host, cuda_device)


def rank_actor_class():
    import ray

    return ray.remote(RankActor)


class RayRanks:
    """Ranks 1..tp x pp - 1 as actors of the current placement group's bundles 1.., and
    rank 0's (this process's) membership of the groups."""

    def __init__(self, config: Any, model_dir: Path) -> None:
        import ray
        from ray.util import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from lmfleet.worker.parallel import state
        from lmfleet.worker.parallel.ranks import join_groups, join_while_watching

        size = config.parallel.world_size
        group = get_current_placement_group()
        if group is None or len(group.bundle_specs) < size:
            raise RuntimeError(f"a replica of {size} ranks needs a placement group with a "
                               "bundle per rank")
        host = ray.util.get_node_ip_address()
        port = state.free_port()
        os.environ.update(state.rank_environment())
        actor_class = rank_actor_class()
        self.actors, self.refs = [], []
        for rank in range(1, size):
            bundle = group.bundle_specs[rank]
            actor = actor_class.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0), max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=group, placement_group_bundle_index=rank)).remote()
            self.actors.append(actor)
            self.refs.append(actor.run.remote(rank, config, str(model_dir), port, host))
        self._closed = False
        cuda_device = 0 if config.model.device == "cuda" else None
        try:
            join_while_watching(lambda: join_groups(0, config, port, host, cuda_device),
                                self.dead)
        except BaseException as error:
            failure = self.failure(error)
            self.close(timeout_s=0)
            raise failure from error

    def _ended(self, timeout_s: float = 0.0) -> list[tuple[int, str]]:
        """(rank, how it ended) of the ranks whose actor call is over."""
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        ready, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout_s)
        ended = []
        for index, ref in enumerate(self.refs):
            if ref not in ready:
                continue
            try:
                ray.get(ref)
                how = "stopped"
            except RayActorError:
                how = "its actor died"
            except RayTaskError as error:
                cause = getattr(error, "cause", None) or error
                how = f"failed: {type(cause).__name__}: {cause}"
            ended.append((index + 1, how))
        return ended

    def dead(self) -> list[str]:
        """The ranks that ended ("rank 2 (its actor died)"), if any."""
        return [f"rank {rank} ({how})" for rank, how in self._ended()]

    def failure(self, error: BaseException) -> BaseException:
        """The error to raise on rank 0 when a collective failed: the rank that failed or
        died, if one did (it is the cause; rank 0 only saw the connection drop)."""
        ended = self._ended(FAILURE_REPORT_S)
        if ended:
            described = ", ".join(f"rank {rank} {how}" for rank, how in ended)
            return RuntimeError(f"parallel {described} ({error})")
        return error

    def close(self, timeout_s: float = 10.0) -> None:
        """Stop every rank: they leave on the shutdown message (sent by the driver); their
        actors are then ended."""
        import ray

        from lmfleet.worker.parallel import state

        if self._closed:
            return
        self._closed = True
        ray.wait(self.refs, num_returns=len(self.refs), timeout=timeout_s)
        for actor in self.actors:
            ray.kill(actor)
        state.destroy_groups()
