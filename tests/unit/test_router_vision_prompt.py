"""A vision model's chat prompt in the router: the tokenizer loaded from a tiny LLaVA
directory knows its image layout; the template renders each image part as one <image>
token, which the router widens to the image's run and checks against the images sent."""

from __future__ import annotations

import asyncio

import pytest

from lmfleet.router.admission import Admission
from lmfleet.router.errors import InvalidRequestError
from lmfleet.router.generation import Generation
from lmfleet.router.metrics import RouterMetrics
from lmfleet.router.model_replicas import ModelReplicas
from lmfleet.router.policies import make_policy
from lmfleet.router.replicas import ReplicaRegistry
from lmfleet.router.tokenizer import chat_messages_for_template, load_model_tokenizer
from lmfleet.worker.model.vision.vision_info import VisionInfo
from tests.vision_model import TOKENS_PER_IMAGE, make_tiny_llava

pytestmark = pytest.mark.model

IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, default_model_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("vision") / "tiny-llava", default_model_dir)


@pytest.fixture(scope="module")
def generation():
    registry = ReplicaRegistry(["127.0.0.1:1"], load_model_tokenizer)  # never contacted
    return Generation(registry, RouterMetrics(registry))


def model_for(tokenizer) -> ModelReplicas:
    model = ModelReplicas(name=tokenizer.model_name, tokenizer=tokenizer,
                          policy=make_policy("least_loaded"), admission=Admission("m"))
    model.max_model_len, model.vocab_size = 512, len(tokenizer.hf)
    return model


@pytest.fixture(scope="module")
def llava(llava_dir):
    return model_for(load_model_tokenizer(str(llava_dir), "tiny-llava"))


def tokenize(generation, model, messages, num_images):
    vision = model.tokenizer.vision is not None
    return asyncio.run(generation.tokenize_chat(
        model, chat_messages_for_template(messages, vision=vision), num_images=num_images))


def test_the_tokenizer_knows_the_image_layout(llava, llava_dir, default_model_dir):
    assert llava.tokenizer.vision == VisionInfo.from_model_dir(llava_dir)
    assert llava.tokenizer.vision.tokens_per_image == TOKENS_PER_IMAGE
    assert load_model_tokenizer(str(default_model_dir), "default").vision is None


def test_each_image_part_becomes_a_full_run_of_image_tokens(generation, llava):
    token = llava.tokenizer.vision.image_token_id
    messages = [{"role": "user", "content": [{"type": "text", "text": "Compare"}, IMAGE,
                                             {"type": "text", "text": "with"}, IMAGE]}]
    ids = tokenize(generation, llava, messages, num_images=2)
    rendered = llava.tokenizer.apply_chat_template(
        chat_messages_for_template(messages, vision=True))
    assert rendered.count(token) == 2  # what the template itself renders
    assert ids == llava.tokenizer.vision.expand_image_tokens(rendered)
    first = ids.index(token)
    assert ids[first:first + TOKENS_PER_IMAGE] == [token] * TOKENS_PER_IMAGE
    assert ids.count(token) == 2 * TOKENS_PER_IMAGE
    # The text between the images stays between their runs.
    between = ids[first + TOKENS_PER_IMAGE:ids.index(token, first + TOKENS_PER_IMAGE)]
    assert llava.tokenizer.decode(between).strip() == "with"


def test_string_content_renders_as_one_text_part(generation, llava):
    as_string = tokenize(generation, llava, [{"role": "user", "content": "Hello"}], 0)
    as_part = tokenize(generation, llava,
                       [{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], 0)
    assert as_string == as_part


def test_images_that_do_not_match_the_prompt_are_a_400(generation, llava):
    one_image = [{"role": "user", "content": [IMAGE]}]
    with pytest.raises(InvalidRequestError, match="places for 1 images but 2 were given"):
        tokenize(generation, llava, one_image, num_images=2)
    typed = [{"role": "user", "content": "what is <image>?"}]  # the token, typed as text
    with pytest.raises(InvalidRequestError, match="places for 1 images but 0") as error:
        tokenize(generation, llava, typed, num_images=0)
    assert error.value.param == "messages"
