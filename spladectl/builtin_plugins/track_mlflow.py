"""Mirror a run to MLflow (`--track mlflow`): parameters, per-step metrics, final metrics and the model.

The tracking URI is `--mlflow-uri` (or $MLFLOW_TRACKING_URI), else a SQLite database shared by all runs,
RUNS_ROOT/mlflow.db, with artifacts in RUNS_ROOT/mlartifacts/. The experiment is the sweep's name for sweep
points, else $MLFLOW_EXPERIMENT_NAME, else "spladectl"; the MLflow run is named after the spladectl run id, and
a resumed run continues the same MLflow run. Uses MlflowClient only (no global "active run"), so several runs in
one process (a sweep) never mix.

MLflow names may not contain "@": nDCG@10 is logged as nDCG_at_10.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

from spladectl.errors import SpladectlError
from spladectl.hookspecs import hookimpl

NAME = "mlflow"
_STATUS = {"finished": "FINISHED", "failed": "FAILED", "interrupted": "KILLED"}


def _wanted(state) -> bool:
    return NAME in (state.config.track or []) and state.is_main_process


def metric_name(name: str) -> str:
    """A spladectl metric name as MLflow accepts it (letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w.\- /]", "_", name.replace("@", "_at_"))


class MlflowTracker:
    def __init__(self) -> None:
        self.client = None
        self.run_id: str | None = None

    @hookimpl(wrapper=True)
    def train(self, state):
        self._start(state)
        try:
            result = yield
        except BaseException as exc:
            if self.client is not None:
                status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
                self._guard(state, lambda: self.client.set_terminated(self.run_id, _STATUS[status]))
                self.client = None
            raise
        if self.client is not None:
            self._finish(state, result)
        return result

    @hookimpl(wrapper=True, tryfirst=True)  # the outermost wrapper: it sees the keys the others add
    def train_step(self, state):
        metrics = yield
        self._log_metrics(state, {k: v for k, v in metrics.items() if k != "step"}, state.step)
        return metrics

    @hookimpl
    def on_evaluate(self, state, metrics, final):
        if not final:  # the final evaluation is among the final metrics logged at the end
            self._log_metrics(state, {f"eval/{k}": v for k, v in metrics.items()}, state.step)

    def _start(self, state) -> None:
        self.client, self.run_id = None, None
        if not _wanted(state):
            return
        from spladectl.builtin_plugins.tracking import INSTALL_HINT, default_mlflow_uri, mask_uri

        try:
            from mlflow import MlflowClient
        except ImportError as exc:
            raise SpladectlError("--track mlflow: mlflow is not installed", hint=INSTALL_HINT) from exc
        run = state.extras.get("run")
        root = run.runs_root if run is not None and run.runs_root else Path(state.output_dir).resolve().parent
        uri = state.extras.get("mlflow_uri") or default_mlflow_uri(root)
        experiment = (run.sweep if run is not None and run.sweep else None) or os.environ.get(
            "MLFLOW_EXPERIMENT_NAME") or "spladectl"
        previous = (run.tracking.get(NAME) or {}) if run is not None else {}
        try:
            client = MlflowClient(tracking_uri=uri)
            found = client.get_experiment_by_name(experiment)
            experiment_id = found.experiment_id if found is not None else client.create_experiment(
                experiment, artifact_location=_artifact_location(uri, experiment))
            if state.step and previous.get("run_id") and previous.get("uri") == mask_uri(uri):
                self.run_id = previous["run_id"]  # a resume continues the same MLflow run
                client.update_run(self.run_id, status="RUNNING")
            else:
                self.run_id = client.create_run(experiment_id, run_name=run.id if run else Path(state.output_dir).name,
                                                tags=_tags(state, run)).info.run_id
                _log_params(client, self.run_id, state.config.to_dict())
        except Exception as exc:  # a wrong URI, an unreachable server: stop before the first step, and say where
            raise SpladectlError(f"--track mlflow: cannot start an MLflow run at {mask_uri(uri)} "
                                 f"({type(exc).__name__}: {exc})",
                                 hint="check --mlflow-uri / $MLFLOW_TRACKING_URI") from exc
        self.client = client
        if run is not None:
            run.tracking[NAME] = {"uri": mask_uri(uri), "experiment": experiment, "experiment_id": experiment_id,
                                  "run_id": self.run_id}
            run.save()  # so that a resume after a crash finds the MLflow run

    def _finish(self, state, result) -> None:
        """Final and best metrics, the configuration and the final model, then the MLflow run ends."""
        client, run_id = self.client, self.run_id
        values = {f"final/{k}": v for k, v in result["final_metrics"].items()}
        if result["best"] is not None:
            values[f"best/{result['best']['metric']}"] = result["best"]["value"]
        self._log_metrics(state, values, state.step)
        config_file = Path(state.output_dir) / "config.toml"
        final = Path(result["final"])

        def upload():
            if config_file.is_file():
                client.log_artifact(run_id, str(config_file))
            if result["status"] == "finished" and final.is_dir():
                client.log_artifacts(run_id, str(final), artifact_path="model")
            client.set_terminated(run_id, _STATUS.get(result["status"], "FAILED"))

        self._guard(state, upload)
        self.client = None

    def _log_metrics(self, state, values: dict[str, Any], step: int) -> None:
        if self.client is None:
            return
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        metrics = [Metric(metric_name(k), float(v), stamp, step) for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)]
        self._guard(state, lambda: [self.client.log_batch(self.run_id, metrics=metrics[i:i + 1000])
                                    for i in range(0, len(metrics), 1000)])

    def _guard(self, state, call) -> None:
        # A tracking server that goes away must not end a long training: warn once, record it, stop mirroring.
        try:
            call()
        except Exception as exc:  # noqa: BLE001
            self.client = None
            message = f"mlflow: stopped mirroring at step {state.step}: {type(exc).__name__}: {exc}"
            run = state.extras.get("run")
            if run is not None:
                run.warnings.append(message)


def _artifact_location(uri: str, experiment: str) -> str | None:
    """For a SQLite store, artifacts next to the database (MLflow would otherwise use ./mlruns in whatever the
    current directory is); a server decides for itself."""
    if not uri.startswith("sqlite:///"):
        return None
    from spladectl.builtin_plugins.tracking import MLFLOW_ARTIFACTS

    database = Path(uri[len("sqlite:///"):])
    return (database.parent / MLFLOW_ARTIFACTS / experiment).resolve().as_uri()


def _tags(state, run) -> dict[str, str]:
    tags = {"spladectl.output_dir": str(Path(state.output_dir).resolve())}
    if run is not None:
        tags.update({"spladectl.run_id": run.id, "spladectl.tags": ",".join(run.tags)})
        if run.sweep:
            tags.update({"spladectl.sweep": run.sweep, "spladectl.point": run.point or ""})
    return tags


def _log_params(client, run_id: str, values: dict[str, Any]) -> None:
    from mlflow.entities import Param

    params = [Param(key, str(value)) for key, value in values.items() if value is not None]
    for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
        client.log_batch(run_id, params=params[i:i + 100])


def plugin(manager) -> MlflowTracker:
    return MlflowTracker()
