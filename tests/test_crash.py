"""kill -9 at many moments of a real training, then `--resume latest`, again and again: the run ends with the weights
of an uninterrupted run bit for bit, its metrics and evaluations line for line, and nothing torn or half-written left.

The moments (tests/crash_plugin.py) are drawn at random from every step's sites: before and after the update, half
way through a metrics line, during an evaluation, half way through best/, a checkpoint's state file, between a
checkpoint's rename and the pruning of older ones, half way through final/. They run as chains: a process is killed at
the first moment, its resume at the second, and so on; two chains run side by side. The seed is printed; set
SPLADECTL_CRASH_SEED to replay one, SPLADECTL_CRASH_KILLS for more moments (the soak mode, `pytest -m soak`, runs 60).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from crash_plugin import SITES
from spladectl.runs.lock import is_held
from spladectl.runs.record import load_record
from test_cli_train import ROWS
from tiny import write_eval_beir

TESTS = Path(__file__).resolve().parent
STEPS, EVAL_EVERY = 12, 3
# What differs between two runs of the same computation: the clock and the process's memory.
TIMING = {"examples_per_s", "queries_per_s", "docs_per_s", "memory_gb"}


def _env(kill_at: str | None = None) -> dict[str, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "2000",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    env.pop("SPLADECTL_KILL_AT", None)
    if kill_at:
        env["SPLADECTL_KILL_AT"] = kill_at
    return env


def _train(data: Path, eval_data: Path, out: Path, *, kill_at: str | None = None, resume: bool = False):
    command = [sys.executable, "-m", "spladectl", "train", "--data", str(data), "-o", str(out),
               "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "2", "--eval-data", str(eval_data),
               "--eval-every", str(EVAL_EVERY), "--precision", "fp32", "--max-query-length", "16",
               "--max-doc-length", "32", "--batch-size", "2", "--seed", "7", "--no-progress"]
    if resume:
        command += ["--resume", "latest"]
    if kill_at:
        command += ["--plugin", "crash_plugin:KillAt"]
    return subprocess.run(command, env=_env(kill_at), capture_output=True, text=True, timeout=600)


def _rows(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING and not k.endswith("seconds")}
            for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    data = root / "triples.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    eval_data = write_eval_beir(root / "eval")
    out = root / "uninterrupted"
    done = _train(data, eval_data, out)
    assert done.returncode == 0, done.stderr
    evals = _rows(out / "eval.jsonl")
    best, improved = None, []
    for row in evals:  # the steps at which best/ is written: those whose nDCG@10 beats every earlier one
        if best is None or row["nDCG@10"] > best:
            best, improved = row["nDCG@10"], [*improved, row["step"]]
    return {"root": root, "data": data, "eval": eval_data, "out": out, "improved": improved}


def _moments(rng: random.Random, n: int, improved: list[int]) -> list[tuple[int, str]]:
    """n distinct (step, site) pairs that a run reaches, in the order a run reaches them."""
    pool = []
    for step in range(1, STEPS + 1):
        for site in SITES:
            if site == "final" or (site == "evaluate" and step % EVAL_EVERY) or (site == "best" and step not in improved):
                continue
            if site == "checkpoint-prune" and step <= 2:  # --keep-last 2: nothing to prune before step 3
                continue
            pool.append((step, site))
    chosen = sorted(rng.sample(pool, min(n, len(pool))), key=lambda m: (m[0], SITES.index(m[1])))
    return chosen + ([(STEPS, "final")] if rng.random() < 0.5 else [])


def _chain(reference, name: str, moments: list[tuple[int, str]]) -> list[str]:
    """Kill a run at each moment in turn, resuming after each; then let the last resume finish. What was seen."""
    out = reference["root"] / name
    seen = []
    for step, site in moments:
        resume = (out / "checkpoints").is_dir() and any((out / "checkpoints").glob("step-*"))
        killed = _train(reference["data"], reference["eval"], out, kill_at=f"{site}:{step}", resume=resume)
        assert killed.returncode == -9, f"{name}: {site}:{step} was not reached (exit {killed.returncode})\n{killed.stderr}"
        # The killed run, as `runs list` shows it: not running (its lock died with it), at the step it had logged.
        assert is_held(out) is False and load_record(out).effective_status() == "stale"
        lines = (out / "metrics.jsonl").read_text().split("\n")
        for number, line in enumerate(lines[:-1], 1):
            json.loads(line)  # every complete line is whole; only the last may be cut short by the kill
        seen.append(f"{site}:{step}")
    finished = _train(reference["data"], reference["eval"], out, resume=True)
    assert finished.returncode == 0, finished.stderr
    return seen


def _assert_same_as_uninterrupted(reference, out: Path) -> None:
    ref = reference["out"]
    ours, theirs = load_file(out / "final" / "model.safetensors"), load_file(ref / "final" / "model.safetensors")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert _rows(out / "metrics.jsonl") == _rows(ref / "metrics.jsonl")  # steps 1..12 once each, same numbers
    assert _rows(out / "eval.jsonl") == _rows(ref / "eval.jsonl")
    best, ref_best = load_file(out / "best" / "model.safetensors"), load_file(ref / "best" / "model.safetensors")
    assert all(torch.equal(best[k], ref_best[k]) for k in best)
    leftovers = [p for p in out.rglob(".*") if p.name != ".lock"]
    assert leftovers == []  # no .tmp-step-*, .partial, .old-* of the killed runs
    assert load_record(out).status == "finished"


def _run_chains(reference, kills: int) -> None:
    seed = int(os.environ.get("SPLADECTL_CRASH_SEED", random.SystemRandom().randrange(2**31)))
    print(f"crash moments seed {seed} (SPLADECTL_CRASH_SEED={seed} replays them)")
    rng = random.Random(seed)
    halves = [_moments(rng, kills // 2, reference["improved"]), _moments(rng, kills - kills // 2, reference["improved"])]
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda args: _chain(reference, *args), [("a", halves[0]), ("b", halves[1])]))
    for name, seen in zip("ab", results):
        print(f"chain {name}: killed at {', '.join(seen)}")
        _assert_same_as_uninterrupted(reference, reference["root"] / name)
    assert sum(len(seen) for seen in results) >= kills


def test_killed_at_twenty_moments_a_run_resumes_to_the_same_model(reference):
    _run_chains(reference, int(os.environ.get("SPLADECTL_CRASH_KILLS", 20)))


@pytest.mark.soak
def test_killed_at_sixty_moments_a_run_resumes_to_the_same_model(reference):
    _run_chains(reference, 60)
