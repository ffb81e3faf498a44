"""GPU throughput: lmfleet beside a peer engine (LMDeploy) on one fixed workload, one call.

Workload (the peer benchmark's, replicated here id for id): a Llama-3-8B-shaped model with
random bf16 weights;
  Test A: 256 requests x 512 random prompt ids -> exactly 256 greedy tokens (EOS ignored);
  Test B: batch 1, 128 prompt ids -> 256 tokens; TPOT = (T(256) - T(1)) / 255 from medians
          of 3 and 5 runs; TTFT = the median T(1).
Steps, each a subprocess whose output is streamed with a prefix, within --budget-s:
  1. the model directory, written by the peer benchmark script (`make-model`) if absent;
  2. peers (the script given with --peer-bench, steps ceilings + lmdeploy): copy bandwidth,
     bf16 matmul rate, LMDeploy Test A/B; it appends JSON lines to OUT/results.jsonl;
  3. one process per lmfleet variant (`--run-variant NAME`: this script again), so GPU
     memory is released between them: start-up time, Test A, Test B.
A step that fails or runs out of time is recorded under "errors" and the rest go on; the
JSON is rewritten after every step. Writes OUT/gpu_throughput.json, .png and .log, and
prints a markdown table last.

Example (device machine; LMDeploy's wheels installed and on PYTHONPATH by the caller):
  python3 benchmarks/gpu_throughput.py --out $OUT --peer-bench path/to/peer_bench.py
CPU smoke run of one variant on a tiny model directory (with a tokenizer):
  python benchmarks/gpu_throughput.py --run-variant default --model-dir DIR --device cpu
      --smoke --result-file /tmp/v.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

try:  # run as a script (benchmarks/ on sys.path) or imported as benchmarks.gpu_throughput
    import gpu_throughput_report as report
except ImportError:
    from benchmarks import gpu_throughput_report as report

ROOT = Path(__file__).resolve().parents[1]
# The peer benchmark's workload constants and model directories (its prompts() below).
A_N, A_IN, A_OUT = 256, 512, 256
B_IN, B_OUT = 128, 256
PROMPT_VOCAB = 128000  # ids drawn from [0, 128000): no special tokens
PROMPT_SEED = 1234
MODEL_DIR = "/tmp/anchor_llama3_8b_random"
TINY_DIR = "/tmp/anchor_llama3_tiny_random"

# Engine options of every variant. The peer runs LMDeploy without prefix caching, and Test
# B repeats one prompt 8 times (its warm-up reuses Test A prompts too): a prefix cache
# would skip prefills the peer does. `--option enable_prefix_caching=true` turns it back on.
COMMON_OPTIONS = {"enable_prefix_caching": False}
# name -> engine options (passed to LLM(model, **options) unchanged) and run settings:
# "test_a_requests" shrinks Test A for slow variants (marked in the JSON); "weight" is the
# variant's share of the time left when it starts (time it does not use goes to the next).
VARIANTS = {
    # The ablation chain, each variant one feature less: Triton kernels + CUDA graphs +
    # overlapped steps; without overlap; without graphs either (kernels only); the old
    # gather + SDPA attention path (slow, so a quarter of Test A).
    "default": {"options": {}, "weight": 2.0},
    "no_overlap": {"options": {"overlap_steps": False}, "weight": 1.5},
    "eager": {"options": {"enforce_eager": True, "overlap_steps": False}, "weight": 1.5},
    "torch": {"options": {"attention_backend": "torch", "enforce_eager": True,
                          "overlap_steps": False},
              "test_a_requests": 64, "weight": 1.0},
}
PEER_RECORDS = {"lmdeploy": ["lmdeploy-A", "lmdeploy-B"], "hf": ["hf-A", "hf-B"]}
REPORT_RESERVE_S = 15  # kept back at the end for the JSON and PNG
VARIANT_MIN_S = 90  # per variant, kept back from the peers' share


def prompts():
    """The peer benchmark's prompts: Test A (256 x 512) and Test B (1 x 128) ids."""
    import numpy as np

    rng = np.random.default_rng(PROMPT_SEED)
    a = rng.integers(0, PROMPT_VOCAB, size=(A_N, A_IN), dtype=np.int64)
    b = rng.integers(0, PROMPT_VOCAB, size=(1, B_IN), dtype=np.int64)
    return a, b


def ensure_lmfleet_importable() -> None:
    """Without an installed lmfleet, map the `lmfleet` namespace onto this checkout."""
    import importlib.util
    import types

    if importlib.util.find_spec("lmfleet") is None:
        package = types.ModuleType("lmfleet")
        package.__path__ = [str(ROOT)]  # lmfleet.worker -> ROOT/worker, as pyproject maps it
        sys.modules["lmfleet"] = package


# ---- one variant, in its own process -----------------------------------------------------
def run_variant(args) -> int:
    import torch

    ensure_lmfleet_importable()
    from lmfleet.worker import LLM, SamplingParams

    spec = VARIANTS[args.run_variant]
    options = {**COMMON_OPTIONS, **spec["options"], **report.parse_options(args.option)}
    out = {"variant": args.run_variant, "options": options, "phase": "start"}
    result_file = Path(args.result_file)

    printed: set[str] = {"options", "phase"}

    def save(phase: str) -> None:  # the file holds all so far; the log shows what is new
        out["phase"] = phase
        tmp = result_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(out, default=str))
        tmp.replace(result_file)
        print(f"{phase}: {json.dumps({k: v for k, v in out.items() if k not in printed})}",
              flush=True)
        printed.update(out)

    cuda = args.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    pa, pb = prompts()
    vocab = json.loads((Path(args.model_dir) / "config.json").read_text())["vocab_size"]
    if vocab < PROMPT_VOCAB:  # a small test model: fold ids into its vocabulary
        pa, pb = pa % vocab, pb % vocab
        out["prompt_ids_mod"] = vocab
    a_n, a_out, b_out, warm_tokens = spec.get("test_a_requests", A_N), A_OUT, B_OUT, 16
    if args.smoke:
        pa, pb, a_n, a_out, b_out, warm_tokens = pa[:, :64], pb[:, :32], 4, 8, 8, 2
    a_n = min(a_n, len(pa))
    pa_ids, pb_ids = pa[:a_n].tolist(), pb.tolist()
    out.update(test_a_requests=a_n, test_a_reduced=a_n < A_N, test_a_prompt_len=len(pa_ids[0]),
               test_a_max_tokens=a_out, test_b_prompt_len=len(pb_ids[0]), test_b_max_tokens=b_out)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out["versions"] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                       "triton": triton_version, "python": platform.python_version()}

    def params(n: int):
        return SamplingParams(max_tokens=n, min_tokens=n, ignore_eos=True, temperature=0)

    try:
        save("import")
        start = time.perf_counter()
        llm = LLM(args.model_dir, device=args.device, **options)
        sync()
        out["startup_s"] = time.perf_counter() - start  # CUDA's initialisation included
        out["device"] = torch.cuda.get_device_name(0) if cuda else platform.processor() or "cpu"
        runner = llm.engine.runner
        out["kv_blocks"] = getattr(runner, "num_blocks", None)
        out["block_size"] = getattr(runner, "block_size", None)
        save("startup")

        # Warm-up, untimed: a prefill chunk and decodes at a few batch sizes, then batch 1.
        start = time.perf_counter()
        llm.generate(pa_ids[:32], params(warm_tokens), use_tqdm=False)
        llm.generate(pb_ids, params(min(8, b_out)), use_tqdm=False)
        sync()
        out["warmup_s"] = time.perf_counter() - start
        save("warmup")

        sync()
        start = time.perf_counter()
        outputs = llm.generate(pa_ids, params(a_out), use_tqdm=False)
        sync()
        wall = time.perf_counter() - start
        lengths = [len(o.output_token_ids) for o in outputs]
        n_out, n_in = sum(lengths), sum(len(p) for p in pa_ids)
        out.update(test_a_wall_s=wall, test_a_out_tok=n_out, test_a_out_tok_s=n_out / wall,
                   test_a_total_tok_s=(n_out + n_in) / wall)
        if len(outputs) != a_n or set(lengths) != {a_out}:
            out["error"] = (f"Test A: {len(outputs)} outputs, lengths {sorted(set(lengths))}, "
                            f"expected {a_n} x {a_out}")
        save("test_a")

        def timed(n: int) -> float:
            sync()
            t = time.perf_counter()
            o = llm.generate(pb_ids, params(n), use_tqdm=False)
            sync()
            elapsed = time.perf_counter() - t
            if len(o[0].output_token_ids) != n:
                raise RuntimeError(f"Test B: {len(o[0].output_token_ids)} tokens, expected {n}")
            return elapsed

        t1 = [timed(1) for _ in range(5)]
        tn = [timed(b_out) for _ in range(3)]
        t1_med, tn_med = statistics.median(t1), statistics.median(tn)
        out.update(test_b_t1_s=t1, test_b_tn_s=tn, test_b_ttft_ms=t1_med * 1e3,
                   test_b_tpot_ms=(tn_med - t1_med) / (b_out - 1) * 1e3)
        if cuda:
            out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        save("done")
        return 0
    except Exception:
        out["error"] = traceback.format_exc()[-2000:]
        save(f"failed after {out['phase']}")
        return 1


# ---- orchestration -----------------------------------------------------------------------
class Runner:
    """The parent: budget, logging (stdout + OUT/gpu_throughput.log), subprocesses."""

    def __init__(self, args) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.start = time.time()
        self.deadline = self.start + args.budget_s
        self.log_file = open(self.out / "gpu_throughput.log", "a")
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.time() - REPORT_RESERVE_S

    def log(self, line: str) -> None:
        with self.lock:
            print(line, flush=True)
            self.log_file.write(line + "\n")
            self.log_file.flush()

    def call(self, name: str, cmd: list[str], limit: float) -> str:
        """Run `cmd` streaming its output as '[name] ...'; 'ok', 'rc=N' or 'timeout'."""
        self.log(f"== {name} (limit {limit:.0f} s): {' '.join(cmd)}")
        start = time.time()
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                errors="replace", env=env, start_new_session=True)

        def pump() -> None:
            for line in proc.stdout:
                self.log(f"[{name}] {line.rstrip()[:1000]}")

        thread = threading.Thread(target=pump, daemon=True)
        thread.start()
        try:
            rc = proc.wait(timeout=max(limit, 1))
            status = "ok" if rc == 0 else f"rc={rc}"
        except subprocess.TimeoutExpired:
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the group this call started, by its id
                    proc.wait(timeout=grace)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            status = f"timeout after {limit:.0f} s"
        thread.join(timeout=5)
        self.log(f"== {name}: {status} in {time.time() - start:.1f} s")
        return status


def model_ready(model_dir: Path) -> bool:
    return (model_dir / "config.json").is_file() and any(model_dir.glob("*.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--out", default=os.environ.get("OUT", "/tmp/gpu_throughput_out"))
    parser.add_argument("--peer-bench", help="the peer benchmark script (make-model, peers)")
    parser.add_argument("--model-dir", help=f"default {MODEL_DIR} ({TINY_DIR} with --tiny)")
    parser.add_argument("--tiny", action="store_true",
                        help="the peer script's 2-layer model shape (a quick smoke run)")
    parser.add_argument("--skip-peers", action="store_true", help="no ceilings, no LMDeploy")
    parser.add_argument("--peer-steps", default="ceilings,lmdeploy")
    parser.add_argument("--peer-budget-s", type=float, default=220)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, of: {', '.join(VARIANTS)}")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="an engine option added to every variant (repeatable)")
    parser.add_argument("--budget-s", type=float, default=540, help="for all steps together")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--smoke", action="store_true",
                        help="Test A 4 requests x 8 tokens, Test B 8 tokens (short prompts)")
    parser.add_argument("--commit-to", help="also copy the JSON and PNG into this directory")
    parser.add_argument("--run-variant", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.model_dir = args.model_dir or (TINY_DIR if args.tiny else MODEL_DIR)
    report.parse_options(args.option)  # fail early on a malformed --option
    if args.run_variant:
        if args.run_variant not in VARIANTS:
            raise SystemExit(f"unknown variant {args.run_variant!r}; known: {list(VARIANTS)}")
        args.result_file = args.result_file or str(Path(args.out) / f"{args.run_variant}.json")
        sys.exit(run_variant(args))
    variants = list(dict.fromkeys(v for v in args.variants.split(",") if v))
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {list(VARIANTS)}")
    if not args.peer_bench and not (args.skip_peers and model_ready(Path(args.model_dir))):
        raise SystemExit("--peer-bench is needed (to write the model and to run the peers)")

    run = Runner(args)
    model_dir = Path(args.model_dir)
    results_jsonl = run.out / "results.jsonl"
    tiny = ["--tiny"] if args.tiny else []
    result = {"benchmark": "gpu_throughput", "device": None,
              "config": {"model": model_dir.name, "model_dir": str(model_dir),
                         "tiny": args.tiny, "smoke": args.smoke, "device": args.device,
                         "budget_s": args.budget_s, "variants": variants,
                         "variant_specs": {v: VARIANTS[v] for v in variants},
                         "common_options": COMMON_OPTIONS, "extra_options":
                         report.parse_options(args.option), "workload": {
                             "test_a": f"{A_N} x {A_IN} prompt ids -> {A_OUT} tokens",
                             "test_b": f"1 x {B_IN} prompt ids -> {B_OUT} tokens",
                             "prompts": f"numpy default_rng({PROMPT_SEED}), ids < "
                                        f"{PROMPT_VOCAB}"}},
              "steps": {}, "errors": [], "variants": {}}

    def save() -> None:
        result["wall_s"] = time.time() - run.start
        result["peer_records"] = report.peer_records(results_jsonl)
        if model_ready(model_dir) and not result.get("model"):
            result["model"] = report.weights_bytes(model_dir)
        report.summarize(result)
        report.write_json(result, run.out)

    def step(name: str, cmd: list[str], limit: float) -> str:
        if limit < 20:
            status = f"skipped: {max(run.left(), 0):.0f} s of the budget left"
            run.log(f"== {name}: {status}")
            result["steps"][name] = {"status": status, "seconds": 0.0}
        else:
            start = time.time()
            status = run.call(name, cmd, limit)
            result["steps"][name] = {"status": status, "seconds": time.time() - start}
        if status != "ok":
            result["errors"].append({"step": name, "error": status})
        return status

    py = [sys.executable, "-u"]
    if not model_ready(model_dir):
        step("make-model", py + [args.peer_bench, "make-model", "--model-dir", str(model_dir),
                                 "--out", str(run.out), "--results", str(results_jsonl)] + tiny,
             min(300, run.left()))
    save()
    if not model_ready(model_dir):
        run.log(f"no model in {model_dir}: nothing to measure")
    else:
        if not args.skip_peers:
            limit = min(args.peer_budget_s, run.left() - VARIANT_MIN_S * len(variants))
            step("peers", py + [args.peer_bench, "all", "--steps", args.peer_steps,
                                "--model-dir", str(model_dir), "--out", str(run.out),
                                "--budget-s", str(int(max(limit - 10, 0)))] + tiny, limit)
            found = report.peer_records(results_jsonl)
            for peer_step in args.peer_steps.split(","):
                for record in PEER_RECORDS.get(peer_step, [peer_step]):
                    if record not in found:
                        result["errors"].append({"step": f"peers/{peer_step}", "error":
                                                 f"no {record} record (OUT/{peer_step}.log)"})
            save()
        scratch = Path(tempfile.mkdtemp(prefix="gpu_throughput_"))
        for index, name in enumerate(variants):
            weights = [VARIANTS[v].get("weight", 1.0) for v in variants[index:]]
            limit = run.left() * weights[0] / sum(weights)
            result_file = scratch / f"{name}.json"
            cmd = py + [str(Path(__file__).resolve()), "--run-variant", name, "--model-dir",
                        str(model_dir), "--device", args.device, "--result-file",
                        str(result_file)] + (["--smoke"] if args.smoke else [])
            for item in args.option:
                cmd += ["--option", item]
            status = step(name, cmd, limit)
            measured = json.loads(result_file.read_text()) if result_file.is_file() else {}
            if status != "ok" and not measured.get("error"):
                measured["error"] = f"{status} (last phase: {measured.get('phase', 'none')})"
            measured.setdefault("options", {**COMMON_OPTIONS, **VARIANTS[name]["options"]})
            result["variants"][name] = measured
            result["device"] = result["device"] or measured.get("device")
            result["versions"] = result.get("versions") or measured.get("versions")
            save()
        shutil.rmtree(scratch, ignore_errors=True)
    save()
    png = run.out / "gpu_throughput.png"
    try:
        report.plot(result, png)
    except Exception as error:  # the JSON is already written; note it and go on
        result["errors"].append({"step": "plot", "error": repr(error)})
        save()
    if args.commit_to:
        target = Path(args.commit_to)
        target.mkdir(parents=True, exist_ok=True)
        for path in (run.out / "gpu_throughput.json", png):
            if path.is_file():
                shutil.copy(path, target / path.name)
    run.log(f"wrote {run.out / 'gpu_throughput.json'} and .png ({time.time() - run.start:.0f} s)")
    run.log(report.table(result))


if __name__ == "__main__":
    main()
