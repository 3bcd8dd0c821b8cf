"""`spladectl encode`: a corpus or query file as sparse vectors on disk, in shards that survive an interruption.

OUT/shards/ holds the vectors, OUT/manifest.json says what was encoded and how (model, input file, format, length, precision, quantisation) and
which shards are finished. Shard k holds inputs k × shard_size ... (k + 1) × shard_size - 1 in input order, so the
files do not depend on how many processes wrote them. Each shard and each manifest update is written to a temporary
file and renamed: after a kill, every shard named in the manifest is whole, and running the same command again
encodes only the rest. Memory stays flat in the corpus size: one shard's texts and vectors at a time per process.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spladectl.data.cache import file_signature, write_atomically
from spladectl.data.texts import check_texts, iter_texts, text_file
from spladectl.errors import SpladectlError
from spladectl.vector_formats import ANSERINI_SCALE, FORMATS, suffix, write_companions, write_shard

MANIFEST = "manifest.json"
SHARDS = "shards"  # a folder of its own, so an engine pointed at it sees nothing but vectors (Anserini reads every file)
_VERSION = 1


@dataclass(frozen=True)
class EncodeJob:
    model: str
    source: str  # a BEIR directory, JSONL or TSV file
    kind: str  # documents | queries
    fmt: str
    max_length: int
    precision: str
    device: str
    scale: int | None  # quantisation: integer weights = round(weight × scale)
    shard_size: int = 10_000
    batch_size: int = 32

    def identity(self) -> dict[str, Any]:
        """What must match for a second run to continue the first one's shards."""
        source = text_file(self.source, self.kind)
        return {"version": _VERSION, "model": self.model, "model_files": model_signature(self.model),
                "source": str(source.resolve()), "source_file": file_signature(source), "kind": self.kind,
                "format": self.fmt, "max_length": self.max_length, "precision": self.precision, "scale": self.scale,
                "shard_size": self.shard_size}


def model_signature(model: str) -> list:
    """Name, size and modification time of a local model's files (a hub name stands for itself)."""
    from spladectl.model import resolve_model_path

    path = Path(resolve_model_path(model))
    if not path.is_dir():
        return [model]
    return [file_signature(p) for p in sorted(path.iterdir()) if p.is_file() and p.name != "README.md"]


def plan(job: EncodeJob) -> EncodeJob:
    """The job with its checks done and Anserini's integer scale filled in."""
    if job.fmt not in FORMATS:
        raise SpladectlError(f"--format {job.fmt!r}: not one of {', '.join(FORMATS)}")
    if job.fmt == "parquet":
        import importlib.util

        if importlib.util.find_spec("pyarrow") is None:
            raise SpladectlError("--format parquet needs pyarrow, which is not installed",
                                 hint="pip install 'spladectl[serving]'")
    if job.scale is not None and job.scale < 1:
        raise SpladectlError(f"--quantize {job.scale}: give a positive scale, such as 100")
    if job.fmt == "anserini" and job.scale is None:
        job = EncodeJob(**{**asdict(job), "scale": ANSERINI_SCALE})
    return job


def encode_to(job: EncodeJob, out: str | os.PathLike, *, nproc: int = 1, overwrite: bool = False,
              progress: bool = True, log: Callable[[str], None] = lambda _: None) -> dict[str, Any]:
    """Encode `job.source` into `out`, continuing an interrupted encode of the same job; a summary dict."""
    job = plan(job)
    out = Path(out)
    identity = job.identity()
    manifest = _open_output(out, identity, overwrite=overwrite)
    if manifest.get("complete"):
        log(f"{out}: already complete ({manifest['count']} {job.kind}); nothing to do")
        return _summary(out, manifest, 0.0, 0)
    if "count" not in manifest:
        manifest["count"] = check_texts(job.source, job.kind)  # every line checked before anything is encoded
        manifest["companions"] = write_companions(job.fmt, out)
        _save(out, manifest)
    # Temporary files of a run that was killed (kill -9 leaves them): never part of the output, and an engine
    # pointed at shards/ must not read them.
    for stale in [*(out / SHARDS).glob(".shard-*.partial"), *out.glob(f".{MANIFEST}.*")]:
        stale.unlink(missing_ok=True)
    done = {int(k) for k, shard in manifest["shards"].items() if (out / shard["file"]).is_file()}
    remaining = manifest["count"] - sum(manifest["shards"][str(k)]["count"] for k in done)
    if done:
        log(f"{out}: continuing: {len(done)} shard(s) already written, {remaining} {job.kind} to go")
    started = time.perf_counter()
    from tqdm.auto import tqdm

    unit = "document" if job.kind == "documents" else "query"
    with tqdm(total=remaining, unit=unit, desc=f"encoding {job.kind}", disable=not progress, dynamic_ncols=True) as bar:
        def finished(index: int, record: dict[str, Any]) -> None:
            manifest["shards"][str(index)] = record
            _save(out, manifest)
            bar.update(record["count"])

        pending = ((i, rows) for i, rows in _shards(job) if i not in done)
        if nproc <= 1:
            worker = _Worker(job, job.device, threads=None)
            for index, rows in pending:
                finished(index, worker.write(out, index, rows))
        else:
            _in_processes(job, out, pending, nproc, finished)
    manifest["complete"] = True
    _save(out, manifest)
    return _summary(out, manifest, time.perf_counter() - started, remaining)


def _shards(job: EncodeJob) -> Iterator[tuple[int, list[tuple[str, str]]]]:
    rows: list[tuple[str, str]] = []
    index = 0
    for text_id, text, _ in iter_texts(job.source, job.kind):
        rows.append((text_id, text))
        if len(rows) == job.shard_size:
            yield index, rows
            rows, index = [], index + 1
    if rows:
        yield index, rows


class _Worker:
    """The model, loaded once per process, and what turns one shard's texts into one shard file."""

    def __init__(self, job: EncodeJob, device: str, threads: int | None):
        import torch

        from spladectl.model import SpladeEncoder

        if threads:
            torch.set_num_threads(threads)
        self.job, self.device = job, device
        self.encoder = SpladeEncoder.from_pretrained(job.model, device=device)
        self.tokens = self.encoder.tokenizer.convert_ids_to_tokens(list(range(self.encoder.vocab_size)))
        self.tokens = [t if t is not None else f"[{i}]" for i, t in enumerate(self.tokens)]

    def write(self, out: Path, index: int, rows: list[tuple[str, str]]) -> dict[str, Any]:
        from spladectl.encoding import encode_sparse

        job = self.job
        matrix = encode_sparse(self.encoder, [text for _, text in rows], max_length=job.max_length,
                               batch_size=job.batch_size, precision=job.precision, device=self.device)
        vectors = [(text_id, text, matrix.indices[matrix.indptr[i]:matrix.indptr[i + 1]],
                    matrix.data[matrix.indptr[i]:matrix.indptr[i + 1]]) for i, (text_id, text) in enumerate(rows)]
        name = f"shard-{index:05d}{suffix(job.fmt, job.kind)}"
        (out / SHARDS).mkdir(exist_ok=True)
        write_atomically(out / SHARDS / name, lambda handle: write_shard(
            job.fmt, handle, vectors, tokens=self.tokens, kind=job.kind, scale=job.scale,
            first_position=index * job.shard_size))
        return {"file": f"{SHARDS}/{name}", "count": len(rows), "terms": int(matrix.nnz), "first_id": rows[0][0]}


_worker: _Worker | None = None


def _start_worker(job: EncodeJob, devices: Any, threads: int) -> None:
    global _worker
    _worker = _Worker(job, devices.get(), threads)


def _write_in_worker(out: Path, index: int, rows: list[tuple[str, str]]) -> tuple[int, dict[str, Any]]:
    return index, _worker.write(out, index, rows)


def _in_processes(job: EncodeJob, out: Path, pending, nproc: int, finished) -> None:
    """Shards spread over `nproc` processes (one per GPU on CUDA), at most two shards each in flight."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    import torch

    context = multiprocessing.get_context("spawn")
    devices = context.Queue()
    gpus = torch.cuda.device_count() if job.device.startswith("cuda") else 0
    for rank in range(nproc):
        devices.put(f"cuda:{rank % gpus}" if gpus else job.device)
    threads = max(1, (os.cpu_count() or 1) // nproc)
    with ProcessPoolExecutor(nproc, mp_context=context, initializer=_start_worker,
                             initargs=(job, devices, threads)) as pool:
        running: set = set()
        for index, rows in pending:
            running.add(pool.submit(_write_in_worker, out, index, rows))
            if len(running) >= 2 * nproc:
                complete, running = wait(running, return_when=FIRST_COMPLETED)
                for future in complete:
                    finished(*future.result())
        for future in running:
            finished(*future.result())


# ---- the output directory and its manifest ------------------------------------------------------------------------

def _open_output(out: Path, identity: dict[str, Any], *, overwrite: bool) -> dict[str, Any]:
    """The manifest to continue, or a fresh one in an empty (or replaced) directory."""
    path = out / MANIFEST
    if path.is_file():
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise SpladectlError(f"{path}: unreadable ({exc})", hint="--overwrite to encode again from scratch")
        if manifest.get("job") == identity:
            return manifest
        if not overwrite:
            changed = sorted(k for k in identity if manifest.get("job", {}).get(k) != identity[k])
            raise SpladectlError(f"{out} holds an encode with other settings ({', '.join(changed)} differ)",
                                 hint="give another directory, or --overwrite to replace it")
        shutil.rmtree(out)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise SpladectlError(f"{out} already exists and is not an encode directory",
                                 hint="give another directory, or --overwrite to replace it")
        shutil.rmtree(out) if out.is_dir() else out.unlink()
    out.mkdir(parents=True, exist_ok=True)
    manifest = {"job": identity, "complete": False, "shards": {}}
    _save(out, manifest)
    return manifest


def _save(out: Path, manifest: dict[str, Any]) -> None:
    text = json.dumps(manifest, indent=1, sort_keys=True)
    write_atomically(out / MANIFEST, lambda handle: handle.write(text.encode()))


def read_manifest(out: str | os.PathLike) -> dict[str, Any]:
    """A complete encode's manifest; an error naming what is wrong otherwise."""
    path = Path(out) / MANIFEST
    if not path.is_file():
        raise SpladectlError(f"{out}: not an encode directory (no {MANIFEST})", hint="write one with `spladectl encode`")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise SpladectlError(f"{out}: the encode is not finished",
                             hint="run the same `spladectl encode` command again to finish it")
    return manifest


def shard_files(out: str | os.PathLike, manifest: dict[str, Any]) -> list[Path]:
    return [Path(out) / manifest["shards"][k]["file"] for k in sorted(manifest["shards"], key=int)]


def _summary(out: Path, manifest: dict[str, Any], seconds: float, encoded: int) -> dict[str, Any]:
    shards = manifest["shards"].values()
    count = manifest["count"]
    return {"out": str(out), "kind": manifest["job"]["kind"], "format": manifest["job"]["format"], "count": count,
            "encoded_now": encoded, "shards": len(manifest["shards"]), "seconds": round(seconds, 2),
            "per_second": round(encoded / seconds, 1) if seconds > 0 else None,
            "avg_terms": round(sum(s["terms"] for s in shards) / max(count, 1), 1),
            "scale": manifest["job"]["scale"], "companions": manifest.get("companions", [])}
