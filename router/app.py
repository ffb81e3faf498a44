"""The OpenAI-compatible HTTP API (FastAPI): /v1/chat/completions, /v1/completions,
/v1/models, /health, /metrics.

Errors are `{"error": {"message", "type", "param", "code"}}`: 400 bad input (malformed
JSON, wrong types, out-of-range values, prompt too long), 401 missing/wrong API key,
404 unknown model, 413 body over `max_body_bytes`, 503 overloaded or no healthy replica
(with Retry-After), 504 deadline passed. Bad input never yields a 500.

Streaming responses are SSE (`data: <json>\\n\\n`, then `data: [DONE]\\n\\n`). Headers are
sent once the first event exists, so admission and routing errors still get their own
status codes; a failure after that ends the stream with an error frame. A client that
disconnects (streaming or not) cancels its worker requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import Any, Optional, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import TypeAdapter
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmfleet.router.auth import ApiKeyAuth
from lmfleet.router.choice_stream import Event
from lmfleet.router.drain import Drain
from lmfleet.router.errors import OverloadedError, RouterError
from lmfleet.router.generation import Generation, GenerationJob
from lmfleet.router.http_gate import DEFAULT_BODY_TIMEOUT_S, HttpGate
from lmfleet.router.images import ImageOptions, chat_inputs
from lmfleet.router.metrics import CONTENT_TYPE, RouterMetrics
from lmfleet.router.openai_api import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChunk,
    CompletionRequest,
    CompletionResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    error_body,
    new_id,
    now,
)
from lmfleet.router.openai_serving import OpenAIFormatter
from lmfleet.router.replicas import ReplicaRegistry

logger = logging.getLogger(__name__)
T = TypeVar("T")

_ERROR_CODES = {400: "Bad input (malformed JSON, wrong types, prompt too long).",
                401: "Missing or wrong API key.", 404: "Unknown model.",
                413: "Request body too large.", 502: "The replica failed.",
                503: "Overloaded or no healthy replica; see Retry-After.",
                504: "The request timed out."}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text} for code, text in _ERROR_CODES.items()}


def _sse_content(chunk_model: str) -> dict[str, Any]:
    """OpenAPI for a stream of SSE events: each event's `data` is a JSON chunk, an error
    object, or the final `[DONE]` (JSON Schema contentMediaType/contentSchema)."""
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk_model}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    event = {"type": "object", "required": ["data"], "properties": {
        "event": {"type": "string"}, "id": {"type": "string"}, "retry": {"type": "integer"},
        "data": {"anyOf": [{"const": "[DONE]"},
                           {"type": "string", "contentMediaType": "application/json",
                            "contentSchema": payload}]}}}
    return {"text/event-stream": {"schema": event}}


@dataclass(frozen=True)
class HttpContext:
    """What the HTTP handlers need; `request_timeout` bounds every request (None: none)."""

    registry: ReplicaRegistry
    generation: Generation
    metrics: RouterMetrics
    auth: ApiKeyAuth
    max_body_bytes: int
    request_timeout: Optional[float] = None
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Shared with the Router, which starts the drain when it stops.
    drain: Drain = field(default_factory=Drain)
    # Serve the chat page (router/webui/index.html) at /.
    webui: bool = True
    # Which image URLs chat requests may use (router/images.py).
    images: ImageOptions = field(default_factory=ImageOptions)


def webui_page() -> str:
    """The built-in chat page (one self-contained HTML file)."""
    from importlib.resources import files

    return (files("lmfleet.router.webui") / "index.html").read_text(encoding="utf-8")


class _ClientGone(Exception):
    """The HTTP client disconnected before its response was ready."""


def create_app(ctx: HttpContext) -> FastAPI:
    app = FastAPI(title="lmfleet", version="1", description=__doc__.split("\n\n")[0],
                  docs_url=None, redoc_url=None)
    _install_error_handlers(app, ctx.metrics)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse,
              responses={200: {"content": _sse_content("ChatCompletionChunk")},
                         **ERROR_RESPONSES})
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        with _Outcome(ctx) as outcome:
            return outcome.answered(await _chat(ctx, body, request, outcome))

    @app.post("/v1/completions", response_model=CompletionResponse,
              responses={200: {"content": _sse_content("CompletionChunk")},
                         **ERROR_RESPONSES})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        with _Outcome(ctx) as outcome:
            return outcome.answered(await _complete(ctx, body, request, outcome))

    @app.get("/v1/models", response_model=ModelList, responses={401: ERROR_RESPONSES[401]})
    async def list_models() -> ModelList:
        created = now()
        # `root` is the served name, never the worker's model_path: a file path on the
        # server is none of a client's business.
        return ModelList(data=[
            ModelCard(id=m.name, created=created, root=m.name,
                      max_model_len=m.max_model_len, num_replicas=m.num_healthy)
            for m in ctx.registry.models.values()])

    if ctx.webui:
        page = webui_page()

        @app.get("/", response_class=HTMLResponse, include_in_schema=False)
        async def chat_page() -> HTMLResponse:
            return HTMLResponse(page)

    @app.get("/health", responses={503: {"description": "No healthy replica."}})
    async def health() -> Response:
        healthy = {m.name: m.num_healthy for m in ctx.registry.models.values()}
        ok = any(healthy.values())
        return JSONResponse({"status": "ok" if ok else "unavailable", "models": healthy},
                            status_code=200 if ok else 503)

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    _finish_openapi(app)
    app.add_middleware(HttpGate, auth=ctx.auth, max_body_bytes=ctx.max_body_bytes,
                       body_timeout_s=ctx.body_timeout_s,
                       on_refused=lambda status: ctx.metrics.record_request(
                           None, "http", str(status)))
    return app


async def _chat(ctx: HttpContext, body: ChatCompletionRequest, request: Request,
                outcome: _Outcome) -> Response:
    model = ctx.registry.get(body.model)
    outcome.model = model.name
    params = body.to_params()
    inputs = await chat_inputs(body.messages, model, ctx.images)
    prompt = await ctx.generation.tokenize_chat(model, inputs.messages,
                                                body.add_generation_prompt is not False,
                                                num_images=len(inputs.images))
    formatter = OpenAIFormatter(
        chat=True, request_id=new_id("chatcmpl"), created=now(), model=model.name,
        tokenizer=model.tokenizer, logprobs=params.logprobs is not None,
        include_usage=body.include_usage_chunk)
    job = _job(ctx, model, [prompt], params, body, inputs.images)
    return await _respond(ctx, request, job, formatter, bool(body.stream))


async def _complete(ctx: HttpContext, body: CompletionRequest, request: Request,
                    outcome: _Outcome) -> Response:
    model = ctx.registry.get(body.model)
    outcome.model = model.name
    params = body.to_params()
    prompts = [await ctx.generation.tokenize(model, p) for p in body.prompts()]
    formatter = OpenAIFormatter(
        chat=False, request_id=new_id("cmpl"), created=now(), model=model.name,
        tokenizer=model.tokenizer, logprobs=params.logprobs is not None,
        include_usage=body.include_usage_chunk)
    job = _job(ctx, model, prompts, params, body)
    return await _respond(ctx, request, job, formatter, bool(body.stream))


class _Outcome:
    """Counts one request in lmfleet:router_requests_total by the status it is answered
    with (a streamed response counts as its 200 once it starts).

    `model` is set only once the registry resolved the request's model: the name a client
    sent is never a label (unbounded cardinality, and text that may not even encode)."""

    def __init__(self, ctx: HttpContext) -> None:
        self.metrics = ctx.metrics
        self.model: Optional[str] = None

    def __enter__(self) -> _Outcome:
        return self

    def answered(self, response: Response) -> Response:
        self.metrics.record_request(self.model, "http", str(response.status_code))
        return response

    def __exit__(self, kind, error, traceback) -> None:
        if isinstance(error, RouterError):
            self.metrics.record_request(self.model, "http", str(error.http_status))
        elif error is not None and not isinstance(error, asyncio.CancelledError):
            self.metrics.record_request(self.model, "http", "500")


def _job(ctx: HttpContext, model, prompts, params, body,
         images: tuple[bytes, ...] = ()) -> GenerationJob:
    deadline = (asyncio.get_running_loop().time() + ctx.request_timeout
                if ctx.request_timeout else None)
    return GenerationJob(model=model, prompts=prompts, params=params,
                         priority=body.priority or 0, session_id=body.session_id,
                         deadline=deadline, images=images)


async def _respond(ctx: HttpContext, request: Request, job: GenerationJob,
                   formatter: OpenAIFormatter, stream: bool) -> Response:
    ctx.drain.check()  # a stopping router takes no new work (JSON 503)
    drain = ctx.drain
    drain.begin()
    events = ctx.generation.stream(job)
    try:
        if not stream:
            try:
                return JSONResponse(await _unless_disconnected(
                    request, drain.until_stopped(formatter.collect(events))))
            finally:
                drain.end()
        # Wait for the first event before sending headers: errors up to here keep their
        # status code (503 overloaded, 400 from the worker, ...).
        first = await _unless_disconnected(request, drain.until_stopped(anext(events)))
    except _ClientGone:
        await events.aclose()
        if stream:
            drain.end()
        return Response(status_code=499)
    except BaseException:
        await events.aclose()
        if stream:
            drain.end()
        raise
    # The stream's end (however it ends) releases this request's drain count.
    body = formatter.sse(drain.guarded(_prepend(first, events)))
    return _SSEResponse(body, media_type="text/event-stream",
                        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class _SSEResponse(StreamingResponse):
    """Closes its event stream however the response ends, which cancels worker calls
    (Starlette abandons the iterator on disconnect without closing it)."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[union-attr]


async def _prepend(first: Event, rest: AsyncIterator[Event]) -> AsyncIterator[Event]:
    async with contextlib.aclosing(rest):
        yield first
        async for event in rest:
            yield event


async def _unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable`, cancelling it if the client disconnects first (_ClientGone)."""
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if work.done():
            return work.result()
        raise _ClientGone()
    finally:
        for task in (work, watcher):
            task.cancel()
        await asyncio.gather(work, watcher, return_exceptions=True)


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# ---- errors -------------------------------------------------------------------------------


def error_response(error: RouterError) -> JSONResponse:
    headers = {}
    retry_after = getattr(error, "retry_after", None)
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    return JSONResponse(error_body(error.message, error.error_type, error.http_status,
                                   error.param),
                        status_code=error.http_status, headers=headers)


def _validation_message(error: RequestValidationError) -> tuple[str, Optional[str]]:
    details = error.errors()
    if not details:
        return "invalid request", None
    first = details[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('msg', '')}", None
    message = first.get("msg", "invalid value")
    extra = f" (and {len(details) - 1} more errors)" if len(details) > 1 else ""
    # request_checks.py errors name their value's path themselves (loc is only the model).
    param = (first.get("ctx") or {}).get("param")
    if param is not None:
        return f"{message}{extra}", str(param)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    return (f"{param}: {message}{extra}" if param else f"{message}{extra}"), param


def _install_error_handlers(app: FastAPI, metrics: Optional[RouterMetrics]) -> None:
    @app.exception_handler(RouterError)
    async def _router_error(request: Request, error: RouterError) -> JSONResponse:
        if not isinstance(error, OverloadedError):
            logger.debug("request failed: %s", error.message)
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, error: RequestValidationError):
        message, param = _validation_message(error)
        if metrics is not None:
            metrics.record_request(None, "http", "400")
        return JSONResponse(error_body(message, "BadRequestError", 400, param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(error.detail), "NotFoundError"
                                       if error.status_code == 404 else "BadRequestError",
                                       error.status_code),
                            status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error serving %s", request.url.path)
        return JSONResponse(error_body("internal error", "InternalServerError", 500),
                            status_code=500)


def _finish_openapi(app: FastAPI) -> None:
    """FastAPI documents 422 for validation errors; this API answers 400 instead. The SSE
    chunk models are added to the components (streams reference them)."""
    original = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = original()
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (ChatCompletionChunk, CompletionChunk):
                chunk = TypeAdapter(model).json_schema(
                    mode="serialization", ref_template="#/components/schemas/{model}")
                components.update(chunk.pop("$defs", {}))
                components[model.__name__] = chunk
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)
            for name in ("HTTPValidationError", "ValidationError"):
                schema.get("components", {}).get("schemas", {}).pop(name, None)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
