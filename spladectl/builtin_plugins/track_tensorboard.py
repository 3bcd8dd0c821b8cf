"""Mirror a run to TensorBoard (`--track tensorboard`): event files in RUN_DIR/tensorboard/.

Written with torch.utils.tensorboard (which needs the `tensorboard` package): the configuration as text at the
start, every step's numbers as `train/<name>` scalars, evaluations as `eval/<name>`, and at the end the run's
hyperparameters with its final metrics (`final/<name>`: the last step's loss terms and the evaluation of the model
training ended with) for TensorBoard's HParams tab, plus the path of the final model as text (TensorBoard keeps
numbers and text, not files). `tensorboard --logdir runs` shows every run.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from spladectl.hookspecs import hookimpl

NAME = "tensorboard"
SUBDIR = "tensorboard"


def _wanted(state) -> bool:
    return NAME in (state.config.track or []) and state.is_main_process


class TensorBoardTracker:
    def __init__(self) -> None:
        self.writer = None
        self.warned = False

    @hookimpl(wrapper=True)
    def train(self, state):
        self._start(state)
        try:
            result = yield
        finally:
            self._close()
        if _wanted(state):
            self._guard(state, lambda: self._finish(state, result))
        return result

    @hookimpl(wrapper=True, tryfirst=True)  # the outermost wrapper: it sees the keys the others add
    def train_step(self, state):
        metrics = yield
        self._scalars(state, "train", metrics)
        return metrics

    @hookimpl
    def on_evaluate(self, state, metrics, final):
        if not final:  # the final evaluation is among the final metrics written at the end
            self._scalars(state, "eval", metrics)

    def _start(self, state) -> None:
        if not _wanted(state):
            return
        from torch.utils.tensorboard import SummaryWriter

        logdir = Path(state.output_dir) / SUBDIR
        # After a resume, TensorBoard drops what an earlier attempt logged at the steps about to be redone.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=state.step + 1 if state.step else None)
        _record(state, {"logdir": str(logdir)})
        if not state.step:
            self.writer.add_text("config", _markdown_table(state.config.to_dict()), 0)

    def _scalars(self, state, group: str, metrics) -> None:
        if self.writer is None:
            return
        self._guard(state, lambda: [self.writer.add_scalar(f"{group}/{key}", value, state.step)
                                    for key, value in metrics.items() if _is_number(key, value)])

    def _finish(self, state, result) -> None:
        """The run's hyperparameters with its final metrics, for TensorBoard's HParams tab."""
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        final = {f"final/{key}": value for key, value in result["final_metrics"].items()}
        run = state.extras.get("run")
        with SummaryWriter(log_dir=str(Path(state.output_dir) / SUBDIR)) as writer:
            params = {key: _hparam(value) for key, value in state.config.to_dict().items()}
            params.update(run_id=run.id if run is not None else "", status=result["status"])
            for summary in hparams(params, final):
                writer.file_writer.add_summary(summary, state.step)
            for tag, value in final.items():
                writer.add_scalar(tag, value, state.step)
            final_dir = Path(result["final"])
            if final_dir.is_dir():
                writer.add_text("model", f"`{final_dir}`", state.step)

    def _guard(self, state, write) -> None:
        # A full disk must not end a long training: warn once, record it, stop mirroring.
        try:
            write()
        except OSError as exc:
            self._close()
            message = f"tensorboard: stopped mirroring at step {state.step}: {exc}"
            run = state.extras.get("run")
            if run is not None:
                run.warnings.append(message)

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _record(state, values: dict[str, Any]) -> None:
    run = state.extras.get("run")
    if run is not None:
        run.tracking[NAME] = values


def _is_number(key: str, value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step"


def _hparam(value: Any) -> Any:
    """HParams takes bool, str, int and float."""
    if value is None:
        return ""
    if isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def _markdown_table(values: dict[str, Any]) -> str:
    rows = [f"| {key} | {value} |" for key, value in values.items() if value is not None]
    return "\n".join(["| setting | value |", "|---|---|", *rows])


def plugin(manager) -> TensorBoardTracker:
    return TensorBoardTracker()
