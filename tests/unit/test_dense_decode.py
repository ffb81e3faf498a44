"""Dense decode cache: slots, copies from the paged cache, growth and the memory bound, on
tiny configurations with exact slot ids and values; and its attention against the gather
path."""

import torch

from lmfleet.worker.model.attention.base import KVCache
from lmfleet.worker.model.attention.dense_decode import CAPACITY_STEP, DenseDecodeCache
from lmfleet.worker.model.attention.torch_ref import (
    AttentionMetadata,
    TorchAttention,
    build_decode_mask,
)

LAYERS, KV_HEADS, HEAD_DIM, BLOCK_SIZE, NUM_BLOCKS = 2, 1, 2, 2, 8


def paged_storage(num_blocks: int = NUM_BLOCKS) -> torch.Tensor:
    """(layers, 2, blocks, block_size, kv_heads, D) where every entry is distinct."""
    shape = (LAYERS, 2, num_blocks, BLOCK_SIZE, KV_HEADS, HEAD_DIM)
    return torch.arange(torch.Size(shape).numel(), dtype=torch.float32).view(shape)


def tokens_of(paged: torch.Tensor, table: list[int], count: int) -> torch.Tensor:
    """A request's first `count` tokens from the paged cache: (layers, 2, Hkv, count, D)."""
    context = paged[:, :, table].flatten(2, 3)[:, :, :count]  # (layers, 2, n, Hkv, D)
    return context.transpose(2, 3)


TOKEN_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4


def new_cache(max_bytes: int = 1 << 20, max_slots: int = 8) -> DenseDecodeCache:
    return DenseDecodeCache(LAYERS, KV_HEADS, HEAD_DIM, torch.float32, torch.device("cpu"),
                            max_bytes, max_slots)


def test_first_decode_copies_the_context_and_later_steps_append_only():
    paged, cache = paged_storage(), new_cache()
    step = cache.prepare(["a", "b"], [3, 2], [3, 2], [[5, 1], [2]], paged, BLOCK_SIZE)
    assert step.slots.tolist() == [0, 1] and step.positions.tolist() == [2, 1]
    assert step.rows_are_slots and step.length == 3
    assert cache.capacity == CAPACITY_STEP and cache.stored == [3, 2]
    assert torch.equal(step.storage[:, :, 0, :, :2], tokens_of(paged, [5, 1], 2))
    assert torch.equal(step.storage[:, :, 1, :, :1], tokens_of(paged, [2], 1))
    # Keys a slot may see: its tokens including the new one.
    assert step.mask[:, 0, 0].tolist() == [[True, True, True], [True, True, False]]

    # The forward pass writes token 2 of a and token 1 of b; the paged cache is not read
    # again for them, so changing it shows that nothing was copied a second time.
    step.storage[:, :, 0, :, 2] = -1.0
    a_tokens = tokens_of(paged, [5, 1], 2)
    paged.zero_()
    step = cache.prepare(["a", "b"], [4, 3], [4, 3], [[5, 1], [2, 3]], paged, BLOCK_SIZE)
    assert step.slots.tolist() == [0, 1] and cache.stored == [4, 3]
    assert (step.storage[:, :, 0, :, 2] == -1.0).all()
    assert torch.equal(step.storage[:, :, 0, :, :2], a_tokens)


def test_slots_stay_packed_as_requests_leave_and_return():
    paged, cache = paged_storage(), new_cache()
    cache.prepare(["a", "b", "c"], [2, 2, 2], [2, 2, 2], [[0], [1], [2]], paged, BLOCK_SIZE)
    c_tokens = tokens_of(paged, [2], 1)
    step = cache.prepare(["c", "a"], [3, 3], [3, 3], [[2, 3], [0, 4]], paged, BLOCK_SIZE)
    # b left; c moved from slot 2 into b's slot 1, so attention reads slots 0-1 only.
    assert cache.slot_of == {"a": 0, "c": 1} and cache.stored == [3, 3, 0]
    assert step.slots.tolist() == [1, 0] and not step.rows_are_slots
    assert torch.equal(step.storage[:, :, 1, :, :1], c_tokens)
    assert step.mask.shape == (2, 1, 1, 3)
    # b comes back (e.g. after a preemption) and d arrives: they take the next slots
    # (slots double, 3 -> 6) and are copied from the paged cache.
    step = cache.prepare(["a", "c", "b", "d"], [4, 4, 3, 2], [4, 4, 3, 2],
                         [[0, 4], [2, 3], [1, 6], [7]], paged, BLOCK_SIZE)
    assert step.slots.tolist() == [0, 1, 2, 3] and step.rows_are_slots
    assert cache.stored == [4, 4, 3, 2, 0, 0] and cache.num_slots == 6
    assert torch.equal(step.storage[:, :, 2, :, :2], tokens_of(paged, [1], 2))
    assert torch.equal(step.storage[:, :, 3, :, :1], tokens_of(paged, [7], 1))
    # A finished request is released by the runner; the last slot fills its place.
    step.storage[:, :, 3, :, 1] = -1.0  # d's token from the forward pass
    cache.release("c")
    step = cache.prepare(["a", "b", "d"], [5, 4, 3], [5, 4, 3], [[0, 4, 5], [1, 6], [7, 2]],
                         paged, BLOCK_SIZE)
    assert cache.slot_of == {"a": 0, "b": 2, "d": 1} and cache.stored == [5, 3, 4, 0, 0, 0]
    assert (step.storage[:, :, 1, :, 1] == -1.0).all()


def test_growth_in_slots_and_capacity_keeps_what_slots_hold():
    num_blocks = CAPACITY_STEP // BLOCK_SIZE + 1
    paged, cache = paged_storage(num_blocks), new_cache()
    table = list(range(num_blocks - 1))
    step = cache.prepare(["a"], [CAPACITY_STEP], [CAPACITY_STEP], [table], paged, BLOCK_SIZE)
    step.storage[:, :, 0, :, CAPACITY_STEP - 1] = 7.0  # the forward pass's token
    held = step.storage[:, :, 0].clone()  # (layers, 2, Hkv, CAPACITY_STEP, D)
    # One more token and one more request: both dimensions grow, a is not copied again.
    paged.zero_()
    step = cache.prepare(["a", "b"], [CAPACITY_STEP + 1, 2], [CAPACITY_STEP + 1, 2],
                         [table + [num_blocks - 1], [6]], paged, BLOCK_SIZE)
    assert cache.capacity == 2 * CAPACITY_STEP and cache.num_slots == 2
    assert step.slots.tolist() == [0, 1] and cache.stored == [CAPACITY_STEP + 1, 2]
    assert torch.equal(step.storage[:, :, 0, :, :CAPACITY_STEP], held)


def test_capacity_is_sized_for_the_final_length_when_it_fits():
    paged = paged_storage()
    cache = new_cache()
    cache.prepare(["a"], [3], [40], [[0, 1]], paged, BLOCK_SIZE)
    assert cache.capacity == 48 and cache.num_slots == 1
    # Within a budget of one slot of CAPACITY_STEP tokens, the hint gives way.
    cache = new_cache(max_bytes=CAPACITY_STEP * TOKEN_BYTES)
    cache.prepare(["a"], [3], [40], [[0, 1]], paged, BLOCK_SIZE)
    assert cache.capacity == CAPACITY_STEP


def test_a_step_beyond_the_memory_bound_falls_back_and_drops_the_copy():
    cache = new_cache(max_bytes=2 * CAPACITY_STEP * TOKEN_BYTES)
    paged = paged_storage()
    assert cache.prepare(["a", "b"], [2, 2], [2, 2], [[0], [1]], paged, BLOCK_SIZE) is not None
    # A third row needs 3 slots (doubling would give 4); neither fits.
    assert cache.prepare(["a", "b", "c"], [3, 3, 2], [3, 3, 2], [[0, 3], [1, 4], [2]], paged,
                         BLOCK_SIZE) is None
    assert cache.storage is None and cache.slot_of == {} and cache.num_slots == 0
    assert cache.prepare([], [], [], [], paged, BLOCK_SIZE) is None


def test_dense_attention_equals_the_gather_path():
    torch.manual_seed(0)
    layers, num_heads, kv_heads, head_dim, block_size, num_blocks = 1, 6, 2, 8, 4, 16
    paged = torch.randn(layers, 2, num_blocks, block_size, kv_heads, head_dim)
    tables = [[3, 7, 1], [0], [9, 2]]
    seq_lens = [10, 3, 6]  # including this step's token
    q = torch.randn(3, num_heads, head_dim)
    k = torch.randn(3, kv_heads, head_dim)
    v = torch.randn(3, kv_heads, head_dim)
    slots = torch.tensor([t[(n - 1) // block_size] * block_size + (n - 1) % block_size
                          for t, n in zip(tables, seq_lens, strict=True)])
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    seq_len_tensor = torch.tensor(seq_lens)
    empty = torch.zeros(0, 1, dtype=torch.int64)

    def metadata(dense):
        return AttentionMetadata(
            slot_mapping=slots, block_size=block_size, num_decode_tokens=3,
            decode_block_tables=table, decode_seq_lens=seq_len_tensor,
            decode_mask=build_decode_mask(seq_len_tensor, width * block_size),
            prefill_query_lens=[], prefill_block_tables=empty,
            prefill_seq_lens=torch.zeros(0, dtype=torch.int64), prefill_max_query_len=1,
            prefill_max_seq_len=0, prefill_token_index=empty,
            prefill_query_mask=torch.zeros(0, 1, dtype=torch.bool),
            prefill_mask=torch.zeros(0, 1, 1, 0, dtype=torch.bool), dense_decode=dense)

    backend = TorchAttention()
    gathered = backend.forward(q, k, v, KVCache(paged[0].clone(), 0), metadata(None), 0.3)
    cache = DenseDecodeCache(layers, kv_heads, head_dim, torch.float32, torch.device("cpu"),
                             1 << 20, max_slots=4)
    # Slot order differs from row order: one request decoded alone in an earlier step.
    earlier = cache.prepare(["r2"], [seq_lens[2] - 1], [seq_lens[2] - 1], [tables[2]], paged,
                            block_size)
    position = seq_lens[2] - 2  # the token that earlier step's forward pass wrote
    block, offset = tables[2][position // block_size], position % block_size
    earlier.storage[:, :, 0, :, position] = paged[:, :, block, offset]
    dense_paged = paged.clone()
    step = cache.prepare(["r0", "r1", "r2"], seq_lens, seq_lens, tables, dense_paged,
                         block_size)
    assert step.slots.tolist() == [1, 2, 0] and not step.rows_are_slots
    dense = backend.forward(q, k, v, KVCache(dense_paged[0], 0), metadata(step), 0.3)
    torch.testing.assert_close(dense, gathered, rtol=1e-6, atol=1e-6)
    # The paged cache got the step's tokens too.
    assert torch.equal(dense_paged[0].flatten(1, 2)[:, slots], torch.stack((k, v)))


def test_the_context_of_a_one_token_request_needs_no_copy():
    cache, paged = new_cache(), paged_storage()
    step = cache.prepare(["a"], [1], [1], [[3]], paged, BLOCK_SIZE)
    assert step.positions.tolist() == [0] and cache.stored == [1]
