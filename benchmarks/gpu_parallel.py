"""Several GPUs in one call: tensor and pipeline parallelism beside one GPU and beside
LMDeploy, and a fleet of GPU replicas behind the router.

Steps, each bounded and recorded (OUT/gpu_parallel.json is rewritten after every step):
  engine      gpu_throughput.py's workload (Test A 256 x 512 -> 256 tokens, Test B batch 1)
              on --model-dir for each --layouts entry (tp=1, tp=2, pp=2), one process each;
  lmdeploy    the peer benchmark (--peer-bench SCRIPT lmdeploy) at each --peer-tp, with
              LMFLEET_PEER_TP in its environment and its records kept as written (a peer
              script that ignores the variable runs its own tp, which its records show);
  replicas    `lmfleet serve --replicas 2` (one GPU each), an online load through the
              router, one replica SIGKILLed --kill-after-s into it: requests failed
              (nothing accepted may be lost), whether the load still ran then, and
              seconds until two replicas serve again (the serve's /metrics);
  tp_replica  `lmfleet serve --tensor-parallel-size 2`: one replica across both GPUs, the
              same load.
Targets (issue #16): TP=2 Test A >= 1.7x lmfleet's TP=1 and >= LMDeploy's TP=2; TP=2
batch-1 TPOT <= 0.6x TP=1. Keep NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 set: every step inherits the environment.

  python3 benchmarks/gpu_parallel.py --out OUT [--peer-bench SCRIPT]   (two GPUs)
CPU smoke run (the tiny model of gpu_throughput.py, gloo instead of NCCL):
  python3 benchmarks/gpu_parallel.py --out OUT --device cpu --model-dir TINY --smoke
`--table JSON` prints the markdown table of a result.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # tests.integration.serve_process, benchmarks.*

from benchmarks import gpu_throughput  # noqa: E402
from benchmarks.online import TargetSpec, Workload, benchmark  # noqa: E402

LAYOUTS = {"tp1": (1, 1), "tp2": (2, 1), "pp2": (1, 2)}
SERVED_NAME = "bench"


def run_step(cmd: list[str], limit_s: float, env: dict | None = None) -> str:
    print("==", " ".join(cmd), flush=True)
    try:
        done = subprocess.run(cmd, timeout=limit_s, env={**os.environ, **(env or {})})
        return "ok" if done.returncode == 0 else f"rc={done.returncode}"
    except subprocess.TimeoutExpired:
        return f"timeout after {limit_s:.0f} s"


def engine_run(args, name: str, out: Path) -> tuple[str, dict]:
    tp, pp = LAYOUTS[name]
    result_file = out / f"engine-{name}.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--run-variant",
           "default", "--model-dir", args.model_dir, "--device", args.device,
           "--result-file", str(result_file), "--option", f"tensor_parallel_size={tp}",
           "--option", f"pipeline_parallel_size={pp}", *(["--smoke"] if args.smoke else [])]
    status = run_step(cmd, args.limit_s)
    return status, json.loads(result_file.read_text()) if result_file.is_file() else {}


def lmdeploy_run(args, tp: int, out: Path) -> tuple[str, list[dict]]:
    folder = out / f"lmdeploy-tp{tp}"
    results = folder / "results.jsonl"
    status = run_step([sys.executable, args.peer_bench, "lmdeploy", "--model-dir",
                       args.model_dir, "--out", str(folder), "--results", str(results)],
                      args.limit_s + 60, {"LMFLEET_PEER_TP": str(tp)})
    records = ([json.loads(line) for line in results.read_text().splitlines() if line]
               if results.is_file() else [])
    return status, records


def serve_flags(args) -> list[str]:
    flags = ["--model", args.model_dir, "--model-name", SERVED_NAME, "--device", args.device,
             "--start-timeout", "600", "--no-webui"]
    return flags + (["--max-model-len", "512", "--num-kv-blocks", "64"] if args.smoke else [])


def workload(args) -> Workload:
    high = 500 if args.smoke else 32000
    if args.smoke:
        return Workload(num_requests=16, input_len_mean=32, output_len_mean=24,
                        token_id_low=10, token_id_high=high)
    return Workload(num_requests=128, input_len_mean=512, output_len_mean=256,
                    token_id_high=high)


def gpu_processes() -> list[list[str]]:
    """[pid, GPU uuid] of every process holding a CUDA context, from nvidia-smi."""
    listing = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,gpu_uuid",
                              "--format=csv,noheader"], capture_output=True, text=True)
    return [[part.strip() for part in line.split(",")]
            for line in listing.stdout.splitlines() if line.strip()]


def fleet_metric(base_url: str, name: str, labels: str) -> float | None:
    """One sample of the serve's /metrics (the controller's numbers are there too)."""
    import httpx

    prefix = f'lmfleet:{name}{{model_name="{SERVED_NAME}"{labels}}} '
    for line in httpx.get(f"{base_url}/metrics", timeout=30).text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    return None


def fleet_run(args, extra: list[str], kill_one: bool) -> dict:
    """Serve, run the load through the router (one replica SIGKILLed --kill-after-s into
    the load when `kill_one`), and report the load and the replacement's timing."""
    from tests.integration.serve_process import start_serve

    record: dict = {"flags": extra}
    started = time.perf_counter()
    with start_serve([*serve_flags(args), *extra]) as serve:
        record["startup_s"] = time.perf_counter() - started
        record["replica_pids"] = serve.worker_pids
        if args.device.startswith("cuda"):  # which processes hold which GPU
            record["gpu_processes"] = gpu_processes()
        starts = fleet_metric(serve.base_url, "fleet_replica_starts_total", "")
        killed: dict = {}

        def kill_during_load() -> None:
            time.sleep(args.kill_after_s)
            victim = serve.worker_pids[0]
            os.kill(victim, signal.SIGKILL)
            killed.update(pid=victim, at=time.perf_counter())

        killer = threading.Thread(target=kill_during_load, daemon=True)
        load_start = time.perf_counter()
        if kill_one:
            killer.start()
        measured = asyncio.run(benchmark([TargetSpec("http", serve.base_url, SERVED_NAME)],
                                         workload(args), [None], warmup=0, progress=False))
        load_end = time.perf_counter()
        record["load"] = {k: v for k, v in measured["runs"][0].items() if k != "samples_ms"}
        if kill_one:
            killer.join()
            killed["after_load_start_s"] = killed["at"] - load_start
            killed["during_load"] = killed["at"] < load_end
            while time.perf_counter() - killed["at"] < args.limit_s:  # the replacement
                ready = fleet_metric(serve.base_url, "fleet_replicas", ',state="ready"')
                now = fleet_metric(serve.base_url, "fleet_replica_starts_total", "")
                if now is not None and starts is not None and now > starts and ready == 2:
                    killed["replaced_after_s"] = time.perf_counter() - killed["at"]
                    break
                time.sleep(0.5)
            record["killed"] = killed
    return record


def replaced(run: dict) -> str:
    killed = run.get("killed")
    if not killed:
        return ""
    after = killed.get("replaced_after_s")
    return (f", killed {'during' if killed.get('during_load') else 'after'} the load, "
            + (f"replaced after {after:.1f} s" if after is not None else "not replaced"))


def table(result: dict) -> str:
    lines = ["| run | Test A out tok/s | Test B TPOT ms | status |", "| --- | ---: | ---: | --- |"]
    for name, run in result["engine"].items():
        lines.append(f"| lmfleet {name} | {run.get('test_a_out_tok_s', float('nan')):.0f} | "
                     f"{run.get('test_b_tpot_ms', float('nan')):.2f} | "
                     f"{result['status'].get('engine-' + name)} |")
    for tp, records in result["lmdeploy"].items():
        steps = {r.get("step"): r for r in records}
        a, b = steps.get("lmdeploy-A", {}), steps.get("lmdeploy-B", {})
        lines.append(f"| LMDeploy {tp} | {a.get('out_tok_s', float('nan')):.0f} | "
                     f"{b.get('tpot_ms', float('nan')):.2f} | "
                     f"{result['status'].get('lmdeploy-' + tp)} |")
    for name, run in result["fleet"].items():
        load = run.get("load", {})
        lines.append(f"| fleet {name}: {load.get('num_failed', '?')} of "
                     f"{load.get('num_requests', '?')} failed{replaced(run)} | "
                     f"{load.get('output_token_throughput', float('nan')):.0f} | | "
                     f"{result['status'].get('fleet-' + name)} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    parser.add_argument("--model-dir", default=gpu_throughput.MODEL_DIR)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--layouts", default="tp1,tp2,pp2")
    parser.add_argument("--peer-bench", default=None)
    parser.add_argument("--peer-tp", default="1,2")
    parser.add_argument("--steps", default="engine,lmdeploy,replicas,tp_replica")
    parser.add_argument("--limit-s", type=float, default=240.0, help="per step")
    parser.add_argument("--kill-after-s", type=float, default=2.0,
                        help="a replica killed this long into the load")
    parser.add_argument("--smoke", action="store_true", help="tiny load, for a CPU check")
    parser.add_argument("--table", metavar="JSON")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    if not args.out:
        parser.error("--out is needed to run the steps")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = args.steps.split(",")
    result: dict = {"benchmark": "gpu_parallel", "device": args.device, "engine": {},
                    "lmdeploy": {}, "fleet": {}, "status": {}}

    def save() -> None:
        (out / "gpu_parallel.json").write_text(json.dumps(result, indent=1, default=str))

    if "engine" in steps:
        for name in args.layouts.split(","):
            result["status"][f"engine-{name}"], result["engine"][name] = engine_run(
                args, name, out)
            save()
    if "lmdeploy" in steps and args.peer_bench:
        for tp in map(int, args.peer_tp.split(",")):
            result["status"][f"lmdeploy-tp{tp}"], result["lmdeploy"][f"tp{tp}"] = (
                lmdeploy_run(args, tp, out))
            save()
    fleets = {"replicas": (["--replicas", "2"], True),
              "tp_replica": (["--tensor-parallel-size", "2"], False)}
    for name, (extra, kill_one) in fleets.items():
        if name in steps:
            try:
                result["fleet"][name] = fleet_run(args, extra, kill_one)
                result["status"][f"fleet-{name}"] = "ok"
            except Exception as error:  # recorded; the other steps go on
                result["status"][f"fleet-{name}"] = f"{type(error).__name__}: {error}"
            save()
    print(table(result))


if __name__ == "__main__":
    main()
