"""Runs and sweeps end to end on splade-tiny: a sweep of four tiny points (one with broken data) ends with three
finished runs, one failed run with its error, a ranked summary and a comparison plot; `runs list/show/compare`
agree with the run directories; a run re-launched from its directory repeats its losses; an interrupted run says
so and `--resume latest` finishes it in place."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from spladectl import plugin_loading
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


QUALITY_COLUMNS = ("nDCG@10", "MRR@10", "R@100", "avg_query_dims", "avg_doc_dims", "avg_flops")


def expected_quality(d: Path) -> list[dict]:
    """The quality rows of the run in `d`, worked out from its files the way docs/orchestration.md describes them."""
    record, evals = json.loads((d / "run.json").read_text()), read_jsonl(d / "eval.jsonl")
    after = (record.get("heldout") or {}).get("after")
    if after:
        final = ("after training", record["steps"], after)
    else:
        final = ("eval.jsonl", evals[-1]["step"], evals[-1]) if evals else None
    best_step = record["best_metrics"].get("nDCG@10", {}).get("step")
    if final is None:
        return [{"evaluation": None, "source": None, **dict.fromkeys(QUALITY_COLUMNS)}]
    rows = [("final, best" if best_step == final[1] else "final", final)]
    if best_step is not None and best_step != final[1]:
        rows.append(("best", ("eval.jsonl", best_step, [e for e in evals if e["step"] == best_step][-1])))
    return [{"evaluation": which, "source": {"origin": origin, "data": "beir", "split": "test", "step": step},
             **{name: values[name] for name in QUALITY_COLUMNS}} for which, (origin, step, values) in rows]


@pytest.fixture
def quality_root(swept, tmp_path):
    """A copy of the sweep in which lambda_q=0.01 has no held-out pass after training (as when --eval-data was
    not given to an older spladectl), so its final numbers must come from eval.jsonl's last line."""
    root = tmp_path / "copy"
    shutil.copytree(swept["root"], root)
    path = root / SWEEP / "lambda_q=0.01" / "run.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "heldout": None}))
    return root


def test_runs_compare_reports_quality_against_cost(quality_root, cli):
    for point in POINTS[:3]:  # in-training evaluations carry the sparsity they were measured at
        for line in read_jsonl(quality_root / SWEEP / point / "eval.jsonl"):
            assert all(isinstance(line[k], float) for k in ("avg_query_dims", "avg_doc_dims", "avg_flops")), point
    result = cli("runs", "compare", SWEEP, "--runs-root", str(quality_root), "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["quality"]
    for point in POINTS:
        d = quality_root / SWEEP / point
        shown = [{k: v for k, v in row.items() if k != "run"} for row in rows if row["run"] == f"{SWEEP}/{point}"]
        assert shown == expected_quality(d), point
        record = json.loads((d / "run.json").read_text())
        if record.get("heldout"):  # the final row holds what run.json reports as the final metrics
            assert {k: shown[0][k] for k in QUALITY_COLUMNS} == {k: record["final_metrics"][k] for k in QUALITY_COLUMNS}
    assert any(r["source"] and r["source"]["origin"] == "eval.jsonl" and r["evaluation"].startswith("final")
               for r in rows)  # lambda_q=0.01's

    text = cli("runs", "compare", SWEEP, "--runs-root", str(quality_root), env=WIDE).output
    quality = text[text.index("quality against cost"):]
    header = quality.splitlines()[2].split()
    assert header == ["run", "evaluation", "source", "nDCG@10", "MRR@10", "R@100", "query", "dims", "doc", "dims",
                      "FLOPS"]
    (never,) = [line for line in quality.splitlines() if line.strip().startswith("bad-data")]
    assert never.split()[1:] == ["-", "no", "evaluation", *["-"] * 6]
    row = next(r for r in rows if r["run"] == f"{SWEEP}/short-warm-up")
    (line,) = [line for line in quality.splitlines() if line.strip().startswith("short-warm-up")
               and row["evaluation"] in line]
    assert f"beir/test, step {row['source']['step']}" in line and f"{row['nDCG@10']:.4f}" in line
    assert f"{row['avg_flops']:.4g}" in line


@pytest.fixture
def drawn(monkeypatch):
    """The figures `runs compare --plot` saves, kept for inspection (savefig itself still runs)."""
    from matplotlib.figure import Figure

    figures, save = [], Figure.savefig

    def keep(self, *args, **kwargs):
        figures.append(self)
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def quality_axes(figure):
    (ax,) = [ax for ax in figure.axes if ax.get_label() == "quality"]
    return ax


def test_runs_compare_plots_quality_against_flops(swept, cli, tmp_path, drawn):
    from spladectl.runs.quality import final_evaluation, quality_path
    from spladectl.runs.record import load_record

    plot = tmp_path / "compare.png"
    result = cli("runs", "compare", SWEEP, "--runs-root", str(swept["root"]), "--plot", str(plot), env=WIDE)
    assert result.exit_code == 0, result.output
    assert plot.read_bytes().startswith(b"\x89PNG") and len(drawn) == 1
    (figure,) = drawn
    assert {ax.get_label() for ax in figure.axes} == {"loss", "lambda", "dims", "eval", "quality"}
    ax = quality_axes(figure)
    assert "FLOPS" in ax.get_xlabel() and ax.get_ylabel() == "nDCG@10" and ax.get_title() == "nDCG@10 against FLOPS"

    records = [load_record(run_dir(swept, p)) for p in POINTS[:3]]
    # one labelled dot per evaluated run, at its final evaluation's FLOPS and nDCG@10
    finals = [final_evaluation(r)[2] for r in records]
    dots = sorted(tuple(map(float, c.get_offsets()[0])) for c in ax.collections)
    assert dots == sorted((f["avg_flops"], f["nDCG@10"]) for f in finals)
    assert sorted(t.get_text() for t in ax.texts) == sorted(POINTS[:3])  # bad-data was never evaluated
    # and a path through its evaluations: before training, every eval.jsonl line, after training
    for record in records:
        heldout, evals = record.heldout, read_jsonl(record.path / "eval.jsonl")
        expected = [heldout["before"], *evals, heldout["after"]]
        assert quality_path(record) == [(e["avg_flops"], e["nDCG@10"]) for e in expected]
    paths = sorted([list(zip(map(float, line.get_xdata()), map(float, line.get_ydata()))) for line in ax.lines])
    assert paths == sorted(quality_path(r) for r in records)


def test_quality_plot_goes_logarithmic_when_flops_spread_over_orders_of_magnitude(swept, tmp_path):
    from spladectl.runs.plot import build_figure
    from spladectl.runs.record import load_record

    root = tmp_path / "copy"
    shutil.copytree(swept["root"] / SWEEP, root)
    close = [load_record(root / p) for p in POINTS[:3]]
    assert quality_axes(build_figure(close)).get_xscale() == "linear"  # a few steps of the same λ hardly differ
    # A heavily regularised run is ~100x sparser; two steps cannot train one, so its files say so instead.
    sparse = root / "lambda_q=0.01"
    lines = [{**e, "avg_flops": e["avg_flops"] / 100} for e in read_jsonl(sparse / "eval.jsonl")]
    (sparse / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines))
    record = json.loads((sparse / "run.json").read_text())
    for when in ("before", "after"):
        record["heldout"][when]["avg_flops"] /= 100
    (sparse / "run.json").write_text(json.dumps(record))
    assert quality_axes(build_figure([load_record(root / p) for p in POINTS[:3]])).get_xscale() == "log"


def test_evaluations_without_flops_show_dashes_and_a_bad_plot_path_is_named(quality_root, cli, drawn):
    # What an older spladectl wrote: evaluations without sparsity, and a line that is no JSON object.
    d = quality_root / SWEEP / "short-warm-up"
    cost = ("avg_query_dims", "avg_doc_dims", "avg_flops")
    lines = [{k: v for k, v in e.items() if k not in cost} for e in read_jsonl(d / "eval.jsonl")]
    (d / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in lines) + "[1, 2]\n")
    record = json.loads((d / "run.json").read_text())
    record["heldout"] = {when: {k: v for k, v in m.items() if k not in cost} for when, m in record["heldout"].items()}
    (d / "run.json").write_text(json.dumps(record))

    plot = quality_root / "quality.png"
    result = cli("runs", "compare", SWEEP, "--runs-root", str(quality_root), "--json", "--plot", str(plot))
    assert result.exit_code == 0, result.output
    rows = [r for r in json.loads(result.stdout)["quality"] if r["run"] == f"{SWEEP}/short-warm-up"]
    assert rows and all(r[k] is None for r in rows for k in cost)
    assert rows[0]["nDCG@10"] == record["heldout"]["after"]["nDCG@10"]  # its quality is still there
    ax = quality_axes(drawn[-1])
    assert "short-warm-up" not in [t.get_text() for t in ax.texts] and len(ax.texts) == 2  # nothing to place it at

    bad = cli("runs", "compare", SWEEP, "--runs-root", str(quality_root), "--plot", str(quality_root / "q.nope"),
              env=WIDE)
    assert bad.exit_code == 2 and f"{quality_root / 'q.nope'}: cannot write the plot" in bad.output


def test_runs_rm_removes_runs_and_refuses_running_ones(swept, cli, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(swept["root"], root)
    result = cli("runs", "rm", f"{SWEEP}/bad-data", "--runs-root", str(root), "--yes")
    assert result.exit_code == 0 and not (root / SWEEP / "bad-data").exists()
    running = root / SWEEP / "short-warm-up" / "run.json"
    record = json.loads(running.read_text())
    running.write_text(json.dumps({**record, "status": "running"}))
    from spladectl.runs.lock import RunLock

    lock = RunLock(running.parent)  # this test process trains there, as far as anyone can tell
    lock.acquire()
    refused = cli("runs", "rm", SWEEP, "--runs-root", str(root), "--yes", env=WIDE)
    assert refused.exit_code == 2 and f"still running (pid {os.getpid()} on" in refused.output
    lock.release()
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
        "@hookimpl(wrapper=True)\ndef train_step(state):\n"
        "    metrics = yield\n"
        "    if state.step == 2:\n        raise KeyboardInterrupt\n"
        "    return metrics\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "stopper"
    manager = plugin_loading.load_plugins()
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

    assert not plugin_loading.load_plugins().has_plugin(stopper)  # --plugin lasts one run, even in one process
    result = cli(*args, "--resume", "latest", env=WIDE)
    assert result.exit_code == 0, result.output
    assert f"resumed from {d / 'checkpoints' / 'step-1'}" in " ".join(result.output.split())
    record = json.loads((d / "run.json").read_text())
    assert (record["status"], record["resumes"], record["steps"]) == ("finished", 1, 3)
    assert [r["step"] for r in read_jsonl(d / "metrics.jsonl")] == [1, 2, 3]
    assert "--plugin stopper" in record["command"]  # the command that started the run is kept
