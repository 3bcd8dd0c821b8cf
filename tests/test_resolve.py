"""Detection and resolution for machines described by injected HardwareFacts (no test pretends a device ran)."""

from __future__ import annotations

import dataclasses
import doctest
import json

import pytest

import spladectl.resolve
from spladectl.errors import SpladectlError
from spladectl.hardware import GPU, HardwareFacts
from spladectl.profiles import ProfileRegistry, builtin_dir
from spladectl.resolve import pick_profile, resolve, resolve_for_machine

BF16_FLAGS = ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]


def cuda_machine(name: str, memory: float, capability: tuple[int, int]) -> HardwareFacts:
    return HardwareFacts(
        cuda_available=True, gpus=[GPU(name, memory, capability, "550.54")], cpu_cores_logical=32, ram_gib=256,
        cpu_flags=["avx2", "avx512f"],
    )


A100 = cuda_machine("NVIDIA A100-SXM4-80GB", 79.2, (8, 0))
V100 = cuda_machine("Tesla V100-SXM2-16GB", 15.8, (7, 0))
RTX3090 = cuda_machine("NVIDIA GeForce RTX 3090", 23.7, (8, 6))
H100 = cuda_machine("NVIDIA H100 80GB HBM3", 79.1, (9, 0))
RTX2070 = cuda_machine("NVIDIA GeForce RTX 2070", 7.8, (7, 5))  # an unknown 8 GB Turing card
RTX3070 = cuda_machine("NVIDIA GeForce RTX 3070", 7.8, (8, 6))  # an unknown 8 GB Ampere card
M4 = HardwareFacts(mps_available=True, os="darwin", arch="arm64", cpu_model="Apple M4", cpu_cores_logical=10,
                   has_bf16=True, cpu_flags=["bf16"])
CPU_BF16 = HardwareFacts(cpu_cores_logical=16, cpu_flags=BF16_FLAGS, has_bf16=True, has_amx=True)
CPU_PLAIN = HardwareFacts(cpu_cores_logical=4, cpu_flags=["avx2"])


@pytest.fixture(scope="module")
def registry() -> ProfileRegistry:
    registry = ProfileRegistry()
    registry.register_dir(builtin_dir(), origin="builtin")
    return registry


def run(registry, facts, name=None, env=None, **flags):
    if name is None:
        name = pick_profile(facts, registry)[0]
    return resolve(registry.get(name), facts, env=env or {}, flags=flags)


def test_module_docstring_example_holds():
    assert doctest.testmod(spladectl.resolve).failed == 0


@pytest.mark.parametrize(
    "facts, name, device, precision, batch, accum, tf32",
    [
        (A100, "a100", "cuda", "bf16-mixed", 24, 1, True),
        (V100, "v100", "cuda", "16-mixed", 14, 1, False),
        (RTX3090, "rtx3090", "cuda", "bf16-mixed", 16, 1, False),
        (M4, "m4-cpu", "cpu", "32-true", 4, 4, False),
        (CPU_BF16, "cpu", "cpu", "bf16-mixed", 8, 2, False),
        (CPU_PLAIN, "cpu", "cpu", "32-true", 8, 2, False),
    ],
)
def test_known_machines_get_their_profile(registry, facts, name, device, precision, batch, accum, tf32):
    picked, _, reasons = pick_profile(facts, registry)
    assert picked == name and reasons
    r = run(registry, facts)
    assert (r.device, r.precision, r.batch_size, r.grad_accum, r.tf32) == (device, precision, batch, accum, tf32)


def test_named_gpus_score_100_and_say_why(registry):
    name, score, reasons = pick_profile(A100, registry)
    assert (name, score) == ("a100", 100)
    assert "'NVIDIA A100-SXM4-80GB' matches a100's gpu_name 'A100'" in reasons
    assert run(registry, A100).reasons == []  # nothing on a real A100 needs changing


def test_h100_is_unknown_and_gets_the_nearest_profile(registry):
    name, score, reasons = pick_profile(H100, registry)
    assert name == "a100" and score < 100
    assert any("no profile names 'NVIDIA H100 80GB HBM3'; nearest" in line for line in reasons)
    r = run(registry, H100)
    assert (r.device, r.precision, r.batch_size, r.tf32) == ("cuda", "bf16-mixed", 24, True)


def test_unknown_8gb_turing_card_gets_v100_scaled_to_its_memory(registry):
    name, score, reasons = pick_profile(RTX2070, registry)
    assert name == "v100" and score < 100
    assert any("nearest" in line for line in reasons)
    r = run(registry, RTX2070)
    assert (r.precision, r.batch_size, r.grad_accum, r.effective_batch_size) == ("16-mixed", 7, 2, 14)
    assert r.sources["batch_size"] == "hardware"
    why = "NVIDIA GeForce RTX 2070 has 7.8 GiB, v100 is written for 16 GiB"
    assert r.changes["batch_size"] == f"{why}: batch size 14 -> 7"


def test_unknown_8gb_ampere_card_gets_rtx3090(registry):
    assert pick_profile(RTX3070, registry)[0] == "rtx3090"
    r = run(registry, RTX3070)
    assert (r.precision, r.batch_size, r.grad_accum) == ("bf16-mixed", 5, 3)


def test_explicit_batch_is_never_scaled_for_memory(registry):
    r = run(registry, RTX2070, batch_size=12)
    assert (r.batch_size, r.grad_accum, r.sources["batch_size"]) == (12, 1, "flag --batch-size")


def test_m4_detection(registry):
    name, score, reasons = pick_profile(M4, registry)
    assert (name, score) == ("m4-cpu", 100)
    assert "Apple MPS is available" in reasons


def test_cpu_detection_reports_bf16_flags(registry):
    assert "the CPU has avx512_bf16, amx_bf16" in pick_profile(CPU_BF16, registry)[2]
    assert "the CPU has none of avx512_bf16, amx_bf16" in pick_profile(CPU_PLAIN, registry)[2]


def test_a100_without_cuda_falls_back_with_one_reason_per_change(registry):
    r = run(registry, HardwareFacts(cpu_cores_logical=8), "a100")
    assert (r.device, r.precision, r.batch_size, r.tf32, r.dataloader_workers) == ("cpu", "32-true", 12, False, 4)
    assert r.reasons == [
        "a100 asks for cuda; no CUDA device: using cpu",
        (
            "a100 asks for bf16-mixed; this CPU has no native bf16 (AVX512-BF16 or AMX), where it cannot be faster"
            " than float32: using 32-true"
        ),
        "precision is 32-true: batch size 24 -> 12 (a100's batch_size_32)",
        "TF32 is a CUDA GPU feature: off on cpu",
    ]
    assert {k for k, v in r.sources.items() if v == "hardware"} == {"device", "precision", "batch_size", "tf32"}


def test_a100_on_a_bf16_cpu_keeps_bf16(registry):
    r = run(registry, CPU_BF16, "a100")
    assert (r.device, r.precision, r.batch_size) == ("cpu", "bf16-mixed", 24)


def test_a_cpu_whose_bf16_matmul_measured_slow_trains_in_float32(registry):
    # The flags say native bf16, the measurement says it multiplies at half float32's speed (an AVX512-BF16 Xeon
    # without AMX, as seen on 2026-12-03): bf16-mixed would only cost, so the cpu profile trains in 32-true.
    slow = dataclasses.replace(CPU_BF16, has_amx=False, bf16_matmul_speedup=0.55)
    r = run(registry, slow, "cpu")
    assert r.precision == "32-true" and r.sources["precision"] == "hardware"
    assert "cpu asks for bf16-mixed; this CPU multiplies bf16 at 0.55× its float32 speed (measured" in r.reasons[0]
    assert run(registry, slow, "v100").precision == "32-true"  # fp16 on a CPU goes to bf16 only where bf16 pays
    fast = dataclasses.replace(CPU_BF16, bf16_matmul_speedup=2.4)
    assert run(registry, fast, "cpu").precision == "bf16-mixed"
    assert run(registry, CPU_PLAIN, "cpu").precision == "32-true"  # no flags: never measured, never bf16


def test_bf16_matmul_speedup_is_measured_once_per_cpu(tmp_path, monkeypatch):
    from spladectl import hardware

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    facts = HardwareFacts(cpu_model="test CPU", cpu_flags=["avx512_bf16"], has_bf16=True, torch="x")
    measured = hardware.bf16_matmul_speedup(facts)
    assert measured > 0  # a real 512³ matmul in both precisions on this machine
    cache = tmp_path / "spladectl" / "bf16-matmul.json"
    (key, value), = json.loads(cache.read_text()).items()
    assert "test CPU" in key and value == measured
    cache.write_text(json.dumps({key: 7.5}))
    assert hardware.bf16_matmul_speedup(facts) == 7.5  # read back, not measured again
    cache.write_text("{not json")
    assert 0 < hardware.bf16_matmul_speedup(facts) != 7.5  # a broken cache is not believed, and is rewritten
    assert json.loads(cache.read_text())[key] > 0


def test_v100_fp16_on_cpus(registry):
    with_bf16 = run(registry, CPU_BF16, "v100")
    assert (with_bf16.precision, with_bf16.batch_size) == ("bf16-mixed", 14)
    assert "this CPU has native bf16: using bf16-mixed" in with_bf16.changes["precision"]
    without = run(registry, CPU_PLAIN, "v100")
    assert (without.precision, without.batch_size) == ("32-true", 8)


def test_cuda_profile_on_a_mac_uses_mps(registry):
    r = run(registry, M4, "a100")
    assert r.device == "mps" and r.changes["device"] == "a100 asks for cuda; no CUDA device: using mps"
    assert r.precision == "bf16-mixed"  # an M2 or newer has bf16
    older = run(registry, HardwareFacts(mps_available=True, os="darwin", arch="arm64"), "a100")
    assert older.precision == "16-mixed"


def test_bf16_on_a_pre_ampere_gpu_becomes_fp16(registry):
    r = run(registry, V100, "a100")
    assert (r.device, r.precision, r.tf32) == ("cuda", "16-mixed", False)
    assert "Tesla V100-SXM2-16GB (compute capability 7.0) has no bf16" in r.changes["precision"]
    assert "has no TF32" in r.changes["tf32"]


def test_force_device_without_the_device_is_an_error(registry):
    with pytest.raises(SpladectlError) as caught:
        run(registry, CPU_BF16, "a100", force_device="cuda")
    assert caught.value.exit_code == 2
    assert str(caught.value) == "--force-device cuda: no CUDA device is visible to torch on this machine"
    with pytest.raises(SpladectlError, match="SPLADECTL_FORCE_DEVICE mps: Apple MPS is not available"):
        run(registry, CPU_BF16, "cpu", env={"SPLADECTL_FORCE_DEVICE": "mps"})


def test_force_device_is_exact(registry):
    r = run(registry, A100, "a100", force_device="cpu", device="cuda")
    assert (r.device, r.sources["device"], r.tf32) == ("cpu", "flag --force-device", False)
    assert run(registry, A100, "a100", force_device="cuda").device == "cuda"


def test_flags_beat_env_beat_profile(registry):
    env = {"SPLADECTL_BATCH_SIZE": "5", "SPLADECTL_GRAD_ACCUM": "3", "SPLADECTL_PRECISION": "fp32"}
    r = run(registry, A100, "a100", env=env, batch_size=7)
    assert (r.batch_size, r.sources["batch_size"]) == (7, "flag --batch-size")
    assert (r.grad_accum, r.sources["grad_accum"]) == (3, "env SPLADECTL_GRAD_ACCUM")
    assert (r.precision, r.sources["precision"]) == ("32-true", "env SPLADECTL_PRECISION")
    assert (r.max_doc_length, r.sources["max_doc_length"]) == (256, "profile a100")


def test_explicit_batch_survives_the_32_true_fallback(registry):
    r = run(registry, CPU_PLAIN, "a100", env={"SPLADECTL_BATCH_SIZE": "20"})
    assert (r.precision, r.batch_size, r.sources["batch_size"]) == ("32-true", 20, "env SPLADECTL_BATCH_SIZE")


def test_choosing_32_true_takes_the_profiles_32_true_batch(registry):
    r = run(registry, A100, "a100", precision="no")
    assert (r.precision, r.batch_size, r.sources["batch_size"]) == ("32-true", 12, "profile a100 (batch_size_32)")
    assert r.reasons == []


@pytest.mark.parametrize("alias, canonical", [("fp32", "32-true"), ("no", "32-true"), ("fp16", "16-mixed"),
                                              ("bf16", "bf16-mixed"), ("16-mixed", "16-mixed")])
def test_precision_aliases(registry, alias, canonical):
    assert run(registry, A100, "a100", precision=alias).precision == canonical


@pytest.mark.parametrize(
    "env, message",
    [
        ({"SPLADECTL_PRECISION": "fp8"}, "SPLADECTL_PRECISION: unknown precision 'fp8'"),
        ({"SPLADECTL_BATCH_SIZE": "big"}, "SPLADECTL_BATCH_SIZE: expected an integer >= 1, got 'big'"),
        ({"SPLADECTL_DEVICE": "gpu"}, "SPLADECTL_DEVICE: unknown device 'gpu'"),
        ({"SPLADECTL_TF32": "maybe"}, "SPLADECTL_TF32: expected a boolean"),
    ],
)
def test_bad_environment_values_are_user_errors(registry, env, message):
    with pytest.raises(SpladectlError, match=message):
        run(registry, A100, "a100", env=env)


def test_empty_env_var_counts_as_unset(registry):
    assert run(registry, A100, "a100", env={"SPLADECTL_BATCH_SIZE": ""}).batch_size == 24


def test_world_size_multiplies_the_effective_batch(registry):
    r = run(registry, A100, "a100", env={"WORLD_SIZE": "4", "SPLADECTL_GRAD_ACCUM": "2"})
    assert (r.world_size, r.sources["world_size"], r.effective_batch_size) == (4, "env WORLD_SIZE", 24 * 2 * 4)


def test_workers_leave_a_core_for_training_unless_explicit(registry):
    r = run(registry, CPU_PLAIN, "a100")
    assert r.dataloader_workers == 3
    assert r.changes["dataloader_workers"] == (
        "4 logical CPU(s): dataloader workers 4 -> 3 (one core stays with training)"
    )
    assert run(registry, CPU_PLAIN, "a100", env={"SPLADECTL_DATALOADER_WORKERS": "8"}).dataloader_workers == 8


def test_processes_on_one_machine_share_its_cores_for_workers(registry):
    # torchrun starts LOCAL_WORLD_SIZE processes here; each gets its share of the 16 cores, one kept for training.
    r = run(registry, CPU_BF16, "a100", env={"WORLD_SIZE": "8", "LOCAL_WORLD_SIZE": "4"})
    assert r.dataloader_workers == 3
    assert r.changes["dataloader_workers"] == (
        "16 logical CPU(s) shared by 4 training processes: dataloader workers 4 -> 3 per process "
        "(one core each stays with training)"
    )
    assert run(registry, CPU_BF16, "a100", env={"LOCAL_WORLD_SIZE": "8"}).dataloader_workers == 1
    with pytest.raises(SpladectlError, match="LOCAL_WORLD_SIZE"):
        run(registry, CPU_BF16, "a100", env={"LOCAL_WORLD_SIZE": "zero"})


def test_as_dict_contract(registry):
    d = run(registry, CPU_PLAIN, "a100").as_dict()
    for key in ("name", "device", "precision", "batch_size", "grad_accum", "world_size", "tf32", "max_query_length",
                "max_doc_length", "gradient_checkpointing", "dataloader_workers", "effective_batch_size", "sources"):
        assert key in d
    assert d["name"] == "a100" and all(isinstance(line, str) for line in d["reasons"])


def test_resolve_for_machine_detects_or_takes_a_name(registry):
    detected = resolve_for_machine(facts=A100, registry=registry, env={})
    assert detected.name == "a100" and detected.sources["name"] == "detected (score 100)" and detected.detection
    named = resolve_for_machine(facts=A100, registry=registry, env={"SPLADECTL_PROFILE": "v100"})
    assert (named.name, named.sources["name"], named.precision) == ("v100", "env SPLADECTL_PROFILE", "16-mixed")
    flagged = resolve_for_machine("rtx3090", facts=A100, registry=registry, env={"SPLADECTL_PROFILE": "v100"})
    assert (flagged.name, flagged.sources["name"]) == ("rtx3090", "flag --profile")


def test_user_profiles_win_ties(registry, tmp_path):
    mine = tmp_path / "my-a100.toml"
    mine.write_text('extends = "a100"\nbatch_size = 32\n[match]\naccelerator = "cuda"\ngpu_name = "A100"\n')
    registry.register(mine, origin="user")
    try:
        assert pick_profile(A100, registry)[0] == "my-a100"
    finally:
        registry._sources.pop("my-a100")
