"""Training data converted once to a memory-mapped Arrow file, so that training on millions of examples starts at once
and holds only the rows it is using.

`spladectl data prepare IN OUT` reads IN (JSONL, seed JSON or TSV triples) one row at a time, checks every row as the
readers do, and writes OUT/examples.arrow (Arrow IPC, record batches of ROWS_PER_BATCH rows) and OUT/prepared.json
(rows, fewest negatives, whether teacher scores are present, the source). OUT is written in a staging directory and
renamed, so it is whole or absent. `--data OUT` then trains on it: PreparedExamples maps the file and builds an
Example only when a micro-batch asks for it; the page cache, not the process, holds what was read.

TSV triples: lines with the same query and positive are grouped into one example when they are adjacent (reading a
TSV file directly groups them wherever they are, which needs the whole file in memory); sort the file by its first
two columns to group them all.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from spladectl.data._io import iter_json_array, iter_jsonl, iter_lines, where
from spladectl.data.examples import Example, _example, _tsv_example, require_same_scoring
from spladectl.errors import DataError, SpladectlError

MANIFEST = "prepared.json"
TABLE = "examples.arrow"
FORMAT = "spladectl-prepared-examples"
VERSION = 1
ROWS_PER_BATCH = 4096


def is_prepared(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _pyarrow():
    try:
        import pyarrow as pa
    except ImportError as exc:
        raise SpladectlError("prepared training data needs pyarrow",
                             hint="pip install 'spladectl[serving]' (or pip install pyarrow)") from exc
    return pa


def stream_examples(path: str | Path, fmt: str) -> Iterator[Example]:
    """The examples of a JSONL, seed JSON or TSV file one at a time, checked as the readers check them."""
    if fmt == "jsonl":
        for line, record in iter_jsonl(path):
            yield _example(record, where(path, line))
    elif fmt == "json":
        for line, record in iter_json_array(path):
            yield _example(record, where(path, line))
    elif fmt == "tsv":
        current: Example | None = None
        for number, line in iter_lines(path):
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


def prepare(source: str | Path, out: str | Path, *, fmt: str,
            progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Convert `source` into a prepared directory `out` (see the module's docstring); returns its manifest."""
    from spladectl.data.cache import staged_directory

    pa = _pyarrow()
    source, out = Path(source), Path(out)
    schema = pa.schema([("query", pa.string()), ("positive", pa.string()), ("negatives", pa.list_(pa.string())),
                        ("teacher_scores", pa.list_(pa.float64())), ("source", pa.string())])
    rows, min_negatives, max_negatives, first = 0, None, 0, None
    with staged_directory(out) as staging:
        staging.mkdir(parents=True)
        with pa.OSFile(str(staging / TABLE), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
            batch: list[Example] = []
            for example in stream_examples(source, fmt):
                if first is None:
                    first = example
                require_same_scoring(example, first)
                batch.append(example)
                rows += 1
                n = len(example.negatives)
                min_negatives = n if min_negatives is None else min(min_negatives, n)
                max_negatives = max(max_negatives, n)
                if len(batch) == ROWS_PER_BATCH:
                    writer.write_batch(_record_batch(pa, schema, batch))
                    batch = []
                    if progress:
                        progress(rows)
            if batch:
                writer.write_batch(_record_batch(pa, schema, batch))
        if first is None:
            raise DataError(f"{source}: no examples")
        stat = source.stat()
        manifest = {"format": FORMAT, "version": VERSION, "rows": rows, "min_negatives": min_negatives,
                    "max_negatives": max_negatives, "teacher_scores": first.teacher_scores is not None,
                    "source": str(source.resolve()), "source_format": fmt, "source_bytes": stat.st_size}
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if progress:
        progress(rows)
    return manifest


def _record_batch(pa, schema, examples: list[Example]):
    return pa.record_batch([[e.query for e in examples], [e.positive for e in examples],
                            [e.negatives for e in examples], [e.teacher_scores for e in examples],
                            [e.source for e in examples]], schema=schema)


class PreparedExamples(Sequence[Example]):
    """The examples of a prepared directory, memory-mapped: `len()`, and an Example built per index on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            manifest = json.loads((self.path / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise DataError(f"{self.path / MANIFEST}: unreadable ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
            raise DataError(f"{self.path / MANIFEST}: not a prepared-examples manifest of version {VERSION}",
                            hint=f"prepare the data again with `spladectl data prepare SOURCE {self.path}`")
        self.manifest = manifest
        pa = _pyarrow()
        try:
            self._table = pa.ipc.open_file(pa.memory_map(str(self.path / TABLE), "r")).read_all()
        except (OSError, pa.ArrowInvalid) as exc:
            raise DataError(f"{self.path / TABLE}: unreadable ({exc})",
                            hint=f"prepare the data again with `spladectl data prepare SOURCE {self.path}`") from exc
        if self._table.num_rows != manifest.get("rows"):
            raise DataError(f"{self.path / TABLE}: {self._table.num_rows} rows, but {MANIFEST} says "
                            f"{manifest.get('rows')}", hint="prepare the data again")
        self._columns = {name: self._table.column(name) for name in self._table.column_names}

    @property
    def min_negatives(self) -> int:
        return int(self.manifest["min_negatives"])

    @property
    def has_teacher_scores(self) -> bool:
        return bool(self.manifest["teacher_scores"])

    def __len__(self) -> int:
        return self._table.num_rows

    def __getitem__(self, index):  # type: ignore[override]
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        c = self._columns
        return Example(c["query"][index].as_py(), c["positive"][index].as_py(), c["negatives"][index].as_py(),
                       c["teacher_scores"][index].as_py(), c["source"][index].as_py())

    def __reduce__(self):
        # DataLoader workers started by spawn get the path and map the file themselves, instead of a pickled copy.
        return (PreparedExamples, (str(self.path),))

    def __repr__(self) -> str:
        return f"PreparedExamples({str(self.path)!r}, {len(self)} rows)"


def min_negatives(examples: Sequence[Example]) -> int:
    """The fewest negatives any example has (from the manifest for prepared data: no scan)."""
    if isinstance(examples, PreparedExamples):
        return examples.min_negatives
    return min(len(e.negatives) for e in examples)


def all_have_teacher_scores(examples: Sequence[Example]) -> bool:
    if isinstance(examples, PreparedExamples):
        return examples.has_teacher_scores
    return all(e.teacher_scores is not None for e in examples)

