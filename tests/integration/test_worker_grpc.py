"""`lmfleet worker` over real gRPC: a worker subprocess on the embedded SmolLM2, a real
client on the generated stubs, and the offline `LLM` as the reference for greedy tokens.

One module-scoped worker (context 64 tokens) serves most tests; drain and SIGTERM each
get their own, since both end a worker's life.
"""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from lmfleet.proto.v1 import worker_pb2 as pb
from lmfleet.proto.v1 import worker_pb2_grpc
from lmfleet.worker import LLM, SamplingParams
from tests.integration.worker_process import start_worker, worker_process

pytestmark = [pytest.mark.integration, pytest.mark.model]

MAX_MODEL_LEN = 64
RPC_TIMEOUT = 180  # seconds; generous for a shared 2-core machine, but bounded
INVALID = pb.GenerateError.INVALID_ARGUMENT
UNAVAILABLE = pb.GenerateError.UNAVAILABLE

_SUBJECTS = ["the ocean", "a small robot", "the city of Paris", "winter mornings",
             "an old lighthouse", "prime numbers", "a cup of coffee", "the night sky"]
_TEMPLATES = ["Write one sentence about {}:", "Here is a fact about {}.", "Q: What is {}?\nA:",
              "A short poem about {}\n", "My teacher told me that {}",
              "The most surprising thing about {} is", "Describe {} in three words:",
              "Once upon a time, {}"]
PROMPTS = [t.format(s) for t in _TEMPLATES for s in _SUBJECTS]  # 64 varied prompts


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(str(default_model_dir), max_model_len=MAX_MODEL_LEN)


@pytest.fixture(scope="module")
def prompt_ids(llm):
    ids = [llm.tokenizer.encode(p) for p in PROMPTS]
    # Short enough that a run to the context is over twice as long as 24 tokens.
    assert max(len(i) for i in ids) + 2 * 24 < MAX_MODEL_LEN
    return ids


@pytest.fixture(scope="module")
def reference(llm, prompt_ids):
    """Offline greedy outputs (24 tokens at most) of every prompt, computed once."""
    outputs = llm.generate(prompt_ids, SamplingParams(max_tokens=24, temperature=0),
                           use_tqdm=False)
    return [list(o.output_token_ids) for o in outputs]


@pytest.fixture(scope="module")
def address(default_model_dir):
    with start_worker(default_model_dir, ["--max-model-len", str(MAX_MODEL_LEN)]) as address:
        yield address


@pytest.fixture(scope="module")
def stub(address):
    with grpc.insecure_channel(address) as channel:
        yield worker_pb2_grpc.WorkerStub(channel)


def _request(request_id, prompt, **params) -> pb.GenerateRequest:
    return pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt,
                              sampling_params=pb.SamplingParams(**params))


def _collect(responses) -> tuple[list[int], list, pb.GenerateResponse]:
    """(token ids, chunks, last message) of a whole Generate stream."""
    messages = list(responses)
    chunks = [m.chunk for m in messages[:-1]]
    assert all(m.WhichOneof("response") == "chunk" for m in messages[:-1])
    return [t for c in chunks for t in c.token_ids], chunks, messages[-1]


def _load(stub) -> pb.LoadReport:
    return stub.GetLoad(pb.GetLoadRequest(), timeout=RPC_TIMEOUT)


def _wait_idle(stub, timeout: float = 60.0) -> pb.LoadReport:
    deadline = time.monotonic() + timeout
    while True:
        load = _load(stub)
        idle = load.num_running == 0 and load.num_waiting == 0
        if (idle and load.num_free_blocks == load.num_total_blocks) or time.monotonic() > deadline:
            return load
        time.sleep(0.1)


# ---- generation ---------------------------------------------------------------------


def test_greedy_stream_matches_offline(stub, prompt_ids, reference):
    for index in (0, 13, 42):
        responses = stub.Generate(_request(f"greedy-{index}", prompt_ids[index],
                                           temperature=0, max_tokens=16), timeout=RPC_TIMEOUT)
        tokens, chunks, last = _collect(responses)
        assert tokens == reference[index][:16]
        assert all(len(c.token_ids) >= 1 and not c.logprobs for c in chunks)
        assert last.WhichOneof("response") == "complete"
        expected_reason = "length" if len(tokens) == 16 else "stop"
        assert last.complete.finish_reason == expected_reason
        assert last.complete.prompt_tokens == len(prompt_ids[index])
        assert last.complete.completion_tokens == len(tokens)


def test_logprobs_come_with_each_token(stub, llm, prompt_ids):
    params = SamplingParams(max_tokens=6, temperature=0, logprobs=3)
    offline = llm.generate([prompt_ids[5]], params, use_tqdm=False)[0]
    responses = stub.Generate(_request("logprobs", prompt_ids[5], max_tokens=6, temperature=0,
                                       logprobs=3), timeout=RPC_TIMEOUT)
    tokens, chunks, last = _collect(responses)
    assert tokens == offline.output_token_ids
    received = [lp for c in chunks for lp in c.logprobs]
    assert [lp.token_id for lp in received] == tokens
    for got, want in zip(received, offline.logprobs, strict=True):
        assert list(got.top_token_ids) == list(want.top_token_ids)
        assert len(got.top_logprobs) == 3 and got.top_token_ids[0] == got.token_id  # greedy
        assert got.logprob == pytest.approx(want.logprob, abs=1e-3)
    assert last.complete.completion_tokens == 6


@pytest.mark.parametrize(("case", "request_kwargs", "message"), [
    ("empty prompt", dict(prompt=[]), "prompt is empty"),
    ("too long", dict(prompt=[100] * MAX_MODEL_LEN), "context is 64 tokens"),
    ("token out of vocab", dict(prompt=[1, 49152]), "outside the vocabulary"),
    ("top_p 0", dict(prompt=[1, 2], top_p=0.0), "top_p"),
    ("max_tokens 0", dict(prompt=[1, 2], max_tokens=0), "max_tokens"),
    ("no request id", dict(prompt=[1, 2], request_id=""), "request_id is required"),
])
def test_bad_input_is_one_invalid_argument_event(stub, case, request_kwargs, message):
    kwargs = dict(request_kwargs)
    request = _request(kwargs.pop("request_id", f"bad-{case}"), kwargs.pop("prompt"), **kwargs)
    messages = list(stub.Generate(request, timeout=RPC_TIMEOUT))
    assert len(messages) == 1
    assert messages[0].WhichOneof("response") == "error"
    assert messages[0].error.kind == INVALID
    assert message in messages[0].error.message
    assert "Traceback" not in messages[0].error.message
    # The worker keeps serving, and the rejected request left nothing behind.
    tokens, _, last = _collect(stub.Generate(
        _request(f"after-{case}", [1, 2, 3], max_tokens=2, temperature=0), timeout=RPC_TIMEOUT))
    assert len(tokens) >= 1 and last.complete.finish_reason in ("length", "stop")


def test_abort_rpc_ends_a_running_stream(stub):
    responses = stub.Generate(_request("to-abort", [1, 2, 3], temperature=0, ignore_eos=True),
                              timeout=RPC_TIMEOUT)
    first = next(responses)
    assert first.WhichOneof("response") == "chunk"
    reply = stub.Abort(pb.AbortRequest(request_ids=["to-abort", "no-such-request"]),
                       timeout=RPC_TIMEOUT)
    assert reply.num_aborted == 1
    tokens, _, last = _collect(responses)
    assert last.WhichOneof("response") == "complete"
    assert last.complete.finish_reason == "abort"
    # Without the abort it would have run to the context (61 tokens).
    assert last.complete.completion_tokens < MAX_MODEL_LEN - 3
    assert last.complete.completion_tokens == 1 + len(tokens)


# ---- services -------------------------------------------------------------------------


@pytest.mark.parametrize("service", ["", "lmfleet.v1.Worker"])
def test_health_is_serving(address, service):
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=RPC_TIMEOUT)
    assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_services(address):
    with grpc.insecure_channel(address) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = list(stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            timeout=RPC_TIMEOUT))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"lmfleet.v1.Worker", "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection"} <= names


def test_model_info(stub, default_model_dir, llm):
    info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=RPC_TIMEOUT)
    assert info.model_name == default_model_dir.name
    assert info.model_path == str(default_model_dir.resolve())
    assert info.max_model_len == MAX_MODEL_LEN
    assert info.vocab_size == 49152
    assert list(info.eos_token_ids) == list(llm.engine.eos_token_ids)


def test_get_load_reports_an_idle_worker_after_work(stub):
    list(stub.Generate(_request("load", [1, 2, 3, 4], max_tokens=4, temperature=0,
                                ignore_eos=True), timeout=RPC_TIMEOUT))
    load = _wait_idle(stub)
    assert (load.num_running, load.num_waiting, load.num_swapped) == (0, 0, 0)
    assert load.num_total_blocks > 0 and load.num_free_blocks == load.num_total_blocks
    assert load.kv_cache_usage == 0.0
    assert load.prefix_cache_queries >= 4
    assert load.generation_tokens_per_second > 0  # 4 tokens within the recent window
    assert not load.draining
    assert [(q.name, q.num_running, q.num_waiting) for q in load.queues] == [("fcfs", 0, 0)]


# ---- concurrency and cancellation ------------------------------------------------------


async def _stream(channel, request_id, prompt, cancel_after=None):
    """Token ids of one stream and its last event (None if cancelled by us).

    A stream to be cancelled asks for tokens up to the context (more than twice the 24 of
    the others), so if cancelling did not abort it, it would still run when they end.
    """
    stub = worker_pb2_grpc.WorkerStub(channel)
    params = (dict(ignore_eos=True) if cancel_after is not None else dict(max_tokens=24))
    call = stub.Generate(_request(request_id, prompt, temperature=0, **params),
                         timeout=RPC_TIMEOUT)
    tokens = []
    async for message in call:
        if message.WhichOneof("response") != "chunk":
            return tokens, message
        tokens.extend(message.chunk.token_ids)
        if cancel_after is not None and len(tokens) >= cancel_after:
            call.cancel()
            return tokens, None
    raise AssertionError(f"{request_id}: stream ended without complete or error")


async def _run_concurrently(address, prompt_ids, tag, cancelled=frozenset()):
    async with grpc.aio.insecure_channel(address) as channel:
        return await asyncio.gather(*(
            _stream(channel, f"{tag}-{i}", prompt, cancel_after=2 if i in cancelled else None)
            for i, prompt in enumerate(prompt_ids)))


def test_64_concurrent_streams_match_offline_and_cancel_frees_everything(
        address, stub, prompt_ids, reference):
    results = asyncio.run(_run_concurrently(address, prompt_ids, "all"))
    for i, (tokens, last) in enumerate(results):
        assert last.WhichOneof("response") == "complete", (i, last)
        assert tokens == reference[i], PROMPTS[i]

    cancelled = frozenset(range(0, 60, 3))  # 20 of them
    results = asyncio.run(_run_concurrently(address, prompt_ids, "cancel", cancelled))
    for i, (tokens, last) in enumerate(results):
        if i in cancelled:
            assert last is None and len(tokens) >= 2, (i, tokens)
            assert tokens[:len(reference[i])] == reference[i][:len(tokens)]
        else:
            assert last.WhichOneof("response") == "complete", (i, last)
            assert tokens == reference[i], PROMPTS[i]
    # The cancelled requests were aborted by the worker, not left to run to the context.
    cancelled_ids = [f"cancel-{i}" for i in sorted(cancelled)]
    assert stub.Abort(pb.AbortRequest(request_ids=cancelled_ids),
                      timeout=RPC_TIMEOUT).num_aborted == 0
    load = _wait_idle(stub)
    assert load.num_running == 0 and load.num_waiting == 0
    assert load.num_free_blocks == load.num_total_blocks


# ---- draining and shutdown ---------------------------------------------------------------


def test_drain_finishes_in_flight_and_refuses_new_work(default_model_dir):
    with start_worker(default_model_dir) as address, grpc.insecure_channel(address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        health = health_pb2_grpc.HealthStub(channel)
        responses = stub.Generate(_request("in-flight", [1, 2, 3], temperature=0,
                                           max_tokens=40, ignore_eos=True), timeout=RPC_TIMEOUT)
        assert next(responses).WhichOneof("response") == "chunk"

        quick = stub.Drain(pb.DrainRequest(timeout_seconds=0), timeout=RPC_TIMEOUT)
        assert quick.num_unfinished == 1
        assert _load(stub).draining
        refused = list(stub.Generate(_request("new", [1, 2], max_tokens=2), timeout=RPC_TIMEOUT))
        assert len(refused) == 1 and refused[0].error.kind == UNAVAILABLE
        for service in ("", "lmfleet.v1.Worker"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service),
                                 timeout=RPC_TIMEOUT)
            assert reply.status == health_pb2.HealthCheckResponse.NOT_SERVING

        drained = {}
        waiter = threading.Thread(target=lambda: drained.update(
            reply=stub.Drain(pb.DrainRequest(), timeout=RPC_TIMEOUT)))
        waiter.start()
        tokens, _, last = _collect(responses)
        waiter.join(RPC_TIMEOUT)
        assert last.complete.finish_reason == "length"
        assert last.complete.completion_tokens == 40 and len(tokens) == 39
        assert drained["reply"].num_unfinished == 0


def test_the_embedded_model_is_served_as_default_as_under_serve(default_model_dir):
    # Under either of its names, so README examples (model "default") work through a
    # router in front of `lmfleet worker --model default` as they do under `serve`.
    for alias in ("default", "SmolLM2-135M-Instruct"):
        with worker_process(alias, ["--max-model-len", "256"]) as worker, \
                grpc.insecure_channel(worker.address) as channel:
            assert worker.model_name == "default"
            info = worker_pb2_grpc.WorkerStub(channel).GetModelInfo(pb.GetModelInfoRequest(),
                                                                     timeout=RPC_TIMEOUT)
            assert info.model_name == "default"


def test_sigterm_lets_the_in_flight_stream_finish_then_exits_0(default_model_dir):
    with worker_process(default_model_dir, ["--drain-timeout", "120"]) as worker, \
            grpc.insecure_channel(worker.address) as channel:
        stub = worker_pb2_grpc.WorkerStub(channel)
        responses = stub.Generate(_request("last-one", [1, 2, 3], temperature=0,
                                           max_tokens=30, ignore_eos=True), timeout=RPC_TIMEOUT)
        assert next(responses).WhichOneof("response") == "chunk"
        worker.process.send_signal(signal.SIGTERM)
        tokens, _, last = _collect(responses)
        assert last.complete.finish_reason == "length"
        assert last.complete.completion_tokens == 30 and len(tokens) == 29
        assert worker.process.wait(timeout=120) == 0


# ---- engine failures (in process: a fault injected into the real engine) ------------------


def test_a_failed_step_reaches_every_stream_and_the_engine_keeps_serving(
        llm, prompt_ids, reference, monkeypatch):
    from lmfleet.worker.async_engine import AsyncEngine, EngineStepError

    engine = llm.engine
    real_launch = engine.runner.launch
    calls = []

    def launch_failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("injected device fault")
        return real_launch(*args, **kwargs)

    monkeypatch.setattr(engine.runner, "launch", launch_failing_once)

    async def consume(async_engine, index):
        tokens = []
        try:
            async for output in async_engine.generate(
                    f"fault-{index}-{len(calls)}", prompt_ids[index],
                    SamplingParams(max_tokens=24, temperature=0)):
                tokens.extend(output.new_token_ids)
        except EngineStepError as error:
            return error
        return tokens

    async def main():
        async_engine = AsyncEngine(engine)
        async_engine.start()
        try:
            failed = await asyncio.wait_for(
                asyncio.gather(*(consume(async_engine, i) for i in range(4))), RPC_TIMEOUT)
            after = await asyncio.wait_for(consume(async_engine, 7), RPC_TIMEOUT)
            return failed, after, async_engine.load()
        finally:
            await asyncio.to_thread(async_engine.shutdown)

    failed, after, load = asyncio.run(main())
    assert all(isinstance(result, EngineStepError) for result in failed), failed
    assert "injected device fault" in str(failed[0])
    assert after == reference[7]
    assert load.num_running == 0 and load.num_free_blocks == load.num_total_blocks
