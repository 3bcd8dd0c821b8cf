"""The built-in TensorBoard and MLflow trackers mirror a real run on splade-tiny; what they wrote is read back with
tensorboard's EventAccumulator and MLflow's own client (nothing of either library is mocked)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spladectl.runs.summary import read_jsonl
from tiny import write_eval_beir, write_jsonl

SMALL = ["--profile", "cpu", "--precision", "fp32", "--batch-size", "2", "--grad-accum", "1", "--max-steps", "2",
         "--max-query-length", "16", "--max-doc-length", "32", "--lr", "1e-4", "--seed", "7", "--no-progress"]
# Whatever the developer's shell points MLflow at, these runs use their own store.
CLEAN = {"MLFLOW_TRACKING_URI": None, "MLFLOW_EXPERIMENT_NAME": None, "SPLADECTL_TRACK": None, "COLUMNS": "250"}


@pytest.fixture(scope="module")
def tracked(tmp_path_factory, cli):
    tmp = tmp_path_factory.mktemp("tracked")
    data, beir, root = write_jsonl(tmp / "triples.jsonl"), write_eval_beir(tmp / "beir"), tmp / "runs"
    result = cli("train", "--data", str(data), "--runs-root", str(root), *SMALL, "--eval-data", str(beir),
                 "--eval-every", "1", "--track", "tensorboard,mlflow", "--tag", "mirrored", "--json", env=CLEAN)
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(result.stdout)["run_dir"])
    return {"root": root, "dir": run_dir, "record": json.loads((run_dir / "run.json").read_text()),
            "rows": read_jsonl(run_dir / "metrics.jsonl"), "evals": read_jsonl(run_dir / "eval.jsonl")}


def test_tensorboard_event_files_hold_the_run(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    rows, evals = tracked["rows"], tracked["evals"]
    events = EventAccumulator(str(tracked["dir"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in rows], rel=1e-6)  # stored as float32
    assert [e.value for e in events.Scalars("train/lambda_q")] == pytest.approx([r["lambda_q"] for r in rows])
    assert [e.value for e in events.Scalars("eval/nDCG@10")] == pytest.approx([e["nDCG@10"] for e in evals])
    assert events.Scalars("final/loss")[-1].value == pytest.approx(rows[-1]["loss"], rel=1e-6)

    hparams = events.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["lr"].number_value == pytest.approx(1e-4)
    assert start.hparams["run_id"].string_value == tracked["record"]["id"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| lr | 0.0001 |" in config and "| precision | 32-true |" in config
    model = events.Tensors("model/text_summary")[0].tensor_proto.string_val[0].decode()
    assert str(tracked["dir"] / "final") in model
    assert tracked["record"]["tracking"]["tensorboard"]["logdir"] == str(tracked["dir"] / "tensorboard")


def test_mlflow_store_holds_params_metrics_and_the_model(tracked, tmp_path):
    from mlflow import MlflowClient

    rows, evals, record = tracked["rows"], tracked["evals"], tracked["record"]
    database = tracked["root"].resolve() / "mlflow.db"
    assert record["tracking"]["mlflow"]["uri"] == f"sqlite:///{database}"
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    experiment = client.get_experiment_by_name("spladectl")
    (run,) = client.search_runs([experiment.experiment_id])
    run_id = run.info.run_id
    assert run_id == record["tracking"]["mlflow"]["run_id"] and run.info.run_name == record["id"]
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert (params["lr"], params["max_steps"], params["precision"], params["seed"]) == ("0.0001", "2", "32-true", "7")
    assert run.data.tags["spladectl.tags"] == "mirrored" and run.data.tags["spladectl.run_id"] == record["id"]

    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == [(r["step"], r["loss"]) for r in rows]
    ndcg = sorted(client.get_metric_history(run_id, "eval/nDCG_at_10"), key=lambda m: m.step)
    assert [m.value for m in ndcg] == [e["nDCG@10"] for e in evals]
    assert run.data.metrics["final/loss"] == rows[-1]["loss"]
    assert run.data.metrics["best/nDCG_at_10"] == max(e["nDCG@10"] for e in evals)

    artifacts = {a.path for a in client.list_artifacts(run_id, "model")}
    assert {"model/model.safetensors", "model/splade_config.json"} <= artifacts
    copy = Path(client.download_artifacts(run_id, "model/model.safetensors", str(tmp_path)))
    assert copy.read_bytes() == (tracked["dir"] / "final" / "model.safetensors").read_bytes()
    assert {a.path for a in client.list_artifacts(run_id)} >= {"config.toml", "model"}


def test_tracker_mistakes_are_clear(cli, tmp_path):
    data, root = write_jsonl(tmp_path / "triples.jsonl"), tmp_path / "runs"
    unknown = cli("train", "--data", str(data), "--runs-root", str(root), *SMALL, "--track", "wandb", env=CLEAN)
    assert unknown.exit_code == 2 and "--track wandb: unknown tracker" in unknown.output
    assert not root.exists()  # refused before any run began

    bad_uri = cli("train", "--data", str(data), "--runs-root", str(root), *SMALL, "--track", "mlflow",
                  "--mlflow-uri", "nosuchscheme://somewhere", env=CLEAN)
    assert bad_uri.exit_code == 2 and "Traceback" not in bad_uri.output
    (run_dir,) = list(root.iterdir())
    record = json.loads((run_dir / "run.json").read_text())
    assert record["status"] == "failed" and "cannot start an MLflow run at nosuchscheme://somewhere" in record["error"]
    assert record["steps"] == 0  # stopped before the first step
