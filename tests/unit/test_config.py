"""EngineConfig: flat options routed to their sub-config, bad values and names refused."""

from __future__ import annotations

import pytest
import torch

from lmfleet.worker.config import (
    CacheConfig,
    EngineConfig,
    ModelConfig,
    SchedulerConfig,
    parse_dtype,
)
from lmfleet.worker.kv.manager import KVCacheManager
from lmfleet.worker.scheduler.base import make_scheduler
from lmfleet.worker.scheduler.fcfs import FCFSScheduler

INVALID_OPTIONS = [
    ("dtype", "float64"),
    ("dtype", "int8"),
    ("dtype", "FP32"),
    ("device", "tpu"),
    ("device", "gpu"),
    ("device", ""),
    ("max_model_len", 0),
    ("max_model_len", -1),
    ("block_size", 0),
    ("block_size", -16),
    ("block_size", 3),
    ("block_size", 12),
    ("num_kv_blocks", 0),
    ("kv_cache_memory_bytes", 0),
    ("kv_cache_memory_fraction", 0.0),
    ("kv_cache_memory_fraction", 1.5),
    ("max_num_seqs", 0),
    ("max_num_batched_tokens", 0),
    ("mlfq_queue_order", "fifo"),
    ("mlfq_last_queue", "lifo"),
    ("mlfq_deadline_s", 0.0),
    ("mlfq_deadline_s", -5.0),
    ("mlfq_deadline_slack", -1.0),
    ("mlfq_deadline_slack", float("nan")),
]


@pytest.mark.parametrize(("name", "value"), INVALID_OPTIONS,
                         ids=[f"{n}={v!r}" for n, v in INVALID_OPTIONS])
def test_invalid_option_raises_value_error_naming_it(name, value):
    with pytest.raises(ValueError, match=name):
        EngineConfig.from_options("default", **{name: value})


VALID_OPTIONS = [
    ("dtype", "auto"),
    ("dtype", "float32"),
    ("dtype", "bf16"),
    ("dtype", "half"),
    ("device", "cpu"),
    ("device", "cuda"),
    ("device", "cuda:1"),
    ("max_model_len", 1),
    ("block_size", 1),
    ("block_size", 16),
    ("block_size", 256),
    ("num_kv_blocks", 1),
    ("kv_cache_memory_bytes", 1),
    ("kv_cache_memory_fraction", 1.0),
    ("enable_prefix_caching", False),
    ("max_num_seqs", 1),
    ("max_num_batched_tokens", 1),
    ("mlfq_queue_order", "arrival"),
    ("mlfq_queue_order", "least_attained"),
    ("mlfq_deadline_s", 0.001),
    ("mlfq_deadline_slack", 0.0),
    ("mlfq_deadline_slack", 0.8),
    ("mlfq_deadline_slack", 1.0),
]


@pytest.mark.parametrize(("name", "value"), VALID_OPTIONS,
                         ids=[f"{n}={v!r}" for n, v in VALID_OPTIONS])
def test_valid_edge_option_is_accepted(name, value):
    config = EngineConfig.from_options("default", **{name: value})
    owner = next(sub for sub in (config.model, config.cache, config.scheduler)
                 if hasattr(sub, name))
    assert getattr(owner, name) == value


def test_a_round_robin_last_queue_needs_arrival_order():
    with pytest.raises(ValueError, match="mlfq_queue_order='arrival'"):
        EngineConfig.from_options("default", mlfq_last_queue="round_robin")
    config = EngineConfig.from_options("default", mlfq_last_queue="round_robin",
                                       mlfq_queue_order="arrival")
    assert config.scheduler.mlfq_last_queue == "round_robin"


def test_unknown_option_raises_value_error_naming_it():
    with pytest.raises(ValueError, match=r"unknown engine option 'max_num_seq'"):
        EngineConfig.from_options("default", max_num_seq=8)


def test_unknown_option_message_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"known: \[.*'max_num_seqs'"):
        EngineConfig.from_options("default", gpu_memory_utilization=0.9)


def test_options_are_routed_to_the_sub_config_that_owns_them():
    config = EngineConfig.from_options("/models/x", dtype="bf16", block_size=8, max_num_seqs=4,
                                       max_num_batched_tokens=32, seed=7)
    assert config.model == ModelConfig(model="/models/x", dtype="bf16")
    assert config.cache == CacheConfig(block_size=8)
    assert config.scheduler == SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=32)
    assert config.seed == 7


def test_unknown_attention_backend_is_a_value_error():
    with pytest.raises(ValueError, match="attention_backend 'flash'.*auto, triton, torch"):
        EngineConfig.from_options("default", attention_backend="flash")


def test_defaults():
    config = EngineConfig.from_options()
    assert config.model.model == "default"
    assert config.cache.block_size is None  # the attention backend chooses
    assert config.model.attention_backend == "auto"
    assert config.model.enforce_eager is False
    assert config.cache.enable_prefix_caching is True
    assert config.scheduler.policy == "fcfs"
    assert config.seed == 0


@pytest.mark.parametrize(("dtype", "device", "expected"), [
    ("auto", "cpu", torch.float32),
    ("auto", "cuda", torch.bfloat16),
    ("fp16", "cpu", torch.float16),
    ("bfloat16", "cpu", torch.bfloat16),
])
def test_torch_dtype_resolves_auto_by_device(dtype, device, expected):
    assert ModelConfig(dtype=dtype, device=device).torch_dtype is expected


def test_parse_dtype_accepts_supported_torch_dtypes_and_rejects_others():
    assert parse_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="float64"):
        parse_dtype(torch.float64)


def test_configs_are_frozen():
    config = CacheConfig()
    with pytest.raises(AttributeError):
        config.block_size = 32  # type: ignore[misc]


def test_make_scheduler_builds_fcfs_and_rejects_unknown_policies():
    kv_manager = KVCacheManager(num_blocks=4, block_size=4)
    assert isinstance(make_scheduler(SchedulerConfig(policy="fcfs"), kv_manager), FCFSScheduler)
    with pytest.raises(ValueError, match="unknown scheduler policy 'lifo'"):
        make_scheduler(SchedulerConfig(policy="lifo"), kv_manager)
