"""Line-numbered reading of text, JSON and JSONL files, with every problem raised as a DataError naming file:line."""

from __future__ import annotations

import gzip
import json
import math
import zlib
from pathlib import Path
from typing import IO, Any, Iterator

from spladectl.errors import DataError


def where(path: str | Path, line: int | None = None) -> str:
    """`file:line` as compilers print it, so editors and terminals can jump to the spot."""
    return f"{path}:{line}" if line is not None else str(path)


def open_text(path: str | Path) -> IO[str]:
    """Open a (possibly gzipped) UTF-8 file; utf-8-sig drops a BOM, universal newlines turn CRLF into LF."""
    path = Path(path)
    try:
        if path.suffix.lower() == ".gz":  # detect_format reads `.JSONL.GZ` as gzipped JSONL too
            return gzip.open(path, "rt", encoding="utf-8-sig")
        return open(path, encoding="utf-8-sig")
    except OSError as exc:
        raise DataError(f"{path}: cannot open ({exc.strerror or exc})") from exc


def iter_lines(path: str | Path, start: int = 1) -> Iterator[tuple[int, str]]:
    """(1-based line number, line without its newline) for every line from line `start`, blank ones included."""
    with open_text(path) as handle:
        try:
            for number, line in enumerate(handle, start=1):
                if number < start:
                    continue
                yield number, line.rstrip("\r\n")
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot read ({exc})") from exc


def _invalid_json(exc: ValueError | RecursionError) -> str:
    """What json.loads's other errors mean: a number of more than 4300 digits, or arrays nested too deeply."""
    if isinstance(exc, RecursionError):
        return "invalid JSON (nested too deeply)"
    return f"invalid JSON ({str(exc).split(':')[0]})"


def iter_jsonl(path: str | Path, start: int = 1) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line from line `start`; anything but a JSON object is an error at
    its line."""
    for number, line in iter_lines(path, start):
        if not line.strip():
            continue  # a blank line carries no row, so nothing is skipped by passing over it
        yield number, json_object(line, where(path, number))


def json_object(text: str, at: str) -> dict[str, Any]:
    """One line of JSONL as an object; anything else is an error naming `at` (file:line)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(f"{at}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
    except (ValueError, RecursionError) as exc:
        raise DataError(f"{at}: {_invalid_json(exc)}") from exc
    if not isinstance(value, dict):
        raise DataError(f"{at}: expected a JSON object, found {_json_type(value)}")
    return value


def iter_json_array(path: str | Path) -> Iterator[tuple[int, Any]]:
    """(line where the element starts, element) for each element of a file holding one JSON list.

    json.load would give no positions, so the list is walked with raw_decode to name the line of each element.
    """
    with open_text(path) as handle:
        try:
            text = handle.read()
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
        except (OSError, EOFError, zlib.error) as exc:  # a truncated or corrupt .gz
            raise DataError(f"{path}: cannot read ({exc})") from exc
    decoder = json.JSONDecoder()
    lines = _LineCounter(text)
    pos = _skip_ws(text, 0)
    if pos >= len(text) or text[pos] != "[":
        found = "an empty file" if pos >= len(text) else repr(text[pos])
        raise DataError(f"{where(path, lines.at(pos))}: expected a JSON list of examples, found {found}")
    pos = _skip_ws(text, pos + 1)
    if pos < len(text) and text[pos] == "]":
        pos += 1
    else:
        while True:
            try:
                value, end = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as exc:
                raise DataError(f"{where(path, exc.lineno)}: invalid JSON ({exc.msg} at column {exc.colno})") from exc
            except (ValueError, RecursionError) as exc:
                raise DataError(f"{where(path, lines.at(pos))}: {_invalid_json(exc)}") from exc
            yield lines.at(pos), value
            pos = _skip_ws(text, end)
            if pos < len(text) and text[pos] == ",":
                pos = _skip_ws(text, pos + 1)
                continue
            if pos < len(text) and text[pos] == "]":
                pos += 1
                break
            raise DataError(f"{where(path, lines.at(pos))}: invalid JSON (expected ',' or ']' after a list element)")
    pos = _skip_ws(text, pos)
    if pos < len(text):
        raise DataError(f"{where(path, lines.at(pos))}: invalid JSON (extra data after the list)")


def require_text(record: dict[str, Any], key: str, at: str, *, allow_empty: bool = False) -> str:
    """A string field that must be present and, unless allowed, not blank."""
    if key not in record:
        raise DataError(f"{at}: missing field '{key}'")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{at}: field '{key}' must be a string, found {_json_type(value)}")
    if not allow_empty and not value.strip():
        raise DataError(f"{at}: field '{key}' is empty")
    return require_unicode(value, f"{at}: field '{key}'")


def require_unicode(value: str, at: str) -> str:
    """Text every tokenizer takes: a JSON escape like \\ud800 decodes to a lone surrogate, which is not Unicode text
    (the Rust tokenizer rejects it with a TypeError, hours later); refuse it here, naming where it was."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise DataError(f"{at}: not valid Unicode (a lone surrogate, U+{ord(value[exc.start]):04X})") from None
    return value


def require_id(record: dict[str, Any], key: str, at: str) -> str:
    """An id field; BEIR ids are strings, but some files write them as integers, which we accept as their text."""
    if key not in record:
        raise DataError(f"{at}: missing field '{key}'")
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise DataError(f"{at}: field '{key}' must be a string, found {_json_type(value)}")
    value = str(value)
    if not value.strip():
        raise DataError(f"{at}: field '{key}' is empty")
    return require_unicode(value, f"{at}: field '{key}'")


def optional_score(record: dict[str, Any], key: str, at: str) -> float | None:
    """A finite number, or None when the field is absent."""
    if key not in record or record[key] is None:
        return None
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"{at}: field '{key}' must be a finite number, found {json.dumps(value)}")
    return float(value)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}.get(type(value), "a number")


def _skip_ws(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in " \t\r\n":
        pos += 1
    return pos


class _LineCounter:
    """Line numbers of increasing offsets in O(total length), not O(length) per lookup."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        if pos < self.pos:  # rare (error paths): count from the start again
            self.pos, self.line = 0, 1
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line
