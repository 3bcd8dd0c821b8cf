"""A plugin that SIGKILLs the training process at one chosen moment, for tests/test_crash.py.

Loaded with `--plugin crash_plugin:KillAt`; the moment is SPLADECTL_KILL_AT="SITE:STEP". Hooks reach the moments
between steps; the moments inside a write (half a metrics line, half a checkpoint, between a checkpoint's rename and
the pruning of old ones, half of best/ or final/) are reached by wrapping the functions that write, in this process
only. Nothing here changes what training computes.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from spladectl.hookspecs import hookimpl

# In the order they happen within a step (and, for "final", at the end).
SITES = ("before-step", "after-step", "metrics-line", "evaluate", "best", "checkpoint-state", "checkpoint-rename",
         "checkpoint-prune", "final")


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KillAt:
    def __init__(self):
        site, _, step = os.environ["SPLADECTL_KILL_AT"].partition(":")
        assert site in SITES, site
        self.site, self.step = site, int(step or 0)
        self.state = None
        self._wrap_writers()

    def _now(self, site: str, step: int | None = None) -> bool:
        return self.site == site and (step if step is not None else self.state.step) == self.step

    @hookimpl(wrapper=True)
    def train_step(self, state):
        self.state = state
        if self._now("before-step", state.step + 1):
            die()
        metrics = yield
        if self._now("after-step"):
            die()
        return metrics

    @hookimpl
    def on_evaluate(self, state, metrics, final):
        if not final and self._now("evaluate"):
            die()

    def _wrap_writers(self) -> None:
        import torch

        from spladectl import checkpoint, engine, model

        plugin = self
        open_metrics = engine._open_metrics

        class HalfALine:
            """metrics.jsonl whose line for the chosen step is cut in the middle, on disk, when the kill comes."""

            def __init__(self, handle):
                self.handle = handle

            def write(self, text: str):
                if plugin._now("metrics-line"):
                    self.handle.write(text[: len(text) // 2])
                    self.handle.flush()
                    die()
                return self.handle.write(text)

            def __getattr__(self, name):
                return getattr(self.handle, name)

        engine._open_metrics = lambda path, *, resumed_at: HalfALine(open_metrics(path, resumed_at=resumed_at))

        save = torch.save

        def half_a_checkpoint(obj, f, *args, **kwargs):
            if isinstance(obj, dict) and "format_version" in obj and plugin._now("checkpoint-state", obj["step"]):
                save({"half": list(range(1000))}, f)  # some bytes of a state that never completes
                f.flush()
                die()
            return save(obj, f, *args, **kwargs)

        checkpoint.torch.save = half_a_checkpoint

        replace = os.replace

        def rename(src, dst, *args, **kwargs):
            if Path(dst).name == f"step-{plugin.step}" and plugin._now("checkpoint-rename", plugin.step):
                die()
            replace(src, dst, *args, **kwargs)
            if Path(dst).name == f"step-{plugin.step}" and plugin._now("checkpoint-prune", plugin.step):
                die()  # the new checkpoint is complete, the old ones not yet pruned

        checkpoint.os.replace = rename  # the os module: every caller in this process goes through it

        save_pretrained = model.SpladeEncoder.save_pretrained

        def half_a_model(encoder, path, *args, **kwargs):
            name = Path(path).name
            for site, prefix in (("best", ".best.partial"), ("final", ".final.partial")):
                if plugin.site == site and name.startswith(prefix) and (site == "final" or plugin._now(site)):
                    save_pretrained(encoder, path, *args, **kwargs)
                    (Path(path) / "model.safetensors").write_bytes(b"half")
                    die()
            return save_pretrained(encoder, path, *args, **kwargs)

        model.SpladeEncoder.save_pretrained = half_a_model
