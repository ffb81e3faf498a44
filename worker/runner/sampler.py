"""Batched token sampling: penalties, min_tokens, greedy / temperature, top-k/p, min-p.

Every random row draws its noise from its own request's `torch.Generator`, so a request's
tokens depend only on its seed and its own logits, never on what else is batched with it.
Sampling uses the exponential race (argmax of p / Exp(1)), which picks index i with
probability p_i and needs no cumulative sums.

`sample_async` never waits for the device: per-row parameters go up through pinned memory,
and the results come back by an asynchronous copy into pinned memory that
`PendingSample.result()` waits for, so the engine can launch the next step first.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from lmfleet.worker.request import Request, TokenLogprobs

_NEG_INF = float("-inf")


@dataclass
class SamplingBatch:
    """Per-row sampling state for the rows that sample this step (one per request)."""

    requests: list[Request]
    generators: list[torch.Generator]
    eos_token_ids: tuple[int, ...]

    @property
    def params(self):
        return [request.sampling_params for request in self.requests]


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[Optional[TokenLogprobs]]


def to_device(values, device: torch.device, dtype: Optional[torch.dtype] = None
              ) -> torch.Tensor:
    """A host list or tensor on `device` without a host sync: a copy from pageable memory
    would wait for every kernel queued before it."""
    host = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def _padded(rows: list[list[int]], pad: int, device: torch.device) -> torch.Tensor:
    width = max((len(r) for r in rows), default=0) or 1
    out = torch.full((len(rows), width), pad, dtype=torch.int64)
    for i, row in enumerate(rows):
        if row:
            out[i, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return to_device(out, device)


def apply_penalties(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Repetition (prompt + output, HF/vLLM style), presence and frequency (output only)."""
    num_rows, vocab = logits.shape
    device = logits.device
    params = batch.params
    output_ids = _padded([r.output_token_ids for r in batch.requests], vocab, device)
    prompt_ids = _padded([r.prompt_token_ids for r in batch.requests], vocab, device)
    counts = torch.zeros(num_rows, vocab + 1, device=device)  # last column swallows padding
    counts.scatter_add_(1, output_ids, torch.ones_like(output_ids, dtype=counts.dtype))
    counts = counts[:, :vocab]  # (N, V)
    in_prompt = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=device)
    in_prompt.scatter_(1, prompt_ids, True)
    seen = in_prompt[:, :vocab] | (counts > 0)  # (N, V)
    repetition = to_device([p.repetition_penalty for p in params], device)[:, None]
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    frequency = to_device([p.frequency_penalty for p in params], device)[:, None]
    presence = to_device([p.presence_penalty for p in params], device)[:, None]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def suppress_stop_tokens(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """Before min_tokens outputs exist, EOS and stop_token_ids cannot be sampled."""
    vocab = logits.shape[1]
    rows, columns = [], []
    for row, request in enumerate(batch.requests):
        params = request.sampling_params
        if request.num_output_tokens < params.min_tokens:
            banned = set(params.stop_token_ids)
            if not params.ignore_eos:
                banned.update(batch.eos_token_ids)
            banned = [t for t in banned if t < vocab]
            rows.extend([row] * len(banned))
            columns.extend(banned)
    if rows:
        # One indexed write for the whole batch instead of one per row.
        logits[to_device(rows, logits.device), to_device(columns, logits.device)] = _NEG_INF
    return logits


def filter_logits(logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
    """top-k, top-p and min-p on temperature-scaled logits (N, V); removed entries -> -inf."""
    params = batch.params
    device = logits.device
    vocab = logits.shape[1]
    sorted_logits, sorted_ids = logits.sort(dim=-1, descending=True)  # (N, V)
    ranks = torch.arange(vocab, device=device)[None, :]  # (1, V)
    top_k = to_device([p.top_k if p.top_k > 0 else vocab for p in params], device)
    remove = ranks >= top_k[:, None]  # (N, V)
    probs = sorted_logits.masked_fill(remove, _NEG_INF).softmax(dim=-1)
    top_p = to_device([p.top_p for p in params], device)[:, None]
    # Drop a token when the tokens ranked above it already cover top_p (keeps the first).
    remove |= (probs.cumsum(dim=-1) - probs) > top_p
    min_p = to_device([p.min_p for p in params], device)[:, None]
    remove |= probs < min_p * probs[:, :1]
    filtered = sorted_logits.masked_fill(remove, _NEG_INF)
    return torch.full_like(logits, _NEG_INF).scatter(1, sorted_ids, filtered)


def compute_logprobs(raw_logits: torch.Tensor, token_ids: torch.Tensor, batch: SamplingBatch
                     ) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Log-probabilities of the model's distribution (before penalties and temperature):
    (top values (N, n), top ids (N, n), the sampled token's (N,)), or None if no row asks."""
    wanted = [p.logprobs for p in batch.params]
    if all(n is None for n in wanted):
        return None
    logprobs = raw_logits.log_softmax(dim=-1)  # (N, V)
    top_n = max(n or 0 for n in wanted)
    top_values, top_ids = logprobs.topk(max(top_n, 1), dim=-1)  # (N, top_n)
    chosen = logprobs.gather(1, token_ids[:, None])[:, 0]  # (N,)
    return top_values, top_ids, chosen


class PendingSample:
    """The step's sampled tokens (and logprobs) on their way to the host."""

    def __init__(self, token_ids: torch.Tensor,
                 logprobs: Optional[tuple[torch.Tensor, ...]], wanted: list[Optional[int]]):
        self.device_token_ids = token_ids  # (N,) int64, on the device
        self._wanted = wanted
        self._event: Optional[torch.cuda.Event] = None
        tensors = (token_ids, *(logprobs or ()))
        if token_ids.device.type == "cuda":
            self._host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors]
            for host, device in zip(self._host, tensors, strict=True):
                host.copy_(device, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = list(tensors)

    def result(self) -> SamplerOutput:
        """Wait for the copies; token ids and logprobs as Python values."""
        if self._event is not None:
            self._event.synchronize()
        sampled = self._host[0].tolist()
        if len(self._host) == 1:
            return SamplerOutput(token_ids=sampled, logprobs=[None] * len(sampled))
        top_values, top_ids, chosen = (t.tolist() for t in self._host[1:])
        result: list[Optional[TokenLogprobs]] = []
        for row, n in enumerate(self._wanted):
            if n is None:
                result.append(None)
                continue
            result.append(TokenLogprobs(
                token_id=sampled[row], logprob=chosen[row],
                top_token_ids=tuple(top_ids[row][:n]), top_logprobs=tuple(top_values[row][:n])))
        return SamplerOutput(token_ids=sampled, logprobs=result)


def sample(logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
    """logits (N, V) float32 -> one token per row."""
    return sample_async(logits, batch).result()


def sample_async(logits: torch.Tensor, batch: SamplingBatch) -> PendingSample:
    """logits (N, V) float32 -> one token per row, left on the device for now."""
    raw_logits = logits
    params = batch.params
    if any(p.uses_penalties for p in params):
        logits = apply_penalties(logits, batch)
    if any(r.num_output_tokens < r.sampling_params.min_tokens for r in batch.requests):
        # Written in place; the raw logits are kept only when logprobs read them later.
        keep_raw = logits is raw_logits and any(p.logprobs is not None for p in params)
        logits = suppress_stop_tokens(logits.clone() if keep_raw else logits, batch)
    # (N,) greedy choice for every row. max() returns the first maximal index as argmax
    # does, and runs 2-3x faster than argmax over a (64, 49152) CPU tensor.
    token_ids = logits.max(dim=-1).indices
    random_rows = [i for i, p in enumerate(params) if not p.greedy]
    if random_rows:
        rows = to_device(random_rows, logits.device)
        temperatures = to_device([params[i].temperature for i in random_rows], logits.device)
        scaled = logits[rows] / temperatures[:, None]  # (R, V)
        sub_batch = SamplingBatch([batch.requests[i] for i in random_rows],
                                  [batch.generators[i] for i in random_rows], batch.eos_token_ids)
        if any(p.top_k_enabled or p.top_p < 1 or p.min_p > 0 for p in sub_batch.params):
            scaled = filter_logits(scaled, sub_batch)
        probs = scaled.softmax(dim=-1)  # (R, V)
        noise = torch.stack([
            torch.empty(probs.shape[1], device=probs.device).exponential_(generator=generator)
            for generator in sub_batch.generators
        ])  # (R, V)
        token_ids[rows] = (probs / noise).argmax(dim=-1)
    logprobs = compute_logprobs(raw_logits, token_ids, batch)
    return PendingSample(token_ids, logprobs, [p.logprobs for p in params])
