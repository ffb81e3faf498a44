"""A worker running skip-join MLFQ with a host KV tier: exact outputs under constant
preemption and swapping, and a load report that shows queues, swaps and sessions."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from lmfleet.proto.v1 import worker_pb2 as pb
from lmfleet.proto.v1 import worker_pb2_grpc
from lmfleet.worker import LLM, SamplingParams
from lmfleet.worker.model.arch import ArchConfig
from tests.integration.worker_process import start_worker

pytestmark = [pytest.mark.integration, pytest.mark.model]

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time,",
           "List three primary colors:", "1, 2, 3, 4, 5,", "The quick brown fox",
           "Q: What is the boiling point of water?\nA:", "My favourite food is"]
MAX_TOKENS = 20
# A microsecond quantum with a round-robin last queue reorders the jobs every step, and
# 10 device blocks for 3 running jobs force swaps. A fixed 4 s deadline turns the deadline
# lane on from the start (jobs older than 1 s are urgent), so it may reorder them too.
WORKER_ARGS = ["--scheduler", "mlfq", "--host-kv-memory", "64MiB", "--num-kv-blocks", "10",
               "--max-num-seqs", "3", "--mlfq-base-quantum-s", "0.000001",
               "--mlfq-starvation-s", "1000000", "--mlfq-queue-order", "arrival",
               "--mlfq-last-queue", "round_robin",
               "--mlfq-num-queues", "8", "--mlfq-deadline-s", "4"]


@pytest.fixture(scope="module")
def reference(default_model_dir):
    llm = LLM(str(default_model_dir))
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate(ids, SamplingParams(max_tokens=MAX_TOKENS, temperature=0),
                           use_tqdm=False)
    return ids, [o.output_token_ids for o in outputs]


async def _generate(address, ids, session_id=None):
    async with grpc.aio.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)

        async def one(index, prompt):
            request = pb.GenerateRequest(
                request_id=f"r{index}-{session_id}", prompt_token_ids=prompt,
                session_id=session_id,
                sampling_params=pb.SamplingParams(max_tokens=MAX_TOKENS, temperature=0))
            tokens = []
            async for message in stub.Generate(request, timeout=300):
                tokens.extend(message.chunk.token_ids)
            return tokens

        return await asyncio.gather(*(one(i, p) for i, p in enumerate(ids)))


def test_mlfq_worker_is_exact_and_reports_queues_swaps_and_sessions(default_model_dir,
                                                                    reference):
    ids, expected = reference
    with start_worker(default_model_dir, WORKER_ARGS) as address:
        assert asyncio.run(_generate(address, ids)) == expected
        with grpc.insecure_channel(address) as channel:
            stub = worker_pb2_grpc.WorkerStub(channel)
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
            assert load.scheduler == "mlfq"
            assert [q.name for q in load.queues] == [
                *(f"mlfq-q{i}" for i in range(8)), "mlfq-deadline-lane"]
            assert load.num_swap_out_blocks > 0 and load.num_swap_in_blocks > 0
            # Bytes follow from the model: 16 tokens x K and V of every layer, fp32.
            arch = ArchConfig.from_model_dir(default_model_dir)
            block_bytes = 16 * arch.kv_bytes_per_token * 4
            assert load.swap_out_bytes == load.num_swap_out_blocks * block_bytes
            assert load.swap_in_bytes == load.num_swap_in_blocks * block_bytes
            assert load.num_preemptions > 0
            assert load.cost_model.prefill_per_token_s > 0
            assert load.num_total_host_blocks > 0
            # A finished turn of a session keeps its KV in host memory.
            asyncio.run(_generate(address, ids[:1], session_id="chat"))
            load = stub.GetLoad(pb.GetLoadRequest(), timeout=30)
            assert load.num_sessions == 1
            assert load.host_kv_cache_usage > 0
