"""Experiment files: a base configuration and a grid and/or list of variations, each point a `spladectl train`.

    name = "lambda-grid"              # the sweep's directory under the runs root (default: the file's name)
    metric = "nDCG@10"                # what the summary ranks by (default: nDCG@10 when evaluated, else loss)

    [base]                            # any `spladectl train` option, by its long name (- or _)
    data = "triples.jsonl"
    max-steps = 200

    [grid]                            # every combination of these lists
    lambda_q = [1e-4, 5e-4]
    precision = ["32-true", "bf16-mixed"]

    [[points]]                        # and/or explicit points, each over [base]
    name = "long-warm-up"             # optional: by default a point is named after its settings
    flops_warmup_steps = 150

Point names are deterministic (`lambda_q=0.0001,precision=32-true`), so `--resume` recognises finished points.
`spladectl tune` reads the same files with a `[search]` table of ranges instead of a grid (runs/search_space.py).
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError
from spladectl.launch import LAUNCH_OPTIONS
from spladectl.runs.options import option_names, text
from spladectl.runs.search_space import Dimension, parse_search
from spladectl.runs.store import slug

TOP_LEVEL = ("name", "description", "metric", "base", "grid", "points", "search")
# A sweep trains its points one after another in its own process: a point cannot start processes of its own.
_NOT_DISTRIBUTED = ("a sweep trains its points one after another in its own single process; train a distributed point "
                    "with `spladectl train --nproc-per-node N` and the point's options (`spladectl sweep --dry-run` "
                    "prints them)")
# Each point's run chooses these itself (its directory, no resume, no terminal chatter, one process).
NOT_IN_POINTS = {"output_dir": "each point gets RUNS_ROOT/<sweep>/<point>",
                 "runs_root": "pass --runs-root to `spladectl sweep`",
                 "resume": "use `spladectl sweep --resume`", "from_run": "name the settings instead",
                 "name": "points are named after their settings ([[points]] may set `name`)",
                 "as_json": "pass --json to `spladectl sweep`", "progress": "pass --no-progress to `spladectl sweep`",
                 **dict.fromkeys(LAUNCH_OPTIONS, _NOT_DISTRIBUTED)}
MAX_NAME = 100


@dataclass
class Point:
    name: str
    settings: dict[str, Any]  # option name -> value: [base] with this point's variation over it
    varied: dict[str, Any] = field(default_factory=dict)


@dataclass
class Experiment:
    name: str
    path: Path
    base: dict[str, Any]
    points: list[Point]
    metric: str | None = None
    description: str | None = None
    search: list[Dimension] = field(default_factory=list)  # [search]: what `spladectl tune` samples
    varies: bool = False  # the file has a [grid] or [[points]] (what `spladectl sweep` runs)


def load_experiment(path: str | Path, command) -> Experiment:
    """Read and check an experiment file against the train command's options; every mistake names the file and key."""
    from spladectl._compat import tomllib
    from spladectl.profiles import toml_problem

    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8-sig"))  # TOML is UTF-8 whatever the locale; BOM dropped
    except OSError as exc:
        raise SpladectlError(f"{path}: cannot read the experiment file ({exc.strerror or exc})") from exc
    except (ValueError, RecursionError) as exc:  # TOMLDecodeError, UnicodeDecodeError, a 5000-digit integer
        raise SpladectlError(f"{path}: not valid TOML ({toml_problem(exc)})") from exc
    unknown = sorted(set(data) - set(TOP_LEVEL))
    if unknown:
        raise SpladectlError(f"{path}: unknown key(s) {', '.join(unknown)}; expected {', '.join(TOP_LEVEL)}",
                             hint="train options go in [base], [grid] or [[points]]")
    names = option_names(command)
    where = str(path)
    name = data.get("name", path.stem)
    if not isinstance(name, str) or not name.strip() or slug(name, MAX_NAME) != name:
        raise SpladectlError(f"{where}: name {name!r}" + ("" if "name" in data else " (the file's name)")
                             + ": use letters, digits and ._=+,@- (it names a directory)",
                             hint=None if "name" in data else 'set name = "..." at the top of the file')
    base = _options(_table(data, "base", where), names, f"{where}: [base]")
    grid = _options(_table(data, "grid", where), names, f"{where}: [grid]")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SpladectlError(f"{where}: [grid] {key}: expected a non-empty list of values, got {values!r}")

    points = [_point(base, dict(zip(grid, combo)), None) for combo in itertools.product(*grid.values())] \
        if grid else []
    listed = data.get("points", [])
    if not isinstance(listed, list) or not all(isinstance(p, dict) for p in listed):
        raise SpladectlError(f"{where}: points: expected [[points]] tables")
    for i, entry in enumerate(listed, 1):
        entry = dict(entry)
        point_name = entry.pop("name", None)
        if point_name is not None and (not isinstance(point_name, str) or slug(point_name, MAX_NAME) != point_name):
            raise SpladectlError(f"{where}: [[points]] #{i} name {point_name!r}: use letters, digits and ._=+,@-")
        points.append(_point(base, _options(entry, names, f"{where}: [[points]] #{i}"), point_name))
    if not points:
        points = [Point("base", dict(base))]
    seen: dict[str, int] = {}
    for i, point in enumerate(points):
        if point.name in seen:
            raise SpladectlError(f"{where}: two points are both named {point.name!r}",
                                 hint="give [[points]] distinct settings or a `name`")
        seen[point.name] = i
    search = parse_search(_options(_table(data, "search", where), names, f"{where}: [search]"), f"{where}: [search]")
    both = [d.name for d in search if d.name in base]
    if both:
        raise SpladectlError(f"{where}: {', '.join(both)} in both [base] and [search]; keep one",
                             hint="[search] gives the range a tuner samples; [base] fixes a value")
    metric = data.get("metric")
    if metric is not None and not isinstance(metric, str):
        raise SpladectlError(f"{where}: metric: expected a metric name such as \"nDCG@10\" or \"loss\"")
    return Experiment(name=name, path=path, base=base, points=points, metric=metric,
                      description=data.get("description"), search=search, varies=bool(grid or listed))


def _table(data: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise SpladectlError(f"{where}: {key}: expected a table [{key}]")
    return value


def _options(values: dict[str, Any], names: dict[str, str], where: str) -> dict[str, Any]:
    """Keys spelled as on the command line (max-steps, max_steps) -> the train command's option names."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}
    for key, value in values.items():
        name = names.get(key)
        if name is None:
            close = difflib.get_close_matches(key.replace("-", "_"), sorted(set(names.values())), n=1)
            raise SpladectlError(f"{where}: unknown train option {key!r}" + (f" (did you mean {close[0]}?)"
                                                                            if close else ""),
                                 hint="`spladectl train --help` lists the options")
        if name in NOT_IN_POINTS:
            raise SpladectlError(f"{where}: {key} cannot be set in an experiment: {NOT_IN_POINTS[name]}")
        if name in out:  # `max-steps` and `max_steps`: one value would silently replace the other
            raise SpladectlError(f"{where}: {spelled[name]!r} and {key!r} both set {name}; keep one")
        out[name], spelled[name] = value, key
    return out


def _point(base: dict[str, Any], varied: dict[str, Any], name: str | None) -> Point:
    return Point(name=name or point_name(varied), settings={**base, **varied}, varied=varied)


def point_name(varied: dict[str, Any]) -> str:
    """`key=value,key=value` from a point's own settings, made directory-safe; a long one keeps a hash so that two
    points never share a name."""
    if not varied:
        return "base"
    readable = ",".join(f"{key}={text(value)}" for key, value in varied.items())
    name = slug(readable, max_length=10_000)
    if len(name) > MAX_NAME or name != readable:
        digest = hashlib.sha1(readable.encode()).hexdigest()[:8]
        name = f"{name[:MAX_NAME - 9]}-{digest}" if len(name) > MAX_NAME else f"{name}-{digest}"
    return name


def shard(points: list[Point], spec: str | None) -> list[Point]:
    """The points of shard `i/n` (1-based): every n-th point starting at the i-th, so n machines that each run one
    shard of the same file split the work evenly without talking to each other."""
    if not spec:
        return points
    try:
        index, count = (int(part) for part in spec.split("/"))
    except ValueError:
        raise SpladectlError(f"--shard {spec!r}: expected i/n, e.g. 1/4") from None
    if not 1 <= index <= count:
        raise SpladectlError(f"--shard {spec!r}: i must be between 1 and n")
    return points[index - 1::count]
