"""Per-request timing records and the summary statistics both benchmark halves report.

JCT (job completion time) = completion - arrival; TTFT = first token - arrival; the
stall of a request is the longest time it went without producing a token, counted from
its arrival (so TTFT is one of its stalls): the longest time it waited without running,
give or take one step. Arrival is the workload's arrival time, not when the engine loop
got to add the request.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class JobRecord:
    """Times in seconds from the start of the run (arrival is the job's, not the add)."""

    job_id: str
    arrival_s: float
    output_len: int
    is_long: bool
    first_token_s: float = float("nan")
    finish_s: float = float("nan")
    last_token_s: float = float("nan")
    # Longest time without producing a token, counted from arrival (so TTFT included).
    max_stall_s: float = 0.0
    num_tokens: int = 0

    def on_tokens(self, now: float, count: int) -> None:
        if count == 0:
            return
        previous = self.arrival_s if self.num_tokens == 0 else self.last_token_s
        self.max_stall_s = max(self.max_stall_s, now - previous)
        if self.num_tokens == 0:
            self.first_token_s = now
        self.last_token_s = now
        self.num_tokens += count


def summarize(records: list[JobRecord]) -> dict:
    """Mean/p50/p99 JCT and TTFT, the worst TTFT and stall, and JCT per job class."""
    if any(r.num_tokens != r.output_len for r in records):
        raise RuntimeError("a job did not produce exactly its output length")
    jct = np.array([r.finish_s - r.arrival_s for r in records])
    ttft = np.array([r.first_token_s - r.arrival_s for r in records])
    is_long = np.array([r.is_long for r in records])
    out = {
        "num_requests": len(records),
        "jct_mean_s": float(jct.mean()),
        "jct_p50_s": float(np.percentile(jct, 50)),
        "jct_p99_s": float(np.percentile(jct, 99)),
        "jct_max_s": float(jct.max()),
        "ttft_mean_s": float(ttft.mean()),
        "ttft_p99_s": float(np.percentile(ttft, 99)),
        "ttft_max_s": float(ttft.max()),
        "max_stall_s": float(max(r.max_stall_s for r in records)),
    }
    for name, mask in (("short", ~is_long), ("long", is_long)):
        if mask.any():
            out[f"jct_mean_{name}_s"] = float(jct[mask].mean())
            out[f"jct_p99_{name}_s"] = float(np.percentile(jct[mask], 99))
    return out
