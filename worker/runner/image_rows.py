"""The rows a step's image positions take in place of token embeddings.

An image is encoded (processor, vision tower, projector) the first time a step computes one
of its positions, batched with every other image that step needs, and kept, keyed on its
digest, until every request holding it has its KV: a chunk boundary inside an image or a
second request with the same image reads the kept rows (a request preempted after that
encodes it again). A prefix hit or a session that already holds an image's KV never
encodes it at all.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Optional

import torch

from lmfleet.worker.model.loader import safetensors_files
from lmfleet.worker.model.vision.llava_vision import ImageProcessor, load_llava_vision
from lmfleet.worker.request import Request
from lmfleet.worker.scheduler.base import ScheduledRequest

# Images encoded in one vision-tower call at most (bounds its activations' memory).
MAX_IMAGES_PER_ENCODE = 16


class ImageRows:
    def __init__(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> None:
        self.vision = load_llava_vision(model_dir, safetensors_files(model_dir), dtype, device)
        self.processor = ImageProcessor(model_dir)
        self.device = device
        self._rows: dict[bytes, torch.Tensor] = {}  # digest -> (tokens_per_image, H)
        self._holders: dict[bytes, set[str]] = {}  # digest -> ids of requests holding it
        self.num_images_encoded = 0

    def for_step(self, ordered: list[ScheduledRequest]
                 ) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """The step's image rows: (token rows (K,), vectors (K, H)) for requests laid out in
        `ordered`'s order, each taking num_new_tokens rows; None if the step has none."""
        pieces: list[tuple[int, bytes, int, int]] = []  # (batch row, digest, first, count)
        row = 0
        for item in ordered:
            request = item.request
            start = request.num_computed_tokens
            end = start + item.num_new_tokens
            for span in request.image_spans:
                if span.offset + span.length <= start:  # its KV exists: the rows can go
                    self._let_go(span.digest, request.request_id)
                    continue
                low, high = max(start, span.offset), min(end, span.offset + span.length)
                if low < high:
                    pieces.append((row + low - start, span.digest, low - span.offset,
                                   high - low))
                    self._hold(span.digest, request.request_id)
            row += item.num_new_tokens
        if not pieces:
            return None
        self._encode_missing(ordered)
        token_rows = torch.cat([torch.arange(r, r + n) for r, _, _, n in pieces])  # (K,)
        vectors = torch.cat([self._rows[d][first:first + n]
                             for _, d, first, n in pieces])  # (K, H)
        return token_rows.to(self.device), vectors

    @torch.inference_mode()
    def encode_seconds(self, repeats: int) -> float:
        """The least time one image takes through the encoder (the cost model's share)."""
        from PIL import Image

        buffer = io.BytesIO()
        Image.new("RGB", (64, 64), (120, 60, 30)).save(buffer, format="PNG")
        times = []
        for _ in range(repeats + 1):  # the first call warms up
            start = time.perf_counter()
            self.vision(self.processor([buffer.getvalue()]).to(self.device))
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            times.append(time.perf_counter() - start)
        return min(times[1:])

    def release(self, request_id: str) -> None:
        """A request finished: images no other request holds are dropped."""
        for digest in [d for d, ids in self._holders.items() if request_id in ids]:
            self._let_go(digest, request_id)

    def _let_go(self, digest: bytes, request_id: str) -> None:
        holders = self._holders.get(digest)
        if holders is None or request_id not in holders:
            return
        holders.discard(request_id)
        if not holders:
            del self._holders[digest], self._rows[digest]

    def _hold(self, digest: bytes, request_id: str) -> None:
        self._holders.setdefault(digest, set()).add(request_id)

    def _encode_missing(self, ordered: list[ScheduledRequest]) -> None:
        missing: dict[bytes, bytes] = {}  # digest -> image bytes, first come first
        for item in ordered:
            request: Request = item.request
            for span, data in zip(request.image_spans, request.images, strict=True):
                if span.digest in self._holders and span.digest not in self._rows:
                    missing.setdefault(span.digest, data)
        digests = list(missing)
        for first in range(0, len(digests), MAX_IMAGES_PER_ENCODE):
            batch = digests[first:first + MAX_IMAGES_PER_ENCODE]
            pixels = self.processor([missing[d] for d in batch])  # (B, C, S, S)
            rows = self.vision(pixels.to(self.device))  # (B, tokens_per_image, H)
            for digest, image_rows in zip(batch, rows, strict=True):
                self._rows[digest] = image_rows
            self.num_images_encoded += len(batch)
