"""Memory peaks during one optimizer step: process RSS, the CUDA caching allocator, the GPU through NVML, and MPS.

A *probe* reads one kind of memory. `StepSampler` runs a light background thread for the length of a step that calls
every probe's `sample()` every few milliseconds and keeps the maximum; probes whose backend tracks its own peak
(the CUDA allocator, the kernel's ru_maxrss) report it from `end()`. Values are bytes; `gib()` converts.

The backends are passed in (`torch.cuda`, `torch.mps`, the `pynvml` module), so the logic of the GPU probes can be
tested on a machine without a GPU; `probes_for(device)` picks the real ones for a run.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


class Probe(Protocol):
    """One kind of memory. Metric names are the keys of the dicts it returns (bytes)."""

    name: str

    def begin(self) -> None: ...  # the step starts: reset backend peaks

    def sample(self) -> dict[str, float]: ...  # current values (called from the sampler thread)

    def end(self) -> dict[str, float]: ...  # the step ended: peaks the backend tracked itself


def gib(value: float) -> float:
    return value / 2**30


# ------------------------------------------------------------------------------------------------ probes

class RssProbe:
    """Resident set size of this process (psutil), sampled; plus the kernel's lifetime high-water mark (ru_maxrss)."""

    name = "rss"

    def __init__(self, process: Any = None, maxrss: Callable[[], float | None] | None = None):
        if process is None:
            import psutil

            process = psutil.Process()
        self.process = process
        self.maxrss = maxrss or ru_maxrss_bytes

    def begin(self) -> None:
        pass

    def sample(self) -> dict[str, float]:
        return {"mem_rss_peak": float(self.process.memory_info().rss)}

    def end(self) -> dict[str, float]:
        high_water = self.maxrss()
        return {} if high_water is None else {"mem_rss_max": float(high_water)}


def ru_maxrss_bytes() -> float | None:
    """The process's peak RSS since it started, from getrusage (KiB on Linux, bytes on macOS); None on Windows."""
    try:
        import resource
    except ImportError:
        return None
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(value if sys.platform == "darwin" else value * 1024)


class CudaAllocatorProbe:
    """The CUDA caching allocator's own peaks for one device: reset at the start of the step, read at its end."""

    name = "cuda"

    def __init__(self, device: Any, cuda: Any = None):
        if cuda is None:
            import torch

            cuda = torch.cuda
        self.cuda, self.device = cuda, device

    def begin(self) -> None:
        self.cuda.reset_peak_memory_stats(self.device)

    def sample(self) -> dict[str, float]:
        return {}

    def end(self) -> dict[str, float]:
        return {"mem_cuda_allocated_peak": float(self.cuda.max_memory_allocated(self.device)),
                "mem_cuda_reserved_peak": float(self.cuda.max_memory_reserved(self.device))}


class NvmlProbe:
    """Memory in use on the whole GPU as the driver sees it (all processes, including the CUDA context), sampled."""

    name = "nvml"

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle

    def begin(self) -> None:
        pass

    def sample(self) -> dict[str, float]:
        return {"mem_gpu_used_peak": float(self.nvml.nvmlDeviceGetMemoryInfo(self.handle).used)}

    def end(self) -> dict[str, float]:
        return {}

    def close(self) -> None:
        try:
            self.nvml.nvmlShutdown()
        except Exception:  # shutting down twice, or a driver gone away: nothing left to release
            pass


class MpsProbe:
    """Apple MPS: memory held by tensors (current_allocated_memory) and by the Metal driver, sampled."""

    name = "mps"

    def __init__(self, mps: Any = None):
        if mps is None:
            import torch

            mps = torch.mps
        self.mps = mps

    def begin(self) -> None:
        pass

    def sample(self) -> dict[str, float]:
        return {"mem_mps_allocated_peak": float(self.mps.current_allocated_memory()),
                "mem_mps_driver_peak": float(self.mps.driver_allocated_memory())}

    def end(self) -> dict[str, float]:
        return {}


def nvml_probe(device_index: int, *, nvml: Any = None, cuda: Any = None) -> tuple[NvmlProbe | None, str | None]:
    """An NVML probe for the torch CUDA device `device_index`, or (None, why not).

    NVML numbers GPUs without regard to CUDA_VISIBLE_DEVICES, so the device is found by its PCI bus id when torch
    reports one, else by position in CUDA_VISIBLE_DEVICES, else by the same index.
    """
    try:
        if nvml is None:
            import pynvml as nvml
        nvml.nvmlInit()
    except Exception as exc:  # no driver library, no GPU, a container without NVML access
        return None, f"NVML unavailable ({type(exc).__name__}: {exc})"
    try:
        handle = None
        props = cuda.get_device_properties(device_index) if cuda is not None else None
        if props is not None and all(hasattr(props, a) for a in ("pci_domain_id", "pci_bus_id", "pci_device_id")):
            bus_id = f"{props.pci_domain_id:08X}:{props.pci_bus_id:02X}:{props.pci_device_id:02X}.0"
            handle = nvml.nvmlDeviceGetHandleByPciBusId(bus_id)
        if handle is None:
            visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
            index = int(visible[device_index]) if device_index < len(visible) and visible[device_index].isdigit() \
                else device_index
            handle = nvml.nvmlDeviceGetHandleByIndex(index)
        nvml.nvmlDeviceGetMemoryInfo(handle)  # fail here, not in the sampler thread
    except Exception as exc:
        try:
            nvml.nvmlShutdown()
        except Exception:
            pass
        return None, f"NVML cannot read device {device_index} ({type(exc).__name__}: {exc})"
    return NvmlProbe(nvml, handle), None


def probes_for(device: Any, *, cuda: Any = None, mps: Any = None, nvml: Any = None,
               rss: RssProbe | None = None) -> tuple[list[Any], list[str]]:
    """The probes for a run on `device` (a torch.device or its type string), and notes on the ones left out."""
    kind = getattr(device, "type", str(device))
    index = getattr(device, "index", None)
    probes: list[Any] = [rss or RssProbe()]
    notes: list[str] = []
    if kind == "cuda":
        if cuda is None:
            import torch

            cuda = torch.cuda
        if index is None:
            index = cuda.current_device()
        probes.append(CudaAllocatorProbe(index, cuda))
        probe, why_not = nvml_probe(index, nvml=nvml, cuda=cuda)
        if probe is not None:
            probes.append(probe)
        else:
            notes.append(why_not or "NVML unavailable")
    elif kind == "mps":
        probes.append(MpsProbe(mps))
    return probes, notes


# ------------------------------------------------------------------------------------------------ the sampler

@dataclass
class StepSampler:
    """Peak of every probe's metrics between `start()` and `stop()`, sampled every `interval` seconds in a thread."""

    probes: list[Any]
    interval: float = 0.005
    _peaks: dict[str, float] = field(default_factory=dict)
    _thread: threading.Thread | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    errors: list[str] = field(default_factory=list)

    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("StepSampler.start() called twice without stop()")
        self._peaks = {}
        for probe in self.probes:
            probe.begin()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="spladectl-memory", daemon=True)
        self._thread.start()

    def stop(self) -> dict[str, float]:
        """Stop sampling; the peaks in bytes, by metric name."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        self._sample()
        with self._lock:
            peaks = dict(self._peaks)
        for probe in self.probes:
            for key, value in probe.end().items():
                peaks[key] = max(value, peaks.get(key, 0.0))
        return peaks

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def _sample(self) -> None:
        for probe in self.probes:
            try:
                values = probe.sample()
            except Exception as exc:  # a probe that fails once is dropped, with a note; training goes on
                self.errors.append(f"{probe.name}: {type(exc).__name__}: {exc}")
                self.probes = [p for p in self.probes if p is not probe]
                continue
            with self._lock:
                for key, value in values.items():
                    if value > self._peaks.get(key, -1.0):
                        self._peaks[key] = value
