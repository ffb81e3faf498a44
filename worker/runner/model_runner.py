"""The model runner: owns the weights, the KV tensors and the attention backend; turns a
step into tensors (step_inputs.py), runs the forward pass (a captured CUDA graph for
decode-only steps on CUDA, eagerly otherwise) and samples.

Logits are computed only for requests whose step reaches the end of their known tokens (a
finished prefill or a decode); earlier prefill chunks only fill the cache.

Under pipeline parallelism a runner is one stage: it receives the previous stage's hidden
states, runs its layers and sends them on; the last stage sends the rows that sample
back to stage 0, whose step resolves them when the engine waits for it (DeferredSample).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.kv.manager import blocks_for_tokens
from lmfleet.worker.kv.swapper import KVSwapper
from lmfleet.worker.model.arch import ArchConfig
from lmfleet.worker.model.attention.base import KVCache, kv_cache_shape
from lmfleet.worker.model.attention.cpu_kernel import PagedDecodeKernel, load_paged_decode_kernel
from lmfleet.worker.model.attention.dense_decode import DenseDecodeCache, DenseDecodeStep
from lmfleet.worker.model.attention.registry import make_backend, resolve_backend_name
from lmfleet.worker.model.cpu_linear import transpose_linears
from lmfleet.worker.model.cpu_ops import attach_fused_ops, load_cpu_ops
from lmfleet.worker.model.default_model import cache_dir
from lmfleet.worker.model.loader import load_model
from lmfleet.worker.model.vision.vision_info import VisionInfo
from lmfleet.worker.parallel import state as parallel_state
from lmfleet.worker.parallel.pipeline import PipelineLink
from lmfleet.worker.parallel.stages import pipeline_stage
from lmfleet.worker.request import Request, TokenLogprobs
from lmfleet.worker.runner.cuda_graphs import DecodeGraphs
from lmfleet.worker.runner.image_rows import ImageRows
from lmfleet.worker.runner.kv_budget import KVLayout, local_num_kv_blocks
from lmfleet.worker.runner.sampler import PendingSample, SamplingBatch, sample_async, to_device
from lmfleet.worker.runner.step_inputs import StepBatch, StepInputs
from lmfleet.worker.scheduler.base import ScheduledRequest

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprobs: Optional[TokenLogprobs]


class InFlightStep:
    """A launched step whose sampled tokens are still on the device."""

    def __init__(self, requests: list[Request], pending: Optional[PendingSample]) -> None:
        self.requests = requests  # in sample-row order
        self.pending = pending
        self.row_of = {request.request_id: row for row, request in enumerate(requests)}

    def wait(self) -> dict[str, SampledToken]:
        """Block until the tokens are on the host: request id -> its sampled token."""
        result = None if self.pending is None else self.pending.result()
        if result is None:  # nothing sampled, or sampled on another rank
            return {}
        return {
            request.request_id: SampledToken(token, logprobs)
            for request, token, logprobs in zip(self.requests, result.token_ids,
                                                result.logprobs, strict=True)
        }


class DeferredSample:
    """A pipeline step's sample on stage 0: its rows come back from the last stage, and are
    turned into logits and tokens when the engine waits for the step."""

    def __init__(self, resolve: Callable[[], Optional[PendingSample]]) -> None:
        self._resolve = resolve

    def result(self):
        pending = self._resolve()
        return None if pending is None else pending.result()


class ModelRunner:
    def __init__(self, config: EngineConfig, model_dir: Path) -> None:
        self.config = config
        self.device = torch.device(config.model.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        self.dtype = config.model.torch_dtype
        self.arch = ArchConfig.from_model_dir(model_dir)
        # Under tensor parallelism this runner is one rank: it holds its shard of the weights
        # and the KV of its KV heads; block ids mean the same blocks on every rank.
        self.tp_rank = parallel_state.get_tp_rank()
        self.tp_size = parallel_state.get_tp_size()
        # Under pipeline parallelism, this stage's layers and their KV only.
        self.stage = pipeline_stage(self.arch.num_layers, parallel_state.get_pp_size(),
                                    parallel_state.get_pp_rank())
        groups = parallel_state.get_groups()
        self.pipeline = PipelineLink(groups) if self.stage.size > 1 else None
        # An encoded cache (int8 or fp8, kv/kv_codecs.py): the torch and Triton backends
        # decode what they read; the C decode kernel and the fused rotary + store read the
        # model dtype.
        kv_dtype = config.cache.kv_cache_dtype
        self.kv_codec = None if kv_dtype == "auto" else kv_dtype
        self.backend_name = resolve_backend_name(config.model.attention_backend, self.device)
        max_len = config.model.max_model_len or self.arch.max_position_embeddings
        if self.arch.sliding_window:
            # Attention here is full-context; past the window the model would differ.
            max_len = min(max_len, self.arch.sliding_window)
        self.model = load_model(model_dir, max_len, self.dtype, self.device, self.stage)
        self.images = self._image_rows(model_dir)
        if self.device.type == "cpu":
            transpose_linears(self.model)
        decode_kernel, fused_ops = self._load_fused_kernels()
        if self.kv_codec is not None:
            decode_kernel = None  # it reads a cache in the model dtype
        self.num_kv_heads = self.arch.num_kv_heads // self.tp_size  # this rank's
        self.backend = make_backend(self.backend_name, self.num_kv_heads, self.device,
                                    decode_kernel)
        if not self.backend.supports_dtype(self.device, self.dtype):
            raise ValueError(f"the {self.backend_name} attention backend does not support "
                             f"{self.dtype} on {self.device.type}")
        if fused_ops is not None:
            attach_fused_ops(self.model, fused_ops)
        if self.kv_codec is not None:
            for module in self.model.modules():
                if hasattr(module, "fused_kv_store"):
                    module.fused_kv_store = False
        self.block_size = config.cache.block_size or self.backend.default_block_size
        self.kv_layout = KVLayout(self.stage.num_layers, self.num_kv_heads, self.arch.head_dim,
                                  self.dtype, self.kv_codec)
        self.num_blocks = self._num_kv_blocks(max_len)
        # A lone request must always fit, so the context is capped by the KV capacity.
        self.max_model_len = min(max_len, self.num_blocks * self.block_size)
        if self.max_model_len < max_len:
            logger.warning("max_model_len capped at %d by the KV capacity (%d blocks)",
                           self.max_model_len, self.num_blocks)
        # An encoded cache is stored by an indexed copy (torch_ref.write_kv): rows without a
        # slot (CUDA-graph padding, slot -1) land in one spare block past the allocator's.
        storage_blocks = self.num_blocks + (1 if self.kv_codec is not None else 0)
        shape = kv_cache_shape(self.stage.num_layers, storage_blocks, self.block_size,
                               self.num_kv_heads, self.kv_layout.width)
        # Zero-filled, not empty: attention multiplies masked-out slots by a weight of 0,
        # which is only harmless if they hold finite values.
        self.kv_storage = torch.zeros(shape, dtype=self.kv_layout.dtype, device=self.device)
        self.kv_caches = [KVCache(self.kv_storage[layer], layer)
                          for layer in range(self.stage.num_layers)]
        self.dense_decode = self._dense_decode_cache()
        self.num_host_blocks = config.cache.host_kv_memory_bytes // self.kv_block_bytes
        self.swapper: Optional[KVSwapper] = None
        if self.num_host_blocks:
            host_storage = torch.zeros((self.num_host_blocks, *shape[:2], *shape[3:]),
                                       dtype=self.kv_layout.dtype,
                                       pin_memory=self.device.type == "cuda")
            self.swapper = KVSwapper(self.kv_storage, host_storage,
                                     overlap=config.cache.swap_overlap)
        self._generators: dict[str, torch.Generator] = {}
        scheduler = config.scheduler
        self.inputs = StepInputs(
            max(scheduler.max_num_batched_tokens, scheduler.max_num_seqs),
            scheduler.max_num_seqs, blocks_for_tokens(self.max_model_len, self.block_size),
            self.block_size, self.device)
        self.graphs: Optional[DecodeGraphs] = None
        # Graphs capture one rank's forward; a stage's also waits on its neighbours'
        # point-to-point transfers, which are not captured: pipeline stages run eagerly.
        if (self.device.type == "cuda" and not config.model.enforce_eager
                and self.backend.supports_cuda_graphs and self.pipeline is None):
            self.graphs = DecodeGraphs(self._forward, self.backend, self.inputs,
                                       scheduler.max_num_seqs, self.max_model_len)
            self.graphs.capture()

    def _image_rows(self, model_dir: Path) -> Optional[ImageRows]:
        """A vision-language model's image path (None for a text-only model)."""
        if VisionInfo.from_model_dir(model_dir) is None:
            return None
        if self.tp_size > 1 or self.stage.size > 1:
            raise ValueError("a vision-language model runs on one rank: tensor and pipeline "
                             "parallelism do not take image prompts")
        return ImageRows(model_dir, self.dtype, self.device)

    def _load_fused_kernels(self) -> tuple[Optional[PagedDecodeKernel], Optional[object]]:
        """The decode kernel and fused ops of this device: the C kernels for CPU float32
        with the torch backend (ModelConfig.cpu_kernels), the Triton ops with the Triton
        backend, else (None, None)."""
        if self.backend_name == "triton":
            from lmfleet.worker.kernels.triton_ops import TritonOps

            return None, TritonOps(self.device.type)
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

    def _dense_decode_cache(self) -> Optional[DenseDecodeCache]:
        use_dense = self.config.cache.dense_decode_cache
        if use_dense and self.kv_codec is not None:
            raise ValueError("dense_decode_cache keeps contexts in the model dtype; it does "
                             f"not combine with kv_cache_dtype={self.kv_codec!r}")
        if use_dense is None and self.kv_codec is not None:
            use_dense = False
        if use_dense is None:
            use_dense = (self.device.type == "cpu" and self.backend_name == "torch"
                         and self.backend.cpu_decode_kernel is None)
        if use_dense and self.backend_name != "torch":
            raise ValueError("dense_decode_cache needs attention_backend='torch'")
        if not use_dense:
            return None
        return DenseDecodeCache(
            self.stage.num_layers, self.num_kv_heads, self.arch.head_dim, self.dtype,
            self.device, max_bytes=self.num_blocks * self.kv_block_bytes,
            max_slots=self.config.scheduler.max_num_seqs)

    @property
    def kv_block_bytes(self) -> int:
        return self.kv_layout.block_bytes(self.block_size)

    def _num_kv_blocks(self, max_model_len: int) -> int:
        # Every rank holds the same blocks (rank 0's block tables address them all): the
        # smallest budget of the ranks decides.
        return parallel_state.all_reduce_min(local_num_kv_blocks(
            self.config.cache, self.device, self.kv_block_bytes, self.block_size,
            self.config.scheduler.max_num_seqs, max_model_len))

    def release(self, request_id: str) -> None:
        """Forget per-request state (its sampling generator, its dense KV copy) once it has
        finished."""
        self._generators.pop(request_id, None)
        if self.images is not None:
            self.images.release(request_id)
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

    def _forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                 metadata) -> torch.Tensor:
        return self.model(input_ids, positions, self.kv_caches, metadata, self.backend)

    def execute(self, scheduled: list[ScheduledRequest],
                eos_token_ids: tuple[int, ...]) -> dict[str, SampledToken]:
        """Run one step and wait; returns the sampled token of each request that reached
        its end."""
        return self.launch(scheduled, eos_token_ids).wait()

    @torch.inference_mode()
    def launch(self, scheduled: list[ScheduledRequest], eos_token_ids: tuple[int, ...],
               in_flight: Optional[InFlightStep] = None) -> InFlightStep:
        """Queue one step on the device without waiting for it. Input tokens still on the
        device (placeholders) are taken from `in_flight`, the step launched before."""
        if not scheduled:
            return InFlightStep([], None)
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        image_rows = self.images.for_step(decodes + prefills) if self.images else None
        bucket = None
        if self.graphs is not None and not prefills and image_rows is None:
            bucket = self.graphs.bucket_for(len(decodes))
        batch = self.inputs.prepare(decodes + prefills, len(decodes), pad_to=bucket,
                                    extra=self._dense_decode_step(decodes))
        if batch.placeholder_rows:
            self._fill_placeholders(batch, in_flight)
        if bucket is not None and batch.persistent:
            hidden = self.graphs.replay(bucket)
        else:
            hidden = self._eager_forward(batch, self._receive_hidden(batch), image_rows)
        if not self.stage.is_last:
            self.pipeline.send_hidden(hidden)  # (2, T, H)
        if not batch.sample_rows:
            return InFlightStep([], None)
        requests = batch.sample_requests
        if not self.stage.is_last:  # stage 0: the rows come back from the last stage
            shape = (len(batch.sample_rows), self.arch.hidden_size)
            return InFlightStep(requests, DeferredSample(lambda: self._sample(
                self.pipeline.recv_from_last(shape, self.dtype, self.device), requests,
                eos_token_ids)))
        rows = self._sample_rows(hidden, batch)  # (N, H)
        if not self.stage.is_first:
            self.pipeline.send_to_first(rows)
            return InFlightStep([], None)
        return InFlightStep(requests, self._sample(rows, requests, eos_token_ids))

    def _receive_hidden(self, batch: StepBatch) -> Optional[torch.Tensor]:
        """The previous stage's (2, T, H) output for this batch (None on stage 0)."""
        if self.stage.is_first:
            return None
        shape = (2, batch.input_ids.shape[0], self.arch.hidden_size)
        return self.pipeline.recv_hidden(shape, self.dtype, self.device)

    def _fill_placeholders(self, batch: StepBatch, in_flight: Optional[InFlightStep]) -> None:
        if in_flight is None or in_flight.pending is None:
            raise RuntimeError("a step reads tokens still on the device, but none is in flight")
        rows = [row for row, _ in batch.placeholder_rows]
        sources = [in_flight.row_of[request.request_id] for _, request in batch.placeholder_rows]
        tokens = in_flight.pending.device_token_ids[to_device(sources, self.device)]  # (P,)
        batch.input_ids.index_copy_(0, to_device(rows, self.device), tokens.to(torch.int32))

    def _eager_forward(self, batch: StepBatch, hidden: Optional[torch.Tensor] = None,
                       image_rows: Optional[tuple[torch.Tensor, torch.Tensor]] = None
                       ) -> torch.Tensor:
        metadata = self.backend.build_metadata(batch.common)
        try:
            return self.model(batch.input_ids, batch.positions, self.kv_caches, metadata,
                              self.backend, hidden, image_rows)
        except BaseException:
            # Some layers may have written this step's tokens and others not.
            if self.dense_decode is not None:
                self.dense_decode.clear()
            raise

    def _sample_rows(self, hidden: torch.Tensor, batch: StepBatch) -> torch.Tensor:
        """hidden (T, H) -> the rows that sample (N, H)."""
        rows = batch.sample_rows
        if rows == list(range(len(rows))):
            return hidden[:len(rows)]  # a decode-only step: no gather
        return hidden[to_device(rows, self.device)]

    def _sample(self, selected: torch.Tensor, requests: list[Request],
                eos_token_ids: tuple[int, ...]) -> Optional[PendingSample]:
        """selected (N, H) final hidden rows -> their sampled tokens, on their way to the
        host (None on ranks other than 0, which only join the logits' all-gather)."""
        logits = self.model.compute_logits(selected)  # (N, V), gathered from every rank
        if self.tp_rank != 0:
            return None  # only rank 0 samples
        sampling = SamplingBatch(requests, [self._generator(r) for r in requests],
                                 eos_token_ids)
        return sample_async(logits, sampling)

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
