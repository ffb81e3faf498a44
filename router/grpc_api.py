"""The public gRPC API: lmfleet.v1.Serving (serving.proto), grpc.health.v1 and reflection.

`Generate` takes text (no template), token ids, or chat messages (the model's chat
template is applied; a vision model's messages may carry encoded images, `ChatMessage.
images`, seen by the template after the message's text) and streams `TextDelta`s, then
one `GenerationComplete` with usage.
It runs the same generation path as the HTTP API. Status codes: INVALID_ARGUMENT (bad
input, prompt too long), NOT_FOUND (unknown model), RESOURCE_EXHAUSTED (admission),
UNAVAILABLE (no healthy replica after retries, or the replica failed mid-stream),
DEADLINE_EXCEEDED (the client's deadline, which is also the worker call's deadline),
CANCELLED (client cancel: the worker request is aborted), UNAUTHENTICATED (metadata
`authorization: Bearer <key>` missing or wrong when a key is configured). A request that
does not parse (e.g. a string field that is not valid UTF-8) is INVALID_ARGUMENT too, not
the UNKNOWN that gRPC answers for a failing deserializer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from lmfleet.proto.v1 import serving_pb2, serving_pb2_grpc
from lmfleet.router.auth import ApiKeyAuth
from lmfleet.router.choice_stream import ChoiceEnd, TextChunk, Usage
from lmfleet.router.errors import InvalidRequestError, RouterError
from lmfleet.router.generation import Generation, GenerationJob
from lmfleet.router.images import ImageOptions, chat_inputs
from lmfleet.router.model_replicas import ModelReplicas
from lmfleet.router.params import GenerationParams
from lmfleet.router.replicas import ReplicaRegistry

logger = logging.getLogger(__name__)

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name


def params_from_proto(proto: serving_pb2.GenerationParams) -> GenerationParams:
    """GenerationParams from the wire; unset optional fields stay None (worker default)."""
    optional = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "min_tokens",
                "repetition_penalty", "presence_penalty", "frequency_penalty", "logprobs")
    values = {name: getattr(proto, name) if proto.HasField(name) else None
              for name in optional}
    if values["max_tokens"] == 0:
        raise InvalidRequestError("max_tokens must be at least 1", param="max_tokens")
    return GenerationParams(stop=tuple(proto.stop), stop_token_ids=tuple(proto.stop_token_ids),
                            ignore_eos=proto.ignore_eos, **values)


def _chat_message(message: serving_pb2.ChatMessage) -> dict[str, Any]:
    """A message as the OpenAI door has it: its images are image parts after its text."""
    if not message.images:
        return {"role": message.role, "content": message.content}
    return {"role": message.role, "content": [
        {"type": "text", "text": message.content},
        *({"type": "image", "image": image} for image in message.images)]}


def _image_where(message_index: int, part_index: int) -> str:
    # Part 0 of a message with images is its text (_chat_message).
    return f"messages[{message_index}].images[{part_index - 1}]"


class UndecodableRequest:
    """Stands for a request message that did not parse; the servicer answers it with
    INVALID_ARGUMENT (`reason` is protobuf's)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason


def _tolerant(parse: Callable[[bytes], Any]) -> Callable[[bytes], Any]:
    def deserialize(data: bytes) -> Any:
        try:
            return parse(data)
        except DecodeError as error:
            return UndecodableRequest(str(error))
    return deserialize


def _add_serving(servicer: ServingServicer, server: grpc.aio.Server) -> None:
    """serving_pb2_grpc.add_ServingServicer_to_server with deserializers that let a bad
    message reach the servicer (see UndecodableRequest) instead of failing in gRPC."""
    handlers = {
        "Generate": grpc.unary_stream_rpc_method_handler(
            servicer.Generate,
            request_deserializer=_tolerant(serving_pb2.ServingGenerateRequest.FromString),
            response_serializer=serving_pb2.ServingGenerateResponse.SerializeToString),
        "ListModels": grpc.unary_unary_rpc_method_handler(
            servicer.ListModels,
            request_deserializer=_tolerant(serving_pb2.ListModelsRequest.FromString),
            response_serializer=serving_pb2.ListModelsResponse.SerializeToString),
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)


class ServingServicer(serving_pb2_grpc.ServingServicer):
    def __init__(self, registry: ReplicaRegistry, generation: Generation,
                 auth: ApiKeyAuth) -> None:
        self.registry = registry
        self.generation = generation
        self.metrics = generation.metrics
        self.auth = auth

    async def _check_auth(self, context: grpc.aio.ServicerContext) -> None:
        if not self.auth.authorized_metadata(context.invocation_metadata()):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED,
                                "invalid or missing API key (metadata 'authorization: "
                                "Bearer <key>')")

    async def _check_decoded(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        if isinstance(request, UndecodableRequest):
            self.metrics.record_request(None, "grpc",
                                        grpc.StatusCode.INVALID_ARGUMENT.name)
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"the request message does not parse: {request.reason}")

    async def Generate(self, request: serving_pb2.ServingGenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[serving_pb2.ServingGenerateResponse]:
        await self._check_auth(context)
        await self._check_decoded(request, context)
        model_name = None  # a label only once resolved: never the name a client sent
        try:
            model = self.registry.get(request.model)
            model_name = model.name
            job = await self._job(model, request, context)
            async with contextlib.aclosing(self.generation.stream(job)) as events:
                finish_reason = "stop"
                async for event in events:
                    if isinstance(event, TextChunk):
                        if event.text or event.token_ids:
                            yield serving_pb2.ServingGenerateResponse(
                                delta=serving_pb2.TextDelta(text=event.text,
                                                            token_ids=event.token_ids))
                    elif isinstance(event, ChoiceEnd):
                        finish_reason = event.finish_reason
                    elif isinstance(event, Usage):
                        yield serving_pb2.ServingGenerateResponse(
                            complete=serving_pb2.GenerationComplete(
                                finish_reason=finish_reason,
                                usage=serving_pb2.Usage(
                                    prompt_tokens=event.prompt_tokens,
                                    completion_tokens=event.completion_tokens,
                                    cached_tokens=event.cached_tokens)))
        except RouterError as error:
            self.metrics.record_request(model_name, "grpc", error.grpc_code.name)
            await context.abort(error.grpc_code, error.message)
        except asyncio.CancelledError:
            self.metrics.record_request(model_name, "grpc", grpc.StatusCode.CANCELLED.name)
            raise
        self.metrics.record_request(model_name, "grpc", grpc.StatusCode.OK.name)

    async def _job(self, model: ModelReplicas, request: serving_pb2.ServingGenerateRequest,
                   context: grpc.aio.ServicerContext) -> GenerationJob:
        params = params_from_proto(request.params)
        images: tuple[bytes, ...] = ()
        kind = request.WhichOneof("prompt")
        if kind == "text":
            prompt = await self.generation.tokenize(model, request.text)
        elif kind == "token_ids":
            prompt = await self.generation.tokenize(model, list(request.token_ids.ids))
        elif kind == "chat":
            inputs = await chat_inputs([_chat_message(m) for m in request.chat.messages],
                                       model, ImageOptions(), where=_image_where)
            images = inputs.images
            prompt = await self.generation.tokenize_chat(model, inputs.messages,
                                                         num_images=len(images))
        else:
            raise InvalidRequestError("a prompt is required (text, token_ids or chat)",
                                      param="prompt")
        remaining = context.time_remaining()
        deadline = (asyncio.get_running_loop().time() + remaining
                    if remaining is not None else None)
        return GenerationJob(model=model, prompts=[prompt], params=params,
                             priority=request.priority,
                             session_id=(request.session_id
                                         if request.HasField("session_id") else None),
                             deadline=deadline, images=images)

    async def ListModels(self, request: serving_pb2.ListModelsRequest,
                         context: grpc.aio.ServicerContext) -> serving_pb2.ListModelsResponse:
        await self._check_auth(context)
        await self._check_decoded(request, context)
        return serving_pb2.ListModelsResponse(models=[
            serving_pb2.ModelCard(name=m.name, max_model_len=m.max_model_len,
                                  num_replicas=m.num_healthy)
            for m in self.registry.models.values()])


async def add_grpc_services(server: grpc.aio.Server, servicer: ServingServicer
                            ) -> HealthServicer:
    """Register Serving, health (SERVING for "" and the Serving service) and reflection."""
    _add_serving(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
         reflection.SERVICE_NAME), server)
    return health
