"""Property-based fuzzing (hypothesis) of every reader of user files: training data, BEIR directories, corpus and
query texts, hardware profiles, experiment files, and a few commands that read them.

The property, for every generated input: the reader either loads it, and then what it loaded is what was written (no
row, id or key silently dropped), or it raises the project's own error (a SpladectlError: DataError, ProfileError)
whose message names the file, and the line or key where one applies. Never another exception type, never a silently
dropped row. Through the CLI: exit 0, or exit 2 with one `Error` message and no traceback.

Inputs mix valid rows with corruptions (invalid JSON, wrong types, missing, empty and extra keys, 1 MB lines, deep
nesting, huge numbers) in several encodings (UTF-8 with and without BOM, CRLF, gzip, and damaging ones: UTF-16,
invalid UTF-8, raw surrogates, broken gzip), under unicode file names, as files, symlinks, dangling symlinks,
directories or paths below a file. Inputs that once exposed a bug are kept as `@example`s.

Profiles: "ci" (the default, 60 inputs a test) and "slow" (2000): `SPLADECTL_FUZZ=slow pytest tests/test_fuzz.py`.
See docs/reliability.md.
"""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from spladectl.data import detect_format, load_beir, load_training_data
from spladectl.data.beir import read_corpus, read_queries
from spladectl.data.texts import check_texts, iter_texts
from spladectl.errors import DataError, ProfileError, SpladectlError
from spladectl.profiles import DEVICES, ProfileRegistry, builtin_dir, default_registry
from spladectl.runs.experiment import load_experiment, point_name
from spladectl.runs.store import slug

PROFILE = "slow" if os.environ.get("SPLADECTL_FUZZ") == "slow" else "ci"
_COMMON = dict(deadline=None, database=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much,
                                      HealthCheck.large_base_example])
settings.register_profile("ci", max_examples=60, **_COMMON)
settings.register_profile("slow", max_examples=2000, **_COMMON)
settings.load_profile(PROFILE)

RAN: Counter[str] = Counter()  # inputs each test ran (generated, explicit examples and shrinking)


class _Summary:
    """Prints the count at the end of the run, with pytest's own summary (a plugin registered by the fixture)."""

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if RAN:
            terminalreporter.write_line(f"fuzz ({PROFILE} profile): {sum(RAN.values())} inputs over {len(RAN)} "
                                        "tests: " + ", ".join(f"{name} {n}" for name, n in RAN.items()))


@pytest.fixture(scope="module", autouse=True)
def _count_inputs(request):
    if not request.config.pluginmanager.has_plugin("spladectl-fuzz-summary"):
        request.config.pluginmanager.register(_Summary(), "spladectl-fuzz-summary")


# ---- strategies ---------------------------------------------------------------------------------------------------

MB = 1_000_000
TEXT = st.text(st.characters(codec="utf-8"), min_size=1, max_size=12).filter(str.strip)  # any char but surrogates
TSV_TEXT = st.text(st.characters(codec="utf-8", exclude_characters="\t\r\n"), min_size=1, max_size=12).filter(str.strip)
BLANK = st.sampled_from(["", " ", "\t", " \u3000 ", "\x0c"])  # lines that carry no row
EMPTY = st.sampled_from(["", " ", "\t\n", "\u3000"])  # text that is there but empty
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
NOT_STRING = JSON.filter(lambda v: not isinstance(v, str))
NOT_OBJECT = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.lists(JSON, max_size=3)
# One line each, invalid whatever follows it: bad syntax, raw NUL, 1 MB of nesting, a 5000-digit number, 1 MB unclosed.
INVALID_JSON = ['{"query": }', '{"query": "q",}', "{'query': 'q'}", '{"query" "q"}', "nul", '{"query": "a\x00b"}',
                '"unterminated', '{"query": "q"} trailing', "[" * MB, "1" * 5000, '{"query": "' + "x" * MB]
NAME = st.one_of(
    st.sampled_from(["data", "données", "数据 集", "emoji-🙂", " spaced ", "-dash", "bad-\udcff-byte", "new\nline"]),
    st.text(st.characters(codec="utf-8", exclude_characters="/\\\x00"), min_size=1, max_size=12),
).filter(lambda s: s not in (".", ".."))
CLI_NAME = st.text(st.characters(codec="utf-8", categories=("L", "N"), include_characters="-_ é🙂"),
                   min_size=1, max_size=10).filter(lambda s: not s.startswith("-"))

# How a file is stored: transparent encodings must load as if plain UTF-8, damaging ones must fail naming the file.
TRANSPARENT = ("utf-8", "utf-8-bom", "crlf", "bom+crlf", "gzip", "gzip-upper")
DAMAGING = ("utf-16", "invalid-utf-8", "raw-surrogate", "gzip-truncated", "gzip-bad-crc", "gzip-garbage", "not-gzip")
ENCODING = st.sampled_from(TRANSPARENT * 3 + DAMAGING)
PLAIN_ENCODING = st.sampled_from(("utf-8", "utf-8", "utf-8-bom", "crlf", "bom+crlf", "utf-16", "invalid-utf-8",
                                  "raw-surrogate"))
# Where a file is: readable shapes (a file, a symlink to one) and ones that are not.
READABLE = ("file", "symlink")
SHAPE = st.sampled_from(READABLE * 4 + ("dangling", "directory", "below-a-file", "missing"))


def gz_suffix(encoding: str) -> str:
    return ".GZ" if encoding == "gzip-upper" else ".gz" if encoding.startswith(("gzip", "not-gzip")) else ""


def encode(text: str, encoding: str, at: int = 0) -> bytes:
    """The bytes of `text` stored as `encoding`; `at` places an inserted bad byte."""
    if encoding in ("crlf", "bom+crlf"):
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8")
    if encoding in ("utf-8-bom", "bom+crlf"):
        return b"\xef\xbb\xbf" + data
    if encoding == "utf-16":
        return text.encode("utf-16")
    if encoding in ("invalid-utf-8", "raw-surrogate"):
        at %= len(data) + 1
        return data[:at] + (b"\xff" if encoding == "invalid-utf-8" else "\ud800".encode("utf-8", "surrogatepass")) \
            + data[at:]
    if encoding in ("gzip", "gzip-upper"):
        return gzip.compress(data, mtime=0)
    if encoding == "gzip-truncated":
        return gzip.compress(data, mtime=0)[:-(1 + at % 8)]
    if encoding == "gzip-bad-crc":
        packed = bytearray(gzip.compress(data, mtime=0))
        packed[-8] ^= 0xFF
        return bytes(packed)
    if encoding == "gzip-garbage":
        return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + b"\xff" * 8  # a reserved block type
    return data  # utf-8, and not-gzip: plain text under a .gz name


def place(root: Path, name: str, data: bytes, shape: str) -> Path:
    """Store `data` as root/name in `shape`; returns the path to hand to the reader."""
    path = root / name
    if shape == "file":
        path.write_bytes(data)
    elif shape == "symlink":
        (root / "spladectl-elsewhere").mkdir(exist_ok=True)  # longer than any generated name: no clash
        (root / "spladectl-elsewhere" / name).write_bytes(data)
        path.symlink_to(root / "spladectl-elsewhere" / name)
    elif shape == "dangling":
        path.symlink_to(root / "spladectl-nowhere" / name)
    elif shape == "directory":
        path.mkdir()
        (path / "inside").write_bytes(data)
    elif shape == "below-a-file":
        (root / "spladectl-a-file").write_bytes(data)
        path = root / "spladectl-a-file" / name
    return path  # "missing": nothing there


def fails(call: Callable[[], Any], error: type[SpladectlError], *names: str) -> bool:
    """Run `call`; False if it loaded. If it raised `error`, its message must start with `names[0]` and contain the
    others; any other exception propagates (a bug)."""
    try:
        call()
    except error as exc:
        message = str(exc)
        assert message.startswith(names[0]), f"{message[:500]!r} does not start with {names[0]!r}"
        for word in names[1:]:
            assert word in message, f"{message[:500]!r} does not name {word!r}"
        event("fails")  # --hypothesis-show-statistics shows how inputs split between loading and failing
        return True
    event("loads")
    return False


def must_fail(call: Callable[[], Any], error: type[SpladectlError], *names: str) -> None:
    assert fails(call, error, *names), f"loaded, but expected a {error.__name__} naming {names}"


def tmpdir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="spladectl-fuzz-")


def toml_str(value: str) -> str:
    return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")  # JSON's escapes are TOML's; DEL is not


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return toml_str(value)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_str(key)


# ---- seed JSON / JSONL training files -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line (or JSON list element) as written and what the reader must make of it: an example, nothing (a blank
    line), or an error at its line (bad)."""

    text: str
    loads_as: Any = None
    bad: bool = False


SEED_KEYS = ("query", "positive_document", "negative_documents")
SCORE = st.floats(allow_nan=False, allow_infinity=False, width=64) | st.integers(-10**6, 10**6)


@st.composite
def seed_record(draw, scored: bool, huge: bool = False) -> tuple[dict, tuple]:
    """A valid example object with extra keys, and the (query, positive, negatives, scores) it must load as."""
    query = "q " * (MB // 2) if huge else draw(TEXT)
    positive, negatives = draw(TEXT), draw(st.lists(TEXT, max_size=3))
    record = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k not in (*SEED_KEYS, "positive_score")),
                                  JSON, max_size=2))
    record.update(query=query, positive_document=positive)
    scores = None
    if scored:
        scores = [float(s) for s in draw(st.lists(SCORE, min_size=len(negatives) + 1, max_size=len(negatives) + 1))]
        record["positive_score"] = scores[0]
        record["negative_documents"] = [{"document": n, "score": s} for n, s in zip(negatives, scores[1:])]
    else:
        record["negative_documents"] = [draw(st.sampled_from([n, {"document": n}, {"document": n, "score": None}]))
                                        for n in negatives]
    return record, (query.strip(), positive.strip(), [n.strip() for n in negatives], scores)


@st.composite
def seed_row(draw, scored: bool, corrupt: bool, blank_lines: bool = True) -> Row:
    kinds = ["valid"] * 8 + ["huge"] + ["blank"] * blank_lines + corrupt * [
        "other-scoring", "invalid-json", "not-an-object", "missing-key", "wrong-type", "empty-text", "lone-surrogate",
        "bad-score"]
    kind = draw(st.sampled_from(kinds))
    if kind == "blank":
        return Row(draw(BLANK))
    if kind == "invalid-json":
        return Row(draw(st.sampled_from(INVALID_JSON)), bad=True)
    if kind == "not-an-object":
        return Row(json.dumps(draw(NOT_OBJECT)), bad=True)
    record, loads_as = draw(seed_record(scored != (kind == "other-scoring"), huge=kind == "huge"))
    if kind in ("valid", "other-scoring", "huge"):
        return Row(json.dumps(record, ensure_ascii=draw(st.booleans())), loads_as)
    key = draw(st.sampled_from(SEED_KEYS))
    if kind == "missing-key":
        del record[key]
    elif kind == "wrong-type":
        record[key] = draw(JSON.filter(lambda v: not isinstance(v, list)) if key == "negative_documents"
                           else NOT_STRING)
    elif kind in ("empty-text", "lone-surrogate"):
        text = draw(EMPTY) if kind == "empty-text" else draw(TEXT) + draw(st.sampled_from(["\ud800", "\udfff"]))
        record[key] = [draw(st.sampled_from([text, {"document": text}]))] if key == "negative_documents" else text
    else:  # bad-score
        record["positive_score"] = draw(st.sampled_from([float("nan"), float("inf"), "1.5", True, [1.0]]))
    return Row(json.dumps(record), bad=True)  # ASCII escapes: a lone surrogate is written as \ud800


@st.composite
def seed_rows(draw, blank_lines: bool = True) -> list[Row]:
    """Rows of one file: all with teacher scores or none, and half the files with corruptions among them."""
    scored, corrupt = draw(st.booleans()), draw(st.booleans())
    return draw(st.lists(seed_row(scored, corrupt, blank_lines), max_size=6))


def seed_outcome(rows: list[Row], path: Path, first_line: int) -> tuple[list | None, str | None]:
    """(examples, None) for a file that must load, or (None, the start of its error message)."""
    examples, scored = [], None
    for line, row in enumerate(rows, start=first_line):
        if row.bad:
            return None, f"{path}:{line}: "
        if row.loads_as is None:
            continue
        if scored is not None and scored != (row.loads_as[3] is not None):
            return None, f"{path}:{line}: "  # teacher scores on some rows only
        scored = row.loads_as[3] is not None
        examples.append(row.loads_as)
    return (examples, None) if examples else (None, f"{path}: ")


def check_training_file(path: Path, encoding: str, shape: str, examples: list | None, error: str | None) -> None:
    """load_training_data must give `examples` or fail with `error`, whatever the file's encoding and shape."""
    load = lambda: load_training_data(path, show_progress=False)  # noqa: E731
    if shape not in READABLE:
        must_fail(load, DataError, str(path))
    elif encoding not in TRANSPARENT:
        must_fail(load, DataError, str(path))
    elif error is not None:
        must_fail(load, DataError, error)
    else:
        got = [(e.query, e.positive, e.negatives, e.teacher_scores) for e in load()]
        event("loads")
        assert got == examples


@example(rows=[Row("1" * 5000, bad=True)], encoding="utf-8", name="big-int", shape="file")  # ValueError escaped
@example(rows=[Row("[" * MB, bad=True)], encoding="utf-8", name="deep", shape="file")  # RecursionError escaped
@example(rows=[Row(json.dumps({"query": "q\ud800", "positive_document": "p", "negative_documents": []}), bad=True)],
         encoding="utf-8", name="surrogate", shape="file")  # loaded; the tokenizer failed later with a TypeError
@example(rows=[Row('{"query": "q", "positive_document": "p", "negative_documents": []}', ("q", "p", [], None))],
         encoding="gzip-upper", name="upper", shape="file")  # .jsonl.GZ was read as plain text: "not UTF-8"
@example(rows=[], encoding="gzip-garbage", name="zlib", shape="file")  # zlib.error escaped
@given(rows=seed_rows(), encoding=ENCODING, name=NAME, shape=SHAPE)
def test_jsonl_training_file(rows: list[Row], encoding: str, name: str, shape: str) -> None:
    RAN["jsonl"] += 1
    with tmpdir() as tmp:
        text = "\n".join(row.text for row in rows) + ("\n" if rows and len(rows) % 2 else "")
        path = place(Path(tmp), name + ".jsonl" + gz_suffix(encoding), encode(text, encoding, len(rows) * 7), shape)
        check_training_file(path, encoding, shape, *seed_outcome(rows, path, first_line=1))


@example(rows=[Row("[" * MB, bad=True)], encoding="utf-8", layout="list", name="deep", shape="file")
@example(rows=[], encoding="gzip-truncated", layout="list", name="eof", shape="file")  # EOFError escaped
@given(rows=seed_rows(blank_lines=False), encoding=ENCODING, name=NAME, shape=SHAPE,
       layout=st.sampled_from(["list"] * 6 + ["not-a-list", "unclosed", "trailing-data"]))
def test_json_array_training_file(rows: list[Row], encoding: str, layout: str, name: str, shape: str) -> None:
    RAN["json"] += 1
    with tmpdir() as tmp:
        text = "[\n" + ",\n".join(row.text for row in rows) + "\n]\n"
        if layout == "not-a-list":
            text = text[2:-3]
        elif layout == "unclosed":
            text = text[:-2]
        elif layout == "trailing-data":
            text += "[]\n"
        path = place(Path(tmp), name + ".json" + gz_suffix(encoding), encode(text, encoding, len(rows) * 5), shape)
        examples, error = seed_outcome(rows, path, first_line=2)
        if layout != "list":  # whichever comes first: a bad element, or the missing or extra bracket
            examples, error = None, f"{path}:"
        check_training_file(path, encoding, shape, examples, error)


# ---- TSV triples ----------------------------------------------------------------------------------------------------


@st.composite
def tsv_rows(draw) -> list[Row]:
    """query<TAB>positive<TAB>negatives... lines; queries and positives come from a small pool, so pairs repeat."""
    pool = draw(st.lists(TSV_TEXT, min_size=1, max_size=3))
    rows = []
    for _ in range(draw(st.integers(0, 6))):
        kind = draw(st.sampled_from(["valid"] * 6 + ["huge", "blank", "too-few-columns", "empty-column"]))
        if kind == "blank":
            rows.append(Row(draw(BLANK)))
            continue
        fields = [draw(st.sampled_from(pool)), draw(st.sampled_from(pool)), *draw(st.lists(TSV_TEXT, min_size=1,
                                                                                           max_size=3))]
        if kind == "huge":
            fields[2] = "n" * MB
        if kind == "too-few-columns":
            fields = fields[:draw(st.integers(1, 2))]
        elif kind == "empty-column":
            fields[draw(st.integers(0, len(fields) - 1))] = draw(EMPTY.filter(lambda s: "\n" not in s))
        stripped = [f.strip() for f in fields]
        if kind in ("too-few-columns", "empty-column"):
            rows.append(Row("\t".join(fields), bad=True))
        else:
            rows.append(Row("\t".join(fields), (stripped[0], stripped[1], stripped[2:])))
    return rows


def tsv_outcome(rows: list[Row], path: Path) -> tuple[list | None, str | None]:
    grouped: dict[tuple[str, str], tuple] = {}
    for line, row in enumerate(rows, start=1):
        if row.bad:
            return None, f"{path}:{line}: "
        if row.loads_as is not None:
            query, positive, negatives = row.loads_as
            grouped.setdefault((query, positive), (query, positive, [], None))[2].extend(negatives)
    return (list(grouped.values()), None) if grouped else (None, f"{path}: ")


@example(rows=[], encoding="utf-8", name="empty", shape="file", suffix=".tsv")  # loaded as no examples at all
@given(rows=tsv_rows(), encoding=ENCODING, name=NAME, shape=SHAPE, suffix=st.sampled_from([".tsv", ".TSV"]))
def test_tsv_triples_file(rows: list[Row], encoding: str, name: str, shape: str, suffix: str) -> None:
    RAN["tsv"] += 1
    with tmpdir() as tmp:
        text = "\n".join(row.text for row in rows) + "\n"
        path = place(Path(tmp), name + suffix + gz_suffix(encoding), encode(text, encoding, len(text) // 3), shape)
        check_training_file(path, encoding, shape, *tsv_outcome(rows, path))


# ---- any bytes under any name ---------------------------------------------------------------------------------------

ANY_BYTES = st.one_of(
    st.binary(max_size=300),
    st.text(max_size=200).map(lambda s: s.encode("utf-8")),
    st.lists(JSON, max_size=4).map(lambda vs: "\n".join(json.dumps(v) for v in vs).encode()),
    st.lists(st.lists(st.text(max_size=5), max_size=4), max_size=4).map(
        lambda rows: "\n".join("\t".join(r) for r in rows).encode()),
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe[\x00", b"[" * MB, b"{" * MB, b"\x00" * 64, b"\t\t\n",
                     gzip.compress(b'{"query": "q", "positive_document": "p", "negative_documents": ["n"]}\n')]),
)


@given(data=ANY_BYTES, name=NAME, shape=SHAPE,
       suffix=st.sampled_from(["", ".json", ".jsonl", ".tsv", ".txt", ".jsonl.gz", ".JSON.GZ", ".tsv.gz", ".gz"]))
def test_any_bytes_any_name(data: bytes, name: str, suffix: str, shape: str) -> None:
    """Whatever the bytes and the name, every reader loads them or fails naming the file; what loads is well formed."""
    RAN["any-bytes"] += 1
    with tmpdir() as tmp:
        path = place(Path(tmp), name + suffix, data, shape)
        if not fails(lambda: detect_format(path), DataError, str(path)):
            assert shape in READABLE
        try:
            examples = load_training_data(path, show_progress=False)
        except DataError as exc:
            assert str(exc).startswith(str(path)), str(exc)
        else:
            assert examples and all(e.query.strip() and e.positive.strip() and all(n.strip() for n in e.negatives)
                                    for e in examples)
        for kind in ("documents", "queries"):
            try:
                count = check_texts(path, kind)
            except DataError as exc:
                assert str(exc).startswith(str(path)), str(exc)
            else:
                assert count == len(list(iter_texts(path, kind))) > 0
        for read in (read_corpus, read_queries):
            fails(lambda: read(path), DataError, str(path))


# ---- BEIR directories -----------------------------------------------------------------------------------------------

BEIR_ID = st.text(st.characters(codec="utf-8", exclude_categories=("Z", "C")), min_size=1, max_size=6)


@dataclass(frozen=True)
class BeirFile:
    """One file of a BEIR directory: its lines, how it is stored, and the line of its first corruption."""

    lines: list[str]
    encoding: str = "utf-8"
    shape: str = "file"
    bad_line: int | None = None


def first_bad(kinds: list[str]) -> int | None:
    return next((i for i, k in enumerate(kinds, start=1) if k not in ("valid", "blank")), None)


def row_kinds(corrupt: bool, *bad: str) -> st.SearchStrategy[str]:
    """Mostly valid rows; corruptions only in a file chosen to be corrupt (so that half the directories load)."""
    return st.sampled_from(["valid"] * 8 + ["blank"] + (list(bad) if corrupt else []))


@st.composite
def corpus_file(draw, corrupt: bool) -> tuple[BeirFile, dict[str, str]]:
    """corpus.jsonl lines and the doc id -> "title text" it must load as (up to its first corruption)."""
    ids = draw(st.lists(BEIR_ID, min_size=1, max_size=5, unique=True))
    lines, kinds, corpus = [], [], {}
    for doc_id in ids:
        kind = draw(row_kinds(corrupt, "invalid-json", "bad-id", "bad-title", "no-text", "bad-text", "empty",
                              "duplicate", "lone-surrogate"))
        title = draw(st.sampled_from([None, "absent", ""]) | TEXT)
        text = draw(TEXT | st.just(""))
        if not f"{title if isinstance(title, str) and title != 'absent' else ''} {text}".strip():
            text = "x"
        if kind == "blank":
            lines.append(draw(BLANK))
        elif kind == "invalid-json":
            lines.append(draw(st.sampled_from(INVALID_JSON)))
        else:
            written_id: Any = int(doc_id) if doc_id.isascii() and doc_id.isdigit() and str(int(doc_id)) == doc_id \
                and draw(st.booleans()) else doc_id
            if kind == "duplicate" and corpus:
                written_id = draw(st.sampled_from(sorted(corpus)))
            elif kind == "duplicate":
                kind = "valid"
            record = {"_id": written_id, "text": text, **draw(st.dictionaries(st.sampled_from(["metadata", "url"]),
                                                                             JSON, max_size=1))}
            if title != "absent":
                record["title"] = title
            if kind == "bad-id":
                record["_id"] = draw(st.sampled_from([None, True, 1.5, [], {}, "", "  "]))
            elif kind == "bad-title":
                record["title"] = draw(st.sampled_from([0, False, [], {}, 1, ["t"]]))
            elif kind == "no-text":
                del record["text"]
            elif kind == "bad-text":
                record["text"] = draw(NOT_STRING)
            elif kind == "empty":
                record.update(title=draw(EMPTY), text=draw(EMPTY))
            elif kind == "lone-surrogate":
                record[draw(st.sampled_from(["title", "text", "_id"]))] = "t\udc80"
            lines.append(json.dumps(record))
            if kind == "valid":
                corpus[doc_id] = f"{(title if title not in (None, 'absent') else '').strip()} {text.strip()}".strip()
        kinds.append(kind)
    return BeirFile(lines, bad_line=first_bad(kinds) or (None if corpus else 0)), corpus


@st.composite
def queries_file(draw, corrupt: bool) -> tuple[BeirFile, dict[str, str]]:
    ids = draw(st.lists(BEIR_ID, min_size=1, max_size=4, unique=True))
    lines, kinds, queries = [], [], {}
    for query_id in ids:
        kind = draw(row_kinds(corrupt, "invalid-json", "no-text", "empty", "bad-text", "duplicate",
                              "lone-surrogate"))
        text = draw(TEXT)
        if kind == "duplicate" and queries:
            query_id = draw(st.sampled_from(sorted(queries)))
        elif kind == "duplicate":
            kind = "valid"
        record = {"_id": query_id, "text": text, **draw(st.dictionaries(st.just("metadata"), JSON, max_size=1))}
        if kind == "no-text":
            del record["text"]
        elif kind == "empty":
            record["text"] = draw(EMPTY)
        elif kind == "bad-text":
            record["text"] = draw(NOT_STRING)
        elif kind == "lone-surrogate":
            record["text"] += "\ud83d"
        lines.append(draw(BLANK) if kind == "blank" else draw(st.sampled_from(INVALID_JSON))
                     if kind == "invalid-json" else json.dumps(record))
        if kind == "valid":
            queries[query_id] = text.strip()
        kinds.append(kind)
    return BeirFile(lines, bad_line=first_bad(kinds) or (None if queries else 0)), queries


@st.composite
def qrels_file(draw, queries: list[str], docs: list[str], corrupt: bool) -> tuple[BeirFile, dict[str, dict[str, int]]]:
    """qrels lines (BEIR's tab format under a header, or TREC's) and the judgments they must load as. A pair judged
    twice gets the same score (a harmless repeat) unless the row is a "rejudged" corruption."""
    queries, docs = queries or ["q"], docs or ["d"]
    lines = ["query-id\tcorpus-id\tscore"] if draw(st.booleans()) else []
    kinds = ["blank"] * len(lines)
    qrels: dict[str, dict[str, int]] = {}
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(row_kinds(corrupt, "bad-score", "unknown-query", "unknown-doc", "columns", "rejudged"))
        qid, did = draw(st.sampled_from(queries)), draw(st.sampled_from(docs))
        score = qrels.get(qid, {}).get(did, draw(st.integers(-1, 3)))
        if kind == "rejudged":
            score += 1
        written = draw(st.sampled_from([str(score), f"{score}.0", f" {score} "]))
        if kind == "bad-score":
            written = draw(st.sampled_from(["x", "1.5", "nan", "inf", "1e400", "", "score"]))
        elif kind == "unknown-query":
            qid = "unknown-query"
        elif kind == "unknown-doc":
            did = "unknown-doc"
        fields = [qid, did, written] if kind != "columns" else [qid, did, written, "1", "2"][:draw(st.sampled_from(
            [1, 2, 5]))]
        style = draw(st.sampled_from(["tab", "tab", "trec", "space"]))
        if style == "trec" and kind != "columns":
            fields = [qid, "0", did, written]
        separator = "\t" if style == "tab" or not written.strip() else " "
        lines.append(draw(BLANK) if kind == "blank" else separator.join(fields))
        if kind == "rejudged" and did not in qrels.get(qid, {}):
            kind = "valid"  # the first judgment of the pair after all
        if kind == "valid":
            qrels.setdefault(qid, {}).setdefault(did, score)
        kinds.append(kind)
    bad = first_bad(kinds)
    if bad is not None:  # what came before the bad row is all that counts
        qrels = {}
    return BeirFile(lines, bad_line=bad or (None if qrels else 0)), qrels


BEIR_ENCODING = st.sampled_from(("utf-8", "utf-8-bom", "crlf", "utf-16", "invalid-utf-8"))
BEIR_SHAPE = st.sampled_from(("file", "symlink", "dangling", "directory", "missing"))
BEIR_PROBLEMS = ("corpus", "queries", "qrels", "encoding", "shape", "qrels-dir", "everything")


@st.composite
def beir_dirs(draw) -> tuple[BeirFile, dict, BeirFile, dict, BeirFile, dict, str, str]:
    """Three files and a qrels directory; half of them with something wrong (in one place, or everywhere)."""
    problem = draw(st.sampled_from(("none",) * len(BEIR_PROBLEMS) + BEIR_PROBLEMS))
    anywhere = problem == "everything"
    corpus_f, corpus = draw(corpus_file(corrupt=problem in ("corpus", "everything")))
    queries_f, queries = draw(queries_file(corrupt=problem in ("queries", "everything")))
    qrels_f, qrels = draw(qrels_file(list(queries), list(corpus), corrupt=problem in ("qrels", "everything")))
    which = draw(st.integers(0, 2))
    files = [BeirFile(f.lines, draw(BEIR_ENCODING) if anywhere or problem == "encoding" and i == which else "utf-8",
                      draw(BEIR_SHAPE) if anywhere or problem == "shape" and i == which else "file", f.bad_line)
             for i, f in enumerate((corpus_f, queries_f, qrels_f))]
    qrels_dir = draw(st.sampled_from(["dir", "file", "missing", "symlink"])) if anywhere or problem == "qrels-dir" \
        else "dir"
    return (*files, corpus, queries, qrels, draw(st.sampled_from(["train", "dév"])), qrels_dir)


def beir_example(corpus: list[str], queries: list[str], qrels: list[str], **layout):
    """A BEIR directory given as lines, for @example."""
    files = [BeirFile(corpus, bad_line=layout.get("corpus_bad")), BeirFile(queries, bad_line=layout.get("queries_bad")),
             BeirFile(qrels, bad_line=layout.get("qrels_bad"))]
    return (*files, layout.get("corpus_loads", {}), layout.get("queries_loads", {}), layout.get("qrels_loads", {}),
            "train", "dir")


def write_beir_file(path: Path, file: BeirFile) -> None:
    text = "\n".join(file.lines) + "\n"
    place(path.parent, path.name, encode(text, file.encoding, len(text) // 2), file.shape)


@example(beir=beir_example(  # a first row with a bad score was skipped as if a header
    ['{"_id": "d", "text": "t"}'], ['{"_id": "q", "text": "q"}'], ["q\td\t1.5", "q\td\t1"], qrels_bad=1))
@example(beir=beir_example(  # title 0 / false / [] was taken for no title
    ['{"_id": "d", "title": 0, "text": "t"}'], ['{"_id": "q", "text": "q"}'], ["q\td\t1"], corpus_bad=1))
@example(beir=beir_example(  # mining a corpus without a word BM25 indexes: ValueError inside bm25s
    ['{"_id": "d", "text": "the 0"}'], ['{"_id": "q", "text": "q"}'], ["q\td\t1"], corpus_loads={"d": "the 0"},
    queries_loads={"q": "q"}, qrels_loads={"q": {"d": 1}}))
@given(beir=beir_dirs())
def test_beir_directory(beir) -> None:
    RAN["beir"] += 1
    corpus_f, queries_f, qrels_f, corpus, queries, qrels, split, qrels_dir_shape = beir
    with tmpdir() as tmp:
        root = Path(tmp) / "bëir"
        root.mkdir()
        write_beir_file(root / "corpus.jsonl", corpus_f)
        write_beir_file(root / "queries.jsonl", queries_f)
        qdir = root / "qrels"
        if qrels_dir_shape in ("dir", "symlink"):
            real = qdir if qrels_dir_shape == "dir" else Path(tmp) / "real-qrels"
            real.mkdir()
            write_beir_file(real / f"{split}.tsv", qrels_f)
            if qrels_dir_shape == "symlink":
                qdir.symlink_to(real)
        elif qrels_dir_shape == "file":
            qdir.write_text("not a directory")

        error = None  # the start of the message load_beir must fail with, file by file in the order it reads them
        layout_ok = qrels_dir_shape in ("dir", "symlink") and all(f.shape in READABLE for f in (corpus_f, queries_f))
        if not layout_ok or qrels_f.shape in ("dangling", "missing"):
            error = str(root)
        for name, file in (("corpus.jsonl", corpus_f), ("queries.jsonl", queries_f), (f"qrels/{split}.tsv", qrels_f)):
            if error is None and (file.shape not in READABLE or file.encoding not in TRANSPARENT
                                  or file.bad_line is not None):
                line = file.bad_line if file.shape in READABLE and file.encoding in TRANSPARENT else None
                error = f"{root / name}:{line}: " if line else f"{root / name}"
        load = lambda: load_beir(root, split)  # noqa: E731
        if error is not None:
            must_fail(load, DataError, error)
            must_fail(lambda: load_training_data(root, split=split, show_progress=False), DataError, str(root))
            return
        dataset = load()
        event("loads")
        assert dataset.corpus == corpus
        assert dataset.qrels == qrels
        assert dataset.queries == {qid: queries[qid] for qid in qrels}
        assert detect_format(root) == "beir"
        positives = [(queries[q], corpus[d]) for q, docs in qrels.items() for d, s in docs.items() if s > 0]
        train = lambda: load_training_data(root, split=split, show_progress=False,  # noqa: E731
                                           cache_dir=Path(tmp) / "cache")
        if not positives:
            must_fail(train, DataError, str(root / "qrels" / f"{split}.tsv"), "no positive")
        else:
            assert [(e.query, e.positive) for e in train()] == positives


# ---- corpus and query texts (spladectl encode) ----------------------------------------------------------------------


@st.composite
def text_rows(draw, kind: str, tsv: bool) -> list[Row]:
    """Rows of a text file: JSONL records (`_id`/`id`, `text`/`contents`, a title for documents) or id<TAB>text."""
    ids = draw(st.lists(TSV_TEXT if tsv else TEXT, min_size=0, max_size=5))  # may repeat: check_texts names it
    rows = []
    for text_id in ids:
        bad = draw(st.sampled_from(["valid"] * 6 + ["blank", "missing-id", "empty-text", "wrong-type", "huge",
                                                     "invalid", "lone-surrogate"]))
        text = draw(TSV_TEXT if tsv else TEXT) if bad != "huge" else "t" * MB
        if bad == "blank":
            rows.append(Row(draw(BLANK)))
        elif tsv:
            fields = [text_id, text, *draw(st.lists(TSV_TEXT | st.just(""), max_size=2))]
            if bad == "missing-id":
                fields[0] = draw(EMPTY.filter(lambda s: "\n" not in s))
            elif bad == "empty-text":
                fields[1:] = [draw(EMPTY.filter(lambda s: "\n" not in s))]
            elif bad in ("wrong-type", "invalid", "lone-surrogate"):  # (a decoded file has no surrogates)
                fields = [text_id]  # no tab
            joined = " ".join(f.strip() for f in fields[1:] if f.strip())
            rows.append(Row("\t".join(fields), (text_id.strip(), joined), bad not in ("valid", "huge")))
        else:
            id_key, text_key = draw(st.sampled_from(["_id", "id"])), draw(st.sampled_from(["text", "contents"]))
            record = {id_key: text_id, text_key: text}
            title = draw(st.none() | TEXT) if kind == "documents" else None
            if title is not None:
                record["title"] = title
            if bad == "missing-id":
                del record[id_key]
            elif bad == "empty-text":
                record[text_key] = draw(EMPTY)
                record.pop("title", None)
            elif bad == "wrong-type":
                record[draw(st.sampled_from([id_key, text_key]))] = draw(NOT_STRING.filter(
                    lambda v: not isinstance(v, int) or isinstance(v, bool)))
            elif bad == "lone-surrogate":
                record[draw(st.sampled_from([id_key, text_key]))] = text + "\udfff"
            loaded = text.strip() if kind == "queries" or title is None else f"{title.strip()} {text.strip()}"
            rows.append(Row(draw(st.sampled_from(INVALID_JSON)) if bad == "invalid" else json.dumps(record),
                            (text_id, loaded.strip()), bad not in ("valid", "huge")))
    return rows


@st.composite
def text_files(draw) -> tuple[str, bool, bool, list[Row]]:
    """(documents or queries, TSV?, in a BEIR directory?, rows): a BEIR directory holds JSONL."""
    kind, tsv, in_beir_dir = draw(st.sampled_from(["documents", "queries"])), draw(st.booleans()), draw(st.booleans())
    return kind, tsv and not in_beir_dir, in_beir_dir, draw(text_rows(kind, tsv and not in_beir_dir))


@example(case=("documents", False, False, [Row(json.dumps({"_id": "a\udfff", "text": "t"}), bad=True)]),
         encoding="utf-8", name="surrogate-id", shape="file")  # check_texts: UnicodeEncodeError hashing the id
@given(case=text_files(), encoding=ENCODING, name=NAME, shape=SHAPE)
def test_text_reader(case: tuple[str, bool, bool, list[Row]], encoding: str, name: str, shape: str) -> None:
    """iter_texts gives every row, in order, with its file:line; check_texts counts them and names repeated ids."""
    RAN["texts"] += 1
    kind, tsv, in_beir_dir, rows = case
    with tmpdir() as tmp:
        text = "\n".join(row.text for row in rows) + "\n"
        raw = encode(text, encoding, len(rows))
        if in_beir_dir:  # the directory is given; the file is corpus.jsonl or queries.jsonl (maybe .gz)
            root = Path(tmp) / name
            root.mkdir()
            base = "corpus.jsonl" if kind == "documents" else "queries.jsonl"
            path = place(root, base + (".gz" if gz_suffix(encoding) else ""), raw, shape)
            given_path = root
        else:
            path = given_path = place(Path(tmp), name + (".tsv" if tsv else ".jsonl") + gz_suffix(encoding), raw,
                                      shape)
        if shape not in READABLE or encoding not in TRANSPARENT:
            must_fail(lambda: check_texts(given_path, kind), DataError, str(given_path))
            return
        expected, error, seen = [], None, {}
        for line, row in enumerate(rows, start=1):
            if row.bad:
                error = f"{path}:{line}: "
                break
            if row.loads_as is not None:
                expected.append((*row.loads_as, f"{path}:{line}"))
        if error is not None:
            must_fail(lambda: list(iter_texts(given_path, kind)), DataError, error)
            must_fail(lambda: check_texts(given_path, kind), DataError, error)
            return
        assert list(iter_texts(given_path, kind)) == expected
        event("loads")
        repeated = None
        for text_id, _, at in expected:
            if text_id in seen:
                repeated = at
                break
            seen[text_id] = at
        if repeated:
            must_fail(lambda: check_texts(given_path, kind), DataError, f"{repeated}: duplicate id")
        elif not expected:
            must_fail(lambda: check_texts(given_path, kind), DataError, str(path))
        else:
            assert check_texts(given_path, kind) == len(expected)


# ---- hardware profiles ----------------------------------------------------------------------------------------------

GOOD = {
    "string": TEXT, "device": st.sampled_from(DEVICES), "accelerator": st.sampled_from(DEVICES),
    "precision": st.sampled_from(["32-true", "16-mixed", "bf16-mixed", "fp32", "no", "fp16", "bf16", " BF16 "]),
    "positive": st.integers(1, 2**63 - 1), "count": st.integers(0, 2**63 - 1), "bool": st.booleans(),
    "number": st.integers(1, 10**6) | st.floats(1e-3, 1e6),
    "regex": st.sampled_from(["A100", "(?i)rtx ?[34]090", ".*"]),
    "capability": st.tuples(st.integers(0, 99), st.integers(0, 9)).map(lambda c: f"{c[0]}.{c[1]}"),
    "strings": st.lists(st.text(max_size=6), max_size=3),
}
BAD = {  # wrong types, and right types out of range
    "string": st.integers() | st.booleans() | st.lists(st.integers(), max_size=2),
    "device": st.sampled_from(["gpu", "CUDA", "", "tpu"]) | st.integers(),
    "accelerator": st.sampled_from(["gpu", "xpu", ""]) | st.booleans(),
    "precision": st.sampled_from(["fp8", "", "mixed", "64-true"]) | st.integers() | st.booleans(),
    "positive": st.integers(-2**63, 0) | st.floats(allow_infinity=False) | st.booleans() | st.text(max_size=3),
    "count": st.integers(-2**63, -1) | st.floats(allow_nan=False) | st.just("0"),
    "bool": st.integers(0, 1) | st.sampled_from(["true", "yes"]),
    "number": st.integers(-10, 0) | st.sampled_from([float("nan"), -1.5, "80", True]),
    "regex": st.sampled_from(["(", "[a-", "a{99999999999}", "(" * 1000 + ")" * 1000]) | st.integers(),
    "capability": st.sampled_from(["8", "8.0.1", "x.y", "", "9" * 5000 + ".0"]) | st.floats(0, 10),
    "strings": st.text(max_size=4) | st.lists(st.integers(), min_size=1, max_size=2),
}
SETTING_KINDS = {"name": "string", "description": "string", "device": "device", "precision": "precision",
                 "batch_size": "positive", "batch_size_32": "positive", "grad_accum": "positive", "tf32": "bool",
                 "gradient_checkpointing": "bool", "max_query_length": "positive", "max_doc_length": "positive",
                 "dataloader_workers": "count"}
MATCH_KINDS = {"accelerator": "accelerator", "gpu_name": "regex", "memory_gib": "number",
               "compute_capability": "capability", "cpu_features": "strings", "os": "string", "arch": "string"}
REQUIRED = ("description", "device", "precision", "batch_size")
# Whole-file problems: each is "not valid TOML", wherever it goes.
INVALID_TOML = ["batch_size = ", "[match", "= 3", "x = " + "[" * 100_000, "y = " + "1" * 5000, 'z = "a\x00b"',
                'w = "\\ud800"', "description = 'a'\ndescription = 'b'"]


@dataclass(frozen=True)
class Entry:
    key: str
    value: Any
    bad: bool = False


@st.composite
def entries(draw, kinds: dict[str, str], required: tuple[str, ...] = (), *, bad: bool = False,
            unknown: bool = False, missing: bool = False) -> list[Entry]:
    """Keys of a TOML table in any order: every required one (unless `missing`), some others; with `bad` some values
    are of the wrong type or out of range, with `unknown` a key outside the schema is among them."""
    keys = [k for k in kinds if (k not in required or missing) and draw(st.booleans()) or k in required and not missing]
    out = []
    for key in draw(st.permutations(keys)):
        wrong = bad and draw(st.integers(0, 2)) == 0
        out.append(Entry(key, draw((BAD if wrong else GOOD)[kinds[key]]), wrong))
    if unknown:
        key = draw(st.sampled_from(["batchsize", "batch-size", "Device", "", "gpu", "précision"]))
        out.insert(draw(st.integers(0, len(out))), Entry(key, draw(GOOD["string"]), True))
    return out


@dataclass(frozen=True)
class ProfileCase:
    top: list[Entry]
    match: list[Entry] | None = None  # the [match] table
    corruption: str | None = None  # a line of invalid TOML, in the middle
    encoding: str = "utf-8"
    shape: str = "file"

    def toml(self) -> str:
        lines = [f"{toml_key(e.key)} = {toml_value(e.value)}" for e in self.top]
        if self.match is not None:
            lines += ["[match]"] + [f"{toml_key(e.key)} = {toml_value(e.value)}" for e in self.match]
        if self.corruption is not None:
            lines.insert(len(lines) // 2, self.corruption)
        return "\n".join(lines) + "\n"


PROFILE_PROBLEMS = ("value", "key", "missing", "toml", "encoding", "shape", "everything")


@st.composite
def profile_cases(draw) -> ProfileCase:
    """Half of them valid; the others with one kind of problem, or all kinds at once."""
    problem = draw(st.sampled_from(("none",) * len(PROFILE_PROBLEMS) + PROFILE_PROBLEMS))
    has = lambda *kinds: problem in (*kinds, "everything")  # noqa: E731
    top = draw(entries(SETTING_KINDS, REQUIRED, bad=has("value"), unknown=has("key"), missing=has("missing")))
    match = draw(st.none() | entries(MATCH_KINDS, bad=has("value"), unknown=has("key") and draw(st.booleans())))
    corruption = draw(st.sampled_from(INVALID_TOML)) if has("toml") and draw(st.integers(0, 2)) else None
    return ProfileCase(top, match, corruption, draw(PLAIN_ENCODING) if has("encoding") else "utf-8",
                       draw(SHAPE) if has("shape") else draw(st.sampled_from(READABLE)))


def normalised(kind: str, value: Any) -> Any:
    from spladectl.precision import canonical_precision

    return {"precision": canonical_precision, "capability": lambda v: tuple(int(p) for p in v.split(".")),
            "strings": tuple, "number": float}.get(kind, lambda v: v)(value)


VALID_TOP = [Entry("description", "d"), Entry("device", "cpu"), Entry("precision", "fp32"), Entry("batch_size", 1)]


@example(case=ProfileCase(VALID_TOP, [Entry("compute_capability", "9" * 5000 + ".0", True)]),
         name="capability")  # int() of 5000 digits: ValueError escaped
@example(case=ProfileCase(VALID_TOP, [Entry("gpu_name", "a{99999999999}", True)]), name="regex")  # OverflowError
@example(case=ProfileCase(VALID_TOP, [Entry("gpu_name", "(" * 1000 + ")" * 1000, True)]), name="regex")  # Recursion
@example(case=ProfileCase(VALID_TOP, None, "y = " + "1" * 5000), name="bigint")  # ValueError escaped
@example(case=ProfileCase(VALID_TOP, None, "x = " + "[" * 100_000), name="deep")  # RecursionError escaped
@given(case=profile_cases(), name=NAME)
def test_profile_file(case: ProfileCase, name: str) -> None:
    """A profile by path (`--profile ./mine.toml`) and from the user's directory: loads as written or a
    ProfileError naming the file and the key."""
    RAN["profile"] += 1
    top, match, shape, text = case.top, case.match, case.shape, case.toml()
    with tmpdir() as tmp:
        users = Path(tmp) / "config" / "spladectl" / "profiles"
        users.mkdir(parents=True)
        path = place(users, name + ".toml", encode(text, case.encoding, len(text) // 2), shape)
        registry = ProfileRegistry()
        registry.register_dir(builtin_dir(), origin="builtin")
        by_path = lambda: registry.get(str(path))  # noqa: E731
        from_dir = lambda: default_registry(env={"XDG_CONFIG_HOME": str(Path(tmp) / "config")}, plugins=False)
        if shape not in READABLE:
            must_fail(by_path, ProfileError, str(path))
            if shape in ("dangling", "directory"):
                must_fail(from_dir, ProfileError, str(path))
            return
        if case.encoding not in TRANSPARENT or case.corruption is not None:
            must_fail(by_path, ProfileError, str(path), "not valid TOML")
            must_fail(from_dir, ProfileError, str(path))
            return
        problem = next((e for e in top if e.bad), None) or next((e for e in match or [] if e.bad), None)
        if problem is not None:
            key = problem.key if problem in top else f"match.{problem.key}"
            must_fail(by_path, ProfileError, str(path), repr(key))
            must_fail(from_dir, ProfileError, str(path), repr(key))
            return
        missing = [k for k in REQUIRED if k not in {e.key for e in top}]
        if missing:
            must_fail(by_path, ProfileError, str(path), f"missing key {missing[0]!r}")
            return
        profile = by_path()
        event("loads")
        written = {e.key: normalised(SETTING_KINDS[e.key], e.value) for e in top}
        assert profile.name == written.pop("name", Path(path).stem)
        assert {k: getattr(profile, k) for k in written} == written
        if match is None:
            assert profile.match is None
        else:
            got = {e.key: getattr(profile.match, e.key) for e in match}
            assert got == {e.key: normalised(MATCH_KINDS[e.key], e.value).lower() if e.key in ("os", "arch")
                           else normalised(MATCH_KINDS[e.key], e.value) for e in match}
        if not (profile.name.endswith(".toml") or "/" in profile.name):  # those names read as paths
            assert from_dir().get(profile.name).to_dict() == {**profile.to_dict(), "origin": "user"}


# ---- experiment files -----------------------------------------------------------------------------------------------

OPTIONS = {  # train options, each with the spellings a file may use and values of its type
    "max_steps": (["max-steps", "max_steps", "--max-steps"], st.integers(1, 10**6)),
    "lambda_q": (["lambda_q", "lambda-q"], st.floats(0, 1)),
    "lr": (["lr", "--lr"], st.floats(1e-7, 1)),
    "precision": (["precision"], st.sampled_from(["32-true", "bf16-mixed", "fp16"])),
    "seed": (["seed"], st.integers(0, 2**31)),
    "tag": (["tag"], st.lists(TEXT, min_size=1, max_size=2)),
    "in_batch_negatives": (["in-batch-negatives", "in_batch_negatives"], st.booleans()),
    "data": (["data", "--data"], TEXT),
}
EXPERIMENT_PROBLEMS = ["unknown-top-level", "unknown-option", "forbidden-option", "grid-not-a-list", "grid-empty",
                       "points-not-tables", "bad-point-name", "bad-name", "metric-not-a-string", "base-not-a-table",
                       "two-spellings"]


@st.composite
def option_table(draw, max_size: int = 3) -> dict[str, Any]:
    names = draw(st.lists(st.sampled_from(sorted(OPTIONS)), max_size=max_size, unique=True))
    return {draw(st.sampled_from(OPTIONS[n][0])): draw(OPTIONS[n][1]) for n in names}


SPELLED = {spelling: name for name, (spellings, _) in OPTIONS.items() for spelling in spellings}


def canonical(table: dict[str, Any]) -> dict[str, Any]:
    return {SPELLED[k]: v for k, v in table.items()}


@st.composite
def experiments(draw) -> tuple[dict[str, Any], str | None]:
    """An experiment as a TOML-able dict, and the key its one corruption (if any) must be reported under."""
    exp: dict[str, Any] = {}
    if draw(st.booleans()):
        exp["name"] = draw(st.from_regex(r"[A-Za-z0-9=+,@-][A-Za-z0-9._=+,@-]{0,12}[A-Za-z0-9=+,@-]", fullmatch=True))
    if draw(st.booleans()):
        exp["metric"] = draw(st.sampled_from(["nDCG@10", "loss", "R@100"]))
    exp["base"] = draw(option_table())
    grid = draw(option_table(max_size=2))
    exp["grid"] = {k: draw(st.lists(OPTIONS[SPELLED[k]][1], min_size=1, max_size=3, unique_by=repr)) for k in grid}
    exp["points"] = [{**draw(option_table(max_size=2)), **({"name": draw(st.from_regex(r"[a-z][a-z0-9-]{0,8}",
                                                                                        fullmatch=True))}
                                                           if draw(st.booleans()) else {})}
                     for _ in range(draw(st.integers(0, 3)))]
    problem = draw(st.none() | st.none() | st.sampled_from(EXPERIMENT_PROBLEMS))
    table = draw(st.sampled_from(["base", "grid", "points"]))
    bad_key = None
    if problem == "unknown-top-level":
        bad_key, exp["bsae"] = "bsae", {}
    elif problem in ("unknown-option", "forbidden-option"):
        bad_key = draw(st.sampled_from(["learning_rate", "max-step", "--Max-Steps"] if problem == "unknown-option"
                                       else ["output-dir", "resume", "nproc-per-node", "runs_root", "json"]))
        if table == "points":
            exp["points"].append({bad_key: 1})
        else:
            exp[table][bad_key] = [1] if table == "grid" else 1
    elif problem in ("grid-not-a-list", "grid-empty"):
        bad_key = "seed"
        exp["grid"]["seed"] = 3 if problem == "grid-not-a-list" else []
    elif problem == "points-not-tables":
        bad_key, exp["points"] = "points", draw(st.sampled_from([3, "p", [1, 2]]))
    elif problem == "bad-point-name":
        bad_key = "name"
        exp["points"].append({"name": draw(st.sampled_from(["a b", ".hidden", "", "x/y", "é"])), "seed": 1})
    elif problem == "bad-name":
        bad_key, exp["name"] = "name", draw(st.sampled_from(["a b", "..", "", "x/y", "_x", 3]))
    elif problem == "metric-not-a-string":
        bad_key, exp["metric"] = "metric", draw(st.sampled_from([1, True, ["loss"]]))
    elif problem == "base-not-a-table":
        bad_key, exp["base"] = "base", draw(st.sampled_from([1, "x", [1]]))
    elif problem == "two-spellings":
        bad_key = "max_steps"
        exp["base"].update({"max-steps": 1, "max_steps": 2})
    return exp, bad_key


def experiment_toml(exp: dict[str, Any]) -> str:
    tables = ("base", "grid")
    lines = [f"{toml_key(k)} = {toml_value(v)}" for k, v in exp.items()
             if not (k in tables and isinstance(v, dict)) and not (k == "points" and is_tables(v))]
    for key in tables:
        if isinstance(exp.get(key), dict):
            lines += [f"[{key}]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in exp[key].items()]
    for point in exp["points"] if is_tables(exp.get("points")) else []:
        lines += ["[[points]]"] + [f"{toml_key(k)} = {toml_value(v)}" for k, v in point.items()]
    return "\n".join(lines) + "\n"


def is_tables(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def expected_points(exp: dict[str, Any]) -> list[tuple[str, dict]] | None:
    """(name, settings) of every point, or None when two points share a name."""
    base, grid = canonical(exp["base"]), canonical(exp["grid"])
    points = [(point_name(varied), {**base, **varied})
              for varied in (dict(zip(grid, combo)) for combo in itertools.product(*grid.values()))] if grid else []
    for entry in exp["points"]:
        varied = canonical({k: v for k, v in entry.items() if k != "name"})
        points.append((entry.get("name") or point_name(varied), {**base, **varied}))
    points = points or [("base", dict(base))]
    return points if len({name for name, _ in points}) == len(points) else None


def experiment_problem(exp: dict[str, Any], bad_key: str | None, path: Path) -> str | None:
    """What the error must name, in the order load_experiment checks: top-level keys, the name, the corruption,
    points sharing a name (the metric comes last); None when the file must load."""
    name = exp.get("name", path.stem)
    if bad_key == "bsae":
        return bad_key
    if not isinstance(name, str) or slug(name, 100) != name:
        return "name"
    if bad_key is not None and bad_key != "metric":
        return bad_key
    if expected_points(exp) is None:
        return "named"
    return bad_key


@example(case=({"base": {"max-steps": 1, "max_steps": 2}, "grid": {}, "points": []}, "max_steps"),
         encoding="utf-8", name="two-spellings", shape="file")  # one of the two silently won
@example(case=({"base": {}, "grid": {}, "points": []}, None), encoding="invalid-utf-8", name="latin1",
         shape="file")  # UnicodeDecodeError escaped
@given(case=experiments(), encoding=PLAIN_ENCODING, name=NAME, shape=SHAPE)
def test_experiment_file(case, encoding: str, name: str, shape: str) -> None:
    RAN["experiment"] += 1
    from spladectl.cli.train import train_command

    exp, bad_key = case
    with tmpdir() as tmp:
        path = place(Path(tmp), name + ".toml", encode(experiment_toml(exp), encoding, 3), shape)
        load = lambda: load_experiment(path, train_command())  # noqa: E731
        if shape not in READABLE or encoding not in TRANSPARENT:
            must_fail(load, SpladectlError, str(path))
            return
        problem = experiment_problem(exp, bad_key, path)
        if problem is not None:
            must_fail(load, SpladectlError, str(path), problem)
            return
        loaded = load()
        event("loads")
        assert [(p.name, p.settings) for p in loaded.points] == expected_points(exp)
        assert loaded.name == exp.get("name", path.stem) and loaded.metric == exp.get("metric")


# ---- through the CLI ------------------------------------------------------------------------------------------------


def cli_outcome(result, path: Path) -> bool:
    """True for success (exit 0); otherwise it must be exit 2 with one Error message naming the file, no traceback."""
    if result.exit_code == 0:
        event("loads")
        return True
    event("fails")
    output = result.output
    assert result.exit_code == 2, output[-2000:]
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in output, output[-2000:]
    assert sum(line.lstrip().startswith(("Error", "╭─ Error")) for line in output.splitlines()) == 1, output[-2000:]
    assert str(path) in output, output[-2000:]
    return False


@given(data=st.data(), tsv=st.booleans(), encoding=ENCODING, name=CLI_NAME, shape=SHAPE,
       command=st.sampled_from(["validate", "stats"]))
def test_cli_data_validate_and_stats(cli, data, tsv: bool, encoding: str, name: str, shape: str, command: str) -> None:
    """`spladectl data validate|stats FILE --json`: every example counted, or exit 2 with the file named."""
    RAN["cli-data"] += 1
    rows = data.draw(tsv_rows() if tsv else seed_rows())
    with tmpdir() as tmp:
        text = "\n".join(row.text for row in rows) + "\n"
        path = place(Path(tmp), name + (".tsv" if tsv else ".jsonl") + gz_suffix(encoding),
                     encode(text, encoding, len(text) // 2), shape)
        examples, error = (tsv_outcome if tsv else seed_outcome)(*((rows, path) if tsv else (rows, path, 1)))
        result = cli("data", command, str(path), "--json", env={"COLUMNS": "5000"})
        readable = shape in READABLE and encoding in TRANSPARENT
        assert cli_outcome(result, path) == (readable and error is None), result.output[-2000:]
        if readable and error is None:
            assert json.loads(result.stdout)["examples"] == len(examples)
        elif readable:
            assert error.rstrip() in result.output, result.output[-2000:]


@given(profile=profile_cases(), case=experiments(), name=CLI_NAME)
def test_cli_profile_show_and_sweep_dry_run(cli, profile: ProfileCase, case, name: str) -> None:
    """`spladectl profile show FILE --json` and `spladectl sweep FILE --dry-run --json`: exit 0, or exit 2 naming
    the file."""
    RAN["cli-toml"] += 1
    encoding, shape = profile.encoding, profile.shape
    with tmpdir() as tmp:
        env = {"COLUMNS": "5000", "XDG_CONFIG_HOME": str(Path(tmp) / "config")}
        path = place(Path(tmp), name + ".toml", encode(profile.toml(), encoding, 5), shape)
        result = cli("profile", "show", str(path), "--json", env=env)
        valid = shape in READABLE and encoding in TRANSPARENT and profile.corruption is None and not any(
            e.bad for e in [*profile.top, *(profile.match or [])]) and {e.key for e in profile.top} >= set(REQUIRED)
        assert cli_outcome(result, path) == valid, result.output[-2000:]
        if valid:
            shown = json.loads(result.stdout)
            assert all(shown[e.key] == normalised(SETTING_KINDS[e.key], e.value)
                       for e in profile.top if e.key != "name")

        exp, bad_key = case
        path = place(Path(tmp), name + "-sweep.toml", encode(experiment_toml(exp), encoding, 5), shape)
        result = cli("sweep", str(path), "--dry-run", "--json", "--runs-root", str(Path(tmp) / "runs"), env=env)
        valid = shape in READABLE and encoding in TRANSPARENT and experiment_problem(exp, bad_key, path) is None
        assert cli_outcome(result, path) == valid, result.output[-2000:]
        if valid:
            assert [row["point"] for row in json.loads(result.stdout)] == [p for p, _ in expected_points(exp)]
