"""The images of a chat request, as both front doors take them.

OpenAI HTTP content parts `{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`
carry a base64 data URL (`data:image/png;base64,...`), or an http(s) URL that the router
fetches only when its operator allows it (`--allow-image-urls`: a fetch may reach whatever
the router's network can, so it is off by default), within `MAX_IMAGE_BYTES` and
`fetch_timeout_s`. The gRPC door's `ChatMessage.images` arrive as bytes. Every image must
be one PIL can read; `detail` is accepted and ignored (a LLaVA model sees one fixed size).

Anything wrong is an InvalidRequestError (400 / INVALID_ARGUMENT) whose message and
`param` name the part (`messages[1].content[0]`): a text-only model given an image, more
than MAX_IMAGES_PER_REQUEST images, bad base64, bytes that are not an image, an image too
large, a refused or failed URL.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from lmfleet.router.errors import InvalidRequestError
from lmfleet.router.model_replicas import ModelReplicas
from lmfleet.router.tokenizer import chat_messages_for_template, message_dicts
from lmfleet.worker.chat_images import (
    ContentPartError,
    ImagePart,
    decode_data_url,
    image_parts,
    part_where,
    url_scheme,
)
from lmfleet.worker.model.vision.vision_info import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES_PER_REQUEST,
    ImageError,
    check_image_bytes,
    text_only_model_error,
)

IMAGE_FETCH_TIMEOUT_S = 10.0
# A fetch follows at most this many redirects.
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class ImageOptions:
    """How the router takes image URLs. allow_urls: fetch http(s) image URLs (otherwise
    only data URLs); fetch_timeout_s: the most one fetch may take, connect to last byte."""

    allow_urls: bool = False
    fetch_timeout_s: float = IMAGE_FETCH_TIMEOUT_S

    def __post_init__(self) -> None:
        if not self.fetch_timeout_s > 0:
            raise ValueError(f"fetch_timeout_s must be positive, got {self.fetch_timeout_s}")


@dataclass(frozen=True)
class ChatInputs:
    """A conversation ready for the chat template, and its images in order."""

    messages: list[dict[str, Any]]
    images: tuple[bytes, ...] = ()


async def chat_inputs(messages: Sequence[Any], model: ModelReplicas, options: ImageOptions,
                      where: Callable[[int, int], str] = part_where) -> ChatInputs:
    """The template messages and the checked image bytes of a conversation for `model`;
    `where(message index, part index)` names an image part in errors."""
    data = message_dicts(messages)
    try:
        parts = image_parts(data, where)
    except ContentPartError as error:
        raise InvalidRequestError(str(error), param=error.where) from None
    vision = model.tokenizer.vision
    if parts and vision is None:
        where = parts[0].where
        raise InvalidRequestError(f"{where}: {text_only_model_error(model.name)}", param=where)
    if len(parts) > MAX_IMAGES_PER_REQUEST:
        where = parts[MAX_IMAGES_PER_REQUEST].where
        raise InvalidRequestError(
            f"{where}: {len(parts)} images; at most {MAX_IMAGES_PER_REQUEST} a request",
            param=where)
    template_messages = chat_messages_for_template(data, vision=vision is not None)
    return ChatInputs(template_messages, await load_images(parts, options))


async def load_images(parts: Sequence[ImagePart], options: ImageOptions) -> tuple[bytes, ...]:
    """Every part's image bytes, checked; the first failure cancels the others' fetches."""
    tasks = [asyncio.ensure_future(load_image(part, options)) for part in parts]
    try:
        return tuple(await asyncio.gather(*tasks))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def load_image(part: ImagePart, options: ImageOptions) -> bytes:
    """One image part's bytes (decoded or fetched), checked to be a usable image."""
    try:
        data = await _image_bytes(part, options)
        # PIL reads the header and verifies the data: not on the event loop.
        await asyncio.to_thread(check_image_bytes, data, part.where)
    except ImageError as error:
        raise _invalid(error, part.where) from None
    return data


async def _image_bytes(part: ImagePart, options: ImageOptions) -> bytes:
    source, where = part.source, part.where
    if isinstance(source, bytes):
        return source
    if not isinstance(source, str):
        raise ImageError(f"{where}: an image must be a URL or bytes")
    scheme = url_scheme(source)
    if scheme == "data":
        return await asyncio.to_thread(decode_data_url, source, where)
    if scheme in ("http", "https"):
        if not options.allow_urls:
            raise ImageError(f"{where}: this server does not fetch image URLs; send the "
                             "image inline as a data URL (data:image/png;base64,...), or "
                             "start the router with --allow-image-urls")
        return await fetch_image(source, where, options.fetch_timeout_s)
    raise ImageError(f"{where}: an image URL must be a data URL (data:image/png;base64,...)"
                     + (" or http(s)" if options.allow_urls else ""))


async def fetch_image(url: str, where: str, timeout_s: float) -> bytes:
    """GET an image URL: at most MAX_IMAGE_BYTES (streamed; the download stops past it) in
    at most `timeout_s` seconds. Raises ImageError naming `where`."""
    import httpx

    try:
        return await asyncio.wait_for(_download(url, where, timeout_s), timeout_s)
    except asyncio.TimeoutError:
        raise ImageError(f"{where}: fetching the image took over {timeout_s:g} s") from None
    except httpx.HTTPError as error:
        raise ImageError(f"{where}: cannot fetch the image ({type(error).__name__}: "
                         f"{error or 'no answer'})") from None


async def _download(url: str, where: str, timeout_s: float) -> bytes:
    import httpx

    too_large = ImageError(f"{where}: the image at the URL is over {MAX_IMAGE_BYTES} bytes")
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS,
                                 timeout=timeout_s) as client:
        async with client.stream("GET", url) as response:
            if response.status_code != 200:
                raise ImageError(f"{where}: fetching the image answered HTTP "
                                 f"{response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > MAX_IMAGE_BYTES:
                raise too_large
            chunks: list[bytes] = []
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_IMAGE_BYTES:
                    raise too_large
                chunks.append(chunk)
    return b"".join(chunks)


def _invalid(error: ImageError, where: str) -> InvalidRequestError:
    return InvalidRequestError(str(error), param=where)
