"""Chained block hashes for prefix caching.

A full block's hash covers its own tokens and, through the parent hash, every token
before it; two requests share a block only if their whole prefixes up to that block
are equal. A 128-bit BLAKE2b digest makes an accidental collision (which would silently
serve another prompt's KV) practically impossible, unlike Python's 64-bit `hash`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Sequence
from typing import Optional

from lmfleet.worker.model.vision.vision_info import ImageSpan

BlockHash = bytes

# Parent of the first block: any fixed value distinct from every digest works.
ROOT_HASH: BlockHash = b"lmfleet-kv-root"


def hash_block_tokens(parent_hash: Optional[BlockHash], token_ids: Sequence[int],
                      extra: bytes = b"") -> BlockHash:
    """Digest of one full block given the digest of the block before it; `extra` holds
    what the tokens do not say (the images at the block's image positions)."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(parent_hash if parent_hash is not None else ROOT_HASH)
    digest.update(array("q", token_ids).tobytes())
    digest.update(extra)
    return digest.digest()


def image_key(image_spans: Sequence[ImageSpan], start: int, end: int) -> bytes:
    """The images whose positions overlap tokens [start, end), each with where it starts
    relative to `start`: an image token's KV depends on which image, and which of its rows."""
    return b"".join(span.digest + (span.offset - start).to_bytes(8, "little", signed=True)
                    for span in image_spans
                    if span.offset < end and start < span.offset + span.length)


def extend_block_hashes(
    block_hashes: list[BlockHash], token_ids: Sequence[int], num_tokens: int, block_size: int,
    image_spans: Sequence[ImageSpan] = (),
) -> None:
    """Append to `block_hashes` the hashes of every full block within `num_tokens` tokens."""
    num_full_blocks = num_tokens // block_size
    for block_index in range(len(block_hashes), num_full_blocks):
        parent = block_hashes[-1] if block_hashes else None
        start = block_index * block_size
        end = start + block_size
        block_hashes.append(hash_block_tokens(parent, token_ids[start:end],
                                              image_key(image_spans, start, end)))
