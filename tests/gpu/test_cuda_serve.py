"""`lmfleet serve --device cuda`: a Ray-placed replica on the GPU serves the same greedy
tokens as Hugging Face transformers on the same weights (float32), through the router's
OpenAI API and straight over the replica's gRPC, one request and a concurrent batch.

Real processes (serve, Ray, the replica actor); run on the device machine with the fleet's
packages (Ray, FastAPI, ...) importable; skipped where CUDA is absent.
"""

from __future__ import annotations

import random

import pytest
import torch

from tests.conftest import hf_greedy, make_tiny_model
from tests.integration.serve_process import start_serve
from tests.integration.test_served_text import add_metaspace_tokenizer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = make_tiny_model(tmp_path_factory.mktemp("serve_cuda") / "llama", "llama")
    add_metaspace_tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 60))] for _ in range(10)]


@pytest.fixture(scope="module")
def expected(model_dir, prompts) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    return [hf_greedy(model, ids, MAX_TOKENS, min_new_tokens=MAX_TOKENS) for ids in prompts]


@pytest.fixture(scope="module")
def serve(model_dir):
    pytest.importorskip("ray")
    with start_serve(["--model", str(model_dir), "--model-name", "tiny", "--device", "cuda",
                      "--dtype", "float32", "--max-model-len", "128"]) as process:
        yield process


def gpu_pids() -> set[int]:
    import pynvml

    pynvml.nvmlInit()
    try:
        pids = set()
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            pids |= {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
        return pids
    finally:
        pynvml.nvmlShutdown()


def test_the_replica_runs_on_the_gpu(serve):
    (pid,) = serve.worker_pids
    assert pid in gpu_pids()


def generate_ids(address: str, prompt: list[int]) -> list[int]:
    import grpc

    from lmfleet.proto.v1 import serving_pb2 as pb
    from lmfleet.proto.v1 import serving_pb2_grpc
    from tests.integration.test_router_grpc import collect

    params = pb.GenerationParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with grpc.insecure_channel(address) as channel:
        _, token_ids, _ = collect(serving_pb2_grpc.ServingStub(channel).Generate(
            pb.ServingGenerateRequest(model="tiny", token_ids=pb.TokenIds(ids=prompt),
                                      params=params), timeout=120))
    return token_ids


def test_router_grpc_streams_equal_hf_float32_one_and_all_at_once(serve, prompts, expected):
    from concurrent.futures import ThreadPoolExecutor

    assert generate_ids(serve.grpc, prompts[0]) == expected[0]
    with ThreadPoolExecutor(len(prompts)) as pool:
        served = list(pool.map(lambda ids: generate_ids(serve.grpc, ids), prompts))
    assert served == expected


def test_http_completions_text_equals_offline_text(serve, model_dir, prompts):
    import httpx

    from lmfleet.worker import LLM, SamplingParams

    body = {"model": "tiny", "prompt": prompts, "max_tokens": MAX_TOKENS, "temperature": 0,
            "ignore_eos": True}
    response = httpx.post(f"{serve.base_url}/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    choices = sorted(response.json()["choices"], key=lambda c: c["index"])
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    with LLM(str(model_dir), max_model_len=128) as llm:  # on the CPU
        offline = llm.generate(prompts, params, use_tqdm=False)
    assert [c["text"] for c in choices] == [o.text for o in offline]
