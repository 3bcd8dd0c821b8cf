"""Every precision of a bench, each in its own process (`python -m spladectl.bench`) unless told not to."""

from __future__ import annotations

import dataclasses
import statistics
import sys
import tempfile
from typing import Any

import torch

from spladectl.bench.max_batch import find_max_batch
from spladectl.bench.settings import BenchSettings, Log, bench_examples, load_tokenizer, unsupported_reason
from spladectl.bench.step import bench_precision
from spladectl.errors import SpladectlError


def bench_one(settings: BenchSettings, precision: str, *, log: Log = lambda _: None, pm=None,
              own_process: bool = False) -> dict[str, Any]:
    """The row of one (supported) precision: timed steps, FLOPs, matmul peak, and the max-batch search if asked.
    A precision that fails with a runtime error (an op without a kernel, out of memory) gives a "failed" row."""
    if pm is None:
        from spladectl.plugin_loading import load_plugins

        pm = load_plugins()
    threads_before = torch.get_num_threads()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    try:
        return _bench_one(settings, precision, log, pm, own_process)
    finally:
        torch.set_num_threads(threads_before)  # an in-process caller keeps its own setting


def _bench_one(settings: BenchSettings, precision: str, log: Log, pm, own_process: bool) -> dict[str, Any]:
    device = torch.device(settings.device)
    tokenizer = load_tokenizer(settings.model)
    pool: list = []

    def make_examples(n: int) -> list:
        if settings.data:
            if not pool:
                from spladectl.data import load_training_data

                pool.extend(load_training_data(settings.data, n_negatives=1, show_progress=False))
            return (pool * -(-n // len(pool)))[:max(n, len(pool))]
        if len(pool) < n:
            pool[:] = bench_examples(tokenizer, n, settings.max_doc_length, seed=settings.seed)
        return pool

    needed = settings.batch_size * (settings.warmup + settings.steps + 2)
    log(f"{precision}: batch {settings.batch_size}, {settings.warmup} warm-up + {settings.steps} timed steps on "
        f"{device}")
    with tempfile.TemporaryDirectory(prefix="spladectl-bench-") as workdir:
        try:
            row = bench_precision(settings, precision, make_examples(needed), pm, log, workdir)
            if settings.find_max_batch:
                row.update(find_max_batch(settings, precision, make_examples, pm, log, workdir,
                                          own_process=own_process))
        except SpladectlError:
            raise
        except (RuntimeError, NotImplementedError) as exc:  # one precision failing must not hide the others
            detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            log(f"{precision}: failed: {detail}")
            row = {"precision": precision, "status": "failed", "reason": detail, "device": str(device),
                   "examples_per_s": None}
    return row


def run_bench(settings: BenchSettings, *, log: Log = lambda _: None, facts=None, isolate: bool = True,
              pm=None, rounds: int = 1) -> list[dict[str, Any]]:
    """Every precision of `settings`: a row each (status "ok", "skipped" with a reason, or "failed").

    `isolate` (default) runs each precision in its own Python process, so its peak memory is its own: in one
    process, memory an earlier precision freed often stays resident (allocator caches, oneDNN scratchpads) and
    would be counted against the next. `facts`: the machine's HardwareFacts when the caller has them.

    `rounds` > 1 runs the precisions that many times in turn (32-true, bf16-mixed, 32-true, …), so that a machine
    whose speed drifts slows every precision alike, and combines each precision's rounds (combine_rounds). A
    profile, top ops or max-batch search, when asked for, come from the first round only.
    """
    device = torch.device(settings.device)
    if facts is None and device.type in ("cpu", "mps") and "bf16-mixed" in settings.precisions:
        from spladectl.hardware import detect

        facts = detect()
    skipped: dict[str, dict[str, Any]] = {}
    for precision in settings.precisions:
        reason = unsupported_reason(precision, device, facts)
        if reason:
            log(f"{precision}: skipped: {reason}")
            skipped[precision] = {"precision": precision, "status": "skipped", "reason": reason,
                                  "device": str(device), "examples_per_s": None}
    runs: dict[str, list[dict[str, Any]]] = {p: [] for p in settings.precisions if p not in skipped}
    for r in range(rounds):
        if rounds > 1:
            log(f"round {r + 1}/{rounds}")
        this_round = settings if r == 0 else dataclasses.replace(settings, find_max_batch=False, top_ops=0,
                                                                 profile_step=False)
        for precision, done in runs.items():
            if isolate:
                done.append(_bench_in_child(this_round, precision, log))
            else:
                done.append(bench_one(this_round, precision, log=log, pm=pm))
    rows = [skipped[p] if p in skipped else combine_rounds(runs[p], runs.get("32-true"))
            for p in settings.precisions]
    return rows


def combine_rounds(rounds: list[dict[str, Any]], reference: list[dict[str, Any]] | None) -> dict[str, Any]:
    """One precision's row from its rounds, and its speed-up over the 32-true rounds run beside them.

    A precision that failed in any round is failed. Otherwise the row is that of the round with the median step
    time (the lower one of two middles, so its fields describe one real run), with: examples/s from the median
    step time over the rounds; "of peak" the median of the rounds' own; peak memory the highest of any round; and
    the speed-up the median of each round's ratio to the 32-true round beside it. The first round's profile, top
    ops and max-batch search are kept.
    """
    failed = next((r for r in rounds if r["status"] != "ok"), None)
    if failed is not None:
        return failed
    steps = [r["median_step_s"] for r in rounds]
    row = dict(rounds[steps.index(statistics.median_low(steps))])
    for key in ("step_breakdown", "top_ops", "max_batch_size", "max_batch_peak_gb", "max_batch_probes",
                "memory_budget_gb"):
        if key in rounds[0]:
            row[key] = rounds[0][key]
    if len(rounds) > 1:
        median = statistics.median(steps)
        row.update(rounds=len(rounds), round_step_s=steps, median_step_s=round(median, 4),
                   examples_per_s=round(row["batch_size"] / median, 3),
                   achieved_flops_per_s=row["step_flops"] / median,
                   matmul_share=round(statistics.median(r["matmul_share"] for r in rounds), 4),
                   round_matmul_share=[r["matmul_share"] for r in rounds],
                   peak_memory_gb=max(r["peak_memory_gb"] for r in rounds))
    row["speedup"] = None
    if reference and all(r["status"] == "ok" for r in reference):
        ratios = [r["examples_per_s"] / ref["examples_per_s"] for r, ref in zip(rounds, reference)]
        row["speedup"] = round(statistics.median(ratios), 3)
        if len(rounds) > 1:
            row["round_speedup"] = [round(x, 3) for x in ratios]
    return row


_ROW_MARKER = "SPLADECTL-BENCH-ROW "


def _bench_in_child(settings: BenchSettings, precision: str, log: Log) -> dict[str, Any]:
    """bench_one in a fresh `python -m spladectl.bench` process; its stderr is relayed line by line to `log`."""
    import json
    import subprocess
    import threading

    request = json.dumps({"settings": dataclasses.asdict(settings), "precision": precision})
    child = subprocess.Popen([sys.executable, "-m", "spladectl.bench"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: list[str] = []

    def relay() -> None:
        for line in child.stderr:
            line = line.rstrip("\n")
            if line.startswith("USDT:"):  # the profiler's start/stop markers
                continue
            tail[:] = (tail + [line])[-20:]
            log(line)

    relay_thread = threading.Thread(target=relay, daemon=True)
    relay_thread.start()
    try:
        child.stdin.write(request)
        child.stdin.close()
        out = child.stdout.read()  # stderr is the relay thread's alone (communicate() would read it too)
        child.wait()
    except BaseException:
        child.kill()
        child.wait()
        raise
    relay_thread.join(timeout=5)
    rows = [line[len(_ROW_MARKER):] for line in out.splitlines() if line.startswith(_ROW_MARKER)]
    if child.returncode == 0 and rows:
        return json.loads(rows[-1])
    errors = [line for line in tail if line.startswith("Error:")]
    if errors:  # a SpladectlError in the child (a bad model name, unreadable data): the user's to fix
        raise SpladectlError(errors[-1][len("Error:"):].strip())
    detail = tail[-1] if tail else f"exit status {child.returncode}"
    if child.returncode < 0:
        detail = f"killed by signal {-child.returncode} (out of memory?)"
    log(f"{precision}: failed: {detail}")
    return {"precision": precision, "status": "failed", "reason": detail, "device": settings.device,
            "examples_per_s": None}


def child_main() -> int:
    import json

    request = json.loads(sys.stdin.read())
    settings = BenchSettings(**request["settings"])
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    try:
        row = bench_one(settings, request["precision"], log=log, own_process=True)
    except SpladectlError as exc:
        log(f"Error: {exc.format_message()}".splitlines()[0])
        return 2
    print(_ROW_MARKER + json.dumps(row, default=str), flush=True)
    return 0
