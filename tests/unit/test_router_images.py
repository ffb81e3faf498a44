"""The router's image parts (router/images.py): each refusal is a 400 naming the part;
http(s) URLs only when allowed, then fetched from a real local HTTP server within the size
and time limits; every attempt of a completion (a resumed one too) carries the images."""

from __future__ import annotations

import asyncio
import base64
import time

import pytest

from lmfleet.proto.v1 import worker_pb2
from lmfleet.router.admission import Admission
from lmfleet.router.errors import InvalidRequestError
from lmfleet.router.generation import GenerationJob, worker_request
from lmfleet.router.images import ImageOptions, chat_inputs, load_image
from lmfleet.router.model_replicas import ModelReplicas
from lmfleet.router.params import GenerationParams
from lmfleet.router.policies import make_policy
from lmfleet.router.tokenizer import ModelTokenizer
from lmfleet.worker.chat_images import ImagePart
from lmfleet.worker.model.vision.vision_info import (
    MAX_IMAGE_BYTES,
    MAX_IMAGES_PER_REQUEST,
    VisionInfo,
)
from tests.vision_model import image_bytes, image_server

PNG = image_bytes(0)
WHERE = "messages[1].content[0]"
VISION = VisionInfo(image_token_id=7, tokens_per_image=4, image_size=32)


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def model(vision) -> ModelReplicas:
    # The template is not rendered here: chat_inputs needs no Hugging Face tokenizer.
    return ModelReplicas(name="m", tokenizer=ModelTokenizer(None, "m", vision=vision),
                         policy=make_policy("least_loaded"), admission=Admission("m"))


def user(*parts) -> list[dict]:
    return [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, *parts]}]


def image_url(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "auto"}}


def refusal(coroutine) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(coroutine)
    assert error.value.http_status == 400
    return error.value


INLINE = ImageOptions()


def load(source, options=INLINE) -> bytes:
    return asyncio.run(load_image(ImagePart(WHERE, source), options))


# ---- chat_inputs ---------------------------------------------------------------------------


def test_a_vision_model_gets_image_parts_and_the_decoded_images_in_order():
    second = image_bytes(1, fmt="JPEG")
    inputs = asyncio.run(chat_inputs(user(image_url(data_url(PNG)), image_url(
        "data:image/jpeg;base64," + base64.b64encode(second).decode())), model(VISION),
        ImageOptions()))
    assert inputs.images == (PNG, second)
    assert inputs.messages == [
        {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
        {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                     {"type": "image"}]}]


def test_a_text_only_model_keeps_its_string_content_and_refuses_images_by_name():
    inputs = asyncio.run(chat_inputs(user(), model(None), ImageOptions()))
    assert inputs.messages[1] == {"role": "user", "content": "Look:"} and not inputs.images
    error = refusal(chat_inputs(user(image_url(data_url(PNG))), model(None), ImageOptions()))
    assert error.param == "messages[1].content[1]"
    assert error.message == ("messages[1].content[1]: model 'm' does not take images (it is "
                             "a text-only model)")


def test_too_many_images_are_refused_naming_the_first_one_too_many():
    parts = [image_url(data_url(PNG))] * (MAX_IMAGES_PER_REQUEST + 1)
    error = refusal(chat_inputs(user(*parts), model(VISION), ImageOptions()))
    where = f"messages[1].content[{MAX_IMAGES_PER_REQUEST + 1}]"
    assert error.param == where and error.message.startswith(where)
    assert f"at most {MAX_IMAGES_PER_REQUEST}" in error.message


def test_an_unsupported_part_type_is_named():
    error = refusal(chat_inputs(user({"type": "input_audio"}), model(VISION), ImageOptions()))
    assert error.param == "messages[1].content[1]"


# ---- one image ---------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "why"), [
    (data_url(b"this is not an image"), "not a readable image"),
    (data_url(PNG[:40]), "not a readable image"),  # truncated
    ("data:image/png;base64,", "the image is empty"),
    ("data:image/png;base64,###", "does not decode"),
    (b"", "the image is empty"),
    (b"\x00" * (MAX_IMAGE_BYTES + 1), f"at most {MAX_IMAGE_BYTES}"),
    ("https://example.com/cat.png", "--allow-image-urls"),
    ("http://example.com/cat.png", "does not fetch image URLs"),
    ("ftp://example.com/cat.png", "must be a data URL"),
    ("cat.png", "must be a data URL"),
])
def test_an_unusable_image_is_a_400_naming_its_part(source, why):
    error = refusal(load_image(ImagePart(WHERE, source), ImageOptions()))
    assert error.param == WHERE
    assert error.message.startswith(f"{WHERE}: ") and why in error.message


def test_good_images_pass_as_they_are():
    assert load(data_url(PNG)) == PNG
    assert load(PNG) == PNG


# ---- fetching URLs -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def server():
    with image_server(PNG) as url:
        yield url


FETCH = ImageOptions(allow_urls=True, fetch_timeout_s=1.0)


def test_an_allowed_url_is_fetched_following_redirects(server):
    assert load(f"{server}/cat.png", FETCH) == PNG
    assert load(f"{server}/moved", FETCH) == PNG


@pytest.mark.parametrize(("path", "why"), [
    ("/missing.png", "answered HTTP 404"),
    ("/text", "not a readable image"),
    ("/declared-huge", f"over {MAX_IMAGE_BYTES} bytes"),
    ("/endless", f"over {MAX_IMAGE_BYTES} bytes"),
    ("/slow", "took over 1 s"),
])
def test_a_failed_fetch_is_a_400_naming_its_part(server, path, why):
    started = time.monotonic()
    error = refusal(load_image(ImagePart(WHERE, f"{server}{path}"), FETCH))
    assert error.param == WHERE and error.message.startswith(f"{WHERE}: ")
    assert why in error.message
    assert time.monotonic() - started < 1.8  # the time limit holds


def test_an_unreachable_host_is_a_400():
    error = refusal(load_image(ImagePart(WHERE, "http://127.0.0.1:9/x.png"), FETCH))
    assert "cannot fetch the image" in error.message and error.param == WHERE


# ---- the images travel with every attempt ----------------------------------------------------


def test_a_resumed_attempt_sends_the_tokens_so_far_and_the_same_images():
    images = (PNG, image_bytes(1))
    job = GenerationJob(model=model(VISION), prompts=[[1, 7, 7, 7, 7, 2]],
                        params=GenerationParams(), session_id="s", images=images)
    first = worker_request(job, "r-0-0", [1, 7, 7, 7, 7, 2], worker_pb2.SamplingParams())
    resumed = worker_request(job, "r-0-1", [1, 7, 7, 7, 7, 2, 30, 31],
                             worker_pb2.SamplingParams(max_tokens=5))
    assert tuple(first.images) == tuple(resumed.images) == images
    assert list(resumed.prompt_token_ids) == [1, 7, 7, 7, 7, 2, 30, 31]
    # Image places end with the original prompt: a generated image token is text.
    assert first.image_positions_end == resumed.image_positions_end == 6
    assert resumed.session_id == "s"


def test_images_go_with_exactly_one_prompt():
    with pytest.raises(ValueError):
        GenerationJob(model=model(VISION), prompts=[[1], [2]], params=GenerationParams(),
                      images=(PNG,))
