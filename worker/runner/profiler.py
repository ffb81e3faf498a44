"""Calibrate the scheduler's cost model with a short profile of the real model.

Runs a few prefills and decode steps on scratch KV blocks (their contents are
overwritten by real requests later; the cache stays finite) and fits `CostModel`.
Takes well under a second on the default model.
"""

from __future__ import annotations

import time

import torch

from lmfleet.worker.request import Request
from lmfleet.worker.runner.model_runner import ModelRunner
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import ScheduledRequest
from lmfleet.worker.scheduler.cost_model import CostModel, fit_line


def _scratch_request(runner: ModelRunner, request_id: str, num_tokens: int) -> Request:
    num_blocks = -(-(num_tokens + 1) // runner.block_size)
    request = Request(request_id, [1] * num_tokens, SamplingParams(max_tokens=1, temperature=0))
    request.block_ids = list(range(num_blocks))
    return request


def _timed(runner: ModelRunner, items: list[ScheduledRequest]) -> float:
    sync = torch.cuda.synchronize if runner.device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    runner.execute(items, eos_token_ids=())
    sync()
    return time.perf_counter() - start


def profile_cost_model(runner: ModelRunner, max_prefill_tokens: int = 256,
                       max_batch: int = 16, repeats: int = 2) -> CostModel:
    capacity_tokens = runner.num_blocks * runner.block_size
    max_prefill_tokens = max(2, min(max_prefill_tokens, capacity_tokens - 1,
                                    runner.max_model_len - 1))
    # Warm-up (allocator, kernels) so the first measurement is not an outlier.
    _timed(runner, [ScheduledRequest(_scratch_request(runner, "w", 8), 8)])
    lengths = sorted({max(2, max_prefill_tokens // d) for d in (8, 4, 2, 1)})
    prefill_x, prefill_y = [], []
    for length in lengths:
        for _ in range(repeats):
            request = _scratch_request(runner, "p", length)
            prefill_x.append(length)
            prefill_y.append(_timed(runner, [ScheduledRequest(request, length)]))
    context = min(64, max_prefill_tokens)
    max_batch = max(1, min(max_batch, capacity_tokens // (context + runner.block_size)))
    decode_x, decode_y = [], []
    for batch in sorted({1, max(1, max_batch // 2), max_batch}):
        for _ in range(repeats):
            items = []
            for index in range(batch):
                request = _scratch_request(runner, f"d{index}", context)
                request.num_computed_tokens = context - 1
                items.append(ScheduledRequest(request, 1))
            decode_x.append(batch)
            decode_y.append(_timed(runner, items))
    for index in range(max_batch):
        runner.release(f"d{index}")
    runner.release("p")
    runner.release("w")
    prefill_base, prefill_slope = fit_line(prefill_x, prefill_y)
    decode_base, decode_slope = fit_line(decode_x, decode_y)
    images = getattr(runner, "images", None)
    return CostModel(prefill_base_s=prefill_base, prefill_per_token_s=prefill_slope,
                     decode_base_s=decode_base, decode_per_seq_s=decode_slope,
                     decode_per_ctx_token_s=0.0,
                     image_encode_s=images.encode_seconds(repeats) if images else 0.0)
