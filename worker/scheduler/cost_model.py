"""How long the model takes: prefill time by prompt tokens, decode step time by batch.

A linear model fitted by least squares on a short profile run when the worker starts
(`profile_cost_model` in worker/model/profiler.py):
    prefill(n, images)    = prefill_base_s + prefill_per_token_s * n + image_encode_s * images
    decode_step(b, ctx)   = decode_base_s + decode_per_seq_s * b + decode_per_ctx_token_s * ctx
where ctx is the total context of the batch. MLFQ uses it for skip-join (which queue a
new job joins) and for its quanta; it is reported with the worker's load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class CostModel:
    prefill_base_s: float = 0.005
    prefill_per_token_s: float = 0.0002
    decode_base_s: float = 0.01
    decode_per_seq_s: float = 0.0005
    decode_per_ctx_token_s: float = 1e-7
    # A vision-language model's image encoder (processor, tower, projector), per image.
    image_encode_s: float = 0.0

    def prefill_time(self, num_tokens: int, num_images: int = 0) -> float:
        return (self.prefill_base_s + self.prefill_per_token_s * num_tokens
                + self.image_encode_s * num_images)

    def decode_step_time(self, batch_size: int, total_context: int) -> float:
        return (self.decode_base_s + self.decode_per_seq_s * batch_size
                + self.decode_per_ctx_token_s * total_context)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares intercept and slope, both clamped at >= 0 (times never shrink)."""
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    var_x = sum((x - mean_x) ** 2 for x in xs)
    slope = 0.0 if var_x == 0 else sum((x - mean_x) * (y - mean_y)
                                       for x, y in zip(xs, ys, strict=True)) / var_x
    slope = max(slope, 0.0)
    return max(mean_y - slope * mean_x, 0.0), slope
