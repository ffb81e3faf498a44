"""Served text equals offline text for the same tokens, with a sentencepiece-style tokenizer.

A Metaspace tokenizer (Llama 2, Mistral, TinyLlama...) renders a token's leading space only
when something precedes it: decoded alone, "▁w5" is "w5"; after the prompt it is " w5".
The router decodes in the prompt's context, as vLLM does (its text keeps that space), so
`LLM.generate` must too. (The embedded SmolLM2 has a byte-level tokenizer, where both ways
give the same text: test_router_openai.py compares those.) Real processes: a worker and a
router on a tiny random-weight Llama with such a tokenizer; the offline `LLM` in this
process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lmfleet.worker import LLM, SamplingParams
from tests.conftest import make_tiny_model
from tests.integration.test_router_helpers import openai_client, start_router
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 128
MAX_TOKENS = 6
SPACE = "\u2581"  # Metaspace's space marker
PROMPTS = [f"w{i} w{i + 7} w{i + 3}" for i in range(0, 240, 20)]


def add_metaspace_tokenizer(directory: Path) -> None:
    """A word-level tokenizer with Metaspace pre-tokenizer and decoder (prepend "first", as
    Llama's): every word w0..w253 exists with and without a leading "▁"."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for i in range(254):  # 3 + 2 * 254 = 511 tokens: within the tiny model's 512
        vocab[f"{SPACE}w{i}"] = len(vocab)
        vocab[f"w{i}"] = len(vocab)
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE,
                                                       prepend_scheme="first")
    tokenizer.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="first")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(str(directory))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = make_tiny_model(tmp_path_factory.mktemp("metaspace") / "llama", "llama")
    add_metaspace_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def router(model_dir):
    with start_worker(model_dir, ["--max-model-len", str(MAX_MODEL_LEN)]) as worker, \
            start_router([worker]) as router:
        yield router


def test_served_completion_text_equals_llm_generate_text(router, model_dir):
    llm = LLM(str(model_dir), max_model_len=MAX_MODEL_LEN)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    offline = llm.generate(PROMPTS, params, use_tqdm=False)
    client = openai_client(router)
    model = client.models.list().data[0].id
    served = client.completions.create(model=model, prompt=PROMPTS, max_tokens=MAX_TOKENS,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in served.choices] == [o.text for o in offline]
    # The case that differed: outputs whose first token carries a "▁" keep its space.
    first_tokens = [llm.tokenizer.convert_ids_to_tokens(o.output_token_ids[0])
                    for o in offline]
    spaced = [o.text for o, t in zip(offline, first_tokens, strict=True)
              if t.startswith(SPACE)]
    assert spaced, f"no output starts with a {SPACE} token: {first_tokens}"
    assert all(text.startswith(" ") for text in spaced)
