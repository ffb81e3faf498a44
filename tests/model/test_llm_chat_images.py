"""`LLM.chat` with images on a tiny random LLaVA: every form of an image (bytes, PIL image,
file path, data URL) is the same request; a text-only model, an unreadable image or a URL
to fetch is a ValueError naming the part."""

from __future__ import annotations

import base64
import io

import pytest

from lmfleet.worker import LLM, SamplingParams
from lmfleet.worker.model.vision.vision_info import ImageError
from tests.vision_model import TOKENS_PER_IMAGE, image_bytes, make_tiny_llava

pytestmark = pytest.mark.model

GREEDY = SamplingParams(max_tokens=6, temperature=0)
PNG = image_bytes(5)


@pytest.fixture(scope="module")
def llava(tmp_path_factory, default_model_dir):
    directory = make_tiny_llava(tmp_path_factory.mktemp("vision") / "tiny-llava",
                                default_model_dir)
    return LLM(str(directory), max_model_len=256)


def ask(image_part: dict, text: str = "What is this?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, image_part]}]


def test_every_form_of_an_image_is_the_same_request(llava, tmp_path):
    from PIL import Image

    path = tmp_path / "picture.png"
    path.write_bytes(PNG)
    forms = [
        {"type": "image", "image": PNG},
        {"type": "image", "image": Image.open(io.BytesIO(PNG))},
        {"type": "image", "image": str(path)},
        {"type": "image", "image": path},
        {"type": "image_url", "image_url": {
            "url": "data:image/png;base64," + base64.b64encode(PNG).decode()}},
    ]
    outputs = llava.chat([ask(form) for form in forms], GREEDY, use_tqdm=False)
    assert len({tuple(o.output_token_ids) for o in outputs}) == 1
    assert len({tuple(o.prompt_token_ids) for o in outputs}) == 1
    token = llava.vision_info.image_token_id
    assert outputs[0].prompt_token_ids.count(token) == TOKENS_PER_IMAGE
    assert outputs[0].prompt_token_ids == llava.apply_chat_template(ask(forms[0]))


def test_the_image_matters_and_text_only_turns_still_run(llava):
    other = llava.chat(ask({"type": "image", "image": image_bytes(6)}), GREEDY,
                       use_tqdm=False)[0]
    first = llava.chat(ask({"type": "image", "image": PNG}), GREEDY, use_tqdm=False)[0]
    assert other.output_token_ids != first.output_token_ids
    text = llava.chat([{"role": "user", "content": "Hello"}], GREEDY, use_tqdm=False)[0]
    assert text.output_token_ids


@pytest.mark.parametrize(("image", "why"), [
    (b"not an image", "not a readable image"),
    ("/no/such/picture.png", "cannot read"),
    ("https://example.com/cat.png", "does not fetch URLs"),
    (12345, "not int"),
])
def test_an_unusable_image_names_its_part(llava, image, why):
    messages = [{"role": "system", "content": "Be brief."},
                *ask({"type": "image", "image": image})]
    with pytest.raises(ImageError) as error:
        llava.chat(messages, GREEDY, use_tqdm=False)
    assert str(error.value).startswith("messages[1].content[1]: ") and why in str(error.value)


def test_a_text_only_model_given_an_image_names_the_part(default_model_dir):
    llm = LLM(str(default_model_dir), max_model_len=256)
    assert llm.vision_info is None
    with pytest.raises(ValueError, match=r"messages\[0\].content\[1\]: .*does not take "
                                         r"images"):
        llm.chat(ask({"type": "image", "image": PNG}), GREEDY, use_tqdm=False)
    assert llm.chat([{"role": "user", "content": "Hello"}], GREEDY,
                    use_tqdm=False)[0].output_token_ids
