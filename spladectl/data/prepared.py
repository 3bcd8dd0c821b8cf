"""Training data converted once to Arrow files, so that training on millions of examples starts at once and holds
only the rows it is using.

`spladectl data prepare IN OUT` reads IN (JSONL, seed JSON or TSV triples) one row at a time, checks every row as the
readers do, and writes OUT/part-NNNNN.arrow (Arrow IPC files of PART_ROWS rows, in record batches of ROWS_PER_BATCH)
and OUT/prepared.json (rows, parts, fewest negatives, whether teacher scores are present, the source). OUT is built in
`.OUT.preparing/` and renamed, so it is whole or absent; a killed preparation continues from its last whole part.
`--data OUT` then trains on it: PreparedExamples reads the record batch holding a row when a micro-batch asks for it
(with pread, not a memory map: mapped pages would count as the process's memory, and a fault holds the GIL).

TSV triples: lines with the same query and positive are grouped into one example when they are adjacent (reading a
TSV file directly groups them wherever they are, which needs the whole file in memory); sort the file by its first
two columns to group them all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
from typing import Any, Callable, Iterator

from spladectl.data._io import iter_json_array, iter_jsonl, iter_lines, where
from spladectl.data.cache import swap_in, write_atomically
from spladectl.data.examples import Example, ExamplesOnDemand, _example, _tsv_example, require_same_scoring
from spladectl.errors import DataError, SpladectlError

MANIFEST = "prepared.json"
PROGRESS = "progress.json"
FORMAT = "spladectl-prepared-examples"
VERSION = 2
# Rows are read a record batch at a time (a pread, without the GIL, in the prefetch thread): small batches keep a
# random row's read small (about 230 KB for MS MARCO-like rows) and the process's memory flat.
ROWS_PER_BATCH = 256
PART_ROWS = 1_000_000  # rows per part file: what a killed `data prepare` can lose


def _schema():
    import pyarrow as pa

    return pa.schema([("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())),
                      ("teacher_scores", pa.list_(pa.float64())), ("source", pa.string())])


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _pyarrow():
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise SpladectlError("prepared training data needs pyarrow",
                             hint="pip install 'spladectl[serving]' (or pip install pyarrow)") from exc
    return pa


def stream_examples(path: str | Path, fmt: str, start: int = 1) -> Iterator[Example]:
    """The examples of a JSONL, seed JSON or TSV file one at a time, checked as the readers check them; JSONL and
    TSV from line `start` (the first line of an example)."""
    if fmt == "jsonl":
        for line, record in iter_jsonl(path, start):
            yield _example(record, where(path, line))
    elif fmt == "json":
        for line, record in iter_json_array(path):
            yield _example(record, where(path, line))
    elif fmt == "tsv":
        current: Example | None = None
        for number, line in iter_lines(path, start):
            if not line.strip():
                continue
            example = _tsv_example(line, where(path, number))
            if current is not None and (current.query, current.positive) == (example.query, example.positive):
                current.negatives.extend(example.negatives)
                continue
            if current is not None:
                yield current
            current = example
        if current is not None:
            yield current
    else:
        raise DataError(f"{path}: {fmt} data cannot be prepared; give a JSONL, JSON or TSV file "
                        "(`spladectl data mine` turns a BEIR directory into JSONL)")


def prepare(source: str | Path, out: str | Path, *, fmt: str, progress: Callable[[int], None] | None = None,
            log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Convert `source` into a prepared directory `out` (see the module's docstring); returns its manifest.

    The work goes into `.OUT.preparing/` beside OUT, a part of PART_ROWS rows at a time, each part whole on disk
    before the record of progress names it. Run again on the same source (same size and modification time) after a
    kill, it continues after the last whole part (JSONL and TSV; a seed JSON list starts over). OUT appears, by a
    rename, only when every row is in.
    """
    pa = _pyarrow()
    source, out = Path(source), Path(out)
    work = out.parent / f".{out.name}.preparing"
    stat = source.stat()
    signature = {"source": str(source.resolve()), "source_bytes": stat.st_size, "source_mtime_ns": stat.st_mtime_ns,
                 "source_format": fmt, "version": VERSION}
    state = _progress_so_far(work, signature) if fmt in ("jsonl", "tsv") else None
    if state is None:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {**signature, "parts": [], "rows": 0, "next_line": 1, "min_negatives": None, "max_negatives": 0,
                 "teacher_scores": None, "first_source": None}
    elif log:
        log(f"continuing: {state['rows']} rows in {len(state['parts'])} part(s) were prepared before it stopped")
    first = None if state["first_source"] is None else Example(
        "", "", [], [0.0] if state["teacher_scores"] else None, state["first_source"])
    pending: list[Example] = []
    try:
        _fill(pa, work, state, first, pending, stream_examples(source, fmt, state["next_line"]), progress)
    except DataError:
        shutil.rmtree(work, ignore_errors=True)  # the source must change: nothing done so far would be reused
        raise

    if not state["rows"]:
        shutil.rmtree(work, ignore_errors=True)
        raise DataError(f"{source}: no examples")
    manifest = {"format": FORMAT, "version": VERSION, "rows": state["rows"], "parts": state["parts"],
                "rows_per_batch": ROWS_PER_BATCH,
                "min_negatives": state["min_negatives"], "max_negatives": state["max_negatives"],
                "teacher_scores": state["teacher_scores"], "source": signature["source"], "source_format": fmt,
                "source_bytes": stat.st_size}
    write_atomically(work / MANIFEST, lambda fh: fh.write((json.dumps(manifest, indent=2) + "\n").encode()))
    (work / PROGRESS).unlink()
    swap_in(work, out)
    if progress:
        progress(state["rows"])
    return manifest


def _fill(pa, work: Path, state: dict[str, Any], first: Example | None, pending: list[Example],
          examples: Iterator[Example], progress: Callable[[int], None] | None) -> None:
    for example in examples:
        if len(pending) >= PART_ROWS:  # a part ends where the next example begins, so a resume starts on a row
            _write_part(pa, work, state, pending, next_line=_line_of(example))
            pending.clear()
        if first is None:
            first = example
            state["teacher_scores"], state["first_source"] = example.teacher_scores is not None, example.source
        require_same_scoring(example, first)
        pending.append(example)
        n = len(example.negatives)
        state["min_negatives"] = n if state["min_negatives"] is None else min(state["min_negatives"], n)
        state["max_negatives"] = max(state["max_negatives"], n)
        if progress and len(pending) % ROWS_PER_BATCH == 0:
            progress(state["rows"] + len(pending))
    if pending:
        _write_part(pa, work, state, pending, next_line=None)


def _progress_so_far(work: Path, signature: dict[str, Any]) -> dict[str, Any] | None:
    """The record of an interrupted preparation of the same source, with its parts on disk; else None."""
    try:
        state = json.loads((work / PROGRESS).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(state, dict) or any(state.get(k) != v for k, v in signature.items()) \
            or state.get("next_line") is None \
            or not all((work / part["file"]).is_file() for part in state.get("parts", [])):
        return None
    return state


def _write_part(pa, work: Path, state: dict[str, Any], examples: list[Example], *, next_line: int | None) -> None:
    name = f"part-{len(state['parts']):05d}.arrow"
    tmp = work / f".{name}.partial"
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, _schema()) as writer:
        for i in range(0, len(examples), ROWS_PER_BATCH):
            writer.write_batch(_record_batch(pa, examples[i:i + ROWS_PER_BATCH]))
    os.replace(tmp, work / name)
    state["parts"].append({"file": name, "rows": len(examples)})
    state["rows"] += len(examples)
    state["next_line"] = next_line
    write_atomically(work / PROGRESS, lambda fh: fh.write(json.dumps(state).encode()))


def _line_of(example: Example) -> int:
    return int(example.source.rsplit(":", 1)[1])


def _record_batch(pa, examples: list[Example]):
    return pa.record_batch([[e.query for e in examples], [e.positive for e in examples],
                            [e.negatives for e in examples], [e.teacher_scores for e in examples],
                            [e.source for e in examples]], schema=_schema())


class PreparedExamples(ExamplesOnDemand):
    """The examples of a prepared directory: `len()`, and an Example built per index on demand from its record batch."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path / MANIFEST}: unreadable ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{self.path / MANIFEST}: not a prepared-examples manifest of version {VERSION}",
                            hint=f"prepare the data again with `spladectl data prepare SOURCE {self.path} --overwrite`")
        self.manifest = manifest
        self._parts = [self.path / part["file"] for part in manifest["parts"]]
        self._part_starts = np.cumsum([0, *(part["rows"] for part in manifest["parts"])])
        self._per_batch = int(manifest["rows_per_batch"])
        if int(self._part_starts[-1]) != manifest.get("rows"):
            raise DataError(f"{self.path / MANIFEST}: its parts hold {int(self._part_starts[-1])} rows, but it says "
                            f"{manifest.get('rows')}", hint="prepare the data again")
        self._readers: dict[int, Any] = {}
        for part in range(len(self._parts)):  # every part opens, and holds the rows the manifest says
            expected = -(-int(self._part_starts[part + 1] - self._part_starts[part]) // self._per_batch)
            if self._reader(part).num_record_batches != expected:
                raise DataError(f"{self._parts[part]}: {self._reader(part).num_record_batches} record batches, "
                                f"expected {expected}", hint="prepare the data again")

    def _reader(self, part: int):
        """The part's IPC reader, opened on first use in each process (a DataLoader worker opens its own)."""
        reader = self._readers.get(part)
        if reader is None:
            pa = _pyarrow()
            try:
                reader = pa.ipc.open_file(pa.OSFile(str(self._parts[part])))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"{self._parts[part]}: unreadable ({exc})", hint="prepare the data again with "
                                f"`spladectl data prepare SOURCE {self.path} --overwrite`") from exc
            self._readers[part] = reader
        return reader

    @property
    def min_negatives(self) -> int:
        return int(self.manifest["min_negatives"])

    @property
    def has_teacher_scores(self) -> bool:
        return bool(self.manifest["teacher_scores"])

    def __len__(self) -> int:
        return int(self._part_starts[-1])

    def _row(self, index: int) -> Example:
        part = int(np.searchsorted(self._part_starts, index, side="right")) - 1
        batch, row = divmod(index - int(self._part_starts[part]), self._per_batch)
        values = self._reader(part).get_batch(batch).slice(row, 1).to_pylist()[0]
        return Example(values["query"], values["positive"], values["negatives"], values["teacher_scores"],
                       values["source"])

    def __reduce__(self):
        # DataLoader workers started by spawn get the path and map the file themselves, instead of a pickled copy.
        return (PreparedExamples, (str(self.path),))

    def __repr__(self) -> str:
        return f"PreparedExamples({str(self.path)!r}, {len(self)} rows)"
