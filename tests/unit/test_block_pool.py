"""BlockPool and KVCacheManager: exact block ids, free order, eviction order, prefix hits.

Tiny pools (4-8 blocks of 4 tokens) so every expectation can be written out in full.
"""

from __future__ import annotations

import pytest

from lmfleet.worker.kv.block_pool import BlockPool, NoFreeBlocksError
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.kv.prefix import hash_block_tokens
from lmfleet.worker.request import Request
from lmfleet.worker.sampling_params import SamplingParams

BLOCK_SIZE = 4


def make_request(request_id: str, token_ids: list[int]) -> Request:
    return Request(request_id, list(token_ids), SamplingParams())


def admit_and_compute(manager: KVCacheManager, request: Request) -> None:
    """What scheduler + engine do for a whole prompt: look up the prefix cache, allocate,
    compute every token and register the full blocks."""
    hit = manager.find_prefix_hit(request)
    num_new_tokens = request.num_tokens - hit.num_tokens(manager.block_size)
    assert manager.allocate(request, num_new_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    manager.cache_computed_blocks(request)


# Three full blocks: [1,2,3,4] [5,6,7,8] [9,10,11,12].
PROMPT_12 = list(range(1, 13))


# ---- BlockPool -------------------------------------------------------------------------


def test_allocate_takes_blocks_from_the_front_in_id_order():
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.free_block_ids() == [5]
    assert pool.num_free_blocks == 1


def test_uncached_blocks_are_freed_to_the_front_of_the_queue():
    pool = BlockPool(6)
    pool.allocate(4)  # [0, 1, 2, 3]; free: [4, 5]
    pool.free([2])
    assert pool.free_block_ids() == [2, 4, 5]
    pool.free([0])
    assert pool.free_block_ids() == [0, 2, 4, 5]
    assert pool.allocate(1) == [0]


def test_cached_blocks_are_freed_to_the_back_of_the_queue_in_the_order_given():
    pool = BlockPool(6)
    pool.allocate(4)
    assert pool.cache_block(1, b"h1")
    assert pool.cache_block(3, b"h3")
    pool.free([3, 1])
    assert pool.free_block_ids() == [4, 5, 3, 1]


def test_reusing_a_free_cached_block_evicts_its_hash():
    pool = BlockPool(2)
    pool.allocate(2)
    pool.cache_block(0, b"h0")
    pool.free([0])  # cached: back of the queue, behind nothing else
    pool.free([1])  # uncached: front
    assert pool.free_block_ids() == [1, 0]
    assert pool.allocate(1) == [1]
    assert pool.get_cached_block(b"h0") == 0  # not reused yet: still findable
    assert pool.allocate(1) == [0]
    assert pool.get_cached_block(b"h0") is None
    assert pool.block_hashes[0] is None
    assert pool.num_cached_blocks == 0


def test_touch_revives_a_free_cached_block_out_of_the_free_queue():
    pool = BlockPool(4)
    pool.allocate(2)
    pool.cache_block(1, b"h1")
    pool.free([1])
    assert pool.free_block_ids() == [2, 3, 1]
    pool.touch([1])
    assert pool.free_block_ids() == [2, 3]
    assert pool.ref_counts[1] == 1
    assert pool.get_cached_block(b"h1") == 1


def test_free_more_often_than_allocated_raises():
    pool = BlockPool(4)
    pool.allocate(1)
    pool.free([0])
    with pytest.raises(RuntimeError, match="block 0"):
        pool.free([0])
    assert pool.free_block_ids() == [0, 1, 2, 3]


def test_allocating_more_than_free_raises_and_changes_nothing():
    pool = BlockPool(4)
    pool.allocate(3)
    with pytest.raises(NoFreeBlocksError):
        pool.allocate(2)
    assert pool.free_block_ids() == [3]


def test_caching_disabled_never_registers_and_frees_to_the_front():
    pool = BlockPool(4, enable_caching=False)
    pool.allocate(2)
    assert not pool.cache_block(0, b"h0")
    pool.free([0])
    assert pool.free_block_ids() == [0, 2, 3]
    assert pool.get_cached_block(b"h0") is None


# ---- KVCacheManager: allocation and freeing ----------------------------------------------


def test_manager_allocates_one_block_per_started_block_of_tokens():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(1, 10)))  # 9 tokens -> 3 blocks
    assert manager.allocate(request, 9)
    assert request.block_ids == [0, 1, 2]
    assert manager.num_free_blocks == 5


def test_manager_grows_a_request_one_block_at_a_time_as_decodes_cross_a_boundary():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(1, 9)))  # 8 tokens: exactly 2 blocks
    assert manager.allocate(request, 8)
    request.num_computed_tokens = 8
    request.append_output_token(100, None)
    assert manager.allocate(request, 1)
    assert request.block_ids == [0, 1, 2]
    request.num_computed_tokens = 9
    request.append_output_token(101, None)
    assert manager.allocate(request, 1)  # token 10 still fits in block 2
    assert request.block_ids == [0, 1, 2]


def test_manager_frees_tail_first_so_the_prompt_tail_is_evicted_first():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    request = make_request("a", PROMPT_12)
    admit_and_compute(manager, request)
    assert request.block_ids == [0, 1, 2]
    manager.free(request)
    assert request.block_ids == []
    assert manager.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]


def test_cached_blocks_are_evicted_lru_tail_block_first():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    manager.free(a)
    b = make_request("b", list(range(100, 120)))  # 20 tokens: takes the 5 never-used blocks
    admit_and_compute(manager, b)
    assert b.block_ids == [3, 4, 5, 6, 7]
    c = make_request("c", [200])
    assert manager.allocate(c, 1)
    assert c.block_ids == [2]  # a's last block goes first
    # a's first two blocks survive: a fresh copy of a's prompt still hits them.
    assert manager.find_prefix_hit(make_request("a2", PROMPT_12)).block_ids == [0, 1]


def test_uncached_partial_block_is_freed_to_the_front():
    manager = KVCacheManager(num_blocks=6, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(1, 7)))  # 6 tokens: one full block, one partial
    admit_and_compute(manager, request)
    assert request.block_ids == [0, 1]
    manager.free(request)
    # Block 1 (tokens 5-6, never full) is worthless: first in line. Block 0 is cached: last.
    assert manager.pool.free_block_ids() == [1, 2, 3, 4, 5, 0]


def test_allocate_beyond_capacity_returns_false_and_changes_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", list(range(1, 18)))  # 17 tokens -> 5 blocks
    hit = manager.find_prefix_hit(request)
    assert not manager.allocate(request, 17, hit)
    assert request.block_ids == []
    assert request.num_computed_tokens == 0
    assert manager.num_free_blocks == 4
    assert manager.pool.free_block_ids() == [0, 1, 2, 3]
    assert manager.prefix_stats.queries == 0


def test_allocate_counts_revived_hit_blocks_against_capacity():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    manager.free(a)
    assert manager.pool.free_block_ids() == [3, 2, 1, 0]
    # Shares a's first two blocks, then needs 3 more: 2 revived + 3 new = 5 > 4 blocks.
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 52, 53, 54, 55, 56, 57, 58])
    hit = manager.find_prefix_hit(b)
    assert hit.block_ids == [0, 1]
    assert not manager.allocate(b, 9, hit)
    assert b.block_ids == []
    assert manager.pool.free_block_ids() == [3, 2, 1, 0]
    assert manager.pool.get_cached_block(a.block_hashes[0]) == 0


def test_allocate_exactly_at_capacity_with_revived_hit_blocks_succeeds():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    manager.free(a)
    # 2 revived + 2 new = 4 blocks: the new ones come from the front ([3, 2] after the
    # revival), so a's third block (2) is evicted.
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 50, 51, 52, 53, 54, 55, 56, 57])
    hit = manager.find_prefix_hit(b)
    assert manager.allocate(b, 8, hit)
    assert b.block_ids == [0, 1, 3, 2]
    assert manager.num_free_blocks == 0
    assert manager.pool.get_cached_block(a.block_hashes[2]) is None


# ---- KVCacheManager: prefix hits ---------------------------------------------------------


def test_prefix_hit_reuses_the_exact_cached_block_ids():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    manager.free(a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 90, 91])  # a's first 2 blocks, then new
    hit = manager.find_prefix_hit(b)
    assert hit.block_ids == [0, 1]
    assert manager.allocate(b, 2, hit)
    assert b.block_ids == [0, 1, 3]
    assert b.num_computed_tokens == 8


def test_revived_hit_blocks_leave_the_free_queue():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    manager.free(a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 90])
    hit = manager.find_prefix_hit(b)
    assert manager.allocate(b, 1, hit)
    assert manager.pool.free_block_ids() == [4, 5, 6, 7, 2]
    assert manager.num_free_blocks == 5


def test_prefix_hit_never_covers_the_last_token():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    prompt = [1, 2, 3, 4, 5, 6, 7, 8]  # exactly 2 blocks
    admit_and_compute(manager, make_request("a", prompt))
    b = make_request("b", prompt)
    hit = manager.find_prefix_hit(b)
    # Serving both blocks would leave nothing to compute, and so nothing to sample from.
    assert hit.block_ids == [0]
    assert manager.allocate(b, 4, hit)
    assert b.num_computed_tokens == 4
    assert b.block_ids == [0, 2]


def test_prefix_hit_stops_at_the_first_differing_block():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit_and_compute(manager, make_request("a", PROMPT_12))
    # Block 1 differs, so block 2 cannot match either (its hash chains through block 1).
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 99, 9, 10, 11, 12, 13])
    assert manager.find_prefix_hit(b).block_ids == [0]


def test_same_tokens_in_a_different_position_do_not_hit():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit_and_compute(manager, make_request("a", PROMPT_12))
    b = make_request("b", [5, 6, 7, 8, 1, 2, 3, 4, 0])  # a's blocks 1 and 0, swapped
    assert manager.find_prefix_hit(b).block_ids == []


def test_block_hashes_chain_through_the_parent():
    assert hash_block_tokens(None, [1, 2]) == hash_block_tokens(None, [1, 2])
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    parent_a, parent_b = hash_block_tokens(None, [1]), hash_block_tokens(None, [2])
    assert hash_block_tokens(parent_a, [3]) != hash_block_tokens(parent_b, [3])


def test_duplicate_content_is_registered_once_and_the_copy_is_freed_plainly():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a, b = make_request("a", PROMPT_12), make_request("b", PROMPT_12)
    # Both admitted before either is computed: no hit for b, so it gets its own blocks.
    assert manager.allocate(a, 12, manager.find_prefix_hit(a))
    assert manager.allocate(b, 12, manager.find_prefix_hit(b))
    assert (a.block_ids, b.block_ids) == ([0, 1, 2], [3, 4, 5])
    for request in (a, b):
        request.num_computed_tokens = 12
        manager.cache_computed_blocks(request)
    assert manager.pool.num_cached_blocks == 3
    assert [manager.pool.get_cached_block(h) for h in b.block_hashes] == [0, 1, 2]
    assert manager.pool.block_hashes[3:6] == [None, None, None]
    manager.free(b)
    # b's copies hold no hash: they go to the front, ahead of the never-used blocks.
    assert manager.pool.free_block_ids() == [3, 4, 5, 6, 7]


def test_two_requests_sharing_a_prefix_hold_one_reference_each():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    a = make_request("a", PROMPT_12)
    admit_and_compute(manager, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 70, 71])
    admit_and_compute(manager, b)
    assert b.block_ids == [0, 1, 3]
    assert manager.pool.ref_counts[:4] == [2, 2, 1, 1]
    manager.free(a)
    assert manager.pool.ref_counts[:4] == [1, 1, 0, 1]
    assert manager.pool.free_block_ids() == [4, 5, 6, 7, 2]  # shared blocks stay in use
    manager.free(b)
    assert manager.pool.ref_counts[:4] == [0, 0, 0, 0]
    # b's partial block 3 is uncached (front); then b's tail-first order 1, 0 at the back.
    assert manager.pool.free_block_ids() == [3, 4, 5, 6, 7, 2, 1, 0]


def test_freeing_a_request_twice_is_harmless_at_the_manager_level():
    manager = KVCacheManager(num_blocks=4, block_size=BLOCK_SIZE)
    request = make_request("a", [1, 2, 3])
    assert manager.allocate(request, 3)
    manager.free(request)
    manager.free(request)  # the request holds no blocks any more
    assert manager.pool.ref_counts == [0, 0, 0, 0]
    assert manager.num_free_blocks == 4


def test_prefix_stats_are_counted_in_tokens():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    admit_and_compute(manager, make_request("a", PROMPT_12))
    assert (manager.prefix_stats.queries, manager.prefix_stats.hits) == (12, 0)
    admit_and_compute(manager, make_request("b", PROMPT_12))
    # 12 tokens queried, 8 served (2 blocks: the last token is never served from cache).
    assert (manager.prefix_stats.queries, manager.prefix_stats.hits) == (24, 8)


def test_allocate_without_a_hit_argument_is_not_a_prefix_query():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE)
    assert manager.allocate(make_request("a", PROMPT_12), 12)
    assert (manager.prefix_stats.queries, manager.prefix_stats.hits) == (0, 0)


def test_prefix_caching_disabled_never_hits():
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK_SIZE, enable_prefix_caching=False)
    admit_and_compute(manager, make_request("a", PROMPT_12))
    b = make_request("b", PROMPT_12)
    assert manager.find_prefix_hit(b).block_ids == []
    assert manager.pool.num_cached_blocks == 0
