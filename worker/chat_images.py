"""Images in chat messages, as the router's front doors and `LLM.chat` both read them.

A message's content is a string or a list of parts: `{"type": "text", "text": ...}`,
`{"type": "image_url", "image_url": {"url": ...}}` (OpenAI's shape: a data URL, or an
http(s) URL that only the router may fetch) and `{"type": "image", "image": X}` (X: the
encoded bytes; `LLM.chat` also takes a PIL image or a file path). For a vision model every
message reaches the chat template as a list of parts, an image part as `{"type": "image"}`
(what Hugging Face's processors pass, and what LLaVA templates iterate over; a string
becomes one text part), and the images travel beside the prompt in the order of their
parts. A text-only model keeps today's rendering: text parts joined into one string.

Imports neither torch nor PIL, so the router stays light.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lmfleet.worker.model.vision.vision_info import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES_PER_REQUEST,
    ImageError,
)

# The largest Worker GenerateRequest a router sends and a worker takes: a request's images
# at their limits, plus room for its token ids (4 bytes or less each on the wire).
MAX_GENERATE_REQUEST_BYTES = MAX_IMAGES_PER_REQUEST * MAX_IMAGE_BYTES + (64 << 20)
IMAGE_PART_TYPES = ("image_url", "image")
# What a chat template is given for each image part.
TEMPLATE_IMAGE_PART = {"type": "image"}


class ContentPartError(ValueError):
    """A content part that cannot be used; `where` names it (messages[1].content[0])."""

    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")
        self.where = where


@dataclass(frozen=True)
class ImagePart:
    """One image part of a conversation: where it is and what it holds (a URL string for
    image_url parts; bytes, a PIL image or a path for image parts)."""

    where: str
    source: Any


def part_where(message_index: int, part_index: int) -> str:
    return f"messages[{message_index}].content[{part_index}]"


def _parts(content: Any) -> list:
    return content if isinstance(content, list) else []


def image_parts(messages: Sequence[Mapping[str, Any]],
                where: Callable[[int, int], str] = part_where) -> list[ImagePart]:
    """Every image part of the conversation, in order, named by `where(message index, part
    index)`. Raises ContentPartError for an image part without its image."""
    found: list[ImagePart] = []
    for i, message in enumerate(messages):
        for j, part in enumerate(_parts(message.get("content"))):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind not in IMAGE_PART_TYPES:
                continue
            where_ = where(i, j)
            if kind == "image_url":
                image_url = part.get("image_url")
                url = image_url.get("url") if isinstance(image_url, Mapping) else image_url
                if not isinstance(url, str) or not url:
                    raise ContentPartError(where_, 'an image_url part needs '
                                           '"image_url": {"url": "data:image/png;base64,..."}')
                found.append(ImagePart(where_, url))
            else:
                if part.get("image") is None:
                    raise ContentPartError(where_, 'an image part needs its "image"')
                found.append(ImagePart(where_, part["image"]))
    return found


def template_content(content: Any, message_index: int) -> list[dict[str, Any]]:
    """A message's content as a vision model's chat template takes it: a list of text and
    `{"type": "image"}` parts. Raises ContentPartError for a part of another type."""
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ContentPartError(f"messages[{message_index}].content",
                               "must be a string or a list of content parts")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        elif kind in IMAGE_PART_TYPES:
            parts.append(dict(TEMPLATE_IMAGE_PART))
        else:
            raise ContentPartError(part_where(message_index, j),
                                   f"content part type {kind!r} is not supported (text, "
                                   "image_url)")
    return parts


def decode_data_url(url: str, where: str) -> bytes:
    """The bytes of a base64 `data:` URL. Raises ImageError naming `where` when it is not
    one, is not an image type, does not decode or is too large."""
    if not url.startswith("data:"):
        raise ImageError(f"{where}: not a data URL")
    header, comma, payload = url[len("data:"):].partition(",")
    if not comma:
        raise ImageError(f"{where}: a data URL needs a ',' before its data")
    media_type, *parameters = header.split(";")
    if "base64" not in parameters:
        raise ImageError(f"{where}: only base64 data URLs are supported "
                         "(data:image/png;base64,...)")
    if media_type and not media_type.lower().startswith("image/"):
        raise ImageError(f"{where}: the data URL holds {media_type!r}, not an image")
    # Checked before decoding, so an oversized payload is never decoded (4 chars: 3 bytes;
    # the first check leaves room for line breaks, which some encoders add).
    limit = (MAX_IMAGE_BYTES + 2) // 3 * 4
    too_large = ImageError(f"{where}: the image is over {MAX_IMAGE_BYTES} bytes")
    if len(payload) > limit + limit // 32 + 64:
        raise too_large
    payload = "".join(payload.split())
    if len(payload) > limit:
        raise too_large
    try:
        return base64.b64decode(payload + "=" * (-len(payload) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ImageError(f"{where}: the data URL's base64 data does not decode") from None


def url_scheme(url: str) -> Optional[str]:
    scheme, colon, _ = url.partition(":")
    return scheme.lower() if colon else None
