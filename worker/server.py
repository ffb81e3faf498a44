"""The gRPC face of one replica: `lmfleet.v1.Worker` (proto/v1/worker.proto) around an
`AsyncEngine`, plus the standard `grpc.health.v1` health service and server reflection.

Generate contract: a stream of `chunk` events (the tokens of each engine step, with their
logprobs when asked for), then exactly one `complete`, or else exactly one `error`:
- INVALID_ARGUMENT: the request can never run (empty or too-long prompt, token id outside
  the vocabulary, bad sampling value, missing or in-use request id, images that do not
  match the prompt's image tokens or are not images, images for a text-only model); the
  message says why.
- UNAVAILABLE: the worker is draining or shutting down; retry on another replica.
- INTERNAL: an engine step failed while the request ran (the request was aborted).
Cancelling the call (client cancel, deadline or disconnect) aborts the engine request at
once, which frees its KV blocks.

Health: "" and "lmfleet.v1.Worker" are SERVING from `start()` (the model is loaded by
then) until draining begins, then NOT_SERVING for good.

Auth: with a worker token ($LMFLEET_WORKER_TOKEN, worker/auth.py) every lmfleet.v1.Worker
call needs metadata `authorization: Bearer <token>` (else UNAUTHENTICATED); health and
reflection stay open for probes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from lmfleet.proto.v1 import worker_pb2, worker_pb2_grpc
from lmfleet.worker.async_engine import AsyncEngine, EngineDeadError, EngineStepError
from lmfleet.worker.auth import (
    WorkerTokenInterceptor,
    worker_listen_warning,
    worker_token_from_env,
)
from lmfleet.worker.chat_images import MAX_GENERATE_REQUEST_BYTES
from lmfleet.worker.request import RequestOutput
from lmfleet.worker.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

WORKER_SERVICE = worker_pb2.DESCRIPTOR.services_by_name["Worker"].full_name  # lmfleet.v1.Worker
_HEALTH_SERVICES = ("", WORKER_SERVICE)
_ErrorKind = worker_pb2.GenerateError.Kind


def sampling_params_from_proto(message: worker_pb2.SamplingParams) -> SamplingParams:
    """Engine sampling parameters; an absent optional field means the engine's default,
    except max_tokens, whose absence means "up to the model's context" (None)."""
    options: dict = {"max_tokens": None}
    for name in ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "min_tokens",
                 "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs"):
        if message.HasField(name):
            options[name] = getattr(message, name)
    options["stop_token_ids"] = tuple(message.stop_token_ids)
    options["ignore_eos"] = message.ignore_eos
    return SamplingParams(**options)


def _error(kind: int, message: str) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(error=worker_pb2.GenerateError(kind=kind, message=message))


def _chunk(output: RequestOutput) -> worker_pb2.GenerateResponse:
    chunk = worker_pb2.GenerateChunk(token_ids=output.new_token_ids)
    if output.logprobs is not None and output.new_token_ids:
        # The engine reports every logprob so far; this step's are the last ones.
        for entry in output.logprobs[-len(output.new_token_ids):]:
            chunk.logprobs.add(token_id=entry.token_id, logprob=entry.logprob,
                               top_token_ids=entry.top_token_ids,
                               top_logprobs=entry.top_logprobs)
    return worker_pb2.GenerateResponse(chunk=chunk)


def _complete(output: RequestOutput) -> worker_pb2.GenerateResponse:
    return worker_pb2.GenerateResponse(complete=worker_pb2.GenerateComplete(
        finish_reason=output.finish_reason or "",
        prompt_tokens=len(output.prompt_token_ids),
        completion_tokens=len(output.output_token_ids),
        cached_tokens=output.num_cached_tokens,
    ))


class WorkerServicer(worker_pb2_grpc.WorkerServicer):
    """Serves one `AsyncEngine`; owns the draining state and the in-flight request set."""

    def __init__(self, engine: AsyncEngine, model_name: str,
                 health: health_aio.HealthServicer) -> None:
        self._engine = engine
        self._model_name = model_name
        self._health = health
        self._draining = False
        # Generate calls admitted and not yet ended, by request id.
        self._in_flight: set[str] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def num_in_flight(self) -> int:
        return len(self._in_flight)

    # ---- Generate ----------------------------------------------------------------------
    async def Generate(self, request: worker_pb2.GenerateRequest, context) -> None:
        if self._draining:
            await context.write(_error(_ErrorKind.UNAVAILABLE,
                                       "the worker is draining; retry on another replica"))
            return
        if not request.request_id:
            await context.write(_error(_ErrorKind.INVALID_ARGUMENT, "request_id is required"))
            return
        if request.request_id in self._in_flight:
            await context.write(_error(_ErrorKind.INVALID_ARGUMENT,
                                       f"request id {request.request_id!r} is already in use"))
            return
        try:
            params = sampling_params_from_proto(request.sampling_params)
        except ValueError as exc:
            await context.write(_error(_ErrorKind.INVALID_ARGUMENT, str(exc)))
            return
        self._in_flight.add(request.request_id)
        self._idle.clear()
        try:
            await self._stream(request, params, context)
        finally:
            self._in_flight.discard(request.request_id)
            if not self._in_flight:
                self._idle.set()

    async def _stream(self, request: worker_pb2.GenerateRequest, params: SamplingParams,
                      context) -> None:
        # A coroutine handler with context.write (not an async-generator handler): when
        # the call is cancelled, CancelledError lands in this frame wherever it waits, and
        # the `finally` below closes the engine stream, which aborts the request.
        # An image the engine cannot use (ImageError, a ValueError) is INVALID_ARGUMENT below.
        outputs = self._engine.generate(
            request.request_id, list(request.prompt_token_ids), params,
            priority=request.priority,
            session_id=request.session_id if request.HasField("session_id") else None,
            images=tuple(request.images),
            image_positions_end=(request.image_positions_end
                                 if request.HasField("image_positions_end") else None))
        try:
            async for output in outputs:
                if output.new_token_ids:
                    await context.write(_chunk(output))
                if output.finished:
                    await context.write(_complete(output))
        except ValueError as exc:
            await context.write(_error(_ErrorKind.INVALID_ARGUMENT, str(exc)))
        except EngineDeadError as exc:
            await context.write(_error(_ErrorKind.UNAVAILABLE, str(exc)))
        except EngineStepError as exc:
            await context.write(_error(_ErrorKind.INTERNAL, str(exc)))
        finally:
            await outputs.aclose()

    # ---- control -----------------------------------------------------------------------
    async def Abort(self, request: worker_pb2.AbortRequest, context) -> worker_pb2.AbortResponse:
        num_aborted = sum(self._engine.abort(request_id) for request_id in request.request_ids)
        return worker_pb2.AbortResponse(num_aborted=num_aborted)

    async def GetLoad(self, request, context) -> worker_pb2.LoadReport:
        load = self._engine.load()
        return worker_pb2.LoadReport(
            num_running=load.num_running,
            num_waiting=load.num_waiting,
            num_swapped=load.num_swapped,
            kv_cache_usage=load.kv_cache_usage,
            num_free_blocks=load.num_free_blocks,
            num_total_blocks=load.num_total_blocks,
            generation_tokens_per_second=load.tokens_per_second(),
            num_preemptions=load.num_preemptions,
            prefix_cache_queries=load.prefix_cache_queries,
            prefix_cache_hits=load.prefix_cache_hits,
            draining=self._draining,
            queues=[worker_pb2.QueueLoad(name=name, num_running=running, num_waiting=waiting)
                    for name, running, waiting in load.queues],
            num_swap_out_blocks=load.num_swap_out_blocks,
            num_swap_in_blocks=load.num_swap_in_blocks,
            swap_out_bytes=load.num_swap_out_blocks * load.block_bytes,
            swap_in_bytes=load.num_swap_in_blocks * load.block_bytes,
            host_kv_cache_usage=(load.num_used_host_blocks / load.num_total_host_blocks
                                 if load.num_total_host_blocks else 0.0),
            num_total_host_blocks=load.num_total_host_blocks,
            num_sessions=load.num_sessions,
            scheduler=load.scheduler,
            cost_model=worker_pb2.CostModel(**load.cost_model) if load.cost_model else None,
        )

    async def Drain(self, request: worker_pb2.DrainRequest, context) -> worker_pb2.DrainResponse:
        timeout = request.timeout_seconds if request.HasField("timeout_seconds") else None
        if timeout is not None and timeout < 0:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "timeout_seconds must be >= 0")
        num_unfinished = await self.drain(timeout)
        return worker_pb2.DrainResponse(num_unfinished=num_unfinished)

    async def GetModelInfo(self, request, context) -> worker_pb2.ModelInfo:
        return worker_pb2.ModelInfo(
            model_name=self._model_name,
            model_path=str(self._engine.model_dir),
            max_model_len=self._engine.max_model_len,
            vocab_size=self._engine.vocab_size,
            eos_token_ids=self._engine.eos_token_ids,
        )

    # ---- draining ----------------------------------------------------------------------
    async def drain(self, timeout: Optional[float]) -> int:
        """Stop admitting Generate calls, wait for in-flight ones (at most `timeout` s,
        None: no limit); returns how many are still running."""
        if not self._draining:
            self._draining = True
            logger.info("draining: %d request(s) in flight", len(self._in_flight))
            for service in _HEALTH_SERVICES:
                await self._health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        return len(self._in_flight)

    def abort_all(self) -> int:
        """Abort every in-flight request (their streams end with finish_reason "abort")."""
        return sum(self._engine.abort(request_id) for request_id in list(self._in_flight))


class WorkerServer:
    """The grpc.aio server of one replica: Worker, health and reflection services.

    token: the worker token Worker calls must carry (default: $LMFLEET_WORKER_TOKEN; none:
    open)."""

    def __init__(self, engine: AsyncEngine, model_name: str,
                 token: Optional[str] = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.token = token or worker_token_from_env()
        self.health = health_aio.HealthServicer()
        self.servicer = WorkerServicer(engine, model_name, self.health)
        interceptors = [WorkerTokenInterceptor(self.token)] if self.token else None
        # Without so_reuseport 0, grpc sets SO_REUSEPORT and a second worker given the
        # same port would silently share it instead of failing to start.
        self._server = grpc.aio.server(options=[
            ("grpc.so_reuseport", 0),
            # A request carries its images (gRPC's default limit is 4 MiB a message).
            ("grpc.max_receive_message_length", MAX_GENERATE_REQUEST_BYTES),
        ], interceptors=interceptors)
        worker_pb2_grpc.add_WorkerServicer_to_server(self.servicer, self._server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self._server)
        reflection.enable_server_reflection(
            (WORKER_SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            self._server)

    async def start(self, host: str, port: int) -> int:
        """Start the engine thread and listen on host:port (0: a free port); returns the
        port. Health turns SERVING here, since the model is loaded by now."""
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        warning = worker_listen_warning(host, self.token)
        if warning:
            logger.warning(warning)
        try:
            bound = self._server.add_insecure_port(address)
        except RuntimeError as exc:  # grpc reports a failed bind this way
            raise OSError(f"could not listen on {address}: {exc}") from exc
        if bound == 0:
            raise OSError(f"could not listen on {address}")
        self.engine.start()
        await self._server.start()
        for service in _HEALTH_SERVICES:
            await self.health.set(service, health_pb2.HealthCheckResponse.SERVING)
        return bound

    async def shutdown(self, drain_timeout: Optional[float], grace: float = 5.0) -> int:
        """Drain (up to `drain_timeout` s), abort what is left, stop serving, stop the
        engine. Returns how many requests had to be aborted."""
        num_unfinished = await self.servicer.drain(drain_timeout)
        if num_unfinished:
            logger.warning("drain timed out: aborting %d request(s)", num_unfinished)
            self.servicer.abort_all()
            # Give the aborted streams a moment to send their final `complete`.
            await self.servicer.drain(grace)
        await self.health.enter_graceful_shutdown()
        await self._server.stop(grace)
        await asyncio.to_thread(self.engine.shutdown)
        return num_unfinished
