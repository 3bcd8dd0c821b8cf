"""From model to search: encoding throughput against sentence-transformers, Seismic against exact search, and ONNX
query latency. Ratios are measured side by side in one run on one machine; each figure is a median of --repeats.

    python benchmarks/serving.py encode   # docs/s: spladectl's encode path vs SparseEncoder.encode_document
    python benchmarks/serving.py memory   # peak RSS of `spladectl encode` on 2k vs 8k documents (flat = streaming)
    python benchmarks/serving.py index    # Seismic vs exact on SciFact: build, size, p50/p99 latency, recall@10
    python benchmarks/serving.py synthetic --docs 1000000   # the same on a synthetic corpus (generator below)
    python benchmarks/serving.py onnx     # one query at a time: onnxruntime vs torch

encode: the same SciFact documents (--docs of them), model (splade-tiny), length (--max-length) and precision
(32-true and, where the CPU has native bf16, bf16-mixed: CPU autocast around both) for both; 2 torch threads.
spladectl's figure is its `encode` worker (tokenize, length-sorted batches, forward, sparse output, a shard file
written); sentence-transformers' is `encode_document(..., convert_to_sparse_tensor=True)` on the model exported by
`spladectl export` (same weights and lengths), batch size 32 for both.

synthetic: --docs documents, each a SciFact document vector (drawn uniformly) whose terms are each dropped with
probability 0.2 and whose weights are each multiplied by exp(N(0, 0.25²)); queries are SciFact's test queries. It
keeps the term statistics of real SPLADE vectors (a few heavy terms per document, a long tail) at a size the real
corpus does not reach.
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

import numpy as np

DEFAULT_DATA = Path(os.environ.get("SPLADECTL_SCIFACT", Path(__file__).resolve().parents[2] / "shared" / "data" / "scifact"))


def median(values):
    return statistics.median(values) if values else float("nan")


# ------------------------------------------------------------------------------------------------------ encoding

def bench_encode(args) -> list[dict]:
    import torch

    from spladectl.data.texts import iter_texts
    from spladectl.export import export_model
    from spladectl.hardware import detect
    from spladectl.vector_files import EncodeJob, _Worker

    torch.set_num_threads(args.threads)
    texts = [(i, t) for i, t, _ in iter_texts(args.data, "documents")][: args.docs]
    facts = detect()
    # bf16 is measured wherever the CPU has bf16 instructions, also where spladectl would not choose it (a bf16
    # matmul slower than float32's); the row says how fast this CPU's bf16 matmul is, so the ratio can be read.
    precisions = ["32-true"] + (["bf16-mixed"] if facts.has_bf16 else [])
    workdir = Path(tempfile.mkdtemp(prefix="serving-bench-"))
    export_model("splade-tiny", workdir / "st", "sentence-transformers")
    from sentence_transformers import SparseEncoder

    st = SparseEncoder(str(workdir / "st"), device="cpu")
    st.max_seq_length = args.max_length
    rows = []
    for precision in precisions:
        job = EncodeJob(model="splade-tiny", source=str(args.data), kind="documents", fmt="parquet",
                        max_length=args.max_length, precision=precision, device="cpu", scale=None, batch_size=32)
        worker = _Worker(job, "cpu", threads=args.threads)
        ours, theirs = [], []
        for repeat in range(args.repeats):
            for name in (("spladectl", "st") if repeat % 2 == 0 else ("st", "spladectl")):
                started = time.perf_counter()
                if name == "spladectl":
                    (workdir / "out").mkdir(exist_ok=True)
                    worker.write(workdir / "out", 0, texts)
                    ours.append(time.perf_counter() - started)
                else:
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
                        st.encode_document([t for _, t in texts], batch_size=32, convert_to_sparse_tensor=True)
                    theirs.append(time.perf_counter() - started)
        rows.append({"precision": precision, "docs": len(texts), "spladectl_docs_s": len(texts) / median(ours),
                     "st_docs_s": len(texts) / median(theirs), "ratio": median(theirs) / median(ours),
                     "bf16_matmul_vs_fp32": facts.bf16_matmul_speedup if precision == "bf16-mixed" else None})
    return rows


def bench_memory(args) -> list[dict]:
    """Peak RSS of a `spladectl encode` process on corpora of 2k and 8k documents (SciFact's, repeated with new ids)."""
    rows = []
    workdir = Path(tempfile.mkdtemp(prefix="serving-memory-"))
    source = [json.loads(line) for line in (args.data / "corpus.jsonl").read_text().splitlines()]
    for size in (2_000, 8_000):
        corpus = workdir / f"corpus-{size}.jsonl"
        with open(corpus, "w") as handle:
            for i in range(size):
                record = dict(source[i % len(source)], _id=f"d{i}")
                handle.write(json.dumps(record) + "\n")
        started = time.perf_counter()
        code = ("import resource, sys; from spladectl.cli.app import main; sys.argv = sys.argv[1:]\n"
                "try:\n    main()\nfinally:\n"
                "    print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)")
        done = subprocess.run([sys.executable, "-c", code, "spladectl", "encode", "-d", str(corpus), "-o",
                               str(workdir / f"out-{size}"), "-f", "parquet", "--max-length", "128",
                               "--shard-size", "1000", "--no-progress", "--precision", "32-true"],
                              capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
        peak = [line for line in done.stderr.splitlines() if line.startswith("PEAK")]
        rows.append({"docs": size, "peak_rss_mib": int(peak[-1].split()[1]) / 1024 if peak else None,
                     "seconds": round(time.perf_counter() - started, 1), "exit": done.returncode})
    return rows


# ------------------------------------------------------------------------------------------------------ indexes

def _scifact_vectors(args, workdir: Path):
    """SciFact's documents encoded once (cached in workdir), and its test queries' vectors."""
    from spladectl.data.beir import load_beir
    from spladectl.encoding import encode_sparse
    from spladectl.model import SpladeEncoder
    from spladectl.vector_files import EncodeJob, encode_to

    vectors = workdir / "scifact-vectors"
    encode_to(EncodeJob(model="splade-tiny", source=str(args.data), kind="documents", fmt="parquet",
                        max_length=args.max_length, precision="32-true", device="cpu", scale=None), vectors,
              progress=False)
    dataset = load_beir(args.data, "test")
    encoder = SpladeEncoder.from_pretrained("splade-tiny")
    query_ids = list(dataset.queries)
    queries = encode_sparse(encoder, [dataset.queries[q] for q in query_ids], max_length=64)
    return vectors, queries


def _measure(index, queries, k: int = 10) -> tuple[list[list[str]], list[float]]:
    found, latencies = [], []
    for row in range(queries.shape[0]):
        started = time.perf_counter()
        hits = index.search(queries[row], k, threads=1)[0]
        latencies.append(time.perf_counter() - started)
        found.append([doc for doc, _ in hits])
    return found, latencies


def _compare(vectors: Path, queries, workdir: Path, label: str, heap_factors) -> list[dict]:
    from spladectl.index import SeismicSettings, build_index, open_index

    rows = []
    built = {}
    for kind in ("exact", "seismic"):
        started = time.perf_counter()
        result = build_index(vectors, workdir / f"{label}-{kind}", kind=kind, overwrite=True, progress=False)
        built[kind] = (time.perf_counter() - started, result["bytes"])
        print(f"{label}: {kind} index built in {built[kind][0]:.0f} s", file=sys.stderr, flush=True)
    exact = open_index(workdir / f"{label}-exact")
    truth, exact_latency = _measure(exact, queries)
    rows.append({"corpus": label, "index": "exact", "build_s": built["exact"][0], "size_mib": built["exact"][1] / 2**20,
                 "p50_ms": np.percentile(exact_latency, 50) * 1e3, "p99_ms": np.percentile(exact_latency, 99) * 1e3,
                 "recall@10": 1.0})
    seismic = open_index(workdir / f"{label}-seismic")
    for heap in heap_factors:
        seismic.settings = SeismicSettings(**{**seismic.settings.__dict__, "heap_factor": heap})
        got, latency = _measure(seismic, queries)
        recall = np.mean([len(set(g) & set(t)) / max(len(t), 1) for g, t in zip(got, truth)])
        rows.append({"corpus": label, "index": f"seismic heap_factor={heap}", "build_s": built["seismic"][0],
                     "size_mib": built["seismic"][1] / 2**20, "p50_ms": np.percentile(latency, 50) * 1e3,
                     "p99_ms": np.percentile(latency, 99) * 1e3, "recall@10": float(recall)})
    return rows


def bench_index(args) -> list[dict]:
    workdir = Path(args.workdir)
    vectors, queries = _scifact_vectors(args, workdir)
    return _compare(vectors, queries, workdir, "SciFact (5,183 docs)", args.heap_factors)


def bench_synthetic(args) -> list[dict]:
    """The synthetic corpus (see the module docstring), written as a parquet encode directory, then compared."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from spladectl.vector_files import MANIFEST, read_manifest, shard_files
    from spladectl.vector_formats import read_shard

    workdir = Path(args.workdir)
    vectors, queries = _scifact_vectors(args, workdir)
    manifest = read_manifest(vectors)
    base = [r for path in shard_files(vectors, manifest) for r in read_shard("parquet", path)]
    rng = np.random.default_rng(0)
    out = workdir / f"synthetic-{args.docs}"
    out.mkdir(exist_ok=True)
    shard, shards = 100_000, {}
    for index, start in enumerate(range(0, args.docs, shard)):
        ids, terms, weights = [], [], []
        for i in range(start, min(start + shard, args.docs)):
            _, t, w = base[rng.integers(len(base))]
            keep = rng.random(len(t)) >= 0.2
            ids.append(f"s{i}")
            terms.append(t[keep].astype(np.int32))
            weights.append((w[keep] * np.exp(rng.normal(0, 0.25, keep.sum()))).astype(np.float32))
        name = f"shard-{index:05d}.parquet"
        pq.write_table(pa.table({"id": ids, "term_ids": pa.array(terms, pa.list_(pa.int32())),
                                 "weights": pa.array(weights, pa.list_(pa.float32()))}), out / name)
        shards[str(index)] = {"file": name, "count": len(ids), "terms": int(sum(len(t) for t in terms))}
    job = {**manifest["job"], "source": f"synthetic({args.docs})"}
    (out / MANIFEST).write_text(json.dumps({"job": job, "complete": True, "count": args.docs, "shards": shards}))
    return _compare(out, queries, workdir, f"synthetic ({args.docs:,} docs)", args.heap_factors)


# ------------------------------------------------------------------------------------------------------ onnx

def bench_onnx(args) -> list[dict]:
    import onnxruntime
    import torch

    from spladectl.data.beir import load_beir
    from spladectl.export import export_model
    from spladectl.model import SpladeEncoder

    torch.set_num_threads(args.threads)
    workdir = Path(tempfile.mkdtemp(prefix="serving-onnx-"))
    export_model("splade-tiny", workdir / "onnx", "onnx")
    queries = list(load_beir(args.data, "test").queries.values())[:200]
    encoder = SpladeEncoder.from_pretrained("splade-tiny").eval()
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(str(workdir / "onnx" / "model.onnx"), options,
                                           providers=["CPUExecutionProvider"])
    timings = {"torch": [], "onnxruntime": []}
    for text in queries:
        batch = encoder.tokenize([text], 64)
        started = time.perf_counter()
        with torch.no_grad():
            encoder(**batch)
        timings["torch"].append(time.perf_counter() - started)
        started = time.perf_counter()
        session.run(["sparse"], {k: v.numpy() for k, v in batch.items()})
        timings["onnxruntime"].append(time.perf_counter() - started)
    return [{"runtime": name, "queries": len(queries), "threads": args.threads,
             "p50_ms": np.percentile(t, 50) * 1e3, "p99_ms": np.percentile(t, 99) * 1e3} for name, t in timings.items()]


def table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    return "\n".join(["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys),
                      *["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["encode", "memory", "index", "synthetic", "onnx"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--docs", type=int, default=1000, help="encode: documents; synthetic: corpus size")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--heap-factors", type=float, nargs="+", default=[0.9, 0.7])
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "spladectl-serving-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    rows = {"encode": bench_encode, "memory": bench_memory, "index": bench_index, "synthetic": bench_synthetic,
            "onnx": bench_onnx}[args.what](args)
    print(json.dumps(rows, indent=1) if args.json else table(rows))


if __name__ == "__main__":
    main()
