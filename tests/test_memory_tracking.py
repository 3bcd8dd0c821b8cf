"""Memory tracking (--memory-tracking): per-step peaks in metrics.jsonl and the end-of-run summary rows.

Process RSS is measured for real. This machine has no GPU, so the CUDA allocator, NVML and MPS probes are tested
with stand-ins for `torch.cuda`, `pynvml` and `torch.mps` (FakeCuda, FakeNvml, FakeMps below): they check the
probes' logic (reset and read of allocator peaks, sampling of device memory, device lookup, fallbacks), not the
drivers.
"""

from __future__ import annotations

import mmap
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from spladectl import memory, plugin_loading, plugins
from spladectl.config import TrainConfig
from spladectl.builtin_plugins.memory import MemoryTracker
from spladectl.engine import Trainer
from spladectl.hookspecs import hookimpl
import tiny
from tiny import metrics_rows

GIB = 2**30
MEMORY_PLUGIN = "spladectl.builtin_plugins.memory"

def examples():
    return tiny.examples() * 2


def config(tmp_path, **overrides):
    return tiny.config(tmp_path, **{"seed": 5, "memory_tracking": True, **overrides})


def hold(megabytes: int, seconds: float = 0.2) -> None:
    """Touch `megabytes` of fresh memory for a moment, then give it back to the kernel. The memory is mapped here
    rather than taken from malloc: in a process whose heap earlier tests fragmented, malloc may serve the block from
    free heap pages and keep them resident after free. The moment is 40 sampling intervals: long enough for the
    sampler thread to run on a busy machine."""
    block = mmap.mmap(-1, megabytes * 2**20)
    pages = np.frombuffer(block, dtype=np.uint8)
    pages.fill(1)
    time.sleep(seconds)
    del pages
    block.close()


# ------------------------------------------------------------------------------------------------ process RSS, real

def test_sampler_catches_a_peak_that_is_gone_by_the_end_of_the_step():
    probe = memory.RssProbe()
    sampler = memory.StepSampler([probe])
    before = probe.sample()["mem_rss_peak"]
    sampler.start()
    hold(300)
    peaks = sampler.stop()
    after = probe.sample()["mem_rss_peak"]
    assert peaks["mem_rss_peak"] - before > 250 * 2**20
    assert peaks["mem_rss_peak"] - after > 250 * 2**20  # the block was freed: only sampling could see it
    assert peaks["mem_rss_max"] >= peaks["mem_rss_peak"] * 0.99  # ru_maxrss, the kernel's high-water mark


class AllocatesAtStep2:
    """Holds 256 MB for a moment inside the second step's loss computation."""

    @hookimpl
    def loss_terms(self, state):
        if state.step == 1:
            hold(256)


def test_per_step_peaks_in_metrics_and_the_summary(tmp_path):
    manager = plugin_loading.make_plugin_manager(installed=False)
    plugins.register(manager, AllocatesAtStep2(), "allocates", source="test")
    trainer = Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    result = trainer.fit()
    rows = metrics_rows(tmp_path)
    assert all({"mem_rss_peak_gb", "mem_rss_max_gb", "memory_gb"} <= set(r) for r in rows)
    assert not any(key.startswith(("mem_cuda", "mem_gpu", "mem_mps")) for r in rows for key in r)  # a CPU run
    assert rows[1]["mem_rss_peak_gb"] - rows[1]["memory_gb"] > 0.2  # step 2's transient 256 MB was seen
    assert rows[1]["mem_rss_peak_gb"] - rows[0]["mem_rss_peak_gb"] > 0.2
    summary = dict(result["summary"])
    assert summary["peak RSS in a step"] == f"{rows[1]['mem_rss_peak_gb']:.3f} GiB (step 2)"
    assert "RSS high-water (ru_maxrss)" in summary
    assert all(len(label) <= 28 for label in summary)


# ------------------------------------------------------------------------------------------------ GPUs, faked

class FakeCuda:
    """Stand-in for torch.cuda (no GPU here): a caching allocator that tracks its own peak."""

    def __init__(self, pci=True):
        self.allocated = self.peak = 0
        self.resets = []
        self.pci = pci

    def current_device(self):
        return 0

    def reset_peak_memory_stats(self, device):
        self.resets.append(device)
        self.peak = self.allocated

    def max_memory_allocated(self, device):
        return self.peak

    def max_memory_reserved(self, device):
        return self.peak + GIB // 2

    def get_device_properties(self, index):
        if not self.pci:
            return SimpleNamespace(name="Fake GPU")
        return SimpleNamespace(name="Fake GPU", pci_domain_id=0, pci_bus_id=0x3B, pci_device_id=0)

    def allocate(self, n):
        self.allocated += n
        self.peak = max(self.peak, self.allocated)

    def free(self, n):
        self.allocated -= n


class FakeNvml:
    """Stand-in for the pynvml module (no NVIDIA driver here)."""

    def __init__(self, fail_init=False):
        self.fail_init = fail_init
        self.used = 1 * GIB
        self.looked_up = []
        self.shutdowns = 0

    def nvmlInit(self):
        if self.fail_init:
            raise RuntimeError("NVML Shared Library Not Found")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByPciBusId(self, bus_id):
        self.looked_up.append(("pci", bus_id))
        return "handle"

    def nvmlDeviceGetHandleByIndex(self, index):
        self.looked_up.append(("index", index))
        return "handle"

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used, total=24 * GIB)


class FakeMps:
    """Stand-in for torch.mps (no Apple GPU here)."""

    def __init__(self):
        self.allocated = 0

    def current_allocated_memory(self):
        return self.allocated

    def driver_allocated_memory(self):
        return self.allocated + GIB


def test_cuda_probes_reset_and_read_allocator_peaks_and_sample_nvml():
    cuda, nvml = FakeCuda(), FakeNvml()
    probes, notes = memory.probes_for(torch.device("cuda", 0), cuda=cuda, nvml=nvml)
    assert [p.name for p in probes] == ["rss", "cuda", "nvml"] and notes == []
    assert nvml.looked_up == [("pci", "00000000:3B:00.0")]  # found by PCI bus id, whatever CUDA_VISIBLE_DEVICES says
    sampler = memory.StepSampler(probes, interval=0.001)

    cuda.allocate(GIB)  # the model, held across steps
    sampler.start()
    cuda.allocate(3 * GIB)  # activations
    nvml.used = 6 * GIB
    time.sleep(0.1)
    cuda.free(3 * GIB)
    nvml.used = 2 * GIB
    peaks = sampler.stop()
    assert cuda.resets == [0]
    assert peaks["mem_cuda_allocated_peak"] == 4 * GIB and peaks["mem_cuda_reserved_peak"] == 4.5 * GIB
    assert peaks["mem_gpu_used_peak"] == 6 * GIB  # sampled: gone by the end of the step, still the peak

    sampler.start()  # the next step's peaks start again from what is held now
    peaks = sampler.stop()
    assert peaks["mem_cuda_allocated_peak"] == GIB and peaks["mem_gpu_used_peak"] == 2 * GIB


def test_nvml_device_lookup_falls_back_to_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    nvml = FakeNvml()
    memory.probes_for(torch.device("cuda", 1), cuda=FakeCuda(pci=False), nvml=nvml)
    assert nvml.looked_up == [("index", 3)]


def test_without_nvml_the_cuda_peaks_remain_with_a_note():
    probes, notes = memory.probes_for("cuda", cuda=FakeCuda(), nvml=FakeNvml(fail_init=True))
    assert [p.name for p in probes] == ["rss", "cuda"]
    assert notes == ["NVML unavailable (RuntimeError: NVML Shared Library Not Found)"]


def test_mps_probe_samples_allocated_memory():
    mps = FakeMps()
    probes, _ = memory.probes_for(torch.device("mps"), mps=mps)
    assert [p.name for p in probes] == ["rss", "mps"]
    sampler = memory.StepSampler(probes, interval=0.001)
    sampler.start()
    mps.allocated = 2 * GIB
    time.sleep(0.1)
    mps.allocated = GIB // 2
    peaks = sampler.stop()
    assert peaks["mem_mps_allocated_peak"] == 2 * GIB and peaks["mem_mps_driver_peak"] == 3 * GIB


def test_gpu_peaks_reach_metrics_and_summary_in_a_real_run(tmp_path):
    """A real CPU training whose tracker is given the fake CUDA and NVML probes: the plumbing from probes to
    metrics.jsonl and summary rows is the one a GPU run uses."""
    cuda, nvml = FakeCuda(), FakeNvml()

    class GpuActivity:  # what a CUDA step would do to the allocator and the device
        @hookimpl
        def loss_terms(self, state):
            cuda.allocate((state.step + 1) * GIB)
            nvml.used = (state.step + 2) * GIB
            time.sleep(0.1)
            cuda.free((state.step + 1) * GIB)

    manager = plugin_loading.make_plugin_manager(installed=False)
    manager.unregister(name=MEMORY_PLUGIN)
    tracker = MemoryTracker(probes_for=lambda device: memory.probes_for("cuda", cuda=cuda, nvml=nvml),
                            interval=0.001)
    plugins.register(manager, tracker, MEMORY_PLUGIN, source="builtin")
    plugins.register(manager, GpuActivity(), "gpu-activity", source="test")
    trainer = Trainer(config(tmp_path), examples(), pm=manager, progress=False)
    result = trainer.fit()
    rows = metrics_rows(tmp_path)
    assert [r["mem_cuda_allocated_peak_gb"] for r in rows] == [1.0, 2.0]
    assert [r["mem_gpu_used_peak_gb"] for r in rows] == [2.0, 3.0]
    summary = dict(result["summary"])
    assert summary["peak CUDA allocated"] == "2.000 GiB (step 2)"
    assert summary["peak GPU used (NVML)"] == "3.000 GiB (step 2)"
    assert nvml.shutdowns == 1  # released at the end of training


def test_a_failing_probe_is_dropped_and_the_step_goes_on():
    class Flaky:
        name = "flaky"

        def begin(self):
            pass

        def sample(self):
            raise OSError("device went away")

        def end(self):
            return {}

    manager = plugin_loading.make_plugin_manager(installed=False)
    manager.unregister(name=MEMORY_PLUGIN)
    tracker = MemoryTracker(probes_for=lambda device: ([memory.RssProbe(), Flaky()], []))
    plugins.register(manager, tracker, MEMORY_PLUGIN, source="builtin")
    state = SimpleNamespace(config=TrainConfig(memory_tracking=True), device=torch.device("cpu"), step=0, total_steps=10)

    def engine_step(state):  # what the engine's step returns, counting the step as it does
        state.step += 1
        return {"step": state.step}

    metrics = manager.hook.train_step.call_extra([engine_step], {"state": state})
    assert metrics["step"] == 1 and metrics["mem_rss_peak_gb"] > 0
    assert ("memory probe failed", "flaky: OSError: device went away") in tracker.summary(state)
    state.config.memory_tracking = False
    metrics = manager.hook.train_step.call_extra([engine_step], {"state": state})
    assert not any(k.startswith("mem_") for k in metrics) and metrics["step"] == 2  # off: the current RSS only
    assert tracker.summary(state) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the real probes; faked above)")
def test_real_cuda_probes():
    probes, _ = memory.probes_for(torch.device("cuda", 0))
    sampler = memory.StepSampler(probes)
    sampler.start()
    block = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    peaks = sampler.stop()
    del block
    assert peaks["mem_cuda_allocated_peak"] >= 256 * 2**20
