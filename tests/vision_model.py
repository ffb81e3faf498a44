"""A tiny random LLaVA directory (CLIP tower, projector, Llama) that transformers and lmfleet
both load, with a tokenizer, a chat template that takes image parts and an image processor;
and small test images."""

from __future__ import annotations

import io
from pathlib import Path

import torch

# A llava-style template: an image part renders as one <image> token.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 image tokens an image
TOKENS_PER_IMAGE = (IMAGE_SIZE // PATCH_SIZE) ** 2


def word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer over made-up words "t0".."t{n-1}" (no model files
    needed: the GPU machines lack the default model)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="t0",
                                   bos_token="t1", eos_token="t2")


def make_tiny_llava(directory: Path, tokenizer_dir: Path | None = None, seed: int = 0,
                    vision_model: str = "clip") -> Path:
    """Weights, config, tokenizer (the default model's, else a word-level one, plus
    <image>) and image processor."""
    import transformers
    from transformers import AutoTokenizer

    tokenizer = (AutoTokenizer.from_pretrained(str(tokenizer_dir)) if tokenizer_dir
                 else word_tokenizer(600))
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    vision_settings = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    if vision_model == "clip":
        vision = transformers.CLIPVisionConfig(projection_dim=32, **vision_settings)
    else:
        vision = transformers.SiglipVisionConfig(**vision_settings)
    text = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id,
        tie_word_embeddings=False)
    config = transformers.LlavaConfig(vision_config=vision, text_config=text,
                                      image_token_index=image_token_id,
                                      image_seq_length=TOKENS_PER_IMAGE)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(torch.float32)
    with torch.no_grad():  # sharper logits: greedy text less tie-prone
        for name, param in model.named_parameters():
            if param.dim() > 1 and "vision_tower" not in name:
                param.mul_(4.0)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    processor.save_pretrained(str(directory))
    return directory


def image_bytes(seed: int, size: tuple[int, int] = (40, 28), fmt: str = "PNG") -> bytes:
    """A small random RGB image, encoded."""
    from PIL import Image

    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), generator=generator,
                           dtype=torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels.numpy()).save(buffer, format=fmt)
    return buffer.getvalue()
