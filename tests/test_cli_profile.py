"""`spladectl profile list|show|detect`, human and --json, run in-process on this machine."""

from __future__ import annotations

import json

import pytest
import torch

SHOW_KEYS = {"name", "device", "precision", "batch_size", "grad_accum"}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No SPLADECTL_* variable or user profile from the developer's own setup leaks into these tests."""
    import os

    for name in list(os.environ):
        if name.startswith("SPLADECTL_") and name != "SPLADECTL_PLUGINS" or name == "WORLD_SIZE":
            monkeypatch.delenv(name)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def flat(text: str) -> str:
    """Output with rich's panel borders and line wrapping removed, so messages can be matched whole."""
    return " ".join(text.replace("│", " ").split())


def ok_json(result):
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_list_human(cli):
    result = cli("profile", "list")
    assert result.exit_code == 0, result.output
    for name in ("a100", "cpu", "m4-cpu", "rtx3090", "v100"):
        assert name in result.stdout
    assert "24/12" in result.stdout  # a100's batch: mixed / 32-true


def test_list_json(cli):
    rows = ok_json(cli("profile", "list", "--json"))
    assert [row["name"] for row in rows] == ["a100", "cpu", "m4-cpu", "rtx3090", "v100"]
    assert all(row["origin"] == "builtin" and row["description"] for row in rows)


def test_show_human(cli):
    result = cli("profile", "show", "v100")
    assert result.exit_code == 0, result.output
    assert "16-mixed" in result.stdout and "match.compute_capability" in result.stdout


def test_show_json_is_the_profile_as_written(cli):
    data = ok_json(cli("profile", "show", "a100", "--json"))
    assert SHOW_KEYS <= set(data)
    assert (data["device"], data["precision"], data["batch_size"], data["grad_accum"]) == ("cuda", "bf16-mixed", 24, 1)
    assert data["match"]["gpu_name"] == "A100"


def test_show_resolve_json(cli):
    data = ok_json(cli("profile", "show", "a100", "--resolve", "--json"))
    assert SHOW_KEYS <= set(data) and isinstance(data["reasons"], list)
    if not torch.cuda.is_available():
        assert data["device"] != "cuda"
        assert data["reasons"][0].startswith("a100 asks for cuda; no CUDA device: using ")
        assert data["tf32"] is False


def test_show_resolve_human(cli):
    result = cli("profile", "show", "a100", "--resolve")
    assert result.exit_code == 0, result.output
    assert "Resolved settings of a100" in result.stdout and "effective batch" in result.stdout
    if not torch.cuda.is_available():
        assert "a100 asks for cuda; no CUDA device" in flat(result.stdout)


def test_world_size_previews_the_effective_batch_of_a_distributed_run(cli):
    data = ok_json(cli("profile", "show", "a100", "--json", "--batch-size", "3", "--grad-accum", "2",
                       "--world-size", "8"))
    assert (data["world_size"], data["sources"]["world_size"]) == (8, "flag --world-size")
    assert data["effective_batch_size"] == 3 * 2 * 8 and data["batch_size"] == 3  # batch_size stays per device
    human = cli("profile", "show", "a100", "--batch-size", "3", "--grad-accum", "2", "--world-size", "8")
    assert "effective batch: 3 per device x 2 accumulation x 8 process(es) = 48" in flat(human.stdout)


def test_override_flags_show_their_effect_and_canonical_precision(cli):
    data = ok_json(cli("profile", "show", "a100", "--json", "--precision", "fp32", "--batch-size", "3",
                       "--grad-accum", "5", "--device", "cpu"))
    assert (data["precision"], data["batch_size"], data["grad_accum"], data["device"]) == ("32-true", 3, 5, "cpu")
    assert data["sources"]["batch_size"] == "flag --batch-size"
    assert data["sources"]["precision"] == "flag --precision"


def test_env_vars_show_up_as_sources(cli):
    data = ok_json(cli("profile", "show", "cpu", "--resolve", "--json", env={"SPLADECTL_BATCH_SIZE": "5"}))
    assert (data["batch_size"], data["sources"]["batch_size"]) == (5, "env SPLADECTL_BATCH_SIZE")
    flagged = ok_json(cli("profile", "show", "cpu", "--json", "--batch-size", "6", env={"SPLADECTL_BATCH_SIZE": "5"}))
    assert flagged["batch_size"] == 6


def test_show_a_profile_file(cli, tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('extends = "v100"\nbatch_size = 10\n')
    data = ok_json(cli("profile", "show", str(path), "--json"))
    assert (data["name"], data["origin"], data["batch_size"], data["precision"]) == ("mine", "path", 10, "16-mixed")


def test_user_profiles_are_listed(cli, tmp_path):
    folder = tmp_path / "config" / "spladectl" / "profiles"
    folder.mkdir(parents=True)
    (folder / "lab.toml").write_text('extends = "cpu"\ndescription = "the lab box"\n')
    rows = ok_json(cli("profile", "list", "--json"))
    assert {"name": "lab", "origin": "user"}.items() <= next(r for r in rows if r["name"] == "lab").items()


def test_unknown_profile_lists_the_known_names(cli):
    result = cli("profile", "show", "a1000")
    assert result.exit_code == 2
    assert "unknown profile 'a1000'; known profiles: a100, cpu, m4-cpu, rtx3090, v100" in flat(result.output)
    assert "Traceback" not in result.output


def test_broken_user_profile_is_a_named_error(cli, tmp_path):
    folder = tmp_path / "config" / "spladectl" / "profiles"
    folder.mkdir(parents=True)
    (folder / "bad.toml").write_text('description = "x"\ndevice = "cpu"\nprecision = "fp32"\nbatch_size = "big"\n')
    result = cli("profile", "list")
    assert result.exit_code == 2
    assert "bad.toml: key 'batch_size': expected an integer >= 1, got string \"big\"" in flat(result.output)


def test_bad_env_value_is_a_clean_error(cli):
    result = cli("profile", "detect", env={"SPLADECTL_PRECISION": "fp8"})
    assert result.exit_code == 2
    assert "SPLADECTL_PRECISION: unknown precision 'fp8'" in flat(result.output)


def test_detect_human(cli):
    result = cli("profile", "detect")
    assert result.exit_code == 0, result.output
    assert "This machine" in result.stdout and "Profile: " in result.stdout and "score" in result.stdout


def test_detect_json(cli):
    data = ok_json(cli("profile", "detect", "--json"))
    assert {"hardware", "profile", "resolved", "reasons"} <= set(data)
    assert SHOW_KEYS <= set(data["resolved"])
    assert data["resolved"]["name"] == data["profile"]
    assert data["reasons"] and all(isinstance(line, str) for line in data["reasons"])
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert data["profile"] == "cpu"
        speedup = data["hardware"]["bf16_matmul_speedup"]
        fast = data["hardware"]["has_bf16"] and (speedup is None or speedup >= 1.2)
        expected = "bf16-mixed" if fast else "32-true"
        assert data["resolved"]["precision"] == expected


def test_detect_with_flags(cli):
    data = ok_json(cli("profile", "detect", "--json", "--precision", "bf16", "--grad-accum", "3"))
    assert data["resolved"]["grad_accum"] == 3
    assert data["resolved"]["precision"] in ("bf16-mixed", "16-mixed", "32-true")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_force_device_cuda_without_cuda_exits_2(cli):
    for command in (["profile", "detect"], ["profile", "show", "a100", "--resolve"]):
        result = cli(*command, "--force-device", "cuda")
        assert result.exit_code == 2
        assert "--force-device cuda: no CUDA device is visible to torch on this machine" in flat(result.output)
        assert "Traceback" not in result.output


def test_bad_device_flag(cli):
    result = cli("profile", "detect", "--device", "gpu")
    assert result.exit_code == 2
    assert "--device: unknown device 'gpu'; expected one of cuda, mps, cpu" in flat(result.output)


def test_profile_help(cli):
    result = cli("profile", "--help")
    assert result.exit_code == 0
    for command in ("list", "show", "detect"):
        assert command in result.stdout
