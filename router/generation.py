"""The one generation path both front doors use (OpenAI HTTP and lmfleet.v1 gRPC).

`Generation.stream(job)` yields `TextChunk`s and one `ChoiceEnd` per completion, then a
final `Usage`. Per request it: takes an admission slot (waiting in the model's queue up to
the deadline), fans out `n` completions per prompt as separate worker requests (seed + i
when a seed is given), and per completion:

- picks a replica by the model's policy and calls worker `Generate` with the time left
  until the request's deadline as the gRPC deadline (so the worker stops too);
- a failing replica (UNAVAILABLE, INTERNAL, a broken stream; e.g. one that died) is
  skipped and the next one is tried, up to `max_attempts` replicas; an UNAVAILABLE one
  is marked unhealthy until its next good load poll. A completion that had already
  produced tokens resumes on the next replica: prompt + the tokens produced so far become
  the new prompt (sent with the request's images, if any), with the budget left
  (max_tokens, min_tokens) and the same stop rules, so the client sees one uninterrupted
  completion; greedy output is token-identical to an undisturbed run (a seeded sampler
  restarts its random stream, and presence/frequency penalties then count only the tokens
  after the resume). Only when no replica is left does it end with
  StreamInterruptedError;
- while no replica can take an attempt (the only one died and its replacement is starting,
  all are unhealthy), waits for one up to `replica_wait_s` (and the request's deadline)
  instead of failing at once, so a client's retries are not spent before the replacement
  is up; then NoReplicaError (503);
- detokenizes incrementally and applies stop strings (router/choice_stream.py); on a match
  it cancels the worker call (which aborts the worker request) and finishes with
  finish_reason "stop".

Closing the stream early (client disconnect, gRPC cancel) cancels every worker call.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import grpc

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.choice_stream import (
    ChoiceEnd,
    ChoiceStream,
    Event,
    RequestState,
    Usage,
)
from lmfleet.router.errors import (
    DeadlineExceededError,
    InvalidRequestError,
    NoReplicaError,
    StreamInterruptedError,
)
from lmfleet.router.metrics import RouterMetrics
from lmfleet.router.model_replicas import ModelReplicas, Replica
from lmfleet.router.params import GenerationParams
from lmfleet.router.policies import RouteRequest
from lmfleet.router.replicas import ReplicaRegistry
from lmfleet.worker.model.vision.vision_info import ImageError

# Replicas tried per completion before giving up with NoReplicaError.
DEFAULT_MAX_ATTEMPTS = 3
# How long a completion waits for a replica when none can take it. A replica a controller
# replaces comes back in seconds (Ray restarts the actor, the model loads).
DEFAULT_REPLICA_WAIT_S = 15.0
# How often a waiting completion looks again (health changes arrive with the load polls).
_REPLICA_WAIT_POLL_S = 0.05


@dataclass(frozen=True)
class GenerationJob:
    """A tokenized request: `prompts` (one or more token-id lists) x `params.n`.

    Completion `p * n + i` is the i-th sample of prompt p (the OpenAI/vLLM choice index).
    `deadline` is on the event loop's clock (`loop.time()`), None for no limit.
    """

    model: ModelReplicas
    prompts: list[list[int]]
    params: GenerationParams
    priority: int = 0
    session_id: Optional[str] = None
    deadline: Optional[float] = None
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    # Encoded images of a vision model's (one) prompt, in the order of its image-token
    # runs; every attempt of every completion sends them (a resumed one too).
    images: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        if self.images and len(self.prompts) != 1:
            raise ValueError("images go with exactly one prompt")


class Generation:
    def __init__(self, registry: ReplicaRegistry, metrics: RouterMetrics,
                 max_attempts: int = DEFAULT_MAX_ATTEMPTS,
                 replica_wait_s: float = DEFAULT_REPLICA_WAIT_S) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be >= 1")
        if not replica_wait_s >= 0:
            raise ValueError(f"replica_wait_s must be >= 0, got {replica_wait_s}")
        self.registry = registry
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.replica_wait_s = replica_wait_s

    # ---- input ---------------------------------------------------------------------------
    async def tokenize(self, model: ModelReplicas, prompt: Union[str, Sequence[int]]
                       ) -> list[int]:
        """Token ids of a text prompt (or validated ids as given), checked against the
        model's vocabulary and context length."""
        if isinstance(prompt, str):
            ids = await asyncio.to_thread(model.tokenizer.encode, prompt)
        else:
            ids = list(prompt)
        return self.check_prompt(model, ids)

    async def tokenize_chat(self, model: ModelReplicas, messages: list[dict[str, Any]],
                            add_generation_prompt: bool = True, num_images: int = 0
                            ) -> list[int]:
        """The rendered conversation's ids; a vision model's image tokens are expanded to
        each image's full run, and checked against the `num_images` that go with it."""
        ids = await asyncio.to_thread(model.tokenizer.apply_chat_template, messages,
                                      add_generation_prompt)
        vision = model.tokenizer.vision
        if vision is not None:
            ids = vision.expand_image_tokens(ids)
        return self.check_prompt(model, ids, num_images, param="messages")

    @staticmethod
    def check_prompt(model: ModelReplicas, ids: list[int], num_images: int = 0,
                     param: str = "prompt") -> list[int]:
        """`ids` if they can run: not empty, in the vocabulary, shorter than the context,
        and (vision models) with places for exactly `num_images` whole images. `param`
        names the request field they came from."""
        if not ids:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        vision = model.tokenizer.vision
        if vision is not None:
            try:
                vision.check_prompt(ids, num_images)
            except ImageError as error:  # e.g. "<image>" typed into a text prompt
                raise InvalidRequestError(str(error), param=param) from None
        if model.vocab_size and any(not 0 <= t < model.vocab_size for t in ids):
            raise InvalidRequestError(
                f"prompt token ids must be in [0, {model.vocab_size})", param="prompt")
        if len(ids) >= model.max_model_len:
            raise InvalidRequestError(
                f"This model's maximum context length is {model.max_model_len} tokens. "
                f"However, your request has {len(ids)} input tokens. Please reduce the "
                "length of the input messages.")
        return ids

    # ---- output ---------------------------------------------------------------------------
    async def stream(self, job: GenerationJob) -> AsyncIterator[Event]:
        """Events of the job (see the module doc). Raises RouterError subclasses."""
        model = job.model
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        async with model.admission.slot(self._remaining(job)):
            self.metrics.queue_time.labels(model.name).observe(loop.time() - arrival)
            # aclosing: closing this generator must close (and cancel) the fan-out too.
            async with contextlib.aclosing(self._fan_out(job, arrival)) as events:
                async for event in events:
                    yield event

    async def _fan_out(self, job: GenerationJob, arrival: float) -> AsyncIterator[Event]:
        n = job.params.n
        queue: asyncio.Queue[Union[Event, BaseException]] = asyncio.Queue()
        state = RequestState(arrival)
        tasks = [
            asyncio.create_task(self._run_choice(job, p * n + i, prompt, i, queue, state))
            for p, prompt in enumerate(job.prompts) for i in range(n)
        ]
        ends: dict[int, ChoiceEnd] = {}
        try:
            while len(ends) < len(tasks):
                event = await queue.get()
                if isinstance(event, BaseException):
                    raise event
                if isinstance(event, ChoiceEnd):
                    ends[event.index] = event
                yield event
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        name = job.model.name
        usage = Usage(
            prompt_tokens=sum(len(p) for p in job.prompts),
            completion_tokens=sum(e.completion_tokens for e in ends.values()),
            # Every sample of a prompt shares its prefix: count its cached tokens once.
            cached_tokens=sum(max(ends[p * n + i].cached_tokens for i in range(n))
                              for p in range(len(job.prompts))))
        self.metrics.prompt_tokens.labels(name).inc(usage.prompt_tokens)
        yield usage

    async def _run_choice(self, job: GenerationJob, index: int, prompt: list[int],
                          sample: int, queue: asyncio.Queue, state: RequestState) -> None:
        try:
            await self._generate_choice(job, index, prompt, sample, queue.put_nowait, state)
        except asyncio.CancelledError:
            raise
        except Exception as error:  # handed to the consumer, which re-raises it
            queue.put_nowait(error)

    async def _generate_choice(self, job: GenerationJob, index: int, prompt: list[int],
                               sample: int, emit, state: RequestState) -> None:
        model = job.model
        params = job.params
        left = model.max_model_len - len(prompt)
        max_tokens = min(params.max_tokens or left, left)
        stop_token_ids = set(params.stop_token_ids)
        route = RouteRequest(model=model.name, session_id=job.session_id)
        # One text state for every attempt: a resumed completion continues it.
        stream = ChoiceStream(index, model, prompt, params, stop_token_ids, emit,
                               self.metrics, state)
        tried: list[str] = []
        last_error = "no replica is healthy"
        for attempt in range(self.max_attempts):
            replica = await self._next_replica(job, route, tried)
            if replica is None:
                break
            tried.append(replica.address)
            done = stream.token_ids  # produced before a failed replica: resume after them
            if len(done) >= max_tokens:  # it died between its last token and its end
                stream.on_complete(worker_pb2.GenerateComplete(finish_reason="length"))
                return
            worker_params = params.to_worker(sample, max_tokens - len(done))
            if done and params.min_tokens:
                worker_params.min_tokens = max(params.min_tokens - len(done), 0)
            request = worker_request(job, f"{job.request_id}-{index}-{attempt}",
                                     prompt + done, worker_params)
            try:
                if await self._attempt(job, replica, request, stream):
                    return
            except _RetryableError as error:
                last_error = f"{replica.address}: {error}"
                continue
        if stream.started:
            raise StreamInterruptedError(
                f"the replica failed mid-generation and no other could resume it "
                f"(tried {len(tried)}; last error: {last_error})")
        raise NoReplicaError(f"no replica of model {model.name} could serve the request "
                             f"(tried {len(tried)}; last error: {last_error})")

    async def _attempt(self, job: GenerationJob, replica: Replica,
                       request: worker_pb2.GenerateRequest, stream: ChoiceStream) -> bool:
        """One try on one replica. True when the completion finished; raises
        _RetryableError when the replica failed and another one may take over."""
        timeout = self._remaining(job, required=True)
        replica.in_flight += 1
        call = replica.stub.Generate(request, timeout=timeout)
        try:
            async for response in call:
                kind = response.WhichOneof("response")
                if kind == "chunk":
                    if stream.on_chunk(response.chunk):
                        return True  # a stop string matched; `finally` cancels the call
                elif kind == "complete":
                    stream.on_complete(response.complete)
                    return True
                elif kind == "error":
                    self._worker_error(response.error)
            raise _RetryableError("the worker ended the stream without a result")
        except grpc.aio.AioRpcError as error:
            code = error.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise DeadlineExceededError("the request deadline passed") from None
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise InvalidRequestError(error.details() or "invalid request") from None
            if code == grpc.StatusCode.UNAVAILABLE:
                self.registry.mark_unhealthy(replica)
            raise _RetryableError(f"{code.name}: {error.details()}") from None
        finally:
            replica.in_flight -= 1
            call.cancel()  # no-op once finished; otherwise aborts the worker request

    async def _next_replica(self, job: GenerationJob, route: RouteRequest,
                            tried: list[str]) -> Optional[Replica]:
        """The replica for the next attempt (not one in `tried`); while there is none,
        look again until `replica_wait_s` or the deadline has passed, then None."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.replica_wait_s
        if job.deadline is not None:
            give_up = min(give_up, job.deadline)
        while True:
            # A model whose last replica went is kept a while (ReplicaRegistry's
            # empty_model_grace_s); should it go and come back, the new entry serves.
            model = self.registry.models.get(job.model.name, job.model)
            replica = await model.select_for(route, exclude=tried)
            if replica is not None or loop.time() >= give_up:
                return replica
            await asyncio.sleep(min(_REPLICA_WAIT_POLL_S, give_up - loop.time()))

    @staticmethod
    def _worker_error(error: worker_pb2.GenerateError) -> None:
        if error.kind == worker_pb2.GenerateError.INVALID_ARGUMENT:
            raise InvalidRequestError(error.message or "invalid request")
        raise _RetryableError(f"{worker_pb2.GenerateError.Kind.Name(error.kind)}: "
                              f"{error.message}")

    @staticmethod
    def _remaining(job: GenerationJob, required: bool = False) -> Optional[float]:
        if job.deadline is None:
            return None
        left = job.deadline - asyncio.get_running_loop().time()
        if required and left <= 0:
            raise DeadlineExceededError("the request deadline passed")
        return max(left, 0.0)


def worker_request(job: GenerationJob, request_id: str, prompt_token_ids: list[int],
                   params: worker_pb2.SamplingParams) -> worker_pb2.GenerateRequest:
    """One attempt's Worker request: a resumed one's prompt holds the tokens produced so
    far, and its images are the job's, as for the first attempt."""
    request = worker_pb2.GenerateRequest(
        request_id=request_id, prompt_token_ids=prompt_token_ids, sampling_params=params,
        priority=job.priority, images=job.images)
    if job.images:  # what the model generates is text, even an image token
        request.image_positions_end = len(job.prompts[0])
    if job.session_id is not None:
        request.session_id = job.session_id
    return request


class _RetryableError(Exception):
    """A replica failed; another replica may be tried (resuming what was produced)."""
