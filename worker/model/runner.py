"""The model runner: owns the weights and the KV tensors, turns a step into tensors,
runs the forward pass and samples.

Batch layout of a step: decodes (one new token each) first, then prefill chunks, all
flattened into T tokens. Logits are computed only for requests whose step reaches the
end of their known tokens (a finished prefill or a decode); earlier prefill chunks
only fill the cache.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.kv.manager import blocks_for_tokens
from lmfleet.worker.kv.swapper import KVSwapper
from lmfleet.worker.model.arch import ArchConfig
from lmfleet.worker.model.attention.base import AttentionMetadata, KVCache
from lmfleet.worker.model.attention.cpu_kernel import PagedDecodeKernel, load_paged_decode_kernel
from lmfleet.worker.model.attention.dense_decode import DenseDecodeCache, DenseDecodeStep
from lmfleet.worker.model.attention.torch_ref import (
    TorchAttention,
    build_decode_mask,
    build_prefill_mask,
)
from lmfleet.worker.model.cpu_linear import transpose_linears
from lmfleet.worker.model.cpu_ops import CpuOps, fuse_cpu_ops, load_cpu_ops
from lmfleet.worker.model.default_model import cache_dir
from lmfleet.worker.model.loader import load_model
from lmfleet.worker.model.sampler import SamplingBatch, sample
from lmfleet.worker.request import Request, TokenLogprobs
from lmfleet.worker.scheduler.base import ScheduledRequest

logger = logging.getLogger(__name__)

# CPU default for the KV budget when none is given: a share of available memory, capped,
# because the cache is zero-filled (and so committed) at start-up.
CPU_KV_MEMORY_FRACTION = 0.2
CPU_KV_MEMORY_CAP = 2 << 30
CUDA_KV_MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: Optional[TokenLogprobs]


def available_cpu_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 << 30


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.device = torch.device(config.model.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        self.dtype = config.model.torch_dtype
        self.arch = ArchConfig.from_model_dir(model_dir)
        self.block_size = config.cache.block_size
        max_len = config.model.max_model_len or self.arch.max_position_embeddings
        if self.arch.sliding_window:
            # Attention here is full-context; past the window the model would differ.
            max_len = min(max_len, self.arch.sliding_window)
        self.model = load_model(model_dir, max_len, self.dtype, self.device)
        if self.device.type == "cpu":
            transpose_linears(self.model)
        self.num_blocks = self._num_kv_blocks(max_len)
        # A lone request must always fit, so the context is capped by the KV capacity.
        self.max_model_len = min(max_len, self.num_blocks * self.block_size)
        if self.max_model_len < max_len:
            logger.warning("max_model_len capped at %d by the KV capacity (%d blocks)",
                           self.max_model_len, self.num_blocks)
        block_shape = (self.block_size, self.arch.num_kv_heads, self.arch.head_dim)
        # One tensor for every layer's K and V so a swap moves a block of all layers in one
        # op. Zero-filled, not empty: attention multiplies masked-out slots by a weight of
        # 0, which is only harmless if they hold finite values.
        self.kv_storage = torch.zeros((self.arch.num_layers, 2, self.num_blocks, *block_shape),
                                      dtype=self.dtype, device=self.device)
        self.kv_caches = [KVCache(self.kv_storage[layer], layer)
                          for layer in range(self.arch.num_layers)]
        decode_kernel, cpu_ops = self._load_cpu_kernels()
        if cpu_ops is not None:
            fuse_cpu_ops(self.model, cpu_ops)
        self.backend = TorchAttention(decode_kernel)
        use_dense = config.cache.dense_decode_cache
        if use_dense is None:
            use_dense = self.device.type == "cpu" and self.backend.cpu_decode_kernel is None
        self.dense_decode = DenseDecodeCache(
            self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim, self.dtype,
            self.device, max_bytes=self.num_blocks * self.kv_block_bytes,
            max_slots=config.scheduler.max_num_seqs) if use_dense else None
        self.num_host_blocks = config.cache.host_kv_memory_bytes // self.kv_block_bytes
        self.swapper: Optional[KVSwapper] = None
        if self.num_host_blocks:
            host_storage = torch.zeros(
                (self.num_host_blocks, self.arch.num_layers, 2, *block_shape), dtype=self.dtype,
                pin_memory=self.device.type == "cuda")
            self.swapper = KVSwapper(self.kv_storage, host_storage,
                                     overlap=config.cache.swap_overlap)
        self._generators: dict[str, torch.Generator] = {}

    def _load_cpu_kernels(self) -> tuple[Optional[PagedDecodeKernel], Optional[CpuOps]]:
        """The C kernels for CPU float32 (ModelConfig.cpu_kernels), or (None, None)."""
        wanted = self.config.model.cpu_kernels
        usable = self.device.type == "cpu" and self.dtype == torch.float32
        if wanted is False or (wanted is None and not usable):
            return None, None
        if not usable:
            raise ValueError("cpu_kernels=True needs device='cpu' and dtype float32")
        build_dir = cache_dir() / "kernels"
        attention, ops = load_paged_decode_kernel(build_dir), load_cpu_ops(build_dir)
        if wanted and (attention is None or ops is None):
            raise ValueError("cpu_kernels=True but the C kernels could not be built here "
                             "(a C compiler with OpenMP is needed; see the log)")
        return attention, ops

    @property
    def kv_block_bytes(self) -> int:
        return self.block_size * self.arch.kv_bytes_per_token * self.dtype.itemsize

    def _num_kv_blocks(self, max_model_len: int) -> int:
        cache = self.config.cache
        if cache.num_kv_blocks is not None:
            return cache.num_kv_blocks
        if cache.kv_cache_memory_bytes is not None:
            budget = cache.kv_cache_memory_bytes
        elif self.device.type == "cuda":
            fraction = cache.kv_cache_memory_fraction or CUDA_KV_MEMORY_FRACTION
            free, total = torch.cuda.mem_get_info(self.device)
            budget = int(fraction * total) - (total - free)
        else:
            fraction = cache.kv_cache_memory_fraction or CPU_KV_MEMORY_FRACTION
            budget = min(int(fraction * available_cpu_memory()), CPU_KV_MEMORY_CAP)
        num_blocks = budget // self.kv_block_bytes
        # More blocks than every sequence at full length could use is wasted memory.
        most_useful = self.config.scheduler.max_num_seqs * blocks_for_tokens(
            max_model_len, self.block_size)
        num_blocks = min(num_blocks, most_useful)
        if num_blocks < 1:
            raise ValueError(f"KV cache budget of {budget} bytes holds no {self.block_size}-token"
                             " block; raise the memory budget or set num_kv_blocks")
        return num_blocks

    def release(self, request_id: str) -> None:
        """Forget per-request state (its sampling generator, its dense KV copy) once it has
        finished."""
        self._generators.pop(request_id, None)
        if self.dense_decode is not None:
            self.dense_decode.release(request_id)

    def _generator(self, request: Request) -> torch.Generator:
        generator = self._generators.get(request.request_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(request.sampling_seed)
            self._generators[request.request_id] = generator
        return generator

    def swap(self, swap_out: list[tuple[int, int]], swap_in: list[tuple[int, int]]) -> None:
        """Copy blocks between the device and host tiers before this step's forward."""
        if (swap_out or swap_in) and self.swapper is None:
            raise RuntimeError("swap requested but no host KV tier is configured")
        if self.swapper is not None:
            self.swapper.swap(swap_out, swap_in)

    @torch.inference_mode()
    def execute(self, scheduled: list[ScheduledRequest],
                eos_token_ids: tuple[int, ...]) -> dict[str, SampledToken]:
        """Run one step; returns the sampled token of each request that reached its end."""
        if not scheduled:
            return {}
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ordered = decodes + prefills
        input_ids, positions, slots, sample_rows = self._flatten(ordered)
        metadata = self._metadata(decodes, prefills, slots, self._dense_decode_step(decodes))
        try:
            hidden = self.model(input_ids, positions, self.kv_caches, metadata, self.backend)
        except BaseException:
            # Some layers may have written this step's tokens and others not.
            if self.dense_decode is not None:
                self.dense_decode.clear()
            raise
        if not sample_rows:
            return {}
        rows = torch.tensor([row for row, _ in sample_rows], device=self.device)
        logits = self.model.compute_logits(hidden[rows])  # (N, V)
        requests = [request for _, request in sample_rows]
        batch = SamplingBatch(requests, [self._generator(r) for r in requests], eos_token_ids)
        result = sample(logits, batch)
        return {
            request.request_id: SampledToken(token, logprobs)
            for request, token, logprobs in zip(requests, result.token_ids, result.logprobs,
                                                strict=True)
        }

    def _flatten(self, ordered: list[ScheduledRequest]):
        ids, positions, slots, sample_rows = [], [], [], []
        row = 0
        for item in ordered:
            request, start = item.request, item.request.num_computed_tokens
            end = start + item.num_new_tokens
            ids.extend(request.token_ids[start:end])
            pos = np.arange(start, end)
            table = np.asarray(request.block_ids, dtype=np.int64)
            positions.append(pos)
            slots.append(table[pos // self.block_size] * self.block_size + pos % self.block_size)
            row += item.num_new_tokens
            if end == request.num_tokens:
                sample_rows.append((row - 1, request))
        as_tensor = lambda a: torch.from_numpy(np.concatenate(a)).to(self.device)  # noqa: E731
        input_ids = torch.tensor(ids, dtype=torch.int64, device=self.device)
        return input_ids, as_tensor(positions), as_tensor(slots), sample_rows

    def _block_tables(self, items: list[ScheduledRequest]) -> tuple[torch.Tensor, list[int]]:
        seq_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in items]
        width = max((blocks_for_tokens(n, self.block_size) for n in seq_lens), default=1)
        table = np.zeros((len(items), width), dtype=np.int64)
        for i, (item, seq_len) in enumerate(zip(items, seq_lens, strict=True)):
            num = blocks_for_tokens(seq_len, self.block_size)
            table[i, :num] = item.request.block_ids[:num]
        return torch.from_numpy(table).to(self.device), seq_lens

    def _dense_decode_step(self, decodes: list[ScheduledRequest]) -> Optional[DenseDecodeStep]:
        if self.dense_decode is None:
            return None
        requests = [d.request for d in decodes]
        return self.dense_decode.prepare(
            [r.request_id for r in requests], [r.num_computed_tokens + 1 for r in requests],
            [self._final_len_bound(r) for r in requests],
            [r.block_ids for r in requests], self.kv_storage, self.block_size)

    def _final_len_bound(self, request: Request) -> int:
        """The most tokens a request can reach (a sizing hint for the dense cache)."""
        max_tokens = request.sampling_params.max_tokens
        if max_tokens is None:
            return self.max_model_len
        return min(request.num_prompt_tokens + max_tokens, self.max_model_len)

    def _metadata(self, decodes: list[ScheduledRequest], prefills: list[ScheduledRequest],
                  slots: torch.Tensor,
                  dense_decode: Optional[DenseDecodeStep]) -> AttentionMetadata:
        # Decode block tables serve the gather path and the CPU kernel, the decode mask only
        # the gather path; with the dense copy both stay empty (a per-step Python loop over
        # every decode saved).
        gathered = decodes if dense_decode is None else []
        decode_tables, decode_lens = self._block_tables(gathered)
        prefill_tables, prefill_lens = self._block_tables(prefills)
        query_lens = [s.num_new_tokens for s in prefills]
        max_query = max(query_lens, default=1)
        token_index = np.zeros((len(prefills), max_query), dtype=np.int64)
        query_mask = np.zeros((len(prefills), max_query), dtype=bool)
        offset = 0
        for i, query_len in enumerate(query_lens):
            token_index[i, :query_len] = np.arange(offset, offset + query_len)
            query_mask[i, :query_len] = True
            offset += query_len
        to_device = lambda a: torch.as_tensor(a).to(self.device)  # noqa: E731
        decode_seq_lens = to_device(np.asarray(decode_lens, dtype=np.int64))
        kernel_decodes = self.backend.cpu_decode_kernel is not None
        masked_lens = decode_seq_lens[:0] if kernel_decodes else decode_seq_lens
        prefill_seq_lens = to_device(np.asarray(prefill_lens, dtype=np.int64))
        prefill_query_mask = to_device(query_mask)
        max_prefill_len = max(prefill_lens, default=0)
        return AttentionMetadata(
            slot_mapping=slots,
            block_size=self.block_size,
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_tables,
            decode_seq_lens=decode_seq_lens,
            decode_mask=build_decode_mask(masked_lens, decode_tables.shape[1] * self.block_size),
            prefill_query_lens=query_lens,
            prefill_block_tables=prefill_tables,
            prefill_seq_lens=prefill_seq_lens,
            prefill_max_query_len=max_query,
            prefill_max_seq_len=max_prefill_len,
            prefill_token_index=to_device(token_index),
            prefill_query_mask=prefill_query_mask,
            prefill_mask=build_prefill_mask(prefill_seq_lens, prefill_query_mask,
                                            max_prefill_len),
            dense_decode=dense_decode,
        )
