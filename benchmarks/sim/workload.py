"""The heavy-tailed scheduling workload, shared by the real-engine run and the simulator.

Poisson arrivals; prompt lengths uniform in `prompt_len`. A `short_fraction` of jobs draw
their output length uniformly from `short_output`; the rest, the long jobs, from
`long_output` with a heavy tail: a bounded Pareto (shape `pareto_alpha`, floor of the
continuous draw) by default, or uniform with `long_distribution="uniform"` (the bimodal
workload earlier runs used). Output lengths are enforced by the caller (min_tokens =
max_tokens), and are never shown to the scheduler.

Capacity (requests/s a saturated engine completes) is derived from the calibrated cost
model under the same step-time rule the simulator uses (`step_time`): a saturated engine
decodes a full batch of `max_num_seqs` every step, and each request adds its prefill tokens
once to some step.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

from lmfleet.worker.scheduler.cost_model import CostModel


@dataclass(frozen=True)
class Job:
    job_id: str
    arrival_s: float
    prompt_len: int
    output_len: int

    @property
    def is_long(self) -> bool:
        return self.output_len > LONG_THRESHOLD


# Anything above this many output tokens counts as a long job in the per-class numbers.
LONG_THRESHOLD = 64


LONG_DISTRIBUTIONS = ("pareto", "uniform")


def uniform_length(bounds: tuple[int, int], uniform: float) -> int:
    """The integer uniform on [low, high] at quantile `uniform` in [0, 1)."""
    low, high = bounds
    return low + int(uniform * (high - low + 1))


@dataclass(frozen=True)
class WorkloadSpec:
    short_fraction: float = 0.8
    short_output: tuple[int, int] = (4, 16)
    long_output: tuple[int, int] = (64, 2048)
    long_distribution: str = "pareto"
    pareto_alpha: float = 1.1
    prompt_len: tuple[int, int] = (16, 160)

    def __post_init__(self) -> None:
        if self.long_distribution not in LONG_DISTRIBUTIONS:
            raise ValueError(f"long_distribution must be one of {LONG_DISTRIBUTIONS}, "
                             f"got {self.long_distribution!r}")
        if self.pareto_alpha <= 0:
            raise ValueError(f"pareto_alpha must be > 0, got {self.pareto_alpha}")

    def long_length(self, uniform: float) -> int:
        """The long output length at quantile `uniform` in [0, 1) (inverse CDF)."""
        low, high = self.long_output
        if self.long_distribution == "uniform":
            return uniform_length(self.long_output, uniform)
        # Bounded Pareto on [low, high]: F(x) = (1 - (low/x)^a) / (1 - (low/high)^a).
        tail = 1 - (low / high) ** self.pareto_alpha
        return min(int(low / (1 - uniform * tail) ** (1 / self.pareto_alpha)), high)

    def long_pmf(self) -> list[tuple[int, float]]:
        """(length, probability) of every long output length."""
        low, high = self.long_output
        if self.long_distribution == "uniform":
            return [(n, 1 / (high - low + 1)) for n in range(low, high + 1)]
        alpha = self.pareto_alpha
        tail = 1 - (low / high) ** alpha
        cdf = lambda x: min((1 - (low / x) ** alpha) / tail, 1.0)  # noqa: E731
        return [(n, cdf(n + 1) - cdf(n)) for n in range(low, high + 1)]

    def output_moments(self) -> tuple[float, float]:
        """Mean and mean square of the output length over all jobs."""
        short_mean, short_square = _uniform_moments(*self.short_output)
        pmf = self.long_pmf()
        long_mean = math.fsum(n * p for n, p in pmf)
        long_square = math.fsum(n * n * p for n, p in pmf)
        f = self.short_fraction
        return f * short_mean + (1 - f) * long_mean, f * short_square + (1 - f) * long_square

    @property
    def mean_output_len(self) -> float:
        return self.output_moments()[0]

    @property
    def mean_prompt_len(self) -> float:
        return sum(self.prompt_len) / 2

    def as_dict(self) -> dict:
        return asdict(self)


def make_jobs(spec: WorkloadSpec, num_jobs: int, rate_per_s: float, seed: int) -> list[Job]:
    """`num_jobs` jobs with Poisson arrivals at `rate_per_s`, the first at t=0."""
    rng = random.Random(seed)
    jobs, now = [], 0.0
    for index in range(num_jobs):
        short = rng.random() < spec.short_fraction
        length_draw = rng.random()
        output_len = (uniform_length(spec.short_output, length_draw) if short
                      else spec.long_length(length_draw))
        jobs.append(Job(f"r{index}", now, rng.randint(*spec.prompt_len), output_len))
        now += rng.expovariate(rate_per_s)
    return jobs


def step_time(cost: CostModel, num_decodes: int, decode_context: int,
              num_prefill_tokens: int) -> float:
    """One engine step: a forward pass over decodes and prefill chunks together. A mixed
    step pays the decode step's fixed cost once plus the prefill tokens' marginal cost."""
    if num_decodes == 0:
        return cost.prefill_time(num_prefill_tokens)
    return (cost.decode_step_time(num_decodes, decode_context)
            + cost.prefill_per_token_s * num_prefill_tokens)


def _uniform_moments(low: int, high: int) -> tuple[float, float]:
    """Mean and mean square of an integer uniform on [low, high]."""
    mean = (low + high) / 2
    return mean, ((high - low + 1) ** 2 - 1) / 12 + mean**2


def capacity_per_s(cost: CostModel, spec: WorkloadSpec, max_num_seqs: int) -> float:
    """Requests per second a saturated engine completes (see the module docstring): per
    request, its prefill tokens plus L-1 decodes, each a 1/B share of a full batch's fixed
    cost plus its own per-sequence and per-context-token cost (context P+1 .. P+L-1)."""
    mean_len, mean_len_square = spec.output_moments()
    mean_prompt = spec.mean_prompt_len
    # E[sum of decode contexts] = E[L-1] E[P] + E[L(L-1)] / 2 (P and L independent)
    context_sum = (mean_len - 1) * mean_prompt + (mean_len_square - mean_len) / 2
    per_request = ((mean_len - 1) * (cost.decode_base_s / max_num_seqs + cost.decode_per_seq_s)
                   + cost.decode_per_ctx_token_s * context_sum
                   + cost.prefill_per_token_s * mean_prompt)
    return 1.0 / per_request
