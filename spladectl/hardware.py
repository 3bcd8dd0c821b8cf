"""What this machine has: one dataclass of facts, and `detect()` to fill it.

Everything downstream (profile detection, resolution, `spladectl env`) reads `HardwareFacts` and nothing else, so tests
describe an A100 or an M4 by constructing the dataclass instead of pretending a device ran. `detect()` never raises
for a missing or broken probe (no NVML, no /proc): it leaves the field at its default and adds a line to `notes`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Any

# The CPU flags that change how we train; /proc/cpuinfo lists ~100 more that nobody needs in a bug report.
RELEVANT_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "avx512_fp16", "amx_fp16", "bf16")
# x86 names the native-bf16 features avx512_bf16 and amx_bf16; Arm (Graviton 3, Apple M2+) calls its one bf16.
BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
# Autocast adds casts around every matmul, so bf16 has to multiply clearly faster than float32 to win a step.
BF16_WORTH_IT = 1.2


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    compute_capability: tuple[int, int]
    driver: str | None = None

    @property
    def capability_text(self) -> str:
        return f"{self.compute_capability[0]}.{self.compute_capability[1]}"


@dataclass
class HardwareFacts:
    """The machine as spladectl sees it. Every field has a harmless default so tests set only what they need."""

    cuda_available: bool = False
    gpus: list[GPU] = field(default_factory=list)
    cuda_version: str | None = None  # the CUDA torch was built with
    mps_available: bool = False
    cpu_model: str = "unknown"
    cpu_cores_physical: int | None = None
    cpu_cores_logical: int = 1
    ram_gib: float = 0.0
    cpu_flags: list[str] = field(default_factory=list)  # the RELEVANT_CPU_FLAGS present
    has_bf16: bool = False  # native bf16 arithmetic: AVX512-BF16, AMX or Arm BF16
    has_amx: bool = False
    # How much faster this CPU multiplies bf16 matrices than float32 ones, measured (None: not measured, as on a CPU
    # without bf16 flags, or in a test that describes a machine).
    bf16_matmul_speedup: float | None = None
    torch: str = "unknown"
    python: str = platform.python_version()
    os: str = "linux"  # platform.system().lower(): "linux", "darwin", "windows"
    os_release: str = ""
    arch: str = "x86_64"  # normalised: "x86_64" or "arm64"
    notes: list[str] = field(default_factory=list)  # probes that failed or looked odd, for `spladectl env`

    @property
    def bf16_pays_off(self) -> bool:
        """Whether bf16-mixed can beat float32 on this CPU: native bf16, and where measured, a faster bf16 matmul.

        The flags alone can mislead: a CPU (or a virtual machine's view of one) with AVX512-BF16 but no AMX has been
        measured multiplying bf16 at 0.55× its float32 speed (2-core Xeon, 2026-12-03), where bf16-mixed only costs.
        """
        if not self.has_bf16:
            return False
        return self.bf16_matmul_speedup is None or self.bf16_matmul_speedup >= BF16_WORTH_IT

    @property
    def gpu(self) -> GPU | None:
        """The GPU training runs on (the first one; every rank of a multi-GPU run sees its own as the first)."""
        return self.gpus[0] if self.cuda_available and self.gpus else None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        for gpu in out["gpus"]:
            gpu["compute_capability"] = "{}.{}".format(*gpu["compute_capability"])
        return out


def detect() -> HardwareFacts:
    """Probe torch, NVML, MPS, psutil and the CPU flags of the machine this runs on."""
    import torch

    facts = HardwareFacts(
        torch=torch.__version__,
        python=platform.python_version(),
        os=platform.system().lower(),
        os_release=platform.release(),
        arch=normalise_arch(platform.machine()),
        cuda_version=torch.version.cuda,
    )
    _detect_cuda(facts, torch)
    facts.mps_available = _safe(lambda: bool(torch.backends.mps.is_available()), False)
    _detect_cpu(facts)
    return facts


def normalise_arch(machine: str) -> str:
    machine = machine.lower()
    return {"aarch64": "arm64", "amd64": "x86_64", "x64": "x86_64"}.get(machine, machine)


def _safe(probe, default):
    try:
        return probe()
    except Exception:  # a probe that fails means "not available", never a crash
        return default


# ---- GPUs ---------------------------------------------------------------------------------------------------------

def _detect_cuda(facts: HardwareFacts, torch) -> None:
    facts.cuda_available = _safe(lambda: bool(torch.cuda.is_available()), False)
    nvml_gpus, nvml_error = _nvml_gpus()
    if facts.cuda_available:
        # torch's view wins: it honours CUDA_VISIBLE_DEVICES and is what training will actually use.
        driver = nvml_gpus[0].driver if nvml_gpus else None
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts.gpus.append(
                GPU(props.name, round(props.total_memory / 2**30, 1), (props.major, props.minor), driver)
            )
        if nvml_error:
            facts.notes.append(f"NVML unavailable ({nvml_error}): GPU facts from torch, driver version unknown")
    elif nvml_gpus:
        facts.gpus = nvml_gpus
        facts.notes.append(
            f"NVML sees {len(nvml_gpus)} GPU(s) but torch {facts.torch} cannot use CUDA: "
            "install a CUDA build of torch to train on them"
        )


def _nvml_gpus() -> tuple[list[GPU], str | None]:
    """GPUs as NVML reports them, or ([], why not). NVML adds the driver version, which torch does not know."""
    try:
        import pynvml
    except ImportError:
        return [], "pynvml is not installed"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # no driver, no library, or a container without the device: all mean "no NVML"
        return [], str(exc) or type(exc).__name__
    try:
        driver = _text(pynvml.nvmlSystemGetDriverVersion())
        gpus = []
        for index in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            gpus.append(
                GPU(
                    name=_text(pynvml.nvmlDeviceGetName(handle)),
                    memory_gib=round(pynvml.nvmlDeviceGetMemoryInfo(handle).total / 2**30, 1),
                    compute_capability=tuple(pynvml.nvmlDeviceGetCudaComputeCapability(handle)),
                    driver=driver,
                )
            )
        return gpus, None
    except Exception as exc:
        return [], str(exc) or type(exc).__name__
    finally:
        _safe(pynvml.nvmlShutdown, None)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value  # older pynvml returns bytes


# ---- CPU ----------------------------------------------------------------------------------------------------------

def _detect_cpu(facts: HardwareFacts) -> None:
    try:
        import psutil

        facts.cpu_cores_physical = psutil.cpu_count(logical=False)
        facts.cpu_cores_logical = psutil.cpu_count(logical=True) or 1
        facts.ram_gib = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception as exc:
        facts.cpu_cores_logical = os.cpu_count() or 1
        facts.notes.append(f"psutil unavailable ({exc}): RAM unknown")
    _detect_cpu_arithmetic(facts)


def _detect_cpu_arithmetic(facts: HardwareFacts) -> None:
    """The CPU's model, flags and bf16 arithmetic (native, AMX, measured speed) into `facts`."""
    model, flags = _cpu_model_and_flags(facts)
    facts.cpu_model = model or platform.processor() or "unknown"
    facts.cpu_flags = [flag for flag in RELEVANT_CPU_FLAGS if flag in flags]
    facts.has_bf16 = any(flag in flags for flag in BF16_FLAGS)
    facts.has_amx = "amx_bf16" in flags or "amx_tile" in flags
    if facts.has_bf16:
        facts.bf16_matmul_speedup = _safe(lambda: bf16_matmul_speedup(facts), None)


_MEASURED: dict[str, float] = {}  # this process's measurements, by the key of the file below


def bf16_matmul_speedup(facts: HardwareFacts) -> float:
    """bf16 ÷ float32 throughput of a 512 × 512 × 512 matmul on this CPU, with torch's threads; measured once and
    kept in ~/.cache/spladectl/bf16-matmul.json for this CPU, flag set, torch and thread count (a fraction of a
    second to measure, but `detect()` runs in every command)."""
    import json

    import torch

    from spladectl.paths import user_cache_dir

    key = f"{facts.cpu_model}|{','.join(facts.cpu_flags)}|torch {facts.torch}|{torch.get_num_threads()} threads"
    path = user_cache_dir() / "bf16-matmul.json"
    try:
        known = json.loads(path.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    if isinstance(known.get(key), (int, float)):
        return float(known[key])
    # Half a second on a slow-bf16 CPU: once per process even where the file cannot be kept (a read-only home).
    if key not in _MEASURED:
        _MEASURED[key] = round(_matmul_seconds(torch, torch.float32) / _matmul_seconds(torch, torch.bfloat16), 2)
    speedup = known[key] = _MEASURED[key]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(json.dumps(known, indent=1))
        os.replace(temporary, path)
    except OSError:
        pass  # a read-only home only means measuring again next time
    return speedup


def _matmul_seconds(torch, dtype, size: int = 512, repeats: int = 7) -> float:
    import time

    a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
    for _ in range(2):  # the first calls build oneDNN's kernels
        a @ b
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        for _ in range(4):
            a @ b
        times.append(time.perf_counter() - started)
    return sorted(times)[len(times) // 2]


def _cpu_model_and_flags(facts: HardwareFacts) -> tuple[str | None, set[str]]:
    if facts.os == "linux":
        found = _read_proc_cpuinfo()
        if found is not None:
            return found
    if facts.os == "darwin":
        return _sysctl("machdep.cpu.brand_string"), _darwin_flags()
    facts.notes.append("CPU flags read through torch's cpuinfo (no /proc/cpuinfo here)")
    return None, _torch_cpu_flags()


def _read_proc_cpuinfo(path: str = "/proc/cpuinfo") -> tuple[str | None, set[str]] | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read()
    except OSError:
        return None
    return parse_cpuinfo(text)


def parse_cpuinfo(text: str) -> tuple[str | None, set[str]]:
    """(model name, flags) from /proc/cpuinfo text; x86 lists `flags`, Arm lists `Features`."""
    model, flags = None, set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip().lower()
        if key == "model name" and model is None:
            model = value.strip()
        elif key in ("flags", "features") and not flags:
            flags = set(value.split())
    return model, flags


def _sysctl(name: str) -> str | None:
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _darwin_flags() -> set[str]:
    # Apple M2 and later implement Arm's BF16 extension; M1 does not.
    if _sysctl("hw.optional.arm.FEAT_BF16") == "1":
        return {"bf16"}
    return _torch_cpu_flags()  # an Intel Mac


@functools.lru_cache(maxsize=1)
def has_amx_tiles() -> bool:
    """Whether this CPU has AMX tiles, as torch's bundled cpuinfo reports (False where it cannot tell); the CPU head
    sizes its products by it (pooling.cpu_head_layout)."""
    return "amx_tile" in _torch_cpu_flags()


@functools.lru_cache(maxsize=1)
def bf16_products_pay_off() -> bool:
    """`HardwareFacts.bf16_pays_off` of this CPU without the rest of detect() (no GPU or memory probes): native bf16
    whose matrix products are measurably faster than float32 ones (measured once and cached, as detect() does). The
    float32 CPU head screens the vocabulary with bf16 products where they are (pooling.SpladeMaxHead); on a CPU
    whose bf16 flags hide slow products, the screen would cost more than it saves."""
    import torch

    facts = HardwareFacts(torch=torch.__version__, os=platform.system().lower(),
                          arch=normalise_arch(platform.machine()))
    _detect_cpu_arithmetic(facts)
    return facts.bf16_pays_off


def _torch_cpu_flags() -> set[str]:
    """x86 flags through torch's bundled cpuinfo (private helpers, so each is optional)."""
    import torch

    probes = {
        "avx2": "_is_avx2_supported",
        "avx512f": "_is_avx512_supported",
        "avx512_bf16": "_is_avx512_bf16_supported",
        "amx_tile": "_is_amx_tile_supported",
    }
    flags = {flag for flag, probe in probes.items() if _safe(lambda p=probe: getattr(torch.cpu, p)(), False)}
    if "amx_tile" in flags:
        flags.add("amx_bf16")  # every AMX CPU so far (Sapphire Rapids on) has AMX-BF16 alongside the tiles
    return flags


if __name__ == "__main__":  # a quick look without the CLI: python -m spladectl.hardware
    import json

    json.dump(detect().to_dict(), sys.stdout, indent=2)
    print()
