"""Peak memory and step time of spladectl's training step with and without gradient caching (--grad-cache-chunk).

    python benchmarks/grad_cache.py                          # batch 16/64/128, plain vs chunks of 16, demo data
    python benchmarks/grad_cache.py --batch-sizes 16,32 --steps 3 --repeats 1      # a quick look
    python benchmarks/grad_cache.py --json > grad_cache.json

The job: splade-tiny, dropout on, 32-true, the built-in demo set (each query with its positive and one hard
negative: a batch of B examples is B queries and 2B documents), queries up to 32 tokens, documents up to 128, the
default loss (in-batch cross-entropy + FLOPS), AdamW, 1 torch thread by default (on a shared 2-core machine, two
threads' parallel regions wait on each other and time the load, not the step; see docs/benchmarks.md, "Busy
machines"). Each (batch, chunk) runs in its own Python
process, so its peak RSS (ru_maxrss, the kernel's high-water mark) is its own; the RSS before the first step is shown
too, to separate the model and libraries from what training adds. Step time is the median over the timed steps
(after --warmup), each step being `Trainer.train_step` as `spladectl train` runs it (forward, backward,
optimizer). Plain and chunked runs of a batch size follow each other, their order alternating between repeats; the
table shows medians over repeats.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULT_MARKER = "GRAD-CACHE-RESULT "


def rss_mb() -> float:
    """This process's resident memory now, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure(batch: int, chunk: int | None, args) -> dict:
    """One run in this process: warm-up and timed optimizer steps; the peak RSS of the whole process."""
    import torch

    torch.set_num_threads(args.threads)
    from spladectl.config import TrainConfig
    from spladectl.data import load_training_data
    from spladectl.engine import Trainer
    from spladectl.plugin_loading import load_plugins

    examples = load_training_data(str(REPO / "spladectl" / "demo" / "train.jsonl"))
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(output_dir=out, batch_size=batch, grad_cache_chunk=chunk, n_negatives=1,
                             max_query_length=32, max_doc_length=args.max_doc_length, precision="32-true", lr=2e-5,
                             max_steps=args.warmup + args.steps, seed=42)
        trainer = Trainer(config, examples, pm=load_plugins(), progress=False, log=lambda _: None)
        trainer.state.model.train()
        before = rss_mb()
        seconds = []
        try:
            for _ in range(args.warmup + args.steps):
                started = time.perf_counter()
                trainer.train_step(trainer.state)
                seconds.append(time.perf_counter() - started)
        finally:
            trainer._close_batches()
    timed = seconds[args.warmup:]
    return {"batch": batch, "chunk": chunk, "step_s": statistics.median(timed),
            "examples_per_s": batch / statistics.median(timed), "rss_before_mb": before,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def run_child(batch: int, chunk: int | None, args) -> dict:
    command = [sys.executable, __file__, "--child", str(batch), str(chunk or 0), "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--threads", str(args.threads), "--max-doc-length",
               str(args.max_doc_length)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"batch {batch}, chunk {chunk} failed:\n{done.stderr[-3000:]}")
    line = next(x for x in done.stdout.splitlines() if x.startswith(RESULT_MARKER))
    return json.loads(line[len(RESULT_MARKER):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", default="16,64,128")
    parser.add_argument("--chunk", type=int, default=16, help="texts per chunk of the gradient-cached runs")
    parser.add_argument("--steps", type=int, default=4, help="timed optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-doc-length", type=int, default=128)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch, chunk = args.child
        print(RESULT_MARKER + json.dumps(measure(batch, chunk or None, args)), flush=True)
        return

    runs: dict[tuple[int, int | None], list[dict]] = {}
    for repeat in range(args.repeats):
        for batch in [int(b) for b in args.batch_sizes.split(",")]:
            pair = [None, args.chunk] if repeat % 2 == 0 else [args.chunk, None]
            for chunk in pair:
                runs.setdefault((batch, chunk), []).append(run_child(batch, chunk, args))
                print(f"  batch {batch:>4} chunk {chunk or '-':>4}: {runs[batch, chunk][-1]}", file=sys.stderr)
    rows = [{key: statistics.median(r[key] for r in results) if key not in ("batch", "chunk") else results[0][key]
             for key in results[0]} for results in runs.values()]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"splade-tiny, 32-true, demo set, 1 hard negative, query/doc ≤ 32/{args.max_doc_length} tokens, "
          f"{args.threads} threads, medians of {args.steps} steps × {args.repeats} repeat(s)")
    print(f"{'batch':>6} {'chunk':>6} {'step s':>8} {'ex/s':>7} {'RSS before MB':>14} {'peak RSS MB':>12} "
          f"{'added MB':>9}")
    for r in rows:
        print(f"{r['batch']:>6} {r['chunk'] or '-':>6} {r['step_s']:>8.2f} {r['examples_per_s']:>7.1f} "
              f"{r['rss_before_mb']:>14.0f} {r['peak_rss_mb']:>12.0f} {r['peak_rss_mb'] - r['rss_before_mb']:>9.0f}")


if __name__ == "__main__":
    main()
