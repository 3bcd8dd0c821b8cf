"""Every precision of a bench, each in its own process (`python -m spladectl.bench`) unless told not to."""

from __future__ import annotations

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
            row = bench_precision(settings, precision, make_examples(needed), pm, log, workdir, {})
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
              pm=None) -> list[dict[str, Any]]:
    """Every precision of `settings`: a row each (status "ok", "skipped" with a reason, or "failed").

    `isolate` (default) runs each precision in its own Python process, so its peak memory is its own: in one
    process, memory an earlier precision freed often stays resident (allocator caches, oneDNN scratchpads) and
    would be counted against the next. `facts`: the machine's HardwareFacts when the caller has them.
    """
    device = torch.device(settings.device)
    if facts is None and device.type in ("cpu", "mps") and "bf16-mixed" in settings.precisions:
        from spladectl.hardware import detect

        facts = detect()
    rows: list[dict[str, Any]] = []
    for precision in settings.precisions:
        reason = unsupported_reason(precision, device, facts)
        if reason:
            log(f"{precision}: skipped: {reason}")
            rows.append({"precision": precision, "status": "skipped", "reason": reason, "device": str(device),
                         "examples_per_s": None})
            continue
        if isolate:
            rows.append(_bench_in_child(settings, precision, log))
        else:
            rows.append(bench_one(settings, precision, log=log, pm=pm))
    reference = next((r for r in rows if r["precision"] == "32-true" and r["status"] == "ok"), None)
    for row in rows:
        if reference is not None and row["status"] == "ok":
            row["speedup"] = round(row["examples_per_s"] / reference["examples_per_s"], 3)
    return rows


_ROW_MARKER = "SPLADECTL-BENCH-ROW "


def _bench_in_child(settings: BenchSettings, precision: str, log: Log) -> dict[str, Any]:
    """bench_one in a fresh `python -m spladectl.bench` process; its stderr is relayed line by line to `log`."""
    import dataclasses
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
