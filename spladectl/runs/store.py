"""Finding runs: the runs root, new run ids, listing, and naming a run by id, id prefix or path."""

from __future__ import annotations

import os
import re
import secrets
from datetime import datetime, timezone
from pathlib import Path

from spladectl.errors import SpladectlError
from spladectl.runs.record import RUN_FILE, RunRecord, load_record

ROOT_ENV_VAR = "SPLADECTL_RUNS_ROOT"
DEFAULT_ROOT = "runs"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=+,@-]+")


def runs_root(given: str | Path | None = None) -> Path:
    """--runs-root, else $SPLADECTL_RUNS_ROOT, else ./runs."""
    return Path(given or os.environ.get(ROOT_ENV_VAR) or DEFAULT_ROOT)


def slug(text: str, max_length: int = 40) -> str:
    """A directory-name-safe version of `text` (letters, digits and ._=+,@- kept; anything else becomes _)."""
    cleaned = _UNSAFE.sub("_", text).strip("._") or "run"
    return cleaned[:max_length].rstrip("._")


def new_run_id(name: str) -> str:
    """UTC time to the second, the slug, and four random hex digits: sortable, readable, and two runs started in
    the same second (several GPUs, several machines) do not collide."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{slug(name)}-{secrets.token_hex(2)}"


def run_id_for(run_dir: Path, root: Path) -> str:
    """A directory under the root is named by its path there (`<id>` or `<sweep>/<point>`); one elsewhere (an
    explicit --output-dir) by its directory name."""
    run_dir, root = run_dir.resolve(), root.resolve()
    try:
        return run_dir.relative_to(root).as_posix()
    except ValueError:
        return run_dir.name


def _renamed(record: RunRecord, root: Path) -> RunRecord:
    """Under `root`, a run's id is its path there (runs can be moved); elsewhere, the id it was given."""
    try:
        record.path.resolve().relative_to(root.resolve())
    except ValueError:
        return record
    record.id = run_id_for(record.path, root)
    return record


def run_dirs(root: Path) -> list[Path]:
    """Directories holding a run.json: RUNS_ROOT/<id> and RUNS_ROOT/<sweep>/<point>."""
    if not root.is_dir():
        return []
    found = []
    for child in sorted(root.iterdir()):
        if not child.is_dir() or child.name.startswith("."):
            continue
        if (child / RUN_FILE).is_file():
            found.append(child)
            continue
        found += [grand for grand in sorted(child.iterdir())
                  if grand.is_dir() and not grand.name.startswith(".") and (grand / RUN_FILE).is_file()]
    return found


def list_runs(root: Path, problems: list[str] | None = None) -> list[RunRecord]:
    """Every run under `root`, oldest first, each named by where it is now. A run.json that cannot be read (edited
    by hand, from a newer format) is left out and described in `problems`, so one bad run never hides the others."""
    records = []
    for path in run_dirs(root):
        try:
            records.append(_renamed(load_record(path), root))
        except SpladectlError as exc:
            if problems is not None:
                problems.append(exc.format_message())
    return sorted(records, key=lambda r: (r.started, r.id))


def find_run(ref: str, root: Path) -> RunRecord:
    """A run named by its id under `root`, a path to its directory, or a prefix of exactly one id."""
    matches, _ = _match(ref, root, expand_sweeps=False)
    return _one(ref, root, matches)


def resolve_refs(refs: list[str], root: Path) -> list[RunRecord]:
    """The runs `refs` name, in order, without repeats; a sweep (by name or directory) stands for all its runs."""
    out: list[RunRecord] = []
    seen: set[str] = set()
    for ref in refs:
        matches, kind = _match(ref, root, expand_sweeps=True)
        if kind == "prefix":
            matches = [_one(ref, root, matches)]
        for record in matches:
            if record.dir not in seen:
                seen.add(record.dir)
                out.append(record)
    return out


def _match(ref: str, root: Path, *, expand_sweeps: bool) -> tuple[list[RunRecord], str]:
    """In order: an exact id under `root`; a path to a run directory; the sweep of that name; a directory of
    runs; else the ids starting with `ref` (kind "prefix", which callers want to be unique)."""
    records = list_runs(root)
    exact = [r for r in records if r.id == ref]
    if exact:
        return exact, "id"
    path = Path(ref)
    if (path / RUN_FILE).is_file():
        return [_renamed(load_record(path), root)], "path"
    if expand_sweeps:
        members = [r for r in records if r.id.startswith(ref.rstrip("/") + "/")]
        if members:
            return members, "sweep"
        if path.is_dir():
            inside = [_renamed(load_record(p), root) for p in run_dirs(path)]
            if inside:
                return inside, "sweep"
    return [r for r in records if r.id.startswith(ref)], "prefix"


def _one(ref: str, root: Path, matches: list[RunRecord]) -> RunRecord:
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise SpladectlError(f"no run {ref!r} under {root}",
                             hint="`spladectl runs list` shows the ids; a path to a run directory works too "
                                  f"(or --runs-root / ${ROOT_ENV_VAR} for another root)")
    ids = ", ".join(r.id for r in matches[:5]) + (", ..." if len(matches) > 5 else "")
    raise SpladectlError(f"{ref!r} matches {len(matches)} runs under {root}: {ids}", hint="give more of the id")


def latest_run(root: Path) -> RunRecord:
    """The most recently started run under `root` (for `train --resume latest` without --output-dir)."""
    records = list_runs(root)
    if not records:
        raise SpladectlError(f"--resume latest: no runs under {root}",
                             hint="give --output-dir DIR or a run id, or train once without --resume")
    return records[-1]
