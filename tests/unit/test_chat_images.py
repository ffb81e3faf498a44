"""Images in chat messages (worker/chat_images.py): data URLs, where each image part is,
and what a vision model's chat template is given."""

from __future__ import annotations

import base64

import pytest

from lmfleet.worker.chat_images import (
    ContentPartError,
    decode_data_url,
    image_parts,
    template_content,
)
from lmfleet.worker.model.vision.vision_info import MAX_IMAGE_BYTES, ImageError
from tests.vision_model import image_bytes

PNG = image_bytes(0)


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "high"}}


# ---- data URLs ---------------------------------------------------------------------------


def test_a_data_url_decodes_to_its_bytes():
    assert decode_data_url(data_url(PNG), "here") == PNG
    jpeg = image_bytes(1, fmt="JPEG")
    assert decode_data_url(data_url(jpeg, "image/jpeg"), "here") == jpeg


def test_wrapped_lines_and_missing_padding_are_tolerated():
    encoded = base64.b64encode(PNG).decode()
    wrapped = "\n".join(encoded[i:i + 76] for i in range(0, len(encoded), 76))
    assert decode_data_url(f"data:image/png;base64,{wrapped}", "here") == PNG
    assert decode_data_url(f"data:image/png;base64,{encoded.rstrip('=')}", "here") == PNG
    assert decode_data_url(f"data:;base64,{encoded}", "here") == PNG  # no media type


@pytest.mark.parametrize(("url", "why"), [
    ("data:image/png;base64,%%%not base64%%%", "base64 data does not decode"),
    ("data:image/png;base64,QUJD\x00", "base64 data does not decode"),
    ("data:image/png,rawbytes", "only base64 data URLs"),
    ("data:image/png;base64", "needs a ','"),
    ("data:text/plain;base64,aGVsbG8=", "'text/plain', not an image"),
    ("https://example.com/cat.png", "not a data URL"),
])
def test_a_bad_data_url_names_its_part(url, why):
    with pytest.raises(ImageError) as error:
        decode_data_url(url, "messages[1].content[0]")
    assert str(error.value).startswith("messages[1].content[0]: ")
    assert why in str(error.value)


def test_an_oversized_data_url_is_refused_before_decoding():
    payload = "A" * ((MAX_IMAGE_BYTES // 3 + 2) * 4)
    with pytest.raises(ImageError, match=r"messages\[0\].content\[2\]: .*over"):
        decode_data_url(f"data:image/png;base64,{payload}", "messages[0].content[2]")


# ---- image parts and template content -------------------------------------------------------


def test_image_parts_are_found_in_order_with_their_places():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Compare"}, url_part("data:a"),
                                     {"type": "text", "text": "and"}, url_part("data:b")]},
        {"role": "assistant", "content": "They differ."},
        {"role": "user", "content": [{"type": "image", "image": PNG}]},
    ]
    parts = image_parts(messages)
    assert [(p.where, p.source) for p in parts] == [
        ("messages[1].content[1]", "data:a"), ("messages[1].content[3]", "data:b"),
        ("messages[3].content[0]", PNG)]


def test_image_parts_may_be_named_by_the_caller():
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"},
                                             {"type": "image", "image": PNG}]}]
    (part,) = image_parts(messages, where=lambda i, j: f"messages[{i}].images[{j - 1}]")
    assert part.where == "messages[0].images[0]"


@pytest.mark.parametrize("part", [
    {"type": "image_url"}, {"type": "image_url", "image_url": {"url": ""}},
    {"type": "image_url", "image_url": {"detail": "low"}}, {"type": "image"}])
def test_an_image_part_without_its_image_is_named(part):
    messages = [{"role": "user", "content": [{"type": "text", "text": "x"}, part]}]
    with pytest.raises(ContentPartError) as error:
        image_parts(messages)
    assert error.value.where == "messages[0].content[1]"
    assert str(error.value).startswith("messages[0].content[1]: ")


def test_template_content_is_a_list_of_text_and_image_parts():
    assert template_content("Hello", 0) == [{"type": "text", "text": "Hello"}]
    assert template_content(None, 0) == []
    assert template_content([{"type": "text", "text": "What is"}, url_part("data:x"),
                             {"type": "image", "image": PNG}], 0) == [
        {"type": "text", "text": "What is"}, {"type": "image"}, {"type": "image"}]


def test_template_content_refuses_other_part_types_by_name():
    with pytest.raises(ContentPartError) as error:
        template_content([{"type": "text", "text": "x"}, {"type": "input_audio"}], 2)
    assert error.value.where == "messages[2].content[1]"
    assert "'input_audio' is not supported" in str(error.value)
