"""A tiny random LLaVA directory (CLIP tower, projector, Llama) that transformers and lmfleet
both load, with a tokenizer, a chat template that takes image parts and an image processor;
and small test images."""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import time
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


@contextlib.contextmanager
def image_server(image: bytes):
    """A local HTTP server of image URLs, yielding its base URL: /cat.png serves `image`,
    /moved redirects there, /text is not an image, /declared-huge declares and /endless
    streams more than MAX_IMAGE_BYTES, /slow answers after 2 s; anything else is a 404."""
    from lmfleet.worker.model.vision.vision_info import MAX_IMAGE_BYTES

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/cat.png":
                self._send(200, image)
            elif self.path == "/moved":
                self.send_response(302)
                self.send_header("Location", "/cat.png")
                self.end_headers()
            elif self.path == "/text":
                self._send(200, b"hello")
            elif self.path == "/declared-huge":
                self.send_response(200)
                self.send_header("Content-Length", str(MAX_IMAGE_BYTES + 1))
                self.end_headers()
                self.wfile.write(image)
            elif self.path == "/endless":  # no length: the download itself must stop
                self.send_response(200)
                self.end_headers()
                with contextlib.suppress(OSError):
                    for _ in range(MAX_IMAGE_BYTES // 65536 + 2):
                        self.wfile.write(b"\x00" * 65536)
            elif self.path == "/slow":
                time.sleep(2)
                self._send(200, image)
            else:
                self._send(404, b"no")

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
