"""Images end to end: the official `openai` client and the lmfleet.v1.Serving stubs against
a real `lmfleet router` in front of two real workers, a tiny random LLaVA and the default
text-only model, with the offline `LLM.chat` on the same LLaVA directory as the reference
for greedy outputs (token-identical; the engine is exact against Hugging Face, which
tests/model/test_llava.py checks)."""

from __future__ import annotations

import base64

import grpc
import openai
import pytest

from lmfleet.proto.v1 import serving_pb2 as pb
from lmfleet.proto.v1 import serving_pb2_grpc
from lmfleet.worker import LLM, SamplingParams
from lmfleet.worker.model.vision.vision_info import MAX_IMAGES_PER_REQUEST
from tests.integration.test_router_helpers import openai_client, start_router
from tests.integration.worker_process import start_worker
from tests.vision_model import TOKENS_PER_IMAGE, image_bytes, image_server, make_tiny_llava

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 512
MAX_TOKENS = 12
RPC_TIMEOUT = 120
CAT, DOG = image_bytes(1), image_bytes(2, size=(24, 36), fmt="JPEG")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url, "detail": "low"}}


def ask(*parts, text: str = "What is in the picture?") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, *parts]}]


ONE_IMAGE = ask(image_part(data_url(CAT)))
TWO_IMAGES = ask(image_part(data_url(CAT)), {"type": "text", "text": "and"},
                 image_part(data_url(DOG, "image/jpeg")), text="Compare")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory, default_model_dir):
    return make_tiny_llava(tmp_path_factory.mktemp("vision") / "tiny-llava", default_model_dir)


@pytest.fixture(scope="module")
def workers(llava_dir):
    args = ["--max-model-len", str(MAX_MODEL_LEN)]
    with start_worker(llava_dir, args) as llava, start_worker("default", args) as text:
        yield llava, text


@pytest.fixture(scope="module")
def router(workers):
    with start_router(list(workers)) as router:
        yield router


@pytest.fixture(scope="module")
def client(router):
    return openai_client(router)


@pytest.fixture(scope="module")
def llm(llava_dir):
    return LLM(str(llava_dir), max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def offline(llm):
    """The offline engine's greedy output for a conversation (cached)."""
    cache = {}

    def run(messages):
        key = repr(messages)
        if key not in cache:
            cache[key] = llm.chat(messages, SamplingParams(max_tokens=MAX_TOKENS,
                                                           temperature=0), use_tqdm=False)[0]
        return cache[key]

    return run


def chat(client, messages, model="tiny-llava", **extra):
    return client.chat.completions.create(model=model, messages=messages,
                                          max_tokens=MAX_TOKENS, temperature=0, **extra)


# ---- OpenAI HTTP: success --------------------------------------------------------------


def test_the_models_are_listed(client):
    assert sorted(card.id for card in client.models.list().data) == ["default", "tiny-llava"]


def test_a_data_url_image_gives_the_offline_engines_answer(client, offline):
    reference = offline(ONE_IMAGE)
    response = chat(client, ONE_IMAGE)
    assert response.choices[0].message.content == reference.text
    assert response.usage.completion_tokens == len(reference.output_token_ids)
    # The expanded prompt: the image counts as its run of image tokens.
    assert response.usage.prompt_tokens == len(reference.prompt_token_ids)
    assert response.usage.prompt_tokens > TOKENS_PER_IMAGE


def test_the_image_changes_the_answer_and_the_offline_forms_agree(client, offline, llm):
    other = ask(image_part(data_url(image_bytes(7))))
    assert chat(client, other).choices[0].message.content == offline(other).text
    assert offline(other).output_token_ids != offline(ONE_IMAGE).output_token_ids
    # The same image as bytes (LLM.chat's own form) is the same request.
    as_bytes = ask({"type": "image", "image": CAT})
    assert offline(as_bytes).output_token_ids == offline(ONE_IMAGE).output_token_ids


def test_two_images_in_one_message_streamed_and_whole(client, offline):
    reference = offline(TWO_IMAGES)
    whole = chat(client, TWO_IMAGES)
    assert whole.choices[0].message.content == reference.text
    assert whole.usage.prompt_tokens == len(reference.prompt_token_ids)
    chunks = list(chat(client, TWO_IMAGES, stream=True,
                       stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reference.text
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_images_in_earlier_turns_stay_in_the_conversation(client, offline):
    turns = [*ONE_IMAGE, {"role": "assistant", "content": "A pattern."},
             {"role": "user", "content": [{"type": "text", "text": "And this one?"},
                                          image_part(data_url(DOG, "image/jpeg"))]}]
    reference = offline(turns)
    response = chat(client, turns, extra_body={"session_id": "vision-turns"})
    assert response.choices[0].message.content == reference.text


def test_text_only_messages_still_work_on_both_models(client):
    for model in ("tiny-llava", "default"):
        response = chat(client, [{"role": "user", "content": "Hello"}], model=model)
        assert response.usage.completion_tokens > 0


# ---- OpenAI HTTP: refusals -----------------------------------------------------------------


def refused(client, messages, model="tiny-llava") -> openai.BadRequestError:
    with pytest.raises(openai.BadRequestError) as error:
        chat(client, messages, model=model)
    assert error.value.status_code == 400
    return error.value


@pytest.mark.parametrize(("part", "why"), [
    (image_part(data_url(b"definitely not a picture")), "not a readable image"),
    (image_part("data:image/png;base64,!!!notbase64!!!"), "does not decode"),
    (image_part("data:image/png;base64,"), "the image is empty"),
    (image_part("https://example.com/cat.png"), "--allow-image-urls"),
    ({"type": "image_url"}, "needs"),
], ids=["not-an-image", "bad-base64", "empty", "http-url", "no-url"])
def test_a_bad_image_is_a_400_naming_the_part(client, part, why):
    messages = [{"role": "system", "content": "Be brief."},
                *ask(image_part(data_url(CAT)), part)]
    error = refused(client, messages)
    assert error.body["param"] == "messages[1].content[2]"
    assert error.body["message"].startswith("messages[1].content[2]: ")
    assert why in error.body["message"]


def test_too_many_images_are_a_400(client):
    error = refused(client, ask(*[image_part(data_url(CAT))] * (MAX_IMAGES_PER_REQUEST + 1)))
    assert f"at most {MAX_IMAGES_PER_REQUEST}" in error.body["message"]


def test_a_text_only_model_given_an_image_is_a_400_naming_the_part(client):
    error = refused(client, ONE_IMAGE, model="default")
    assert error.body["param"] == "messages[0].content[1]"
    assert "does not take images" in error.body["message"]


def test_an_image_token_typed_as_text_is_a_400_not_an_engine_error(client):
    with pytest.raises(openai.BadRequestError) as error:
        client.completions.create(model="tiny-llava", prompt="Look: <image>", max_tokens=2)
    assert "image" in error.value.body["message"]
    assert "image" in refused(client, ask(text="Look: <image>")).body["message"]


# ---- gRPC Serving API ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def stub(router):
    with grpc.insecure_channel(router.grpc) as channel:
        yield serving_pb2_grpc.ServingStub(channel)


def generate(stub, messages, model="tiny-llava"):
    request = pb.ServingGenerateRequest(
        model=model, chat=pb.ChatMessages(messages=messages),
        params=pb.GenerationParams(max_tokens=MAX_TOKENS, temperature=0))
    responses = list(stub.Generate(request, timeout=RPC_TIMEOUT))
    token_ids = [t for r in responses[:-1] for t in r.delta.token_ids]
    return token_ids, responses[-1].complete


def test_grpc_chat_images_give_the_offline_engines_tokens(stub, offline):
    reference = offline(ask({"type": "image", "image": CAT}, {"type": "image", "image": DOG},
                            text="Compare"))
    token_ids, complete = generate(stub, [pb.ChatMessage(role="user", content="Compare",
                                                         images=[CAT, DOG])])
    assert token_ids == reference.output_token_ids
    assert complete.usage.prompt_tokens == len(reference.prompt_token_ids)


@pytest.mark.parametrize(("model", "images", "why"), [
    ("tiny-llava", [CAT, b"not an image"], "messages[1].images[1]: not a readable image"),
    ("tiny-llava", [CAT] * (MAX_IMAGES_PER_REQUEST + 1), f"at most {MAX_IMAGES_PER_REQUEST}"),
    ("default", [CAT], "messages[1].images[0]: model 'default' does not take images"),
], ids=["not-an-image", "too-many", "text-only-model"])
def test_grpc_bad_images_are_invalid_argument_naming_the_image(stub, model, images, why):
    messages = [pb.ChatMessage(role="system", content="Be brief."),
                pb.ChatMessage(role="user", content="Look", images=images)]
    with pytest.raises(grpc.RpcError) as error:
        generate(stub, messages, model=model)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert why in error.value.details()


# ---- image URLs, where the operator allows them ------------------------------------------------


def test_allowed_image_urls_are_fetched(workers, offline):
    with image_server(CAT) as images, start_router(workers[:1], ["--allow-image-urls"]) as router:
        client = openai_client(router)
        response = chat(client, ask(image_part(f"{images}/cat.png")))
        assert response.choices[0].message.content == offline(ONE_IMAGE).text
        error = refused(client, ask(image_part(f"{images}/gone.png")))
        assert error.body["param"] == "messages[0].content[1]"
        assert "HTTP 404" in error.body["message"]
