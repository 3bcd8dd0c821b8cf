"""Representation collapse: the detector on made-up metric streams, then real runs on splade-tiny driven into
collapse (huge λ, no warm-up, a high learning rate) under each --on-collapse policy."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch

from spladectl import losses
from spladectl.collapse import CHANCE_MARGIN, CollapseDetector, check_policy, signals
from spladectl.engine import Trainer
from spladectl.errors import CollapseError, SpladectlError
from spladectl.hookspecs import hookimpl

from tiny import config, examples, metrics_rows, write_eval_beir, write_jsonl

CHANCE_40 = math.log(40)  # 8 queries × (1 positive + 4 negatives), in-batch


def step(n: int, *, query_dims=20.0, doc_dims=150.0, ranking=1.2, chance=CHANCE_40, candidates=40.0) -> dict:
    return {"step": n, "query_dims": query_dims, "doc_dims": doc_dims, "ranking": ranking, "chance_loss": chance,
            "candidates": candidates}


def feed(detector: CollapseDetector, stream: list[dict]) -> list:
    """Each step's verdict (a Collapse or None), in order."""
    return [detector.update(metrics) for metrics in stream]


# ------------------------------------------------------------------------------------------ the detector


def test_a_healthy_stream_never_collapses():
    detector = CollapseDetector(3)
    assert feed(detector, [step(n, ranking=1.0 + 0.1 * (n % 4)) for n in range(1, 50)]) == [None] * 49
    assert not detector.collapsed and detector.healthy == 49


def test_the_reported_run_collapses_after_patience_steps_and_says_so_once():
    # The user's run: healthy until step 42, then query dims under one, documents about one, the loss at ln 40.
    stream = [step(n) for n in range(1, 43)] + [step(n, query_dims=0.4, doc_dims=1.1, ranking=CHANCE_40 - 0.001)
                                                for n in range(43, 60)]
    verdicts = feed(CollapseDetector(10), stream)
    found = [v for v in verdicts if v is not None]
    assert len(found) == 1 and verdicts.index(found[0]) == 51  # step 52: ten collapsed steps, 43 to 52
    collapse = found[0]
    assert (collapse.step, collapse.since) == (52, 43)
    text = collapse.describe()
    assert "step 52" in text and "query representations average 0.40 active dimensions" in text
    assert "document" not in text  # 1.1 active dimensions is sparse, not collapsed
    assert f"chance level {CHANCE_40:.4f}" in text and "40 candidates" in text


def test_a_streak_broken_by_one_healthy_step_starts_over():
    detector = CollapseDetector(3)
    stream = [step(1, doc_dims=0.5), step(2, doc_dims=0.5), step(3), step(4, doc_dims=0.5), step(5, doc_dims=0.5)]
    assert feed(detector, stream) == [None] * 5 and not detector.collapsed
    found = detector.update(step(6, doc_dims=0.0))
    assert found is not None and found.since == 4 and "document representations average 0.00" in found.describe()
    assert detector.collapsed
    detector.update(step(7))
    assert not detector.collapsed  # it recovered


def test_the_loss_at_chance_alone_is_a_collapse_only_after_the_warm_up():
    at_chance = [step(n, ranking=CHANCE_40 + CHANCE_MARGIN / 2) for n in range(1, 9)]
    assert feed(CollapseDetector(3, chance_after=5), at_chance)[:7] == [None] * 7  # steps 6, 7 and 8 count
    assert feed(CollapseDetector(3, chance_after=5), at_chance)[7].since == 6
    near = [step(n, ranking=CHANCE_40 - 2 * CHANCE_MARGIN) for n in range(1, 9)]  # learning, if slowly
    above = [step(n, ranking=CHANCE_40 + 1.0) for n in range(1, 9)]  # confidently wrong is not collapsed
    assert feed(CollapseDetector(3), near) == [None] * 8 and feed(CollapseDetector(3), above) == [None] * 8


def test_a_single_candidate_says_nothing():
    # Without in-batch and hard negatives the loss is ln 1 = 0 whatever the model does.
    assert signals(step(1, ranking=0.0, chance=0.0, candidates=1.0)) == []


def test_policies_and_patience_are_checked():
    assert check_policy("backoff") == "backoff"
    with pytest.raises(SpladectlError, match="--on-collapse 'halt'"):
        check_policy("halt")
    with pytest.raises(SpladectlError, match="collapse_patience"):
        CollapseDetector(0)


# ------------------------------------------------------------------------------------------ real runs

# λ 10 from the first step at lr 1e-3: splade-tiny's representations are empty within three steps.
COLLAPSING = dict(lambda_q=10.0, lambda_d=10.0, flops_warmup_steps=0, lr=1e-3, scheduler="constant",
                  warmup_ratio=0.0)
CLI_COLLAPSING = ["--lambda-q", "10", "--lambda-d", "10", "--flops-warmup-steps", "0", "--lr", "1e-3",
                  "--scheduler", "constant", "--warmup-ratio", "0", "--precision", "fp32", "--batch-size", "4",
                  "--grad-accum", "1", "--max-query-length", "16", "--max-doc-length", "32", "--seed", "7",
                  "--no-progress"]




def error_line(output: str) -> str:
    """The one error the CLI printed (as `Error: ...`, or in rich's box titled Error), on one line."""
    assert output.count("Error") == 1, output
    [line] = [line for line in output.splitlines() if "training collapsed at step" in line]
    return line


def test_stop_ends_the_run_with_what_to_change_and_no_final_model(cli, tmp_path):
    data, beir, out = write_jsonl(tmp_path / "triples.jsonl"), write_eval_beir(tmp_path / "beir"), tmp_path / "run"
    result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "30", "--eval-data", str(beir),
                 "--eval-every", "1", *CLI_COLLAPSING, env={"COLUMNS": "2000"})
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    line = error_line(result.output)
    assert re.search(r"collapsed at step \d+: query representations average 0\.00 active dimensions", line), line
    assert "no final model was written" in line and "the best model (step 1, nDCG@10" in line
    assert str(out / "best") in line
    assert "--lr (now 0.001)" in result.output and "--lambda-q/--lambda-d (now 10/10)" in result.output
    assert "--flops-warmup-steps (now 0)" in result.output
    assert not (out / "final").exists() and (out / "best" / "model.safetensors").is_file()
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "failed" and "collapsed at step" in run["error"] and run["traceback"] is None
    # the default patience: ten collapsed steps, then nothing more is trained
    stopped = int(re.search(r"collapsed at step (\d+)", line).group(1))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()][-1] == stopped
    assert run["best_model"]["step"] == 1


def test_warn_trains_on_and_reports_the_best_model_not_the_collapsed_one(cli, tmp_path):
    data, beir, out = write_jsonl(tmp_path / "triples.jsonl"), write_eval_beir(tmp_path / "beir"), tmp_path / "run"
    result = cli("train", "--data", str(data), "-o", str(out), "--max-steps", "14", "--eval-data", str(beir),
                 "--eval-every", "1", "--on-collapse", "warn", *CLI_COLLAPSING, "--json", env={"COLUMNS": "2000"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "finished" and summary["steps"] == 14
    assert summary["collapsed"] and "collapsed at step" in summary["collapsed"]
    assert result.stderr.count("training goes on (--on-collapse warn)") == 1
    assert (out / "final" / "model.safetensors").is_file()
    # The held-out numbers after training are the best model's, never the collapsed final one's.
    assert summary["best"]["step"] == 1 and summary["heldout_model"] == "best"
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert summary["heldout_after"]["nDCG@10"] == pytest.approx(evals[0]["nDCG@10"])
    assert all(e.get("collapsed") for e in evals[-2:])  # after the detection: recorded, never made the best
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "finished" and run["best_model"]["step"] == 1 and "after" not in run["heldout"]
    assert any("collapsed at step" in w for w in run["warnings"])


class ZeroThenHugeLambda:
    """No sparsity penalty for the first four steps, then FLOPS × 100: healthy steps to take snapshots of, then
    collapse at any of the learning rates the backoffs try (the run's own λ are 0)."""

    @hookimpl
    def loss_terms(self, inputs, state):
        if state.step < 4:
            return None
        docs = inputs.documents.reshape(-1, inputs.documents.shape[-1])
        return {"huge_flops": 100.0 * (losses.flops(inputs.query) + losses.flops(docs))}


class Recorder:
    """Every step's learning rate, and a digest of the weights each step starts from, in the order they ran."""

    def __init__(self):
        self.lrs: list[float] = []
        self.starts: list[tuple[int, str]] = []  # (steps completed, digest of the weights)

    @hookimpl
    def loss_terms(self, inputs, state):
        digest = hashlib.sha256()
        for name, tensor in sorted(state.model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
        self.starts.append((state.step, digest.hexdigest()))

    @hookimpl(wrapper=True)
    def train_step(self, state):
        metrics = yield
        self.lrs.append(metrics["lr"])
        return metrics


def test_backoff_restores_the_snapshot_halves_the_lr_and_gives_up_after_three(tmp_path, pm, registered):
    registered(ZeroThenHugeLambda())
    recorder = registered(Recorder())
    said = []
    settings = {**COLLAPSING, "lambda_q": 0.0, "lambda_d": 0.0}
    trainer = Trainer(config(tmp_path, max_steps=40, on_collapse="backoff", collapse_patience=2, **settings),
                      examples(), pm=pm, progress=False, log=said.append)
    with pytest.raises(CollapseError, match=r"after 3 backoff\(s\)") as caught:
        trainer.fit()
    assert "no final model was written" in str(caught.value) and not (tmp_path / "out" / "final").exists()
    backoffs = [line for line in said if "back to step" in line]
    backs = [int(re.search(r"back to step (\d+)", line).group(1)) for line in backoffs]
    assert len(backs) == 3 and all(b > 0 for b in backs)  # snapshots of healthy steps, not only the start
    assert all(f"learning rate halved (peak {1e-3 / 2 ** k:.3g})" in line for k, line in zip((1, 2, 3), backoffs))
    # The learning rate halves at each backoff, and only then.
    assert sorted(set(recorder.lrs), reverse=True) == [1e-3, 5e-4, 2.5e-4, 1.25e-4]
    assert all(later in (earlier, earlier / 2) for earlier, later in zip(recorder.lrs, recorder.lrs[1:]))
    # After each backoff the run starts again from a snapshot: weights it started that step from before, bit for bit.
    starts = recorder.starts
    restarts = [i for i in range(1, len(starts)) if starts[i][0] <= starts[i - 1][0]]
    assert [starts[i][0] for i in restarts] == backs
    for i in restarts:
        step_, weights = starts[i]
        assert weights in {earlier for s, earlier in starts[:i] if s == step_}
        assert weights != starts[i - 1][1]  # not the collapsed model it replaced
    # metrics.jsonl has one line per step: up to the last restored step at a higher rate, then at half of it.
    rows = metrics_rows(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, len(rows) + 1))
    assert {r["lr"] for r in rows if r["step"] > backs[-1]} == {1.25e-4}
    assert min(r["lr"] for r in rows if r["step"] <= backs[-1]) >= 2.5e-4


def test_backoff_snapshots_leave_a_healthy_run_unchanged(tmp_path, pm):
    runs = {}
    for policy in ("stop", "backoff"):
        trainer = Trainer(config(tmp_path / policy, max_steps=3, on_collapse=policy, collapse_patience=1),
                          examples(), pm=pm, progress=False)
        result = trainer.fit()
        assert result["collapsed"] is None and result["collapse_events"] == [] and result["best"] is None
        runs[policy] = trainer.state.model.state_dict()
    assert all(torch.equal(runs["stop"][k], runs["backoff"][k]) for k in runs["stop"])
    losses = {policy: [r["loss"] for r in metrics_rows(tmp_path / policy)] for policy in runs}
    assert losses["stop"] == losses["backoff"]


def test_chance_level_and_candidates_are_in_the_step_metrics(tmp_path, pm):
    Trainer(config(tmp_path, max_steps=1, n_negatives=1), examples(), pm=pm, progress=False).fit()
    [row] = metrics_rows(tmp_path)
    assert row["candidates"] == 8.0 and row["chance_loss"] == pytest.approx(math.log(8))  # 4 × (1 + 1), in-batch
    Trainer(config(tmp_path / "own", max_steps=1, in_batch_negatives=False), examples(), pm=pm, progress=False).fit()
    [row] = metrics_rows(tmp_path / "own")
    assert row["candidates"] == 2.0 and row["chance_loss"] == pytest.approx(math.log(2))
