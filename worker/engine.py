"""The synchronous engine core: add_request / abort / step() / has_work().

One `step()` = schedule (which requests, how many tokens each) -> run the model on that
batch -> append sampled tokens, check stop conditions, free finished requests. It is
deterministic given the same requests and seeds, and has no asyncio or threads: the
async wrapper and the gRPC server drive it from their own loop.

Overlapped steps (CUDA, `overlap_steps`): step N is scheduled and launched while step
N-1 still runs on the GPU; N-1's sampled tokens stand in token_ids as placeholders (the
scheduler sees the right counts; the runner feeds them to N on the device), and are read
back after N is queued. So the CPU prepares N while the GPU computes N-1, and a step's
outputs reach the caller one step() later. A request that stops at N-1 (EOS, a stop
token) has also run in N: that token is discarded and its KV freed, which is safe
because the device runs N before anything queued after it. Outputs are the same tokens
as without overlap. Steps whose sampling reads the previous tokens on the host
(repetition penalties) run without overlap.

Pipeline parallelism (pp stages) keeps up to pp steps in flight, each in another stage.
They hold disjoint requests: a request whose sampled token has not come back is not
scheduled again (the scheduler skips it), so no step reads a token that is still in
another step's pipeline. Steps are read back oldest first.
"""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.kv.sessions import SessionCache
from lmfleet.worker.model.default_model import resolve_quantized_model_path
from lmfleet.worker.model.vision.vision_info import ImageSpan, VisionInfo, image_spans_for
from lmfleet.worker.parallel.driver import DriverRunner
from lmfleet.worker.parallel.ranks import RankProcesses
from lmfleet.worker.request import (
    FinishReason,
    Request,
    RequestOutput,
    RequestStatus,
    validate_prompt,
)
from lmfleet.worker.runner.model_runner import InFlightStep, ModelRunner
from lmfleet.worker.runner.profiler import profile_cost_model
from lmfleet.worker.scheduler.base import SchedulerOutput, make_scheduler
from lmfleet.worker.scheduler.cost_model import CostModel


class LLMEngine:
    def __init__(self, config: EngineConfig, model_dir: Optional[Path] = None,
                 start_ranks: Optional[Callable[[EngineConfig, Path], Any]] = None) -> None:
        """start_ranks(config, model_dir): starts the other parallel ranks and joins their
        groups as rank 0 (default: local processes, worker/parallel/ranks.py; a Ray
        replica starts them as actors)."""
        self.config = config
        self._start_ranks = start_ranks or RankProcesses
        self.model_dir = (Path(model_dir) if model_dir else resolve_quantized_model_path(
            config.model.model, config.model.quantization))
        if config.model.overlap_steps and config.parallel.world_size > 1:
            # The other ranks would need rank 0's sampled tokens on their devices
            # (worker/parallel/driver.py); checked before any rank starts.
            raise ValueError("overlap_steps is not supported with tensor or pipeline "
                             "parallelism yet")
        self.vision_info = VisionInfo.from_model_dir(self.model_dir)
        self.runner = self._make_runner(config)
        try:
            self._setup(config)
        except BaseException:
            self.close()  # the other ranks, if any, must not outlive a failed start
            raise

    def _setup(self, config: EngineConfig) -> None:
        self.arch = self.runner.arch
        self.max_model_len = self.runner.max_model_len
        self.eos_token_ids = self.arch.eos_token_ids
        self.kv_manager = KVCacheManager(self.runner.num_blocks, self.runner.block_size,
                                         config.cache.enable_prefix_caching,
                                         num_host_blocks=self.runner.num_host_blocks)
        # The cost model is calibrated only where a policy uses it (a short profile).
        self.cost_model: Optional[CostModel] = None
        if config.scheduler.policy == "mlfq":
            self.cost_model = profile_cost_model(self.runner)
        self.scheduler = make_scheduler(config.scheduler, self.kv_manager, self.cost_model)
        pipeline_size = config.parallel.pipeline_parallel_size
        self.scheduler.skip_requests_in_flight = pipeline_size > 1
        self.sessions = SessionCache(self.kv_manager, config.cache.session_ttl_s,
                                     config.cache.max_sessions)
        # Copies for sessions parked by the last step, done before the next step's.
        self._session_swap_out: list[tuple[int, int]] = []
        self.requests: dict[str, Request] = {}
        self._seed_rng = random.Random(config.seed)
        # Outputs produced outside step() (aborts), delivered by the next step().
        self._pending_outputs: list[RequestOutput] = []
        self.num_generated_tokens = 0
        overlap = config.model.overlap_steps
        parallel = config.parallel.world_size > 1
        self.overlap_steps = (self.runner.device.type == "cuda" and not parallel
                              if overlap is None else overlap)
        # Launched steps whose tokens are not read back yet, oldest first: (plan, step,
        # launch time); at most this many stay in flight after a step() returns.
        self._in_flight: deque[tuple[SchedulerOutput, InFlightStep, float]] = deque()
        self._max_in_flight = (pipeline_size - 1 if pipeline_size > 1
                               else int(self.overlap_steps))

    def _make_runner(self, config: EngineConfig):
        """One ModelRunner; under tensor or pipeline parallelism this process is rank 0 and
        the other ranks are started here (worker/parallel/ranks.py)."""
        if config.parallel.world_size == 1:
            return ModelRunner(config, self.model_dir)
        ranks = self._start_ranks(config, self.model_dir)
        try:
            return DriverRunner(ModelRunner(config, self.model_dir), ranks)
        except RuntimeError as error:  # a collective failed: a rank's own error names it
            failure = ranks.failure(error)
            ranks.close(timeout_s=0)
            raise failure from error
        except BaseException:
            ranks.close(timeout_s=0)
            raise

    def dead_ranks(self) -> list[str]:
        """Parallel ranks whose process has ended (rank 0 is this process); a replica with
        any cannot serve and must be replaced whole."""
        runner = self.__dict__.get("runner")
        return runner.dead_ranks() if isinstance(runner, DriverRunner) else []

    def close(self) -> None:
        """Stop the other parallel ranks, if any (idempotent)."""
        runner = self.__dict__.get("runner")
        if isinstance(runner, DriverRunner):
            runner.close()

    # ---- admission -------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int]) -> None:
        """Raise ValueError if this prompt can never run (checked before admission)."""
        validate_prompt(prompt_token_ids, self.max_model_len, self.arch.vocab_size)

    def image_spans(self, prompt_token_ids: list[int], images: tuple[bytes, ...],
                    end: Optional[int] = None) -> list[ImageSpan]:
        """A prompt's image spans (image tokens from `end` on are text); ImageError (a
        ValueError) for images it cannot take."""
        return image_spans_for(self.vision_info, self.config.model.model, prompt_token_ids,
                               images, end)

    def add_request(self, request: Request) -> Request:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.validate(request.prompt_token_ids)
        if not request.image_spans:
            request.image_spans = self.image_spans(request.prompt_token_ids, request.images)
        if request.sampling_params.n != 1:
            raise ValueError("the engine runs one sequence per request; fan out n in the caller")
        seed = request.sampling_params.seed
        request.sampling_seed = seed if seed is not None else self._seed_rng.getrandbits(63)
        self.requests[request.request_id] = request
        if request.session_id is not None:
            self.sessions.attach(request)
        self.scheduler.add(request)
        return request

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV; its final output comes with the next step()."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort(request_id)
        self.runner.release(request_id)
        request.status = RequestStatus.FINISHED
        request.finish_reason = FinishReason.ABORT
        self._pending_outputs.append(self._output(request, []))
        return True

    def has_work(self) -> bool:
        return (bool(self._pending_outputs) or bool(self._in_flight)
                or self.scheduler.has_work())

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._session_swap_out:
            self.runner.swap(self._session_swap_out, [])
            self._session_swap_out = []
        self.sessions.expire()
        plan = self.scheduler.schedule()
        if plan.is_empty and not plan.swap_out_blocks and not plan.swap_in_blocks:
            outputs.extend(self._read_back())  # the oldest step: its requests may go on
            return outputs
        if self.overlap_steps and any(
                item.request.sampling_params.uses_penalties for item in plan.scheduled):
            outputs.extend(self._read_back())  # penalties read the previous tokens on host
            # Requests that stopped there are done: the step does not run them.
            plan.scheduled = [s for s in plan.scheduled if not s.request.is_finished]
        start = time.perf_counter()
        self.runner.swap(plan.swap_out_blocks, plan.swap_in_blocks)
        in_flight = self._in_flight[-1][1] if self._in_flight else None
        launched = self.runner.launch(plan.scheduled, self.eos_token_ids, in_flight)
        # Older steps first (this one's requests that stopped there are seen as finished
        # below), keeping at most _max_in_flight with this one.
        while len(self._in_flight) >= max(self._max_in_flight, 1):
            outputs.extend(self._read_back())
        for item in plan.scheduled:
            request = item.request
            if request.is_finished:
                continue  # stopped by the step before: this step's work for it is dropped
            request.num_computed_tokens += item.num_new_tokens
            request.num_prefilled_tokens += item.num_new_tokens
            if request.num_computed_tokens == request.num_tokens:
                request.append_placeholder()  # sampled by this step, still on the device
        self._in_flight.append((plan, launched, start))
        while len(self._in_flight) > self._max_in_flight:
            outputs.extend(self._read_back())
        return outputs

    def _read_back(self) -> list[RequestOutput]:
        """Wait for the oldest step in flight, if any: fill its tokens in, apply stop
        conditions."""
        if not self._in_flight:
            return []
        plan, launched, start = self._in_flight.popleft()
        sampled = launched.wait()
        outputs = []
        for item in plan.scheduled:
            request = item.request
            if request.is_finished or request.request_id not in self.requests:
                continue  # aborted, or stopped by an earlier step
            if request.block_ids:  # not swapped out or preempted since
                self.kv_manager.cache_computed_blocks(request)
            token = sampled.get(request.request_id)
            if token is None:
                continue  # a prefill chunk that did not reach the end of the prompt
            request.resolve_placeholder(token.token_id, token.logprobs)
            self.num_generated_tokens += 1
            reason = self._stop_reason(request, token.token_id)
            if reason is not None:
                self._finish(request, reason)
            outputs.append(self._output(request, [token.token_id]))
        self.scheduler.on_step_finished(plan, time.perf_counter() - start)
        return outputs

    def _stop_reason(self, request: Request, token_id: int) -> Optional[FinishReason]:
        params = request.sampling_params
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in self.eos_token_ids:
                return FinishReason.STOP
            if token_id in params.stop_token_ids:
                return FinishReason.STOP
        if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
            return FinishReason.LENGTH
        if request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        # A request preempted to recompute while its last token was in flight holds no KV.
        keep_kv = request.session_id is not None and bool(request.block_ids)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.scheduler.finish(request, release_kv=not keep_kv)
        if keep_kv:
            self._session_swap_out.extend(self.sessions.park(request))
        self.runner.release(request.request_id)
        del self.requests[request.request_id]

    @staticmethod
    def _output(request: Request, new_token_ids: list[int]) -> RequestOutput:
        return RequestOutput(
            request_id=request.request_id,
            prompt_token_ids=request.prompt_token_ids,
            output_token_ids=list(request.output_token_ids),
            new_token_ids=new_token_ids,
            finish_reason=request.finish_reason.value if request.finish_reason else None,
            logprobs=list(request.output_logprobs) if request.sampling_params.logprobs
            is not None else None,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )

    # ---- load report -------------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return self.scheduler.num_running

    @property
    def num_waiting(self) -> int:
        return self.scheduler.num_waiting

    @property
    def kv_usage(self) -> float:
        return self.kv_manager.usage

    def queue_loads(self) -> list[tuple[str, int, int]]:
        """(queue name, running, waiting) for each scheduler queue."""
        sizes = getattr(self.scheduler, "queue_sizes", None)
        if sizes is None:
            return [(self.config.scheduler.policy, self.num_running, self.num_waiting)]
        loads = [(f"mlfq-q{level}", running, waiting)
                 for level, (running, waiting) in enumerate(sizes())]
        # The urgent jobs of the deadline lane, while it is on (they are also counted in
        # their queues above).
        lane = self.scheduler.deadline_lane_sizes()
        if lane is not None:
            loads.append(("mlfq-deadline-lane", *lane))
        return loads
