"""`AsyncEngine`: the synchronous `LLMEngine` behind per-request asyncio streams.

Threading contract (the engine is not thread-safe):
- Exactly one thread, the engine thread started by `start()`, ever touches the engine.
- Other threads talk to it through a command list guarded by a condition variable
  (`add` and `abort` commands, applied in the order they were issued). The engine thread
  sleeps on that condition when it has neither commands nor scheduled work: no busy loop.
- Outputs go back to each request's `asyncio.Queue` through `loop.call_soon_threadsafe`,
  one callback per event loop per step (not one per token).
- After every step the engine thread publishes an immutable `LoadSnapshot`; `load()`
  returns the latest one without locking or touching the engine.

Validation: `generate()` checks what can be checked from immutable engine facts
(`max_model_len`, vocabulary size) in the caller's thread; `engine.add_request` on the
engine thread checks again, and its ValueError reaches the caller the same way. Either
way the error is raised by the first `__anext__`, before any output is yielded.

Request ids: an id stays in use until its final output (finish or abort) has been
produced; reusing an id before then is a ValueError ("already in use").

Failures: if `engine.step()` raises, every in-flight request is aborted (its KV freed)
and its stream raises `EngineStepError`; the engine thread then keeps serving new
requests. If even that recovery fails, the engine is marked dead and every later
`generate()` raises `EngineDeadError`.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Optional, Union

from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.load_report import LoadSnapshot, TokenRateWindow, snapshot_engine
from lmfleet.worker.request import Request, RequestOutput, validate_prompt
from lmfleet.worker.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineStepError(RuntimeError):
    """An engine step failed while this request was in flight; the request was aborted."""


class EngineDeadError(RuntimeError):
    """The engine can no longer run requests (its thread stopped or could not recover)."""


@dataclass
class _Stream:
    """Where one request's outputs go: a queue owned by the consumer's event loop."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


@dataclass
class _Add:
    request: Request


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Deliveries:
    """Items for the streams of one event loop, handed over in one callback."""

    items: list[tuple[asyncio.Queue, Union[RequestOutput, BaseException]]] = field(
        default_factory=list)

    def __call__(self) -> None:  # runs on the consumer's event loop
        for queue, item in self.items:
            queue.put_nowait(item)


class AsyncEngine:
    """Runs an `LLMEngine` on its own thread; `generate()` streams a request's outputs."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        # Immutable facts, safe to read from any thread.
        self.max_model_len: int = engine.max_model_len
        self.vocab_size: int = engine.arch.vocab_size
        self.eos_token_ids: tuple[int, ...] = tuple(engine.eos_token_ids)
        self.model_dir = engine.model_dir
        self.scheduler_policy: str = engine.config.scheduler.policy

        self._cond = threading.Condition()
        self._commands: list[Union[_Add, _Abort]] = []  # guarded by _cond
        self._streams: dict[str, _Stream] = {}  # request id -> stream; guarded by _cond
        self._stopping = False  # guarded by _cond
        self._dead: Optional[BaseException] = None
        self._thread: Optional[threading.Thread] = None
        self._rate = TokenRateWindow()
        self._load: LoadSnapshot = snapshot_engine(engine, self._rate)

    # ---- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start the engine thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="lmfleet-engine", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: Optional[float] = 30.0) -> None:
        """Stop the engine thread; in-flight streams raise `EngineDeadError`."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                return  # still inside a step: its ranks must stay
        self._engine.close()  # the other parallel ranks, if any

    @property
    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._dead is None

    # ---- requests ----------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        priority: int = 0,
        session_id: Optional[str] = None,
        images: Sequence[bytes] = (),
        image_positions_end: Optional[int] = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream the outputs of one request; the last one has `finish_reason` set.

        Raises ValueError (before yielding anything) for input that can never run, and
        `EngineStepError` / `EngineDeadError` if the engine fails. If the consumer stops
        iterating early (closes the generator or its task is cancelled), the request is
        aborted at once and its KV blocks freed.
        """
        self._check_prompt(prompt_token_ids)
        if sampling_params.n != 1:
            raise ValueError("the engine runs one sequence per request; fan out n in the caller")
        images = tuple(images)
        # Checked here so a bad image fails this call, not the engine thread.
        spans = self._engine.image_spans(list(prompt_token_ids), images, image_positions_end)
        request = Request(request_id, list(prompt_token_ids), sampling_params,
                          priority=priority, session_id=session_id, images=images,
                          image_spans=spans)
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        with self._cond:
            if self._dead is not None or self._stopping or self._thread is None:
                raise EngineDeadError("the engine is not running")
            if request_id in self._streams:
                raise ValueError(f"request id {request_id!r} is already in use")
            self._streams[request_id] = stream
            self._commands.append(_Add(request))
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finished:
                    finished = True
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abort_stream(request_id, stream)

    def abort(self, request_id: str) -> bool:
        """Abort a request; its stream ends with finish_reason "abort".

        Returns False if no request with this id is in flight. Safe from any thread.
        """
        with self._cond:
            if request_id not in self._streams:
                return False
            self._commands.append(_Abort(request_id))
            self._cond.notify()
        return True

    def _abort_stream(self, request_id: str, stream: _Stream) -> None:
        # Only if the id still belongs to this stream: once its final output is out, the
        # id may already name a newer request that must not be aborted by mistake.
        with self._cond:
            if self._streams.get(request_id) is not stream:
                return
            self._commands.append(_Abort(request_id))
            self._cond.notify()

    def load(self) -> LoadSnapshot:
        """The load as of the end of the engine's latest step."""
        return self._load

    @property
    def num_in_flight(self) -> int:
        """Requests whose final output has not been produced yet."""
        with self._cond:
            return len(self._streams)

    def _check_prompt(self, prompt_token_ids: list[int]) -> None:
        # Same rules as LLMEngine.validate, from facts that never change after start-up.
        validate_prompt(prompt_token_ids, self.max_model_len, self.vocab_size)

    # ---- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        engine = self._engine
        try:
            while True:
                with self._cond:
                    while not (self._commands or self._stopping or engine.has_work()):
                        self._cond.wait()
                    if self._stopping:
                        break
                    commands, self._commands = self._commands, []
                deliveries: dict[asyncio.AbstractEventLoop, _Deliveries] = {}
                for command in commands:
                    self._apply(command, deliveries)
                if engine.has_work():
                    try:
                        outputs = engine.step()
                    except Exception as exc:  # noqa: BLE001 - any failure must reach streams
                        logger.exception("engine step failed; aborting in-flight requests")
                        self._recover(exc, deliveries)
                        if self._dead is not None:
                            self._flush(deliveries)
                            break
                    else:
                        for output in outputs:
                            self._route(output.request_id, output, output.finished, deliveries)
                self._load = snapshot_engine(engine, self._rate)
                self._flush(deliveries)
        except BaseException as exc:  # noqa: BLE001 - the thread must not die silently
            logger.exception("engine thread crashed")
            self._dead = exc
        finally:
            self._fail_all(EngineDeadError("the engine stopped"))

    def _apply(self, command: Union[_Add, _Abort], deliveries) -> None:
        if isinstance(command, _Abort):
            self._engine.abort(command.request_id)
            return
        request = command.request
        try:
            self._engine.add_request(request)
        except ValueError as exc:
            self._route(request.request_id, exc, True, deliveries)

    def _recover(self, error: Exception, deliveries) -> None:
        """After a failed step: abort everything in flight and tell its streams."""
        engine = self._engine
        failure = EngineStepError(f"engine step failed: {type(error).__name__}: {error}")
        try:
            for request_id in list(engine.requests):
                engine.abort(request_id)
            # Nothing is scheduled any more, so this step only returns the abort outputs;
            # they are dropped (their streams get the failure instead).
            engine.step()
        except Exception as exc:
            logger.exception("could not recover from a failed step; the engine is dead")
            self._dead = exc
        with self._cond:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._route(request_id, failure, True, deliveries)

    def _route(self, request_id: str, item, final: bool, deliveries) -> None:
        with self._cond:
            stream = self._streams.get(request_id)
            if stream is not None and final:
                del self._streams[request_id]
        if stream is None:
            return  # the consumer is gone (aborted) and its id already released
        deliveries.setdefault(stream.loop, _Deliveries()).items.append((stream.queue, item))

    @staticmethod
    def _flush(deliveries: dict[asyncio.AbstractEventLoop, _Deliveries]) -> None:
        for loop, batch in deliveries.items():
            try:
                loop.call_soon_threadsafe(batch)
            except RuntimeError:
                pass  # that event loop is closed: nobody is left to read these outputs

    def _fail_all(self, error: BaseException) -> None:
        with self._cond:
            self._stopping = True
            streams, self._streams = list(self._streams.values()), {}
            self._commands = []
        deliveries: dict[asyncio.AbstractEventLoop, _Deliveries] = {}
        for stream in streams:
            deliveries.setdefault(stream.loop, _Deliveries()).items.append((stream.queue, error))
        self._flush(deliveries)
