"""The real-engine half: one engine per process, calibrated, probed, then replaying jobs.

Both policies' engines run at the same time, each in its own process with its own thread
(`engine_worker`), so a CPU shared with other work slows both alike; the parent process
sends both the same job list at the same moment. Each engine is driven by one thread:
requests are added once their arrival time has passed (wall clock), then `step()`.

Protocol over the pipe: the worker sends its calibration and probe, receives
`(jobs, prompts, timeout_s)` (or None to stop), sends its replay; any failure is sent as
`{"error": traceback}`.
"""

from __future__ import annotations

import random
import statistics
import time
import traceback

from sim.calibrate import run_probe
from sim.metrics import JobRecord, summarize
from sim.workload import Job

from lmfleet.worker.scheduler.cost_model import CostModel


def calibrate(runner, num_profiles: int = 3) -> tuple[CostModel, list[dict]]:
    """Field-wise median of several start-up profiles: one profile on a shared, busy machine
    can be far off (a single slow step bends its least-squares line)."""
    from lmfleet.worker.runner.profiler import profile_cost_model

    profiles = [profile_cost_model(runner).as_dict() for _ in range(num_profiles)]
    median = {key: statistics.median(p[key] for p in profiles) for key in profiles[0]}
    return CostModel(**median), profiles


def make_prompts(jobs: list[Job], vocab_size: int, seed: int) -> dict[str, list[int]]:
    # Random ids: no two prompts share a prefix, so prefix caching plays no part.
    rng = random.Random(seed)
    return {j.job_id: [rng.randrange(100, vocab_size) for _ in range(j.prompt_len)]
            for j in jobs}


def replay(engine, jobs: list[Job], prompts: dict[str, list[int]], timeout_s: float) -> dict:
    """Feed `jobs` to the engine at their arrival times (wall clock) and step until all
    finish; returns the summary (with engine counters) and the tokens of each request."""
    from lmfleet.worker.request import Request
    from lmfleet.worker.sampling_params import SamplingParams

    records = {j.job_id: JobRecord(j.job_id, j.arrival_s, j.output_len, j.is_long)
               for j in jobs}
    tokens: dict[str, list[int]] = {}
    pending = sorted(jobs, key=lambda j: j.arrival_s)
    index, num_steps, busy_s = 0, 0, 0.0
    start = time.perf_counter()
    while index < len(pending) or engine.has_work():
        now = time.perf_counter() - start
        if now > timeout_s:
            raise RuntimeError(f"real-engine run exceeded {timeout_s:.0f} s")
        while index < len(pending) and pending[index].arrival_s <= now:
            job = pending[index]
            params = SamplingParams(max_tokens=job.output_len, min_tokens=job.output_len,
                                    temperature=0)
            engine.add_request(Request(job.job_id, prompts[job.job_id], params))
            index += 1
        if not engine.has_work():
            time.sleep(min(pending[index].arrival_s - now, 0.05))
            continue
        step_start = time.perf_counter()
        outputs = engine.step()
        step_end = time.perf_counter()
        num_steps += 1
        busy_s += step_end - step_start
        for output in outputs:
            record = records[output.request_id]
            record.on_tokens(step_end - start, len(output.new_token_ids))
            if output.finished:
                record.finish_s = step_end - start
                tokens[output.request_id] = list(output.output_token_ids)
    makespan = time.perf_counter() - start
    summary = summarize(list(records.values()))
    summary.update(num_steps=num_steps, busy_s=busy_s, makespan_s=makespan,
                   busy_fraction=busy_s / makespan, mean_step_s=busy_s / max(num_steps, 1),
                   num_preemptions=engine.scheduler.num_preemptions,
                   swap_out_blocks=engine.kv_manager.swap_stats.num_swap_out_blocks)
    return {"summary": summary, "tokens": tokens}


def engine_worker(conn, model: str, options: dict, threads: int, probe_jobs: list[Job],
                  probe_seed: int) -> None:
    """Child process main: see the module docstring for the protocol."""
    try:
        import torch

        from lmfleet.worker.config import EngineConfig
        from lmfleet.worker.engine import LLMEngine

        if threads > 0:
            torch.set_num_threads(threads)
        engine = LLMEngine(EngineConfig.from_options(model, **options))
        profiled, profiles = calibrate(engine.runner)
        steps = run_probe(engine, probe_jobs,
                          make_prompts(probe_jobs, engine.arch.vocab_size, probe_seed))
        conn.send({"profiles": profiles, "profiled": profiled.as_dict(), "steps": steps,
                   "vocab_size": engine.arch.vocab_size,
                   # MLFQ's own start-up profile and the base quantum it chose from it.
                   "engine_cost_model": engine.cost_model.as_dict() if engine.cost_model
                   else None,
                   "base_quantum_s": getattr(engine.scheduler, "base_quantum_s", None),
                   "torch_threads": torch.get_num_threads()})
        message = conn.recv()
        if message is not None:
            jobs, prompts, timeout_s = message
            conn.send(replay(engine, jobs, prompts, timeout_s))
    except Exception:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send({"error": traceback.format_exc()})
    finally:
        conn.close()
