"""Hardware detection: the real probe on this machine, CPU flag parsing, and the NVML failure fallbacks."""

from __future__ import annotations

import json
import sys
import types

import torch

from spladectl import hardware
from spladectl.hardware import GPU, HardwareFacts, detect, normalise_arch, parse_cpuinfo


def test_real_detection_on_this_machine():
    facts = detect()
    assert facts.torch == torch.__version__
    assert facts.cuda_available == torch.cuda.is_available()
    assert facts.mps_available == torch.backends.mps.is_available()
    assert facts.cpu_cores_logical >= 1 and facts.ram_gib > 0
    assert facts.cpu_model and facts.os and facts.arch
    assert facts.has_bf16 == any(flag in facts.cpu_flags for flag in hardware.BF16_FLAGS)
    if not facts.cuda_available:
        assert facts.gpu is None
    json.dumps(facts.to_dict())  # `profile detect --json` and `env --json` print it


def test_linux_flags_match_proc_cpuinfo():
    found = hardware._read_proc_cpuinfo()
    if found is None:  # not Linux
        return
    _, flags = found
    facts = detect()
    assert facts.has_bf16 == ("avx512_bf16" in flags or "amx_bf16" in flags or "bf16" in flags)
    assert facts.has_amx == ("amx_bf16" in flags or "amx_tile" in flags)


def test_parse_cpuinfo_x86_and_arm():
    x86 = "processor\t: 0\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: fpu avx2 avx512_bf16 amx_bf16\n"
    assert parse_cpuinfo(x86) == ("Intel(R) Xeon(R) Platinum 8480+", {"fpu", "avx2", "avx512_bf16", "amx_bf16"})
    arm = "processor\t: 0\nFeatures\t: fp asimd sve bf16\nCPU implementer\t: 0x41\n"
    assert parse_cpuinfo(arm) == (None, {"fp", "asimd", "sve", "bf16"})


def test_normalise_arch():
    assert normalise_arch("aarch64") == "arm64"
    assert normalise_arch("AMD64") == "x86_64"
    assert normalise_arch("x86_64") == "x86_64"


def test_injected_facts_need_only_what_matters():
    facts = HardwareFacts(cuda_available=True, gpus=[GPU("NVIDIA A100-PCIE-40GB", 39.4, (8, 0))])
    assert facts.gpu.capability_text == "8.0"
    assert facts.to_dict()["gpus"][0]["compute_capability"] == "8.0"
    assert HardwareFacts(gpus=[GPU("x", 8, (7, 5))]).gpu is None  # a GPU torch cannot use is not trained on


# pynvml is mocked only here, and only to make it fail: detection must fall back to torch without crashing.

def test_missing_pynvml_falls_back(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes `import pynvml` raise ImportError
    assert hardware._nvml_gpus() == ([], "pynvml is not installed")
    assert isinstance(detect(), HardwareFacts)


def test_failing_pynvml_falls_back(monkeypatch):
    class NVMLError(Exception):
        pass

    def boom():
        raise NVMLError("Driver Not Loaded")

    broken = types.SimpleNamespace(nvmlInit=boom, nvmlShutdown=lambda: None)
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert hardware._nvml_gpus() == ([], "Driver Not Loaded")
    facts = detect()
    assert facts.cuda_available == torch.cuda.is_available()


def test_pynvml_failing_mid_query_falls_back(monkeypatch):
    def boom(*args):
        raise RuntimeError("GPU is lost")

    broken = types.SimpleNamespace(nvmlInit=lambda: None, nvmlShutdown=lambda: None,
                                   nvmlSystemGetDriverVersion=boom)
    monkeypatch.setitem(sys.modules, "pynvml", broken)
    assert hardware._nvml_gpus() == ([], "GPU is lost")


def test_bf16_products_pay_off_follows_the_measured_speed_not_the_flags(monkeypatch):
    # No machine here is each kind of CPU: the flags and the measured speed-up are injected.
    def cpu(flags, speedup):
        monkeypatch.setattr(hardware, "_cpu_model_and_flags", lambda facts: ("Some CPU", set(flags)))
        monkeypatch.setattr(hardware, "bf16_matmul_speedup", lambda facts: speedup)
        hardware.bf16_products_pay_off.cache_clear()
        return hardware.bf16_products_pay_off()

    try:
        assert cpu({"avx2", "avx512f", "avx512_bf16"}, 2.1)
        assert not cpu({"avx2", "avx512f", "avx512_bf16"}, 0.55)  # bf16 flags, slow bf16 products
        assert not cpu({"avx2"}, 2.1)
        assert cpu({"amx_tile", "amx_bf16"}, 3.9)
    finally:
        hardware.bf16_products_pay_off.cache_clear()
