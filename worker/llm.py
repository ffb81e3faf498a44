"""`LLM`: the offline Python API, `LLM(model).generate(prompts, SamplingParams(...))`.

It owns the tokenizer (the engine speaks token ids only), fans out `n` completions as
separate engine requests, validates everything before admitting anything (so a bad
prompt in a list leaves the engine untouched) and drives `step()` until all finish.

`LLM.chat` takes images for a vision-language (LLaVA) model as content parts, as the
router does (worker/chat_images.py): `{"type": "image", "image": X}` with X a PIL image
(sent as PNG), a file path or encoded bytes, or `{"type": "image_url", "image_url":
{"url": "data:image/png;base64,..."}}`.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional, Union

from tqdm.auto import tqdm

from lmfleet.worker.chat_images import (
    ImagePart,
    decode_data_url,
    image_parts,
    template_content,
    url_scheme,
)
from lmfleet.worker.config import EngineConfig
from lmfleet.worker.engine import LLMEngine
from lmfleet.worker.model.vision.vision_info import (
    ImageError,
    VisionInfo,
    check_image_bytes,
    text_only_model_error,
)
from lmfleet.worker.request import CompletionOutput, Request, RequestOutput
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.tokenizer import decode_output, load_tokenizer

Prompt = Union[str, list[int]]
Message = dict[str, Any]


def _child_seed(seed: Optional[int], index: int) -> Optional[int]:
    # Completion i of n uses seed + i: they differ, stay reproducible, and match what the
    # router sends for n > 1, so offline and served seeded outputs agree.
    return None if seed is None else seed + index


class LLM:
    def __init__(self, model: str = "default", **engine_options: Any) -> None:
        # tensor_parallel_size=N starts N-1 local rank processes; close() (or leaving a
        # `with LLM(...)` block) stops them.
        self.engine = LLMEngine(EngineConfig.from_options(model, **engine_options))
        try:
            self.tokenizer = load_tokenizer(self.engine.model_dir)
        except BaseException:
            self.engine.close()
            raise
        self._ids = itertools.count()
        self._model_name = model
        # None for a text-only model (then image parts are a ValueError).
        self.vision_info = VisionInfo.from_model_dir(self.engine.model_dir)

    def close(self) -> None:
        """Stop the engine's other ranks (tensor parallelism); idempotent."""
        engine = self.__dict__.get("engine")
        if engine is not None:
            engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass  # interpreter shutdown: the daemon rank processes go with it

    def generate(
        self,
        prompts: Union[Prompt, Sequence[Prompt]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        return self._generate(self._normalize_prompts(prompts), sampling_params, use_tqdm)

    def _generate(self, prompt_list: list[Prompt], sampling_params: Any, use_tqdm: bool,
                  images: Optional[Sequence[tuple[bytes, ...]]] = None
                  ) -> list[RequestOutput]:
        """`generate`, each prompt with its images (`images[i]`: prompt i's, in order)."""
        params_list = self._normalize_params(sampling_params, len(prompt_list))
        image_list = list(images) if images is not None else [()] * len(prompt_list)
        encoded = [self._encode(p) for p in prompt_list]
        for token_ids in encoded:
            self.engine.validate(token_ids)
        groups: list[list[str]] = []
        for prompt_ids, params, prompt_images in zip(encoded, params_list, image_list,
                                                     strict=True):
            base_id = str(next(self._ids))
            child_ids = []
            for index in range(params.n):
                child_params = _replace(params, n=1, seed=_child_seed(params.seed, index))
                request_id = base_id if params.n == 1 else f"{base_id}-{index}"
                self.engine.add_request(Request(request_id, list(prompt_ids), child_params,
                                                images=prompt_images))
                child_ids.append(request_id)
            groups.append(child_ids)
        finished = self._run(sum(len(g) for g in groups), use_tqdm)
        results = []
        for prompt, prompt_ids, child_ids in zip(prompt_list, encoded, groups, strict=True):
            completions = [self._completion(i, finished[rid]) for i, rid in enumerate(child_ids)]
            first = completions[0]
            results.append(RequestOutput(
                request_id=child_ids[0].split("-")[0],
                prompt=prompt if isinstance(prompt, str) else None,
                prompt_token_ids=list(prompt_ids),
                output_token_ids=first.output_token_ids,
                text=first.text,
                finish_reason=first.finish_reason,
                logprobs=first.logprobs,
                num_cached_tokens=finished[child_ids[0]].num_cached_tokens,
                outputs=completions,
            ))
        return results

    def chat(
        self,
        messages: Union[Sequence[Message], Sequence[Sequence[Message]]],
        sampling_params: Union[SamplingParams, Sequence[SamplingParams], None] = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them. A vision
        model's messages may hold image parts (see the module doc); a text-only model
        given one raises ValueError naming it (messages[0].content[1])."""
        if not messages:
            raise ValueError("messages is empty")
        conversations = [messages] if isinstance(messages[0], dict) else list(messages)
        prompts: list[Prompt] = []
        images: list[tuple[bytes, ...]] = []
        for conversation in conversations:
            prompt, conversation_images = self._chat_prompt(conversation)
            prompts.append(prompt)
            images.append(conversation_images)
        return self._generate(prompts, sampling_params, use_tqdm, images)

    def apply_chat_template(self, conversation: Sequence[Message]) -> list[int]:
        """The prompt ids of a conversation: for a vision model, each image expanded to its
        run of image tokens (the images themselves are not read here)."""
        return self._chat_prompt(conversation, read_images=False)[0]

    def _chat_prompt(self, conversation: Sequence[Message], read_images: bool = True
                     ) -> tuple[list[int], tuple[bytes, ...]]:
        for message in conversation:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise ValueError("each chat message must be a dict with 'role' and 'content'")
        parts = image_parts(conversation)
        vision = self.vision_info
        if vision is None:
            if parts:
                raise ImageError(f"{parts[0].where}: {text_only_model_error(self._model_name)}")
            return self._render(conversation), ()
        ids = vision.expand_image_tokens(self._render([
            {**message, "content": template_content(message["content"], index)}
            for index, message in enumerate(conversation)]))
        if not read_images:
            return ids, ()
        images = tuple(_image_bytes(part) for part in parts)
        vision.check_prompt(ids, len(images))
        return ids, images

    def _render(self, conversation: Sequence[Message]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(
            list(conversation), add_generation_prompt=True, tokenize=True)
        # transformers 5 returns a BatchEncoding here; 4.x returns the list of ids.
        if hasattr(encoded, "keys"):
            encoded = encoded["input_ids"]
        return list(encoded)

    # ---- helpers -------------------------------------------------------------------------
    def _run(self, num_requests: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=num_requests, desc="generating", unit="req",
                  disable=None if use_tqdm else True) as progress:
            while self.engine.has_work():
                for output in self.engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        progress.update(1)
        return finished

    def _completion(self, index: int, output: RequestOutput) -> CompletionOutput:
        text = decode_output(self.tokenizer, output.prompt_token_ids, output.output_token_ids)
        return CompletionOutput(index=index, output_token_ids=output.output_token_ids, text=text,
                                finish_reason=output.finish_reason, logprobs=output.logprobs)

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer.encode(prompt))
        return list(prompt)

    @staticmethod
    def _normalize_prompts(prompts: Any) -> list[Prompt]:
        if isinstance(prompts, str):
            return [prompts]
        if isinstance(prompts, Sequence) and prompts and all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompts):
            return [list(prompts)]
        if not isinstance(prompts, Sequence) or isinstance(prompts, (bytes, dict)):
            raise ValueError("prompts must be a string, a list of token ids, or a list of those")
        result: list[Prompt] = []
        for prompt in prompts:
            if isinstance(prompt, str):
                result.append(prompt)
            elif isinstance(prompt, Sequence) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                result.append(list(prompt))
            else:
                raise ValueError(f"invalid prompt {prompt!r}: expected a string or token ids")
        if not result:
            raise ValueError("no prompts given")
        return result

    @staticmethod
    def _normalize_params(params: Any, count: int) -> list[SamplingParams]:
        if params is None:
            return [SamplingParams()] * count
        if isinstance(params, SamplingParams):
            return [params] * count
        params = list(params)
        if len(params) != count or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"sampling_params must be one SamplingParams or {count} of them")
        return params


def _image_bytes(part: ImagePart) -> bytes:
    """The encoded bytes of an image part (a PIL image is encoded as PNG), checked to be an
    image. Raises ImageError (a ValueError) naming the part."""
    source, where = part.source, part.where
    if isinstance(source, str) and url_scheme(source) == "data":
        data = decode_data_url(source, where)
    elif isinstance(source, str) and url_scheme(source) in ("http", "https"):
        raise ImageError(f"{where}: LLM.chat does not fetch URLs; pass the image's bytes, a "
                         "file path or a PIL image")
    elif isinstance(source, (str, Path)):
        try:
            data = Path(source).read_bytes()
        except OSError as error:
            raise ImageError(f"{where}: cannot read {str(source)!r}: {error.strerror}") from None
    elif isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
    elif hasattr(source, "save") and hasattr(source, "mode"):  # a PIL image
        buffer = io.BytesIO()
        source.save(buffer, format="PNG")
        data = buffer.getvalue()
    else:
        raise ImageError(f"{where}: an image must be a PIL image, a file path, bytes or a "
                         f"data URL, not {type(source).__name__}")
    check_image_bytes(data, where)
    return data


def _replace(params: SamplingParams, **changes: Any) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, **changes)
