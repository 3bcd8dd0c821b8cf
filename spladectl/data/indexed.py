"""A JSONL or TSV file too large to read into memory, trained on directly: rows read by byte offset when a
micro-batch asks for them.

Opening the file scans it once for line starts (numpy over 64 MiB blocks, one to two seconds per GB from the page
cache) and keeps them as int64 pairs in a cache file beside the data (or in the user's cache), read with pread; the
next run on an unchanged file (same size and modification time) opens it at once. Memory then does not grow with the
file: a row is parsed, checked and built when it is used, the epoch order is a permutation of row numbers, and the
page cache, not the process, holds what was read. Order, resume and distributed shards are those of data in memory.

Differences from reading the file whole (what `spladectl data prepare` avoids by checking every row first):
- rows are checked when they are used, so a malformed row stops training when it is reached (file:line, as always);
- TSV: each line is one example (reading a file whole groups lines with the same query and positive);
- the fewest negatives and the presence of teacher scores are judged from the first rows (examples.SAMPLE_ROWS); a
  later row with fewer negatives, or with teacher scores where those rows had none (or the reverse), is an error at
  its line.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Callable

import numpy as np

from spladectl.data._io import json_object, where
from spladectl.data.cache import atomic_write, cache_dirs, file_signature, place_tag
from spladectl.data.examples import Example, ExamplesOnDemand, _example, _tsv_example
from spladectl.errors import DataError

# Files larger than this are read by offset; smaller ones are read whole (every row checked before training).
INDEX_BYTES = 512 * 2**20
_BLOCK = 64 * 2**20
_SHORT = 8  # bytes: a line this short may be blank ("\n", "\r\n", spaces); longer ones are rows
_BOM = b"\xef\xbb\xbf"


def row_index(path: Path, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """(rows + 1, 2) int64: for each row (non-blank line) the byte offset where it starts and its 1-based line
    number; the last entry is (file size, 0). Row i is the bytes from index[i, 0] to index[i + 1, 0] (with any blank
    lines after it, which parse as nothing)."""
    size = path.stat().st_size
    starts: list[np.ndarray] = []
    with open(path, "rb") as handle:
        first = 3 if handle.read(3) == _BOM else 0
        handle.seek(0)
        offset = 0
        while block := handle.read(_BLOCK):
            newlines = np.flatnonzero(np.frombuffer(block, dtype=np.uint8) == 10)
            starts.append(newlines.astype(np.int64) + (offset + 1))
            offset += len(block)
            if progress:
                progress(offset)
        bounds = np.concatenate([np.array([first], dtype=np.int64), *starts])
        starts.clear()  # the blocks' arrays: freed before the next copies (10M lines: 80 MB each)
        if bounds[-1] != size:
            bounds = np.append(bounds, np.int64(size))  # the last line has no newline
        lines, lengths = bounds[:-1], np.diff(bounds)
        keep = lengths > _SHORT
        for i in np.flatnonzero(lengths <= _SHORT):  # short lines: blank unless they hold more than spaces
            keep[i] = bool(os.pread(handle.fileno(), int(lengths[i]), int(lines[i])).strip())
    del lengths
    rows = np.flatnonzero(keep)
    del keep
    index = np.empty((len(rows) + 1, 2), dtype=np.int64)
    index[:-1, 0] = lines[rows]
    del lines, bounds
    index[:-1, 1] = rows + 1
    index[-1] = (size, 0)
    return index


class IndexedExamples(ExamplesOnDemand):
    """The rows of a JSONL or TSV file, each read, checked and built when asked for (see the module's docstring)."""

    def __init__(self, path: str | Path, fmt: str, *, index_file: str | Path | None = None,
                 progress: Callable[[int], None] | None = None):
        if fmt not in ("jsonl", "tsv"):
            raise DataError(f"{path}: {fmt} files are read whole; only JSONL and TSV rows can be read by offset")
        self.path, self.fmt = Path(path), fmt
        self.index_file = Path(index_file) if index_file else _index_file(self.path, progress)
        # The index is read with pread too: a memory map of it would count as this process's memory as rows are used.
        with open(self.index_file, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, _, _ = read_header(fh)
            self._index_at = fh.tell()
        self._rows = shape[0] - 1
        self._fd: int | None = None
        self._index_fd: int | None = None
        if len(self) == 0:
            raise DataError(f"{self.path}: no examples")
        self._judge_from_sample(hint=f"`spladectl data prepare {self.path} OUT` checks every row before training")

    def __len__(self) -> int:
        return self._rows

    def _row(self, index: int) -> Example:
        if self._fd is None:  # per process: DataLoader workers open their own
            self._fd, self._index_fd = os.open(self.path, os.O_RDONLY), os.open(self.index_file, os.O_RDONLY)
        start, line, end = np.frombuffer(os.pread(self._index_fd, 24, self._index_at + 16 * index), dtype=np.int64)
        at = where(self.path, int(line))
        raw = os.pread(self._fd, int(end - start), int(start))
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            raise DataError(f"{at}: not UTF-8 text ({exc.reason})") from exc
        if self.fmt == "tsv":
            return _tsv_example(text, at)
        return _example(json_object(text, at), at)

    def __reduce__(self):
        # A DataLoader worker reads the same index file (no lookup, no scan) and opens its own file descriptors.
        return (functools.partial(IndexedExamples, index_file=str(self.index_file)), (str(self.path), self.fmt))

    def __repr__(self) -> str:
        return f"IndexedExamples({str(self.path)!r}, {len(self)} rows)"


def _index_file(path: Path, progress: Callable[[int], None] | None) -> Path:
    """The cached row index of `path`, built when missing or when the file changed (size or modification time)."""
    tag = f"{place_tag(path)}-{path.name}"
    name = f"{tag}-{'-'.join(map(str, file_signature(path)[1:]))}.rows.npy"
    directories = cache_dirs(path.parent, "rows")
    for directory in directories:
        if (directory / name).is_file():
            return directory / name
    index = row_index(path, progress)
    for directory in directories:
        if atomic_write(directory, name, lambda fh: np.save(fh, index), stale_prefix=f"{tag}-"):
            return directory / name
    raise DataError(f"{path}: cannot write the index of its rows in {' or '.join(map(str, directories))}")
