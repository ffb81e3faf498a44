"""What a vision-language (LLaVA) checkpoint asks of a prompt, read from its config.json alone.

The router, `LLM.chat` and the engine share this: it imports neither torch nor the model.
A prompt carries an image as `tokens_per_image` copies of the image token (what Hugging Face's
LLaVA processor does), and the request's images in the order their runs appear. A chat
template renders an image content part as one image token; `expand_image_tokens` widens it.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

VISION_ARCHITECTURES = ("LlavaForConditionalGeneration",)
# Limits on what a request may carry (a 400 past them, naming the part).
MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 8192 * 8192


def is_vision_config(config: dict) -> bool:
    """A LLaVA config.json (by its architectures, else its model_type)."""
    architectures = config.get("architectures") or ()
    if architectures:
        return bool(set(architectures) & set(VISION_ARCHITECTURES))
    return config.get("model_type") == "llava"


class ImageSpan(NamedTuple):
    """One image's positions in a prompt, and a digest of its bytes (what prefix caching
    and sessions key its KV on: equal tokens with another image are not equal prompts)."""

    offset: int
    length: int
    digest: bytes


class ImageError(ValueError):
    """An image a request carries cannot be used: the message names which one and why."""


@dataclass(frozen=True)
class VisionInfo:
    image_token_id: int
    tokens_per_image: int
    image_size: int

    @classmethod
    def from_model_dir(cls, model_dir: Path | str) -> Optional[VisionInfo]:
        """The checkpoint's image prompt layout, or None for a text-only model."""
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            return None
        return cls.from_config(json.loads(path.read_text()))

    @classmethod
    def from_config(cls, config: dict) -> Optional[VisionInfo]:
        if not is_vision_config(config):
            return None
        vision = config.get("vision_config") or {}
        image_size, patch_size = vision.get("image_size", 224), vision.get("patch_size", 32)
        rows = (image_size // patch_size) ** 2
        if vision.get("model_type", "clip_vision_model") == "clip_vision_model":
            rows += 1  # CLIP's class token
        # "default" drops the tower's first row (CLIP's class token; a patch under SigLIP).
        strategy = config.get("vision_feature_select_strategy", "default")
        tokens = rows - 1 if strategy == "default" else rows
        token_id = config.get("image_token_index", config.get("image_token_id"))
        if token_id is None:
            raise ValueError("a LLaVA config.json needs image_token_index")
        return cls(int(token_id), tokens, image_size)

    def expand_image_tokens(self, token_ids: Sequence[int]) -> list[int]:
        """Each single image token (as a chat template renders it) -> tokens_per_image."""
        expanded: list[int] = []
        for token_id in token_ids:
            if token_id == self.image_token_id:
                expanded.extend([token_id] * self.tokens_per_image)
            else:
                expanded.append(token_id)
        return expanded

    def image_spans(self, token_ids: Sequence[int]) -> list[tuple[int, int]]:
        """(offset, length) of each image's positions in an expanded prompt, in order.
        Raises ImageError when a run of image tokens is not whole images."""
        spans: list[tuple[int, int]] = []
        start = None
        for position, token_id in enumerate([*token_ids, None]):
            if token_id == self.image_token_id:
                start = position if start is None else start
                continue
            if start is not None:
                length = position - start
                if length % self.tokens_per_image:
                    raise ImageError(
                        f"the image tokens at {start} run for {length} positions, not a "
                        f"multiple of the {self.tokens_per_image} an image takes")
                spans.extend((offset, self.tokens_per_image) for offset in
                             range(start, position, self.tokens_per_image))
                start = None
        return spans

    def check_prompt(self, token_ids: Sequence[int], num_images: int,
                     end: Optional[int] = None) -> list[tuple[int, int]]:
        """The image spans of an expanded prompt, checked against the images it carries.
        Image tokens at or past `end` are not places for images (a resumed request's
        generated tokens)."""
        if num_images > MAX_IMAGES_PER_REQUEST:
            raise ImageError(f"{num_images} images; at most {MAX_IMAGES_PER_REQUEST} a request")
        spans = self.image_spans(token_ids[:end])
        if len(spans) != num_images:
            raise ImageError(f"the prompt has places for {len(spans)} images but "
                             f"{num_images} were given")
        return spans


def check_image_bytes(data: bytes, where: str) -> tuple[int, int]:
    """(width, height) of an encoded image; ImageError naming `where` if it is not an image
    PIL can read or is too large."""
    if not data:
        raise ImageError(f"{where}: the image is empty")
    if len(data) > MAX_IMAGE_BYTES:
        raise ImageError(f"{where}: the image is {len(data)} bytes; at most {MAX_IMAGE_BYTES}")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > MAX_IMAGE_PIXELS:
                raise ImageError(f"{where}: the image is {width}x{height} pixels; at most "
                                 f"{MAX_IMAGE_PIXELS} pixels")
            image.verify()
    except ImageError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise ImageError(f"{where}: not a readable image ({error})") from None
    return width, height


def text_only_model_error(model: str) -> ImageError:
    return ImageError(f"model {model!r} does not take images (it is a text-only model)")


def image_spans_for(info: Optional[VisionInfo], model: str, prompt: Sequence[int],
                    images: Sequence[bytes], end: Optional[int] = None) -> list[ImageSpan]:
    """Check a request's images against its expanded prompt (up to `end`); their spans with
    digests. A text-only model (info None) takes no images and reads no token as an
    image's."""
    if info is None:
        if images:
            raise text_only_model_error(model)
        return []
    spans = info.check_prompt(prompt, len(images), end)
    for index, data in enumerate(images):
        check_image_bytes(data, f"image {index}")
    return [ImageSpan(offset, length, hashlib.blake2b(data, digest_size=16).digest())
            for (offset, length), data in zip(spans, images, strict=True)]
