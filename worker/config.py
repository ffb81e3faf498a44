"""Engine configuration: frozen dataclasses, one per concern, gathered in `EngineConfig`.

Users pass flat keyword options (`LLM(model, max_num_seqs=8, block_size=16)`, like vLLM);
`EngineConfig.from_options` routes each to the sub-config that owns it and rejects
unknown names with a ValueError, so a typo never silently does nothing.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from lmfleet.worker.options import config_fields, option

if TYPE_CHECKING:
    import torch

# dtype names -> torch attribute names (torch is imported when a dtype is parsed, so the
# command line can read the options without it).
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
}


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
               "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3, "t": 1000**4,
               "tb": 1000**4, "tib": 1024**4}


def parse_size(text: str | int) -> int:
    """'4GiB', '512MB', '1e9' or an int -> bytes."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    number = value.rstrip("abcdefghijklmnopqrstuvwxyz ")
    unit = value[len(number):].strip()
    try:
        amount = float(number)
    except ValueError:
        amount = -1.0
    if unit not in _SIZE_UNITS or amount < 0:
        raise ValueError(f"invalid size {text!r}: use bytes or a unit like 512MiB, 4GiB")
    return int(amount * _SIZE_UNITS[unit])


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[dtype])


ATTENTION_BACKENDS = ("auto", "triton", "torch")
QUANTIZATION_METHODS = ("awq", "gguf")
KV_CACHE_DTYPES = ("auto", "int8", "fp8")


@dataclass(frozen=True)
class ModelConfig:
    # A Hugging Face Llama-family directory, or "default" for the embedded SmolLM2.
    model: str = "default"
    # Weight quantization. None: as the checkpoint says (an AWQ directory runs packed, a
    # GGUF file is expanded to the model dtype); "gguf": a GGUF model's blocks kept packed
    # (worker/quant/gguf_packed.py); "awq": the checkpoint must be AWQ.
    quantization: Optional[str] = option(
        None, "weights: gguf keeps a GGUF model's Q4_0/Q4_1/Q8_0 blocks packed ('default' or a "
        ".gguf file); awq requires an AWQ checkpoint; unset: as the checkpoint says",
        choices=QUANTIZATION_METHODS)
    # "auto": float32 on CPU (exactness, and CPUs lack fast bf16 matmuls), bfloat16 on CUDA.
    dtype: str = option("auto", "auto, float32, bfloat16 or float16")
    device: str = option("cpu", "cpu or cuda")
    # None: the model's max_position_embeddings (capped by a sliding window if any).
    max_model_len: Optional[int] = option(None, "context length (None: the model's)")
    # C kernels for CPU float32, built on first use with the system C compiler: decode
    # attention reading the paged cache in place (attention/paged_decode.c) and the fused
    # residual-add + RMSNorm, rotary + KV-store and SiLU-times-up steps (cpu_ops.c).
    # None: on where they build (CPU float32), else the torch ops. True where they cannot
    # run is an error.
    cpu_kernels: Optional[bool] = option(
        None, "C kernels for CPU float32 (decode attention over the paged KV cache, fused "
        "norm, rotary and SiLU steps), built on first use with the system C compiler")
    # Which attention backend runs the paged KV cache (attention/registry.py). "auto":
    # Triton on CUDA, the torch/C path on CPU.
    attention_backend: str = option(
        "auto", "paged attention kernels: triton (CUDA) or torch (gather + SDPA; the C decode "
        "kernel on CPU); auto: triton on CUDA, torch on CPU", choices=ATTENTION_BACKENDS)
    # True: no CUDA graphs (every decode step launches its kernels from Python).
    enforce_eager: bool = option(
        False, "CUDA: launch every step's kernels from Python (no CUDA graphs)")
    # Schedule and launch step N while step N-1 runs on the device (engine.py). None: on
    # for CUDA, off for CPU (where the CPU is the device, so nothing would overlap).
    overlap_steps: Optional[bool] = option(
        None, "launch each step before reading the previous one's tokens back, so the CPU "
        "prepares a step while the GPU runs the last")

    def __post_init__(self) -> None:
        if self.quantization is not None and self.quantization not in QUANTIZATION_METHODS:
            raise ValueError(f"unknown quantization {self.quantization!r}; known: "
                             f"{', '.join(QUANTIZATION_METHODS)}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention_backend {self.attention_backend!r}; known: "
                             f"{', '.join(ATTENTION_BACKENDS)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"invalid device {self.device!r}: use 'cpu' or 'cuda'")
        if self.dtype != "auto":
            parse_dtype(self.dtype)
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"invalid max_model_len={self.max_model_len}: must be >= 1")

    @property
    def torch_dtype(self) -> torch.dtype:
        return parse_dtype(("float32" if self.device == "cpu" else "bfloat16")
                           if self.dtype == "auto" else self.dtype)


@dataclass(frozen=True)
class CacheConfig:
    # Tokens per KV block; None: the attention backend's choice (16 for torch, 64 for
    # Triton, whose kernels read a block's tokens as one tile).
    block_size: Optional[int] = option(None, "tokens per KV block (None: the backend's)")
    # Capacity: an explicit block count wins; else an explicit byte budget; else a fraction
    # of memory (on CUDA: of the device's total, minus what is already in use, as vLLM's
    # gpu_memory_utilization; on CPU: of the memory available to the process).
    num_kv_blocks: Optional[int] = option(
        None, "KV cache blocks (None: from the memory budget)")
    kv_cache_memory_bytes: Optional[int] = None
    kv_cache_memory_fraction: Optional[float] = option(
        None, "share of memory for the KV cache (None: 0.9 of a GPU, 0.2 of free RAM)")
    enable_prefix_caching: bool = option(
        True, "reuse the KV blocks of prompt prefixes seen before")
    # Host-memory tier for swapped-out KV (0: none; preemption then recomputes).
    host_kv_memory_bytes: int = option(
        0, "host-memory KV tier for swapped-out requests and idle chat sessions, e.g. 4GiB "
        "(0: none; preemption then recomputes)", key="host_kv_memory", size=True)
    # On CUDA, run swap copies on a side stream overlapping the forward pass.
    swap_overlap: bool = True
    # Chat sessions: KV kept after a turn ends for this long, and at most this many
    # sessions (least recently used dropped first).
    session_ttl_s: float = option(600.0, "keep an idle chat session's KV this long")
    max_sessions: int = 256
    # Keep decoding requests' KV also contiguous (attention/dense_decode.py), at most as
    # much memory again as the paged cache. None: on for CPU when the decode kernel is not
    # in use (gathering the context every layer is a large share of a CPU decode step);
    # off for CUDA.
    dense_decode_cache: Optional[bool] = option(
        None, "also keep decoding requests' KV contiguous, read in place by decode attention "
        "(auto: on for CPU, off for CUDA)")

    # KV storage: "auto" keeps the model's dtype; "int8" stores each token's K and V per
    # head as int8 codes with a float32 scale and zero (kv/int8_codec.py), "fp8" as e4m3
    # codes with a float32 scale (kv/fp8_codec.py); the attention backends decode as they
    # read.
    kv_cache_dtype: str = option(
        "auto", "KV cache storage: auto (the model dtype), int8 (per-token, per-head scale "
        "and zero) or fp8 (e4m3, per-token, per-head scale): about twice the tokens of a "
        "16-bit cache in the same memory", choices=KV_CACHE_DTYPES)

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; known: "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.block_size is not None and (
                self.block_size < 1 or self.block_size & (self.block_size - 1)):
            raise ValueError(f"invalid block_size={self.block_size}: must be a power of two")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"invalid num_kv_blocks={self.num_kv_blocks}: must be >= 1")
        if self.kv_cache_memory_bytes is not None and self.kv_cache_memory_bytes < 1:
            raise ValueError("invalid kv_cache_memory_bytes: must be positive")
        fraction = self.kv_cache_memory_fraction
        if fraction is not None and not 0 < fraction <= 1:
            raise ValueError(f"invalid kv_cache_memory_fraction={fraction}: must be in (0, 1]")
        if self.host_kv_memory_bytes < 0:
            raise ValueError("invalid host_kv_memory_bytes: must be >= 0")
        if self.session_ttl_s <= 0:
            raise ValueError(f"invalid session_ttl_s={self.session_ttl_s}: must be > 0")
        if self.max_sessions < 0:
            raise ValueError(f"invalid max_sessions={self.max_sessions}: must be >= 0")


SCHEDULER_POLICIES = ("fcfs", "mlfq")
MLFQ_LAST_QUEUE_ORDERS = ("fcfs", "round_robin")
MLFQ_QUEUE_ORDERS = ("least_attained", "arrival")


@dataclass(frozen=True)
class SchedulerConfig:
    policy: str = option("fcfs", "fcfs, or mlfq (skip-join MLFQ, FastServe)",
                         choices=SCHEDULER_POLICIES, key="scheduler")
    max_num_seqs: int = option(256, "requests batched in one step at most")
    # Token budget of one step: decodes count one token each, prefill chunks their length.
    # None: 2048 on CPU; 8192 on CUDA, where a prefill chunk that size still runs at the
    # GPU's matmul rate and fewer chunks mean fewer passes over the weights (LMDeploy's
    # max_prefill_token_num and vLLM's offline default are 8192 too).
    max_num_batched_tokens: Optional[int] = option(
        None, "token budget of one step (None: 2048 on CPU, 8192 on CUDA)")
    # Skip-join MLFQ (FastServe). Quantum of queue i is base * 2**i; None: the cost model's
    # time of one decode step of a half-full batch, measured at start-up. 12 queues: a job
    # reaches the last queue after ~4095 base quanta (about that many decode steps), so
    # output lengths up to a few thousand tokens keep being told apart; with 8, everything
    # past ~255 steps would share one FCFS queue, putting short-ish long jobs behind giant
    # ones. When long outputs are all of one size, 8 is better: levels then only make
    # alike jobs take turns (docs/scheduling.md).
    mlfq_num_queues: int = option(12, "MLFQ: number of queues; quanta double per level")
    mlfq_base_quantum_s: Optional[float] = option(
        None, "MLFQ: quantum of the top queue, seconds (None: from the cost model)")
    # A job that has not run for this long is promoted to the top queue (FastServe: 3 s).
    mlfq_starvation_s: float = option(
        3.0, "MLFQ: promote a job that has not run for this many seconds")
    # Order within a queue. "least_attained": the job with the least service so far runs
    # first (ties: the one that got to the queue first), so in the deep queues, whose
    # quanta last tens of seconds, a job that just arrived there does not wait out another
    # one's whole quantum, which helps the p99 on heavy-tailed output lengths. "arrival":
    # in the order jobs got to the queue; better when long outputs are all of one size,
    # where taking turns only makes alike jobs all finish late (docs/scheduling.md).
    mlfq_queue_order: str = option(
        "least_attained", "MLFQ: order within a queue: least service so far first, or "
        "arrival", choices=MLFQ_QUEUE_ORDERS)
    # With mlfq_queue_order="arrival", the order within the last queue, where the long jobs
    # end up. "fcfs": a job keeps its place when it spends a quantum there, so long jobs
    # finish in the order they got there. "round_robin": it goes to the back, so long jobs
    # share the slots (processor sharing), which stretches every long job.
    mlfq_last_queue: str = option(
        "fcfs", "MLFQ with mlfq_queue_order arrival: order of the last queue's (long) jobs",
        choices=MLFQ_LAST_QUEUE_ORDERS)
    # The deadline lane (worker/scheduler/deadline_lane.py): a job older than a quarter of
    # the deadline runs ahead of the deep queues, oldest first, until its deadline. The
    # deadline is mlfq_deadline_s when set (a JCT objective, seconds), else learnt:
    # mlfq_deadline_slack x the p99 JCT that FCFS would have given the finished jobs,
    # replayed in hindsight (0: no lane). It holds MLFQ's p99 JCT near FCFS's on
    # heavy-tailed output lengths at some cost to the mean; with long outputs all of one
    # size, arrival order and 8 queues without it do better (docs/scheduling.md).
    mlfq_deadline_s: Optional[float] = option(
        None, "MLFQ deadline lane: a job older than S/4 seconds runs ahead of the deep queues "
        "until it is S seconds old (None: learnt, see mlfq_deadline_slack)")
    mlfq_deadline_slack: float = option(
        1.0, "MLFQ: learnt deadline = X times the p99 JCT FCFS would have given the "
        "finished jobs (0 turns the deadline lane off)")
    # While a job of a higher queue runs, lower queues' prefill chunks may add at most the
    # time of the higher queues' work in the step (by the cost model), so the step takes
    # at most about twice as long. Without this a short job that joins a step carrying a
    # long prompt's full chunk pays that chunk's time on every one of its steps, and
    # skip-join buys it little (docs/scheduling.md).
    mlfq_bounded_prefill: bool = option(
        True, "MLFQ: while a higher queue's job runs, lower queues' prefill chunks add at "
        "most that work's time to a step")
    # Free device blocks kept for arrivals and growth by proactive swap-out (None: 1/16
    # of the device blocks). Only used when a host tier exists.
    kv_headroom_blocks: Optional[int] = None

    def __post_init__(self) -> None:
        if self.policy not in SCHEDULER_POLICIES:
            raise ValueError(f"unknown scheduler policy {self.policy!r}; "
                             f"known: {', '.join(SCHEDULER_POLICIES)}")
        if self.mlfq_num_queues < 1:
            raise ValueError(f"invalid mlfq_num_queues={self.mlfq_num_queues}: must be >= 1")
        if self.mlfq_base_quantum_s is not None and self.mlfq_base_quantum_s <= 0:
            raise ValueError("invalid mlfq_base_quantum_s: must be > 0")
        if self.mlfq_starvation_s <= 0:
            raise ValueError("invalid mlfq_starvation_s: must be > 0")
        if self.mlfq_last_queue not in MLFQ_LAST_QUEUE_ORDERS:
            raise ValueError(f"invalid mlfq_last_queue {self.mlfq_last_queue!r}; known: "
                             f"{', '.join(MLFQ_LAST_QUEUE_ORDERS)}")
        if self.mlfq_queue_order not in MLFQ_QUEUE_ORDERS:
            raise ValueError(f"invalid mlfq_queue_order {self.mlfq_queue_order!r}; known: "
                             f"{', '.join(MLFQ_QUEUE_ORDERS)}")
        if self.mlfq_last_queue == "round_robin" and self.mlfq_queue_order != "arrival":
            raise ValueError("mlfq_last_queue='round_robin' needs mlfq_queue_order='arrival' "
                             "(with 'least_attained' the jobs of a queue already take turns)")
        if self.mlfq_deadline_s is not None and not self.mlfq_deadline_s > 0:
            raise ValueError("invalid mlfq_deadline_s: must be > 0 (or None: learnt)")
        if not self.mlfq_deadline_slack >= 0:
            raise ValueError("invalid mlfq_deadline_slack: must be >= 0 (a multiple of "
                             "FCFS's p99 JCT; 0: no deadline lane)")
        if self.kv_headroom_blocks is not None and self.kv_headroom_blocks < 0:
            raise ValueError("invalid kv_headroom_blocks: must be >= 0")
        if self.max_num_seqs < 1:
            raise ValueError(f"invalid max_num_seqs={self.max_num_seqs}: must be >= 1")
        if self.max_num_batched_tokens is None:  # built without a device: the CPU's budget
            object.__setattr__(self, "max_num_batched_tokens", 2048)
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"invalid max_num_batched_tokens={self.max_num_batched_tokens}: must be >= 1"
            )


@dataclass(frozen=True)
class ParallelConfig:
    # Ranks of one replica, each holding 1/tp of every layer's heads and MLP columns and
    # of the KV cache, in each of pp pipeline stages holding 1/pp of the layers
    # (worker/parallel/). The offline LLM starts them as local processes.
    tensor_parallel_size: int = option(
        1, "ranks of one replica, each holding 1/N of every layer's heads and KV (local "
        "processes: gloo on CPU, NCCL on CUDA)")
    pipeline_parallel_size: int = option(
        1, "pipeline stages of one replica, each holding 1/N of the layers and their KV "
        "(times the tensor-parallel size: one process and device per rank)")
    # Group set-up and each collective give up after this long (a rank that died or never
    # started), so nothing hangs.
    parallel_timeout_s: float = 120.0

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            size = getattr(self, name)
            if isinstance(size, bool) or not isinstance(size, int) or size < 1:
                raise ValueError(f"invalid {name}={size!r}: must be an integer >= 1")
        if not self.parallel_timeout_s > 0:
            raise ValueError(f"invalid parallel_timeout_s={self.parallel_timeout_s}: "
                             "must be > 0")


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Seeds the draw of per-request seeds for requests that give none.
    seed: int = 0

    @classmethod
    def from_options(cls, model: str = "default", **options: Any) -> EngineConfig:
        """Build from flat options; each name must belong to exactly one sub-config."""
        groups: dict[str, dict[str, Any]] = {"model": {"model": model}, "cache": {},
                                             "scheduler": {}, "parallel": {}}
        owners = {
            f.name: group
            for group, klass in (("model", ModelConfig), ("cache", CacheConfig),
                                 ("scheduler", SchedulerConfig),
                                 ("parallel", ParallelConfig))
            for f in dataclasses.fields(klass)
        }
        seed = options.pop("seed", 0)
        # Options users know by another name (scheduler, host_kv_memory="4GiB"; see
        # worker/options.py) become their fields.
        for name, value in config_fields(options).items():
            if name not in owners:
                raise ValueError(f"unknown engine option {name!r}; known: {sorted(owners)}")
            groups[owners[name]][name] = value
        model_config = ModelConfig(**groups["model"])
        if groups["scheduler"].get("max_num_batched_tokens") is None:
            groups["scheduler"]["max_num_batched_tokens"] = (
                2048 if model_config.device == "cpu" else 8192)
        return cls(
            model=model_config,
            cache=CacheConfig(**groups["cache"]),
            scheduler=SchedulerConfig(**groups["scheduler"]),
            parallel=ParallelConfig(**groups["parallel"]),
            seed=seed,
        )
