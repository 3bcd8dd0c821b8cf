"""Experiment files and sweep bookkeeping without training: points and their names, mistakes named by file and
key, shards, the command line a point becomes, and the claim that keeps two processes off one point."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from spladectl.errors import SpladectlError
from spladectl.cli.train import train_command
from spladectl.runs import options
from spladectl.runs.experiment import load_experiment, point_name, shard
from spladectl.runs.record import STALE, RunRecord, load_record
from spladectl.runs.sweep import _claim, check_existing

EXPERIMENT = """
name = "grid"

[base]
data = "triples.jsonl"
max-steps = 3
precision = "bf16"
tag = ["nightly"]

[grid]
lambda_q = [1e-4, 5e-4]
in-batch-negatives = [true, false]

[[points]]
name = "long-warm-up"
flops_warmup_steps = 150

[[points]]
seed = 7
"""


@pytest.fixture(scope="module")
def command():
    return train_command()


def write(tmp_path, text: str, name: str = "exp.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_grid_and_listed_points_with_deterministic_names(tmp_path, command):
    exp = load_experiment(write(tmp_path, EXPERIMENT), command)
    assert exp.name == "grid"
    assert [p.name for p in exp.points] == [
        "lambda_q=0.0001,in_batch_negatives=true", "lambda_q=0.0001,in_batch_negatives=false",
        "lambda_q=0.0005,in_batch_negatives=true", "lambda_q=0.0005,in_batch_negatives=false",
        "long-warm-up", "seed=7"]
    # each point is [base] with its own settings over it, under the train command's option names
    assert exp.points[1].settings == {"data": "triples.jsonl", "max_steps": 3, "precision": "bf16", "tag": ["nightly"],
                                      "lambda_q": 1e-4, "in_batch_negatives": False}
    assert exp.points[4].settings["flops_warmup_steps"] == 150 and exp.points[5].settings["seed"] == 7
    assert [p.name for p in load_experiment(write(tmp_path, EXPERIMENT), command).points] == \
        [p.name for p in exp.points]  # the same file names its points the same way every time


def test_a_point_becomes_the_command_line_the_cli_parses_back(tmp_path, command):
    exp = load_experiment(write(tmp_path, EXPERIMENT), command)
    point = exp.points[1]
    argv = options.argv_for(command, point.settings)
    assert "--no-in-batch-negatives" in argv and argv.count("--tag") == 1
    ctx = command.make_context("train", argv)
    assert {k: ctx.params[k] for k in point.settings} == point.settings
    assert options.explicit(ctx) == set(point.settings)


def test_file_stem_names_the_sweep_and_no_variation_is_one_point(tmp_path, command):
    exp = load_experiment(write(tmp_path, '[base]\nlr = 1e-4\n', "lr-check.toml"), command)
    assert exp.name == "lr-check" and [(p.name, p.settings) for p in exp.points] == [("base", {"lr": 1e-4})]


def test_a_file_name_that_cannot_name_a_directory_asks_for_a_name(tmp_path, command):
    with pytest.raises(SpladectlError, match=r"name 'my grid' \(the file's name\)") as info:
        load_experiment(write(tmp_path, '[base]\nlr = 1e-4\n', "my grid.toml"), command)
    assert 'set name = "..."' in info.value.format_message()


def test_long_or_unsafe_names_stay_unique():
    a, b = point_name({"data": "dir/a.jsonl"}), point_name({"data": "dir_a.jsonl"})
    assert a != b and "/" not in a
    long = point_name({"plugin": ["x" * 80, "y" * 80]})
    assert len(long) <= 100


@pytest.mark.parametrize("text, message", [
    ('[base]\nlamda_q = 1e-4\n', "[base]: unknown train option 'lamda_q' (did you mean lambda_q?)"),
    ('[grid]\nlr = 1e-4\n', "[grid] lr: expected a non-empty list"),
    ('[base]\noutput-dir = "x"\n', "output-dir cannot be set in an experiment"),
    ('[[points]]\nresume = "latest"\n', "[[points]] #1: resume cannot be set"),
    ('[grid]\nnproc-per-node = [1, 2]\n', "[grid]: nproc-per-node cannot be set in an experiment: a sweep trains"),
    ('[base]\nlr = 1e-4\n[extra]\nx = 1\n', "unknown key(s) extra"),
    ('[[points]]\nseed = 1\n[[points]]\nseed = 1\n', "two points are both named 'seed=1'"),
    ('name = "a/b"\n', "name 'a/b'"),
    ('[base\nlr = 1\n', "not valid TOML"),
    # the negative spelling of a flag would read as the flag set: it is refused, the value goes with the positive one
    ('[base]\n"--no-in-batch-negatives" = true\n', "[base]: unknown train option '--no-in-batch-negatives'"),
])
def test_mistakes_name_the_file_and_key(tmp_path, command, text, message):
    path = write(tmp_path, text)
    with pytest.raises(SpladectlError) as info:
        load_experiment(path, command)
    assert str(path) in str(info.value) and message in str(info.value)


def test_a_sweep_refuses_to_run_as_one_of_several_torchrun_processes(cli, tmp_path):
    # Each process would claim and train points of its own; the environment is what torchrun gives rank 1 of 2.
    path = write(tmp_path, EXPERIMENT)
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500",
           "COLUMNS": "2000"}
    result = cli("sweep", str(path), "--runs-root", str(tmp_path / "runs"), env=env)
    assert result.exit_code == 2 and "started as one of 2 processes" in result.output, result.output
    assert str(path) in result.output and "Traceback" not in result.output
    assert not (tmp_path / "runs").exists()


def test_shards_split_the_points_evenly_and_completely(tmp_path, command):
    points = load_experiment(write(tmp_path, EXPERIMENT), command).points
    shards = [shard(points, f"{i}/4") for i in range(1, 5)]
    assert sorted(p.name for s in shards for p in s) == sorted(p.name for p in points)
    assert [len(s) for s in shards] == [2, 2, 1, 1]
    for bad in ("0/2", "3/2", "x"):
        with pytest.raises(SpladectlError, match="--shard"):
            shard(points, bad)


def test_a_claimed_point_is_not_taken_twice_and_a_dead_one_is_retried(tmp_path, command):
    exp = load_experiment(write(tmp_path, EXPERIMENT), command)
    root, point = tmp_path / "runs", exp.points[0]
    (root / exp.name).mkdir(parents=True)
    run_dir = root / exp.name / point.name
    assert _claim(run_dir, exp, point, root) is True
    record = load_record(run_dir)
    assert (record.status, record.sweep, record.point, record.id) == ("running", "grid", point.name,
                                                                      f"grid/{point.name}")
    assert "running in another process" in _claim(run_dir, exp, point, root)  # this process is alive
    # the process that claimed it died without a word: the point is stale, and the next claim retries it
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    record.pid = int(gone.stdout)
    record.save()
    assert load_record(run_dir).effective_status() == STALE
    assert _claim(run_dir, exp, point, root) is True
    finished = load_record(run_dir)
    finished.status = "finished"
    finished.save()
    assert _claim(run_dir, exp, point, root) == "finished earlier, skipped"


def test_resume_refuses_a_finished_point_whose_settings_changed(tmp_path, command):
    exp = load_experiment(write(tmp_path, EXPERIMENT), command)
    root, point = tmp_path / "runs", exp.points[0]
    run_dir = root / exp.name / point.name
    run_dir.mkdir(parents=True)
    RunRecord(id="x", dir=str(run_dir), status="finished", options={**point.settings, "max_steps": 5}).save()
    with pytest.raises(SpladectlError, match="already has 1 point"):
        check_existing(exp, exp.points, root, resume=False)
    with pytest.raises(SpladectlError, match=r"finished with other settings \(max_steps\)"):
        check_existing(exp, exp.points, root, resume=True)
    RunRecord(id="x", dir=str(run_dir), status="finished", options=json.loads(json.dumps(point.settings))).save()
    check_existing(exp, exp.points, root, resume=True)


def test_dry_run_prints_each_point_and_its_command(cli, tmp_path):
    path = write(tmp_path, EXPERIMENT)
    result = cli("sweep", str(path), "--runs-root", str(tmp_path / "runs"), "--dry-run", "--shard", "2/3", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [r["point"] for r in rows] == ["lambda_q=0.0001,in_batch_negatives=false", "long-warm-up"]
    assert rows[0]["command"].startswith("spladectl train --data triples.jsonl --max-steps 3")
    assert not (tmp_path / "runs").exists()


def test_points_refused_before_training_are_recorded_as_failed(cli, tmp_path):
    """Values the CLI itself refuses (a batch size of 0, an unknown tracker) fail their point, not the sweep."""
    path = write(tmp_path, 'name = "refused"\n[base]\ndata = "x.jsonl"\n'
                           '[[points]]\nbatch-size = 0\n[[points]]\ntrack = ["wandb"]\n')
    root = tmp_path / "runs"
    result = cli("sweep", str(path), "--runs-root", str(root), "--json", env={"COLUMNS": "250"})
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert summary["counts"]["failed"] == 2 and summary["plot"] is None  # nothing trained, nothing to plot
    errors = {row["point"]: row["error"] for row in summary["points"]}
    assert "Invalid value for '--batch-size'" in errors["batch_size=0"]  # click's own message
    assert "--track wandb: unknown tracker" in errors["track=wandb"]
    for point, error in errors.items():
        record = load_record(root / "refused" / point)
        assert (record.status, record.error, record.sweep) == ("failed", error, "refused") and record.ended


def test_the_documented_experiment_file_loads(tmp_path, command):
    import re
    from pathlib import Path

    docs = (Path(__file__).resolve().parent.parent / "docs" / "orchestration.md").read_text()
    grid, search = re.findall(r"```toml\n(.*?)```", docs, flags=re.S)
    exp = load_experiment(write(tmp_path, grid, "lambda-grid.toml"), command)
    assert (exp.name, exp.metric, len(exp.points)) == ("lambda-grid", "nDCG@10", 7)
    assert exp.points[1].name == "lambda_q=0.0001,precision=bf16-mixed" and exp.points[-1].name == "long-warm-up"
    exp = load_experiment(write(tmp_path, search, "lr-search.toml"), command)
    assert (exp.name, exp.varies) == ("lr-search", False)
    assert {d.name: d.describe() for d in exp.search} == {
        "lr": "float in [1e-06, 0.001], log scale", "lambda_d": "float in [1e-05, 0.01], log scale",
        "n_negatives": "integer in [1, 4]", "batch_size": "integer in [8, 32], step 8",
        "precision": "one of 32-true, bf16-mixed"}


def test_a_claim_in_progress_is_not_taken_for_a_dead_attempt(tmp_path, command, monkeypatch):
    """Two sweep processes reach one point: A has created its directory but not yet written run.json when B looks.
    B must wait for A's claim (the claims lock), not take the empty directory for a dead attempt and move it aside.
    Threads stand in for the processes; the pause is injected into A's writing of run.json."""
    import threading
    import time

    from spladectl.runs.sweep import run_points

    exp = load_experiment(write(tmp_path, EXPERIMENT), command)
    root, point = tmp_path / "runs", exp.points[0]
    a_writing, a_may_finish = threading.Event(), threading.Event()
    save = RunRecord.save

    def slow_save(self):
        if threading.current_thread().name == "A" and not a_writing.is_set():
            a_writing.set()
            a_may_finish.wait(10)
        save(self)

    monkeypatch.setattr(RunRecord, "save", slow_save)
    trained: list[str] = []
    outcomes = {}

    def sweep(name):
        outcomes[name] = run_points(exp, [point], root, run_point=lambda p, d: trained.append(name),
                                    log=lambda _: None)

    a = threading.Thread(target=sweep, args=("A",), name="A")
    a.start()
    assert a_writing.wait(10)
    b = threading.Thread(target=sweep, args=("B",), name="B")
    b.start()
    time.sleep(0.3)  # B reaches the point while A is half-way through claiming it
    a_may_finish.set()
    a.join(10), b.join(10)
    assert trained == ["A"]
    assert outcomes["B"][0].status == "taken"
    assert load_record(root / exp.name / point.name).pid is not None
