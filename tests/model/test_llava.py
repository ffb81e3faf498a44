"""LLaVA: greedy tokens equal transformers' LlavaForConditionalGeneration on the same tiny
random weights and images, in batches mixing text-only and image prompts, through chunked
prefill (chunks ending inside an image), prefix hits on a repeated image, preemption and
sessions; a different image behind equal tokens never reuses the first one's KV."""

from __future__ import annotations

import io

import pytest
import torch

from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.model.vision.vision_info import ImageError, VisionInfo
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams
from tests.vision_model import image_bytes, make_tiny_llava

pytestmark = pytest.mark.model
MAX_NEW = 8
GREEDY = SamplingParams(max_tokens=MAX_NEW, min_tokens=MAX_NEW, temperature=0)


@pytest.fixture(scope="module", params=["clip", "siglip"])
def llava(request, tmp_path_factory, default_model_dir):
    directory = tmp_path_factory.mktemp(f"llava-{request.param}")
    return make_tiny_llava(directory, default_model_dir, vision_model=request.param)


@pytest.fixture(scope="module")
def hf(llava):
    from transformers import AutoImageProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(llava), dtype=torch.float32)
    return model.eval(), AutoImageProcessor.from_pretrained(str(llava))


def chat_prompt(llava, parts: list) -> list[int]:
    """Token ids of one user turn: text parts as strings, images as None; expanded."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llava))
    content = [{"type": "image"} if p is None else {"type": "text", "text": p} for p in parts]
    ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                        add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    return VisionInfo.from_model_dir(llava).expand_image_tokens(ids)


def hf_greedy(hf, ids: list[int], images: list[bytes]) -> list[int]:
    from PIL import Image

    model, processor = hf
    kwargs = {}
    if images:
        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in images]
        kwargs["pixel_values"] = processor(images=pil, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids),
                                                                            dtype=torch.long),
                             max_new_tokens=MAX_NEW, min_new_tokens=MAX_NEW, do_sample=False,
                             **kwargs)
    return out[0, len(ids):].tolist()


def make_engine(llava, **options) -> LLMEngine:
    options = {"block_size": 8, "num_kv_blocks": 96, **options}
    return LLMEngine(EngineConfig.from_options(str(llava), **options), model_dir=llava)


def run(engine: LLMEngine, prompts: list[tuple[list[int], list[bytes]]], first_id: int = 0,
        session_id=None) -> list[tuple[list[int], int]]:
    """(tokens, cached prompt tokens) per prompt, all added before the first step."""
    for index, (ids, images) in enumerate(prompts):
        engine.add_request(Request(str(first_id + index), ids, GREEDY, images=tuple(images),
                                   session_id=session_id))
    done = {}
    while engine.has_work():
        for output in engine.step():
            if output.finished:
                done[output.request_id] = (output.output_token_ids, output.num_cached_tokens)
    return [done[str(first_id + index)] for index in range(len(prompts))]


@pytest.fixture(scope="module")
def mixed(llava):
    cat, dog = image_bytes(1), image_bytes(2, (50, 20), "JPEG")
    return [
        (chat_prompt(llava, ["What is in ", None, " this picture?"]), [cat]),
        (chat_prompt(llava, ["Tell me a story about a lighthouse keeper."]), []),
        (chat_prompt(llava, [None, "and", None, "compare them"]), [dog, cat]),
        (chat_prompt(llava, ["Describe", None]), [dog]),
    ]


def test_mixed_batch_equals_hf_whole_and_in_chunks(llava, hf, mixed):
    expected = [hf_greedy(hf, ids, images) for ids, images in mixed]
    whole = make_engine(llava)
    assert [tokens for tokens, _ in run(whole, mixed)] == expected
    # 12-token chunks split every 16-token image (and the two images of prompt 2).
    chunked = make_engine(llava, max_num_batched_tokens=12, max_num_seqs=3)
    assert [tokens for tokens, _ in run(chunked, mixed)] == expected
    assert whole.runner.images.num_images_encoded == 2  # cat and dog, each once
    assert not whole.runner.images._rows, "rows are dropped once their KV exists"


def test_repeated_image_hits_the_prefix_cache_and_another_image_does_not(llava, hf, mixed):
    engine = make_engine(llava)
    ids, images = mixed[0]
    first = run(engine, [(ids, images)])
    again = run(engine, [(ids, images)], first_id=1)
    assert again[0][0] == first[0][0] == hf_greedy(hf, ids, images)
    assert again[0][1] >= 16  # the image's blocks came from the cache
    encoded = engine.runner.images.num_images_encoded
    other = image_bytes(7)
    swapped = run(engine, [(ids, [other])], first_id=2)
    assert swapped[0][0] == hf_greedy(hf, ids, [other])
    span = engine.vision_info.image_spans(ids)[0]
    assert swapped[0][1] <= span[0], "KV of another image was reused"
    assert engine.runner.images.num_images_encoded == encoded + 1


def test_preemption_and_sessions_keep_image_prompts_exact(llava, hf, mixed):
    expected = [hf_greedy(hf, ids, images) for ids, images in mixed]
    tight = make_engine(llava, num_kv_blocks=9, max_num_batched_tokens=16)
    assert [tokens for tokens, _ in run(tight, mixed)] == expected
    assert tight.scheduler.num_preemptions > 0  # recomputed prompts re-read image rows
    # A second turn over the first: the parked KV is reused up to its end.
    engine = make_engine(llava)
    ids, images = mixed[0]
    (answer, _), = run(engine, [(ids, images)], session_id="s")
    follow = ids + answer + chat_prompt(llava, ["and now", None])
    turn = (follow, images + [image_bytes(3)])
    (tokens, cached), = run(engine, [turn], first_id=1, session_id="s")
    assert tokens == hf_greedy(hf, *turn)
    assert cached >= len(ids)


def test_images_that_do_not_fit_the_prompt_are_refused(llava, default_model_dir, mixed):
    engine = make_engine(llava)
    ids, images = mixed[0]
    with pytest.raises(ImageError, match="places for 1 images but 2"):
        engine.add_request(Request("a", ids, GREEDY, images=(images[0], images[0])))
    with pytest.raises(ImageError, match="image 0: not a readable image"):
        engine.add_request(Request("b", ids, GREEDY, images=(b"not a picture",)))
    with pytest.raises(ImageError, match="not a multiple"):
        engine.add_request(Request("c", ids[:-12], GREEDY, images=tuple(images)))
    text_only = LLMEngine(EngineConfig.from_options(str(default_model_dir), num_kv_blocks=8),
                          model_dir=default_model_dir)
    with pytest.raises(ImageError, match="does not take images"):
        text_only.add_request(Request("d", [1, 2, 3], GREEDY, images=(images[0],)))
    assert not engine.requests and not text_only.requests


def test_mlfq_profiles_the_image_encoder_and_stays_exact(llava, hf, mixed):
    engine = make_engine(llava, policy="mlfq")
    assert engine.cost_model.image_encode_s > 0
    assert [tokens for tokens, _ in run(engine, mixed)] == [
        hf_greedy(hf, ids, images) for ids, images in mixed]


def test_a_resumed_prompt_reads_generated_image_tokens_as_text(llava, mixed):
    """A replica died after the model generated the image token: the resumed prompt (prompt
    + tokens so far) has image places only up to the original prompt's end."""
    engine = make_engine(llava)
    ids, images = mixed[0]
    token = engine.vision_info.image_token_id
    resumed = ids + [token, 5]
    with pytest.raises(ImageError, match="not a multiple"):
        engine.image_spans(resumed, tuple(images))
    spans = engine.image_spans(resumed, tuple(images), end=len(ids))
    assert spans == engine.image_spans(ids, tuple(images))
    engine.add_request(Request("r", resumed, GREEDY, images=tuple(images), image_spans=spans))
    outputs = [o for _ in range(MAX_NEW + 2) for o in engine.step() if o.finished]
    assert len(outputs[0].output_token_ids) == MAX_NEW
