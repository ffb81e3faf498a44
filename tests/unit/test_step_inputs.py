"""StepInputs: a step's batch laid out in the runner's persistent int32 buffers, exactly:
decodes first, slots through the block table, padding rows that store and see nothing,
tokens still on the device marked for the runner, and steps too big for the buffers."""

from __future__ import annotations

import numpy as np
import torch

from lmfleet.worker.request import Request
from lmfleet.worker.runner.cuda_graphs import graph_buckets
from lmfleet.worker.runner.step_inputs import StepInputs
from lmfleet.worker.sampling_params import SamplingParams
from lmfleet.worker.scheduler.base import ScheduledRequest

BLOCK = 4


def request(request_id: str, tokens: list[int], computed: int, blocks: list[int]) -> Request:
    req = Request(request_id, tokens, SamplingParams(max_tokens=8))
    req.num_computed_tokens = computed
    req.block_ids = blocks
    return req


def inputs() -> StepInputs:
    return StepInputs(max_num_tokens=16, max_num_reqs=4, max_blocks_per_req=4,
                      block_size=BLOCK, device=torch.device("cpu"))


def test_decodes_then_a_prefill_chunk_are_laid_out_exactly():
    decode_a = request("a", [11, 12, 13, 14, 15, 16], 5, [7, 2])  # position 5 -> block 2
    decode_b = request("b", [21, 22], 1, [9])
    chunk = request("c", list(range(30, 40)), 3, [4, 5, 6])  # positions 3..6 of 10
    batch = inputs().prepare([ScheduledRequest(decode_a, 1), ScheduledRequest(decode_b, 1),
                              ScheduledRequest(chunk, 4)], num_decodes=2)
    common = batch.common
    assert batch.input_ids.tolist() == [16, 22, 33, 34, 35, 36]
    assert batch.positions.tolist() == [5, 1, 3, 4, 5, 6]
    assert common.slot_mapping.tolist() == [2 * BLOCK + 1, 9 * BLOCK + 1, 4 * BLOCK + 3,
                                            5 * BLOCK, 5 * BLOCK + 1, 5 * BLOCK + 2]
    assert common.query_start_loc.tolist() == [0, 1, 2, 6]
    assert common.seq_lens.tolist() == [6, 2, 7]
    assert common.block_tables.tolist() == [[7, 2, 0, 0], [9, 0, 0, 0], [4, 5, 0, 0]]
    assert (common.num_decodes, common.num_prefills, common.max_query_len) == (2, 1, 4)
    # The chunk does not reach the end of its prompt: only the decodes sample.
    assert batch.sample_rows == [0, 1] and batch.sample_requests == [decode_a, decode_b]
    assert batch.placeholder_rows == []


def test_padding_rows_store_nothing_and_see_nothing():
    buffers = inputs()
    first = request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9], 8, [3, 1, 2])
    buffers.prepare([ScheduledRequest(first, 1)] * 3, num_decodes=3)  # leave stale rows
    decode = request("b", [5, 6, 7], 2, [8])
    batch = buffers.prepare([ScheduledRequest(decode, 1)], num_decodes=1, pad_to=4)
    common = batch.common
    assert batch.num_padded_reqs == 4 and common.num_decodes == 4
    assert common.slot_mapping.tolist() == [8 * BLOCK + 2, -1, -1, -1]
    assert common.seq_lens.tolist() == [3, 0, 0, 0]
    assert common.query_start_loc.tolist() == [0, 1, 2, 3, 4]
    assert batch.input_ids.tolist() == [7, 0, 0, 0]
    assert common.block_tables.tolist() == [[8, 0, 0, 0]] + [[0, 0, 0, 0]] * 3
    assert batch.sample_rows == [0]


def test_a_token_still_on_the_device_is_marked_for_the_runner():
    decode = request("a", [1, 2, 3], 3, [0])
    decode.append_placeholder()  # sampled by the step in flight
    batch = inputs().prepare([ScheduledRequest(decode, 1)], num_decodes=1)
    assert batch.placeholder_rows == [(0, decode)]
    assert batch.positions.tolist() == [3] and batch.common.slot_mapping.tolist() == [3]


def test_a_step_larger_than_the_buffers_gets_fresh_tensors():
    buffers = inputs()
    long_prefill = request("a", list(range(2, 22)), 0, [0, 1, 2, 3, 4])  # 20 tokens > 16
    batch = buffers.prepare([ScheduledRequest(long_prefill, 20)], num_decodes=0)
    assert batch.input_ids.tolist() == list(range(2, 22))
    assert batch.common.block_tables.tolist() == [[0, 1, 2, 3, 4]]
    assert np.array_equal(batch.common.seq_lens_host, [20])
    assert batch.sample_rows == [19] and not batch.persistent


def test_graph_buckets_cover_every_batch_size_up_to_the_maximum():
    assert graph_buckets(1) == [1]
    assert graph_buckets(20) == [1, 2, 4, 8, 16, 20]
    buckets = graph_buckets(256)
    assert buckets[:5] == [1, 2, 4, 8, 16] and buckets[-1] == 256
    gaps = [b - a for a, b in zip(buckets, buckets[1:], strict=False)]
    assert max(gaps) <= 8  # at most 7 padding rows
