"""Profile + environment + flags + hardware -> the settings a run uses, each with its source and, if changed, a reason.

    >>> from spladectl.hardware import HardwareFacts
    >>> from spladectl.profiles import default_registry
    >>> from spladectl.resolve import resolve
    >>> a100 = default_registry(plugins=False).get("a100")
    >>> r = resolve(a100, HardwareFacts(cpu_cores_logical=8), env={}, flags={"grad_accum": 2})
    >>> r.device, r.precision, r.batch_size, r.grad_accum, r.effective_batch_size
    ('cpu', '32-true', 12, 2, 24)
    >>> r.sources["batch_size"], r.sources["grad_accum"]
    ('hardware', 'flag --grad-accum')
    >>> r.reasons[0]
    'a100 asks for cuda; no CUDA device: using cpu'

The train command calls `resolve_for_machine(profile_or_none, flags=..., env=os.environ)`, which also picks the profile
when none is named, and reads the attributes of the `Resolved` it returns (or `resolved.values`, a plain dict whose
keys are TrainConfig's field names, plus `world_size`).

Precedence, highest first: flags (keys of `SETTINGS`, plus `force_device`; None means "not given"), environment
variables (`ENV_VARS`), the profile. Then the hardware has the last word on what this machine cannot do:
  - device: cuda without CUDA falls back to mps where available, else cpu; mps without MPS to cpu. `force_device`
    never falls back: asking for a device that is not there is an error.
  - precision on cpu: 16-mixed becomes bf16-mixed with native bf16 (AVX512-BF16/AMX), else 32-true; bf16-mixed without
    native bf16 becomes 32-true. On a GPU older than compute capability 8.0 (or an Apple chip before M2) bf16-mixed
    becomes 16-mixed.
  - batch size: the profile's `batch_size_32` when the precision is 32-true; divided down (and grad_accum multiplied
    up, keeping the effective batch) on a GPU with less memory than the profile was written for.
  - tf32 is off without a CUDA GPU of compute capability 8.0 or newer.
  - dataloader workers: at most one fewer than the logical CPUs, shared among the processes of a distributed run on
    this machine (LOCAL_WORLD_SIZE, set by torchrun).
Batch size, grad_accum and workers the user gave explicitly are never adjusted; device, precision and tf32 are
capabilities, so they fall back whatever their source, and the reason names that source.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from spladectl.errors import ProfileError, SpladectlError
from spladectl.hardware import GPU, HardwareFacts
from spladectl.precision import canonical_precision
from spladectl.profiles import DEVICES, Match, Profile, ProfileRegistry

SETTINGS = (
    "device",
    "precision",
    "batch_size",
    "grad_accum",
    "world_size",
    "tf32",
    "gradient_checkpointing",
    "max_query_length",
    "max_doc_length",
    "dataloader_workers",
)
ENV_VARS = {
    "device": "SPLADECTL_DEVICE",
    "force_device": "SPLADECTL_FORCE_DEVICE",
    "precision": "SPLADECTL_PRECISION",
    "batch_size": "SPLADECTL_BATCH_SIZE",
    "grad_accum": "SPLADECTL_GRAD_ACCUM",
    "world_size": "WORLD_SIZE",  # set by torchrun for every process of a distributed run
    "tf32": "SPLADECTL_TF32",
    "gradient_checkpointing": "SPLADECTL_GRADIENT_CHECKPOINTING",
    "max_query_length": "SPLADECTL_MAX_QUERY_LENGTH",
    "max_doc_length": "SPLADECTL_MAX_DOC_LENGTH",
    "dataloader_workers": "SPLADECTL_DATALOADER_WORKERS",
}
PROFILE_ENV_VAR = "SPLADECTL_PROFILE"
_KINDS = {
    "device": "device",
    "force_device": "device",
    "precision": "precision",
    "batch_size": "positive",
    "grad_accum": "positive",
    "world_size": "positive",
    "tf32": "bool",
    "gradient_checkpointing": "bool",
    "max_query_length": "positive",
    "max_doc_length": "positive",
    "dataloader_workers": "count",
}
# A card reports a little less than its label (an "A100 40GB" shows 39.4 GiB); only a real shortfall scales batches.
_MEMORY_SLACK = 0.9


@dataclass(frozen=True)
class Resolved:
    """The settings of one run on one machine. `sources[key]` says where each came from; `changes[key]` why the
    hardware changed it (the same strings, in order, as `reasons`)."""

    name: str
    device: str
    precision: str
    batch_size: int
    grad_accum: int
    world_size: int
    tf32: bool
    gradient_checkpointing: bool
    max_query_length: int
    max_doc_length: int
    dataloader_workers: int
    sources: dict[str, str] = field(default_factory=dict)
    changes: dict[str, str] = field(default_factory=dict)
    detection: list[str] = field(default_factory=list)  # why this profile was picked, when it was detected

    @property
    def reasons(self) -> list[str]:
        return list(self.changes.values())

    @property
    def effective_batch_size(self) -> int:
        return self.batch_size * self.grad_accum * self.world_size

    @property
    def values(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in SETTINGS}

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            **self.values,
            "effective_batch_size": self.effective_batch_size,
            "sources": dict(self.sources),
            "reasons": self.reasons,
        }


def resolve(
    profile: Profile,
    facts: HardwareFacts,
    *,
    env: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> Resolved:
    """Merge flags > env > profile, then apply the hardware fallbacks.

    `env=None` reads os.environ; pass {} to ignore the environment (tests do).
    """
    env = os.environ if env is None else env
    flags = dict(flags or {})
    unknown = set(flags) - set(_KINDS)
    if unknown:
        raise ValueError(f"resolve(): unknown flag(s) {sorted(unknown)}; expected some of {sorted(_KINDS)}")

    values: dict[str, Any] = {key: getattr(profile, key) for key in SETTINGS if key != "world_size"}
    sources = {key: f"profile {profile.name}" for key in values}
    values["world_size"], sources["world_size"] = 1, "default"
    force = None
    for key in _KINDS:
        given = _given(key, env, flags)
        if given is None:
            continue
        value, source = given
        if key == "force_device":
            force = (value, source)
        else:
            values[key], sources[key] = value, source

    changes: dict[str, str] = {}
    local_processes = _parse(env.get("LOCAL_WORLD_SIZE") or 1, "positive", "env LOCAL_WORLD_SIZE")
    state = _State(profile, facts, values, sources, changes, local_processes)
    state.device(force)
    state.precision()
    state.batch_for_precision()
    state.batch_for_memory()
    state.tf32()
    state.workers()
    sources = {key: sources[key] for key in SETTINGS}
    return Resolved(name=profile.name, sources=sources, changes=changes, **values)


def resolve_for_machine(
    profile: str | None = None,
    *,
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    facts: HardwareFacts | None = None,
    registry: ProfileRegistry | None = None,
) -> Resolved:
    """One call for commands: the named profile (or a path, else $SPLADECTL_PROFILE, else the detected one),
    resolved on this machine. `sources["name"]` says how the profile was chosen."""
    from spladectl.hardware import detect
    from spladectl.profiles import default_registry

    env = os.environ if env is None else env
    facts = detect() if facts is None else facts
    registry = default_registry(env=env) if registry is None else registry
    detection: list[str] = []
    if profile:
        source = "flag --profile"
    elif env.get(PROFILE_ENV_VAR):
        profile, source = env[PROFILE_ENV_VAR], f"env {PROFILE_ENV_VAR}"
    else:
        profile, score, detection = pick_profile(facts, registry)
        source = f"detected (score {score})"
    resolved = resolve(registry.get(profile), facts, env=env, flags=flags)
    return dataclasses.replace(resolved, sources={"name": source, **resolved.sources}, detection=detection)


# ---- reading flags and environment variables ----------------------------------------------------------------------

def _given(key: str, env: Mapping[str, str], flags: Mapping[str, Any]) -> tuple[Any, str] | None:
    """(value, source) from the flag, else the environment variable, else None. An empty variable counts as unset."""
    if flags.get(key) is not None:
        source = "flag --" + key.replace("_", "-")
        return _parse(flags[key], _KINDS[key], source), source
    name = ENV_VARS[key]
    raw = env.get(name)
    if raw is None or not str(raw).strip():
        return None
    source = f"env {name}"
    return _parse(str(raw).strip(), _KINDS[key], source), source


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _parse(value: Any, kind: str, source: str) -> Any:
    where = source.split(" ", 1)[1]  # "--batch-size" or "SPLADECTL_BATCH_SIZE"
    if kind == "precision":
        return canonical_precision(value, where=where)
    if kind == "device":
        device = str(value).strip().lower()
        if device not in DEVICES:
            raise SpladectlError(f"{where}: unknown device {value!r}; expected one of {', '.join(DEVICES)}")
        return device
    if kind == "bool":
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE | _FALSE:
            return text in _TRUE
        raise SpladectlError(f"{where}: expected a boolean (1/0, true/false, yes/no, on/off), got {value!r}")
    lowest = 1 if kind == "positive" else 0
    try:
        number = int(str(value).strip()) if not isinstance(value, bool) else None
    except ValueError:
        number = None
    if number is None or number < lowest:
        raise SpladectlError(f"{where}: expected an integer >= {lowest}, got {value!r}")
    return number


# ---- the hardware pass --------------------------------------------------------------------------------------------

def _explicit(source: str) -> bool:
    return source.startswith(("flag ", "env "))


def _who(source: str, profile: Profile) -> str:
    """Who asked for a value, as reasons name it: the profile by name, else the flag or variable."""
    return profile.name if source.startswith("profile ") else source.split(" ", 1)[1]


def _cc(gpu: GPU) -> str:
    return f"{gpu.name} (compute capability {gpu.capability_text})"


@dataclass
class _State:
    """The values being resolved; each method applies one rule and records at most one reason per value changed."""

    profile: Profile
    facts: HardwareFacts
    values: dict[str, Any]
    sources: dict[str, str]
    changes: dict[str, str]
    local_processes: int = 1  # training processes on this machine, which share its cores

    def change(self, key: str, value: Any, reason: str) -> None:
        self.values[key], self.sources[key] = value, "hardware"
        self.changes[key] = reason if key not in self.changes else f"{self.changes[key]}; {reason}"

    @property
    def gpu(self) -> GPU | None:
        return self.facts.gpu if self.values["device"] == "cuda" else None

    def device(self, force: tuple[str, str] | None) -> None:
        facts = self.facts
        available = {"cuda": facts.cuda_available, "mps": facts.mps_available, "cpu": True}
        if force is not None:
            device, source = force
            if not available[device]:
                what = {"cuda": "no CUDA device is visible to torch", "mps": "Apple MPS is not available"}[device]
                raise SpladectlError(
                    f"{source.split(' ', 1)[1]} {device}: {what} on this machine",
                    hint="drop the option to let spladectl fall back, or see `spladectl env`",
                )
            self.values["device"], self.sources["device"] = device, source
            return
        wanted = self.values["device"]
        if available[wanted]:
            return
        fallback = "mps" if wanted == "cuda" and facts.mps_available else "cpu"
        missing = "no CUDA device" if wanted == "cuda" else "no MPS device"
        who = _who(self.sources["device"], self.profile)
        self.change("device", fallback, f"{who} asks for {wanted}; {missing}: using {fallback}")

    def precision(self) -> None:
        precision, device, facts = self.values["precision"], self.values["device"], self.facts
        who = f"{_who(self.sources['precision'], self.profile)} asks for {precision}"
        if device == "cpu" and precision == "16-mixed":
            # float16 autocast on a CPU is slow and needs a scaler; bf16 is the CPU's half precision
            new = "bf16-mixed" if facts.bf16_pays_off else "32-true"
            self.change("precision", new, f"{who}, which needs a GPU; this CPU {_cpu_bf16(facts)}: using {new}")
        elif device == "cpu" and precision == "bf16-mixed" and not facts.bf16_pays_off:
            self.change("precision", "32-true", f"{who}; this CPU {_cpu_bf16(facts)}: using 32-true")
        elif device == "mps" and precision == "bf16-mixed" and not facts.has_bf16:
            self.change("precision", "16-mixed", f"{who}; this Apple chip has no bf16 (M2 and newer): using 16-mixed")
        elif self.gpu and precision == "bf16-mixed" and self.gpu.compute_capability < (8, 0):
            self.change("precision", "16-mixed", f"{who}; {_cc(self.gpu)} has no bf16: using 16-mixed")

    def batch_for_precision(self) -> None:
        if self.values["precision"] != "32-true" or _explicit(self.sources["batch_size"]):
            return
        new, old = self.profile.batch_size_for_32_true, self.values["batch_size"]
        if new == old:
            return
        if self.sources["precision"] == "hardware":
            why = f"precision is 32-true: batch size {old} -> {new} ({self.profile.name}'s batch_size_32)"
            self.change("batch_size", new, why)
        else:  # the user or the profile chose 32-true, so this is the profile speaking, not the hardware
            self.values["batch_size"] = new
            self.sources["batch_size"] = f"profile {self.profile.name} (batch_size_32)"

    def batch_for_memory(self) -> None:
        gpu, match = self.gpu, self.profile.match
        if not gpu or not match or not match.memory_gib or gpu.memory_gib >= _MEMORY_SLACK * match.memory_gib:
            return
        factor = math.ceil(_MEMORY_SLACK * match.memory_gib / gpu.memory_gib)
        why = f"{gpu.name} has {gpu.memory_gib:g} GiB, {self.profile.name} is written for {match.memory_gib:g} GiB"
        batch, accum = self.values["batch_size"], self.values["grad_accum"]
        if _explicit(self.sources["batch_size"]) or batch == 1:
            return
        smaller = max(1, batch // factor)
        self.change("batch_size", smaller, f"{why}: batch size {batch} -> {smaller}")
        if not _explicit(self.sources["grad_accum"]):
            self.change(
                "grad_accum", accum * factor,
                f"{why}: grad accumulation {accum} -> {accum * factor}, keeping the effective batch near "
                f"{batch * accum}",
            )

    def tf32(self) -> None:
        if not self.values["tf32"]:
            return
        if self.values["device"] != "cuda":
            self.change("tf32", False, f"TF32 is a CUDA GPU feature: off on {self.values['device']}")
        elif self.gpu and self.gpu.compute_capability < (8, 0):
            self.change("tf32", False, f"{_cc(self.gpu)} has no TF32 (it needs 8.0 or newer): off")

    def workers(self) -> None:
        workers, cores = self.values["dataloader_workers"], self.facts.cpu_cores_logical
        processes = self.local_processes
        limit = max(0, cores // processes - 1)
        if workers > limit and not _explicit(self.sources["dataloader_workers"]):
            if processes == 1:
                why = f"{cores} logical CPU(s): dataloader workers {workers} -> {limit} (one core stays with training)"
            else:
                why = (f"{cores} logical CPU(s) shared by {processes} training processes: dataloader workers "
                       f"{workers} -> {limit} per process (one core each stays with training)")
            self.change("dataloader_workers", limit, why)


# ---- detection: which profile fits this machine -------------------------------------------------------------------

def pick_profile(facts: HardwareFacts, registry: ProfileRegistry) -> tuple[str, int, list[str]]:
    """The profile that fits `facts` best: (name, score 0-100, reasons). Only profiles with a [match] table compete.

    A CUDA GPU picks the profile whose `gpu_name` matches (100), else the nearest one, first by bf16/TF32 generation
    (compute capability 8.0 and newer, or older), then by memory; an Apple machine with MPS picks an `mps` profile;
    anything else a `cpu` one. Ties go to user and plugin profiles over shipped ones.
    """
    profiles = [p for p in registry.all() if p.match is not None]
    reasons: list[str] = []
    gpu = facts.gpu
    if gpu:
        reasons.append(f"GPU: {gpu.name}, {gpu.memory_gib:g} GiB, compute capability {gpu.capability_text}")
        if len(facts.gpus) > 1:
            reasons.append(f"{len(facts.gpus)} GPUs: the profile applies to each; a distributed launch sets world_size")
        candidates = [p for p in profiles if p.match.accelerator == "cuda"]
        if candidates:
            return _pick_gpu(gpu, candidates, reasons)
        reasons.append("no profile targets CUDA GPUs")
    elif facts.gpus:
        reasons.append(f"{facts.gpus[0].name} is present but torch cannot use CUDA: choosing as for a CPU")
    if facts.mps_available:
        candidates = _platform_candidates(profiles, "mps", facts)
        if candidates:
            reasons.append("Apple MPS is available")
            return _best(candidates, facts, reasons)
    candidates = _platform_candidates(profiles, "cpu", facts)
    if not candidates:
        raise ProfileError(
            "no profile matches this machine (none has [match] accelerator = \"cpu\")",
            hint="name one with --profile, or restore the shipped profiles",
        )
    reasons.append("no usable CUDA GPU" + ("" if facts.mps_available else " and no Apple MPS") + ": a CPU profile")
    return _best(candidates, facts, reasons)


def _rank(profile: Profile, score: float) -> tuple:
    return (-score, profile.origin == "builtin", profile.name)


def _pick_gpu(gpu: GPU, candidates: list[Profile], reasons: list[str]) -> tuple[str, int, list[str]]:
    named = [p for p in candidates if p.match.gpu_name and re.search(p.match.gpu_name, gpu.name, re.IGNORECASE)]
    if named:
        best = min(named, key=lambda p: _rank(p, 100))
        reasons.append(f"{gpu.name!r} matches {best.name}'s gpu_name {best.match.gpu_name!r}")
        tuned = best.match.memory_gib
        if tuned and gpu.memory_gib < _MEMORY_SLACK * tuned:
            reasons.append(f"it has less memory than {best.name} is written for ({tuned:g} GiB): batches scale down")
        return best.name, 100, reasons

    def closeness(p: Profile) -> float:
        # a generation gap costs as much as a factor of four in memory
        return 70 - 30 * _generation_gap(gpu, p.match) - 15 * _memory_gap(gpu, p.match)

    best = min(candidates, key=lambda p: _rank(p, closeness(p)))
    score = int(max(1, min(99, round(closeness(best)))))
    cc = _capability(best.match)
    reasons.append(
        f"no profile names {gpu.name!r}; nearest by compute capability, then memory: {best.name} "
        f"(written for {cc or 'any capability'}, {_gib(best.match.memory_gib)})"
    )
    return best.name, score, reasons


def _generation_gap(gpu: GPU, match: Match) -> int:
    """1 when the profile and the GPU differ in having bf16 and TF32 (compute capability 8.0), since that changes
    precision; within a generation the exact capability matters much less than memory."""
    if match.compute_capability is None:
        return 1
    return int((gpu.compute_capability >= (8, 0)) != (match.compute_capability >= (8, 0)))


def _memory_gap(gpu: GPU, match: Match) -> float:
    if not match.memory_gib or gpu.memory_gib <= 0:
        return 2.0
    return abs(math.log2(gpu.memory_gib / match.memory_gib))


def _capability(match: Match) -> str | None:
    return "compute capability {}.{}".format(*match.compute_capability) if match.compute_capability else None


def _gib(memory: float | None) -> str:
    return f"{memory:g} GiB" if memory else "any memory"


def _platform_candidates(profiles: list[Profile], accelerator: str, facts: HardwareFacts) -> list[Profile]:
    return [
        p for p in profiles
        if p.match.accelerator == accelerator
        and p.match.os in (None, facts.os)
        and p.match.arch in (None, facts.arch)
    ]


def _best(candidates: list[Profile], facts: HardwareFacts, reasons: list[str]) -> tuple[str, int, list[str]]:
    def score(p: Profile) -> int:
        m = p.match
        features = set(m.cpu_features) & set(facts.cpu_flags)
        return 80 + 10 * (m.os is not None) + 10 * (m.arch is not None) + 10 * bool(features)

    best = min(candidates, key=lambda p: _rank(p, score(p)))
    m = best.match
    if m.os or m.arch:
        reasons.append(f"{best.name} is written for {' '.join(filter(None, (m.os, m.arch)))}, which this machine is")
    present = [f for f in m.cpu_features if f in facts.cpu_flags]
    if present:
        reasons.append(f"the CPU has {', '.join(present)}")
    elif m.cpu_features:
        reasons.append(f"the CPU has none of {', '.join(m.cpu_features)}")
    return best.name, min(100, score(best)), reasons


def _cpu_bf16(facts: HardwareFacts) -> str:
    """What this CPU does with bf16, in the words of a resolution message."""
    if not facts.has_bf16:
        return "has no native bf16 (AVX512-BF16 or AMX), where it cannot be faster than float32"
    if not facts.bf16_pays_off:
        return (f"multiplies bf16 at {facts.bf16_matmul_speedup:g}× its float32 speed (measured; "
                "`spladectl env` shows it), where bf16 cannot pay")
    return "has native bf16"
