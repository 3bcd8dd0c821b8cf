"""Training data of MS MARCO size: time to the first training step, peak memory and throughput, for a raw triples
file (read by offset, spladectl.data.indexed) and for the same file prepared (`spladectl data prepare`), at two sizes.

    python benchmarks/large_data.py generate --rows 10000000 --out /big/triples-10M.tsv
    python benchmarks/large_data.py generate --rows 1000000 --out /big/triples-1M.tsv
    python benchmarks/large_data.py measure /big/triples-1M.tsv /big/triples-10M.tsv --prepare --steps 30

`generate` writes `query<TAB>positive<TAB>negative` lines from SciFact text (train queries with a judged document,
a random other document as the negative; passages cut to --chars characters, as MS MARCO passages are about 350),
the shape of MS MARCO's training triples. `measure` trains splade-tiny on each file as it is (and, with --prepare,
on its prepared directory, made first and timed) for --steps steps in a fresh process each, plus a small file read
whole as the in-memory reference, and reports:

- first step: seconds from starting `spladectl train` to its first metrics line (imports, model, data, one step);
  for a raw file the first run builds the row index (a scan of the file), the second finds it cached;
- peak RSS of the process (and its anonymous part: what the page cache cannot give back);
- examples/s over the steps after the first two.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCIFACT = HERE.parent.parent / "shared" / "data" / "scifact"


def generate(rows: int, out: Path, data: Path, chars: int, seed: int) -> None:
    corpus = {}
    with open(data / "corpus.jsonl", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)
            corpus[doc["_id"]] = " ".join(f"{doc.get('title', '')} {doc['text']}".split())[:chars]
    queries = {}
    with open(data / "queries.jsonl", encoding="utf-8") as fh:
        for line in fh:
            q = json.loads(line)
            queries[q["_id"]] = " ".join(q["text"].split())
    pairs = []
    with open(data / "qrels" / "train.tsv", encoding="utf-8") as fh:
        next(fh)
        for line in fh:
            qid, did, score = line.rstrip("\n").split("\t")
            if int(score) > 0 and qid in queries and did in corpus:
                pairs.append((queries[qid], corpus[did]))
    docs = list(corpus.values())
    rng = random.Random(seed)
    tmp = out.with_name(f".{out.name}.partial")
    started = time.perf_counter()
    with open(tmp, "w", encoding="utf-8") as fh:
        for start in range(0, rows, 100_000):
            chunk = []
            for _ in range(min(100_000, rows - start)):
                query, positive = pairs[rng.randrange(len(pairs))]
                chunk.append(f"{query}\t{positive}\t{docs[rng.randrange(len(docs))]}\n")
            fh.write("".join(chunk))
    os.replace(tmp, out)
    print(f"{out}: {rows:,} rows, {out.stat().st_size / 2**30:.2f} GiB in {time.perf_counter() - started:.0f} s")


def _train(data: Path, steps: int, threads: int) -> dict:
    """One `spladectl train` on `data` in its own process: first-step time, peak RSS, examples/s."""
    import psutil

    out = Path(tempfile.mkdtemp(prefix="spladectl-large-"))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "spladectl", "train", "--data", str(data), "--output-dir", str(out / "run"),
               "--max-steps", str(steps), "--batch-size", "16", "--grad-accum", "1", "--max-query-length", "32",
               "--max-doc-length", "128", "--precision", "32-true", "--no-progress"]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watched = psutil.Process(process.pid)
    first_step, peak, peak_anon = None, 0, 0
    metrics = out / "run" / "metrics.jsonl"
    while process.poll() is None:
        try:
            info = watched.memory_full_info()
            peak = max(peak, info.rss)
            peak_anon = max(peak_anon, info.rss - getattr(info, "shared", 0))
        except psutil.Error:
            pass
        if first_step is None and metrics.is_file() and metrics.stat().st_size:
            first_step = time.perf_counter() - started
        time.sleep(0.05)
    log = process.stdout.read()
    if process.returncode != 0:
        raise SystemExit(f"spladectl train on {data} failed:\n{log[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    timed = rows[2:] or rows
    examples_per_s = sum(r["examples"] for r in timed) / sum(r["step_seconds"] for r in timed)
    shutil.rmtree(out, ignore_errors=True)
    return {"first_step_s": round(first_step, 1), "peak_rss_mib": round(peak / 2**20),
            "peak_anon_mib": round(peak_anon / 2**20), "examples_per_s": round(examples_per_s, 1)}


def measure(files: list[Path], steps: int, prepare: bool, threads: int, reference_rows: int) -> list[dict]:
    results = []
    reference = Path(tempfile.mkdtemp(prefix="spladectl-large-ref-")) / "small.tsv"
    with open(files[0], encoding="utf-8") as src, open(reference, "w", encoding="utf-8") as dst:
        for _ in range(reference_rows):
            dst.write(src.readline())
    results.append({"data": f"{reference_rows:,} rows read whole (in memory)", **_train(reference, steps, threads)})
    for path in files:
        rows = _rows(path)
        for attempt in ("first run: builds the row index", "again: index cached"):
            results.append({"data": f"{path.name} ({rows:,} rows, {attempt})", **_train(path, steps, threads)})
        if prepare:
            target = path.with_suffix(".prepared")
            shutil.rmtree(target, ignore_errors=True)
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "spladectl", "data", "prepare", str(path), str(target),
                            "--no-progress"], check=True, capture_output=True)
            prepared_s = time.perf_counter() - started
            results.append({"data": f"{path.name} prepared ({prepared_s:.0f} s to prepare)",
                            **_train(target, steps, threads)})
        for row in results:
            print(json.dumps(row), flush=True)
    return results


def _rows(path: Path) -> int:
    with open(path, "rb") as fh:
        return sum(block.count(b"\n") for block in iter(lambda: fh.read(64 * 2**20), b""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="write a synthetic triples file from SciFact text")
    gen.add_argument("--rows", type=int, default=10_000_000)
    gen.add_argument("--out", type=Path, required=True)
    gen.add_argument("--data", type=Path, default=SCIFACT)
    gen.add_argument("--chars", type=int, default=400)
    gen.add_argument("--seed", type=int, default=1)
    run = commands.add_parser("measure", help="train on each file (and its prepared copy) and report")
    run.add_argument("files", type=Path, nargs="+")
    run.add_argument("--steps", type=int, default=30)
    run.add_argument("--prepare", action="store_true")
    run.add_argument("--threads", type=int, default=2)
    run.add_argument("--reference-rows", type=int, default=100_000)
    args = parser.parse_args()
    if args.command == "generate":
        generate(args.rows, args.out, args.data, args.chars, args.seed)
        return
    results = measure(args.files, args.steps, args.prepare, args.threads, args.reference_rows)
    print("| data | first step s | peak RSS MiB | of which anonymous MiB | examples/s |")
    print("|---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['data']} | {r['first_step_s']} | {r['peak_rss_mib']} | {r['peak_anon_mib']} | "
              f"{r['examples_per_s']} |")


if __name__ == "__main__":
    main()
