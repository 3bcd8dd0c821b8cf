"""Runs and sweeps end to end on splade-tiny: a sweep of four tiny points (one with broken data) ends with three
finished runs, one failed run with its error, a ranked summary and a comparison plot; `runs list/show/compare`
agree with the run directories; a run re-launched from its directory repeats its losses; an interrupted run says
so and `--resume latest` finishes it in place."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spladectl import plugins
from spladectl._compat import tomllib
from spladectl.runs.summary import read_jsonl
from tiny import write_eval_beir, write_jsonl

SWEEP = "tiny-sweep"
POINTS = ["lambda_q=0.0001", "lambda_q=0.01", "short-warm-up", "bad-data"]
WIDE = {"COLUMNS": "250", "MLFLOW_TRACKING_URI": None}
SMALL = ["--profile", "cpu", "--precision", "fp32", "--batch-size", "2", "--grad-accum", "1",
         "--max-query-length", "16", "--max-doc-length", "32", "--lr", "1e-4", "--no-progress"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, cli):
    """One sweep, shared by the tests that read it (they never change its directory)."""
    tmp = tmp_path_factory.mktemp("sweep")
    data, beir = write_jsonl(tmp / "triples.jsonl"), write_eval_beir(tmp / "beir")
    bad = tmp / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n" + json.dumps({"query": "no positive here"}) + "\n")
    experiment = tmp / "experiment.toml"
    experiment.write_text(f"""
name = "{SWEEP}"

[base]
data = "{data}"
profile = "cpu"
precision = "fp32"
max-steps = 2
batch-size = 2
grad-accum = 1
max-query-length = 16
max-doc-length = 32
lr = 1e-4
warmup-ratio = 0.0
seed = 7
eval-data = "{beir}"
eval-every = 1
tag = ["tiny"]

[grid]
lambda_q = [1e-4, 1e-2]

[[points]]
name = "short-warm-up"
flops_warmup_steps = 1

[[points]]
name = "bad-data"
data = "{bad}"
""")
    # The data and the experiment live in a git repository of their own, whose commit the runs record.
    git = ["git", "-C", str(tmp), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    for args in (["init", "-q"], ["add", "."], ["commit", "-q", "-m", "data"]):
        subprocess.run([*git, *args], check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    root = tmp / "runs"
    result = cli("sweep", str(experiment), "--runs-root", str(root), "--no-progress", "--json", env=WIDE)
    return {"root": root, "experiment": experiment, "bad": bad, "result": result, "tmp": tmp, "commit": commit,
            "summary": json.loads(result.stdout) if result.stdout.strip() else None}


def run_dir(swept, point: str) -> Path:
    return swept["root"] / SWEEP / point


def test_the_sweep_records_every_point_and_ranks_the_finished_ones(swept):
    result, summary = swept["result"], swept["summary"]
    assert result.exit_code == 1, result.output  # one point failed, and the sweep went on to the others
    assert summary is not None and summary["counts"]["finished"] == 3 and summary["counts"]["failed"] == 1
    by_point = {row["point"]: row for row in summary["points"]}
    assert sorted(by_point) == sorted(POINTS)

    failed = by_point["bad-data"]
    assert failed["status"] == "failed" and f"{swept['bad']}:2" in failed["error"] and failed["rank"] is None
    record = json.loads((run_dir(swept, "bad-data") / "run.json").read_text())
    assert record["status"] == "failed" and record["error"] == failed["error"]
    assert not (run_dir(swept, "bad-data") / "final").exists()

    # evaluated every step, so ranked by nDCG@10, best first, with each run's own last evaluation
    assert summary["metric"] == "nDCG@10" and summary["lower_is_better"] is False
    finished = summary["points"][:3]
    assert [row["rank"] for row in finished] == [1, 2, 3]
    values = [read_jsonl(Path(row["dir"]) / "eval.jsonl")[-1]["nDCG@10"] for row in finished]
    assert [row["value"] for row in finished] == values == sorted(values, reverse=True)
    for row in finished:
        d = Path(row["dir"])
        record = json.loads((d / "run.json").read_text())
        assert (record["status"], record["sweep"], record["point"]) == ("finished", SWEEP, row["point"])
        assert [r["step"] for r in read_jsonl(d / "metrics.jsonl")] == [1, 2]
        assert (d / "final" / "model.safetensors").is_file()
        assert json.loads((d / "env.json").read_text())["torch"]  # the environment report of the run
        assert record["git"]["cwd"]["commit"]  # the tests run inside the repository
        for name in ("data", "eval_data", "experiment"):
            assert record["git"][name]["commit"] == swept["commit"], name
            assert record["git"][name]["dirty"] is False  # runs/ is untracked, which does not count

    # each point trained with its own settings
    steps = {p: read_jsonl(run_dir(swept, p) / "metrics.jsonl") for p in POINTS[:3]}
    assert steps["lambda_q=0.0001"][1]["lambda_q"] == 1e-4 and steps["lambda_q=0.01"][1]["lambda_q"] == 1e-2
    config = tomllib.loads((run_dir(swept, "short-warm-up") / "config.toml").read_text())
    assert config["flops_warmup_steps"] == 1 and steps["short-warm-up"][1]["lambda_q"] == config["lambda_q"]

    assert json.loads((swept["root"] / SWEEP / "summary.json").read_text())["points"] == summary["points"]
    png = Path(summary["plot"]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000


def test_resume_skips_finished_points_and_retries_failed_ones(swept, cli):
    before = {p: json.loads((run_dir(swept, p) / "run.json").read_text()) for p in POINTS}
    args = ["sweep", str(swept["experiment"]), "--runs-root", str(swept["root"]), "--no-progress"]
    refused = cli(*args, env=WIDE)
    assert refused.exit_code == 2 and "already has 4 point(s)" in refused.output

    result = cli(*args, "--resume", env=WIDE)
    assert result.exit_code == 1
    assert result.output.count("finished earlier, skipped") == 3 and "[4/4] bad-data: failed" in result.output
    assert f"sweep {SWEEP}: ranked by nDCG@10 (higher is better)" in result.output
    assert all(p in result.output for p in POINTS)
    for p in POINTS[:3]:
        assert json.loads((run_dir(swept, p) / "run.json").read_text()) == before[p]  # untouched
    retried = json.loads((run_dir(swept, "bad-data") / "run.json").read_text())
    assert retried["status"] == "failed" and retried["pid"] == before["bad-data"]["pid"]


def test_runs_list_agrees_with_the_run_directories(swept, cli):
    root = str(swept["root"])
    listed = json.loads(cli("runs", "list", "--runs-root", root, "--json").stdout)
    assert sorted(r["id"] for r in listed) == sorted(f"{SWEEP}/{p}" for p in POINTS)
    for r in listed:
        d = Path(r["dir"])
        assert r["status"] == json.loads((d / "run.json").read_text())["status"]
        rows = read_jsonl(d / "metrics.jsonl")
        assert r["steps"] == (rows[-1]["step"] if rows else 0)
        if rows:
            assert r["final_metrics"]["loss"] == rows[-1]["loss"]

    def ids(*filters):
        result = cli("runs", "list", "--runs-root", root, "--json", *filters)
        assert result.exit_code == 0, result.output
        return sorted(r["id"] for r in json.loads(result.stdout))

    assert ids("--status", "failed") == [f"{SWEEP}/bad-data"]
    assert ids("--precision", "fp32") == sorted(f"{SWEEP}/{p}" for p in POINTS)  # an alias, canonicalised
    assert ids("--precision", "bf16") == []
    assert ids("--tag", "tiny", "--sweep", SWEEP) == sorted(f"{SWEEP}/{p}" for p in POINTS)
    assert ids("--tag", "other") == []
    text = cli("runs", "list", "--runs-root", root, env=WIDE).output
    assert "nDCG@10" in text and all(f"{SWEEP}/{p}" in text for p in POINTS)
    assert cli("runs", "list", "--runs-root", root, "--status", "done").exit_code == 2


def test_one_unreadable_run_does_not_hide_the_others(swept, cli, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(swept["root"], root)
    (root / SWEEP / "bad-data" / "run.json").write_text("{ not json")
    result = cli("runs", "list", "--runs-root", str(root), "--json")
    assert result.exit_code == 0
    assert sorted(r["id"] for r in json.loads(result.stdout)) == sorted(f"{SWEEP}/{p}" for p in POINTS[:3])
    assert f"warning: skipped {root / SWEEP / 'bad-data' / 'run.json'}: cannot read the run record" in result.stderr


def test_runs_show_agrees_with_the_run_directory(swept, cli):
    d = run_dir(swept, "short-warm-up")
    result = cli("runs", "show", f"{SWEEP}/short", "--runs-root", str(swept["root"]), "--json")  # a unique prefix
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    rows, evals = read_jsonl(d / "metrics.jsonl"), read_jsonl(d / "eval.jsonl")
    assert shown["config"] == tomllib.loads((d / "config.toml").read_text())
    assert shown["final_metrics"]["loss"] == rows[-1]["loss"]
    assert shown["final_metrics"]["nDCG@10"] == evals[-1]["nDCG@10"]
    assert shown["best_metrics"]["nDCG@10"]["value"] == max(e["nDCG@10"] for e in evals)
    assert shown["best_metrics"]["loss"]["value"] == min(r["loss"] for r in rows)
    assert shown["throughput"]["examples_per_s"] == pytest.approx(
        sum(r["examples"] for r in rows) / sum(r["step_seconds"] for r in rows), rel=1e-3)
    assert shown["peak_memory_gb"]["rss_after_step"] == pytest.approx(max(r["memory_gb"] for r in rows), abs=1e-4)

    text = cli("runs", "show", str(d), "--runs-root", str(swept["root"]), env=WIDE).output  # by directory
    for part in ("finished (sweep tiny-sweep, point short-warm-up)", "final metrics (step 2)", "best metrics",
                 "throughput", "peak memory", "spladectl train --data", "--flops-warmup-steps 1"):
        assert part in text, part
    ambiguous = cli("runs", "show", f"{SWEEP}/lambda", "--runs-root", str(swept["root"]), env=WIDE)
    assert ambiguous.exit_code == 2 and "matches 2 runs" in ambiguous.output


def test_runs_compare_sets_runs_side_by_side_and_plots_them(swept, cli, tmp_path):
    plot = tmp_path / "compare.svg"
    result = cli("runs", "compare", SWEEP, "--runs-root", str(swept["root"]), "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    table = json.loads(result.stdout)
    dirs = [swept["root"] / run_id for run_id in table["runs"]]
    assert sorted(table["runs"]) == sorted(f"{SWEEP}/{p}" for p in POINTS)
    configs = [tomllib.loads((d / "config.toml").read_text()) for d in dirs]
    assert table["settings"]["lambda_q"] == [c["lambda_q"] for c in configs]
    assert table["settings"]["flops_warmup_steps"] == [c.get("flops_warmup_steps") for c in configs]
    assert "lr" not in table["settings"] and "output_dir" not in table["settings"]  # equal, or always different
    last = [read_jsonl(d / "metrics.jsonl")[-1:] for d in dirs]
    assert table["metrics"]["loss"] == [rows[0]["loss"] if rows else None for rows in last]
    assert table["metrics"]["status"] == [json.loads((d / "run.json").read_text())["status"] for d in dirs]
    svg = plot.read_text()
    assert svg.startswith("<?xml") and "short-warm-up" in svg and "nDCG@10" in svg

    text = cli("runs", "compare", f"{SWEEP}/lambda_q=0.0001", f"{SWEEP}/lambda_q=0.01", "--runs-root",
               str(swept["root"]), env=WIDE).output
    assert "settings that differ" in text and "lambda_q" in text and "nDCG@10" in text


def test_runs_rm_removes_runs_and_refuses_running_ones(swept, cli, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(swept["root"], root)
    result = cli("runs", "rm", f"{SWEEP}/bad-data", "--runs-root", str(root), "--yes")
    assert result.exit_code == 0 and not (root / SWEEP / "bad-data").exists()
    running = root / SWEEP / "short-warm-up" / "run.json"
    record = json.loads(running.read_text())
    running.write_text(json.dumps({**record, "status": "running"}))  # this test process is alive: "running"
    refused = cli("runs", "rm", SWEEP, "--runs-root", str(root), "--yes", env=WIDE)
    assert refused.exit_code == 2 and "still running" in refused.output
    assert cli("runs", "rm", SWEEP, "--runs-root", str(root), "--yes", "--force").exit_code == 0
    assert not (root / SWEEP).exists()  # with its last run gone, the sweep's summary and plot go too


def test_relaunch_from_a_run_directory_reproduces_its_first_losses(swept, cli, tmp_path):
    source = run_dir(swept, "short-warm-up")
    refused = cli("train", "--from-run", str(source), "--lr", "1", env=WIDE)
    assert refused.exit_code == 2 and "does not combine with --lr" in refused.output

    result = cli("train", "--from-run", str(source), "--runs-root", str(tmp_path / "runs"), "--name", "again",
                 "--no-progress", "--json", env=WIDE)
    assert result.exit_code == 0, result.output
    new = Path(json.loads(result.stdout)["run_dir"])
    assert new.parent == (tmp_path / "runs").resolve() and "-again-" in new.name
    assert [r["loss"] for r in read_jsonl(new / "metrics.jsonl")] == \
        [r["loss"] for r in read_jsonl(source / "metrics.jsonl")]
    record = json.loads((new / "run.json").read_text())
    assert record["from_run"] == f"{SWEEP}/short-warm-up" and record["status"] == "finished"
    old, again = (tomllib.loads((d / "config.toml").read_text()) for d in (source, new))
    assert {k: v for k, v in again.items() if k != "output_dir"} == {k: v for k, v in old.items() if k != "output_dir"}


@pytest.fixture
def stopper(tmp_path, monkeypatch):
    """A plugin that presses Ctrl-C in the middle of step 2; unregistered from the process-wide manager after."""
    (tmp_path / "stopper.py").write_text(
        "from spladectl.hookspecs import hookimpl\n\n\n"
        "@hookimpl\ndef on_step_end(state, metrics):\n"
        "    if state.step == 2:\n        raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "stopper"
    manager = plugins.load_plugins()
    if manager.has_plugin("stopper"):
        manager.unregister(name="stopper")
    manager.sources.pop("stopper", None)


def test_an_interrupted_run_says_so_and_resume_latest_finishes_it(cli, tmp_path, stopper):
    data, root = write_jsonl(tmp_path / "triples.jsonl"), tmp_path / "runs"
    args = ["train", "--data", str(data), "--runs-root", str(root), "--max-steps", "3", "--save-every", "1", *SMALL]
    result = cli(*args, "--name", "first", "--plugin", stopper)
    assert result.exit_code in (1, 130)  # Ctrl-C: "Aborted!" (click) or 130 (typer's own click)
    (d,) = [p for p in root.iterdir()]
    assert re.fullmatch(r"\d{8}-\d{6}-first-[0-9a-f]{4}", d.name)  # UTC time, --name, a random suffix
    record = json.loads((d / "run.json").read_text())
    assert (record["status"], record["error"], record["steps"]) == ("interrupted", "interrupted (Ctrl-C)", 1)
    assert record["ended"] and record["options"]["plugin"] == [stopper]

    assert not plugins.load_plugins().has_plugin(stopper)  # --plugin lasts one run, even in one process
    result = cli(*args, "--resume", "latest", env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"resumed from {d / 'checkpoints' / 'step-1'}" in " ".join(result.output.split())
    record = json.loads((d / "run.json").read_text())
    assert (record["status"], record["resumes"], record["steps"]) == ("finished", 1, 3)
    assert [r["step"] for r in read_jsonl(d / "metrics.jsonl")] == [1, 2, 3]
    assert "--plugin stopper" in record["command"]  # the command that started the run is kept
