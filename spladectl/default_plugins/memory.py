"""Memory in the metrics: the current RSS every step (cheap, for the progress bar) and, with --memory-tracking
(config `memory_tracking = true`), the peaks of each optimizer step and an end-of-run summary.

The peaks come from a light sampler thread started and stopped around the step by an `optimizer_step` wrapper:
process RSS (psutil, plus ru_maxrss), the CUDA allocator's peaks and the GPU's used memory through NVML on cuda,
and MPS allocated memory on mps. See spladectl/memory.py.
"""

from __future__ import annotations

from typing import Any, Callable

import psutil

from spladectl import memory
from spladectl.hookspecs import hookimpl

_process = psutil.Process()

LABELS = {  # at most 28 characters: the train command aligns the summary's values after them
    "mem_rss_peak": "peak RSS in a step",
    "mem_rss_max": "RSS high-water (ru_maxrss)",
    "mem_cuda_allocated_peak": "peak CUDA allocated",
    "mem_cuda_reserved_peak": "peak CUDA reserved",
    "mem_gpu_used_peak": "peak GPU used (NVML)",
    "mem_mps_allocated_peak": "peak MPS allocated",
    "mem_mps_driver_peak": "peak MPS driver memory",
}


class MemoryTracker:
    """Per-step memory peaks; `probes_for(device)` -> (probes, notes) is replaceable so tests can inject fake GPUs."""

    def __init__(self, probes_for: Callable[[Any], tuple[list[Any], list[str]]] = memory.probes_for,
                 interval: float = 0.005):
        self.probes_for = probes_for
        self.interval = interval
        self._reset()

    def _reset(self) -> None:
        self.sampler: memory.StepSampler | None = None
        self.notes: list[str] = []
        self.peaks: dict[str, tuple[float, int]] = {}  # metric -> (GiB, step) of the run's highest step peak

    def _start_run(self, state) -> None:
        self._close()
        self._reset()
        probes, self.notes = self.probes_for(state.device)
        self.sampler = memory.StepSampler(probes, interval=self.interval)

    @hookimpl
    def on_train_start(self, state):
        if state.config.memory_tracking:
            self._start_run(state)

    @hookimpl(wrapper=True)
    def optimizer_step(self, state):
        if not state.config.memory_tracking:
            return (yield)
        if self.sampler is None:
            self._start_run(state)
        self.sampler.start()
        try:
            metrics = yield
        finally:
            peaks = self.sampler.stop()
        if metrics is not None:
            for key, value in peaks.items():
                gb = round(memory.gib(value), 4)  # the summary shows exactly what metrics.jsonl holds
                metrics[f"{key}_gb"] = gb
                if key not in self.peaks or gb > self.peaks[key][0]:
                    self.peaks[key] = (gb, state.step)
        return metrics

    @hookimpl
    def on_step_end(self, state, metrics):
        metrics["memory_gb"] = _process.memory_info().rss / 2**30

    @hookimpl
    def on_train_end(self, state, status):
        self._close()

    @hookimpl
    def summary_rows(self, state):
        if not state.config.memory_tracking or not self.peaks:
            return None
        rows = [(LABELS.get(key, key), f"{value:.3f} GiB (step {step})")
                for key, (value, step) in sorted(self.peaks.items(), key=lambda kv: list(LABELS).index(kv[0])
                                                 if kv[0] in LABELS else len(LABELS))]
        rows += [("memory note", note) for note in self.notes]
        if self.sampler is not None:
            rows += [("memory probe failed", error) for error in self.sampler.errors]
        return rows

    def _close(self) -> None:
        if self.sampler is not None:
            for probe in self.sampler.probes:
                close = getattr(probe, "close", None)
                if close is not None:
                    close()


def plugin(manager) -> MemoryTracker:
    """Each plugin manager gets its own tracker (it keeps the run's peaks)."""
    return MemoryTracker()
