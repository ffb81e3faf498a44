"""A yardstick, not a policy: shortest-remaining-output-first with the output lengths known.

Real schedulers never know output lengths (the engine does not, and MLFQ must not); the
simulator does, so this bound shows how much of FCFS's mean JCT any reordering could
win on a workload. It reuses MLFQScheduler's KV placement and changes only the order:
fewest output tokens left first (ties: arrival), no starvation promotion.
"""

from __future__ import annotations

from lmfleet.worker.request import Request
from lmfleet.worker.scheduler.mlfq import MLFQScheduler


class OracleSRPTScheduler(MLFQScheduler):
    def priority_order(self) -> list[Request]:
        def remaining(request: Request) -> tuple[int, int]:
            left = request.sampling_params.max_tokens - request.num_output_tokens
            return left, self.entries[request.request_id].position

        return sorted(self.jobs.values(), key=remaining)

    def promote_starved(self) -> list[Request]:
        return []
