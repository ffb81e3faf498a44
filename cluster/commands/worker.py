"""`lmfleet worker`: serve one model replica over gRPC (lmfleet.v1.Worker + health +
reflection).

Contract with launchers and tests: once the model is loaded and the server listens, the
command prints exactly one line to stdout (flushed), and nothing else ever goes there:

    lmfleet worker ready on HOST:PORT model=NAME

(`--port 0` picks a free port; the line carries the real one. An IPv6 host is bracketed.)
Logs go to stderr. $LMFLEET_WORKER_TOKEN, when set, must come with every Worker call
(worker/auth.py). SIGTERM or SIGINT: stop admitting requests (health NOT_SERVING), let
in-flight ones finish for up to `--drain-timeout` seconds, abort the rest, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import sys

READY_PREFIX = "lmfleet worker ready on "


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "worker",
        help="serve one model replica over gRPC (the router's backend)",
        description="Load MODEL and serve it over gRPC as lmfleet.v1.Worker (token ids in, "
        "token ids out), with grpc.health.v1 health and server reflection. Prints "
        f"'{READY_PREFIX}HOST:PORT model=NAME' on stdout when ready; logs go to stderr. "
        "Environment: LMFLEET_WORKER_TOKEN, when set, is a shared secret every "
        "lmfleet.v1.Worker call must carry as metadata 'authorization: Bearer TOKEN' "
        "(wrong or missing: UNAUTHENTICATED; health and reflection stay open for probes); "
        "give routers and the controller the same value.",
    )
    p.add_argument("--model", default="default",
                   help="model directory, .gguf file, or 'default' (embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1; on any other address set "
                   "LMFLEET_WORKER_TOKEN, or anyone who reaches the port can drain the worker)")
    p.add_argument("--port", type=int, required=True, help="port to listen on (0: a free one)")
    p.add_argument("--model-name", default=None,
                   help="name clients use (default: 'default' for the embedded model, else the "
                   "model directory's name or the .gguf file's stem)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests batched in one step at most")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="token budget of one step")
    p.add_argument("--num-kv-blocks", type=int, default=None,
                   help="KV cache blocks (default: from the memory budget)")
    p.add_argument("--block-size", type=int, default=None, help="tokens per KV block")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length (default: the model's)")
    p.add_argument("--scheduler", default="fcfs", choices=("fcfs", "mlfq"),
                   help="fcfs, or mlfq (skip-join MLFQ, FastServe)")
    p.add_argument("--host-kv-memory", default=None, metavar="SIZE",
                   help="host-memory KV tier for swapped-out requests and idle chat sessions, "
                   "e.g. 4GiB (default: none; preemption then recomputes)")
    p.add_argument("--mlfq-starvation-s", type=float, default=None, metavar="S",
                   help="MLFQ: promote a job that has not run for S seconds (default 3)")
    p.add_argument("--mlfq-base-quantum-s", type=float, default=None, metavar="S",
                   help="MLFQ: quantum of the top queue (default: from the cost model)")
    p.add_argument("--mlfq-num-queues", type=int, default=None, metavar="K",
                   help="MLFQ: number of queues; quanta double per level (default 12)")
    p.add_argument("--mlfq-queue-order", default=None, choices=("least_attained", "arrival"),
                   help="MLFQ: order within a queue: least service so far first, or arrival "
                   "(default least_attained; arrival suits long outputs all of one size)")
    p.add_argument("--mlfq-last-queue", default=None, choices=("fcfs", "round_robin"),
                   help="MLFQ with --mlfq-queue-order arrival: order of the last queue's "
                   "(long) jobs (default fcfs)")
    p.add_argument("--mlfq-deadline-s", type=float, default=None, metavar="S",
                   help="MLFQ deadline lane: a job older than S/4 seconds runs ahead of the "
                   "deep queues until it is S seconds old (default: S learnt from finished "
                   "jobs, see --mlfq-deadline-slack)")
    p.add_argument("--mlfq-deadline-slack", type=float, default=None, metavar="X",
                   help="MLFQ: learnt deadline = X times the p99 JCT FCFS would have given "
                   "the finished jobs (default 1.0; 0 turns the deadline lane off)")
    p.add_argument("--mlfq-bounded-prefill", default="auto", choices=("auto", "on", "off"),
                   help="MLFQ: while a higher queue's job runs, cut a lower queue's prefill "
                   "chunk to what fits in that job's quantum (auto: on)")
    p.add_argument("--dense-decode-cache", default="auto", choices=("auto", "on", "off"),
                   help="also keep decoding requests' KV contiguous, read in place by "
                   "decode attention (auto: on for CPU, off for CUDA)")
    p.add_argument("--cpu-kernels", default="auto", choices=("auto", "on", "off"),
                   help="C kernels for CPU float32 (decode attention over the paged KV "
                   "cache, fused norm, rotary and SiLU steps), built on first use with the "
                   "system C compiler (auto: on where they build)")
    p.add_argument("--attention-backend", default="auto", choices=("auto", "triton", "torch"),
                   help="paged attention kernels: triton (CUDA) or torch (gather + SDPA; the "
                   "C decode kernel on CPU) (auto: triton on CUDA, torch on CPU)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="CUDA: launch every step's kernels from Python (no CUDA graphs)")
    p.add_argument("--overlap-steps", default="auto", choices=("auto", "on", "off"),
                   help="launch each step before reading the previous one's tokens back, "
                   "so the CPU prepares a step while the GPU runs the last (auto: on for CUDA)")
    p.add_argument("--session-ttl-s", type=float, default=None, metavar="S",
                   help="keep an idle chat session's KV this long (default 600)")
    p.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds to let in-flight requests finish")
    p.set_defaults(func=run)


# Worker flags that are not engine options: who serves, where, and how it stops.
_NOT_ENGINE_FLAGS = {"help", "model", "model_name", "host", "port", "drain_timeout"}


class _RaisingParser(argparse.ArgumentParser):
    """A worker parser for argv built by code (fleet configs): errors raise ValueError
    instead of exiting the process."""

    def error(self, message: str):
        raise ValueError(message)


def _worker_parser(parser_class: type[argparse.ArgumentParser]) -> argparse.ArgumentParser:
    root = parser_class(prog="lmfleet")
    add_parser(root.add_subparsers(parser_class=parser_class))
    return root._subparsers._group_actions[0].choices["worker"]


def engine_actions() -> list[argparse.Action]:
    """The worker's engine options (--device, --dtype, --max-num-seqs, ...) as argparse
    actions, for commands that pass them on (`lmfleet serve`, fleet configs)."""
    parser = _worker_parser(argparse.ArgumentParser)
    return [a for a in parser._actions if a.dest not in _NOT_ENGINE_FLAGS]


def parse_worker_argv(argv: list[str]) -> argparse.Namespace:
    """`lmfleet worker` arguments parsed from `argv` (without the 'worker' word); bad
    ones raise ValueError with argparse's message."""
    return _worker_parser(_RaisingParser).parse_args(argv)


def build_engine(args: argparse.Namespace):
    """Load the model and build the LLMEngine the arguments describe; returns
    (engine, model_name)."""
    from lmfleet.worker.config import EngineConfig
    from lmfleet.worker.engine import LLMEngine
    from lmfleet.worker.model.default_model import served_model_name

    engine = LLMEngine(EngineConfig.from_options(args.model, **engine_options(args)))
    # The same name `lmfleet serve` gives it ("default" for the embedded model).
    return engine, args.model_name or served_model_name(args.model)


def engine_options(args: argparse.Namespace) -> dict:
    """Engine options from the command line; unset ones are left to the engine."""
    options = {"device": args.device, "dtype": args.dtype, "policy": args.scheduler,
               "attention_backend": args.attention_backend}
    if args.enforce_eager:
        options["enforce_eager"] = True
    for name in ("max_num_seqs", "max_num_batched_tokens", "num_kv_blocks", "block_size",
                 "max_model_len", "mlfq_starvation_s", "mlfq_base_quantum_s", "mlfq_num_queues",
                 "mlfq_queue_order", "mlfq_last_queue", "mlfq_deadline_s", "mlfq_deadline_slack",
                 "session_ttl_s"):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    for name in ("dense_decode_cache", "cpu_kernels", "overlap_steps",
                 "mlfq_bounded_prefill"):  # auto: the engine's default
        if getattr(args, name) != "auto":
            options[name] = getattr(args, name) == "on"
    if args.host_kv_memory is not None:
        from lmfleet.worker.config import parse_size

        options["host_kv_memory_bytes"] = parse_size(args.host_kv_memory)
    return options


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        raise ValueError(f"invalid --port {args.port}: must be in [0, 65535]")
    if args.drain_timeout < 0:
        raise ValueError(f"invalid --drain-timeout {args.drain_timeout}: must be >= 0")
    if args.model_name is not None:  # checked before the model loads
        from lmfleet.cluster.fleet_config import check_served_name

        check_served_name(args.model_name)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import asyncio

    from lmfleet.worker.async_engine import AsyncEngine

    engine, model_name = build_engine(args)
    return asyncio.run(_serve(AsyncEngine(engine), args, model_name))


async def _serve(engine, args: argparse.Namespace, model_name: str) -> int:
    import asyncio
    import signal

    from lmfleet.worker.server import WorkerServer

    server = WorkerServer(engine, model_name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    port = await server.start(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"{READY_PREFIX}{host}:{port} model={model_name}", flush=True)
    await stop.wait()
    logging.getLogger(__name__).info("shutting down: draining for up to %.1f s",
                                     args.drain_timeout)
    await server.shutdown(args.drain_timeout)
    return 0
