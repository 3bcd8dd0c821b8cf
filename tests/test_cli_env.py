"""`spladectl env`: the bug-report text and its JSON."""

from __future__ import annotations

import json

import pytest


@pytest.fixture(autouse=True)
def isolated_config(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))


def test_env_human(cli):
    result = cli("env", env={"SPLADECTL_BATCH_SIZE": "4"})
    assert result.exit_code == 0, result.output
    for line in ("- spladectl version: ", "- Python version: ", "- torch version: ", "- transformers version: ",
                 "- torch.distributed backends: ", "- CPU: ", "- RAM: ", "- native bf16 / AMX: ", "- CUDA: ", "- Apple MPS: ", "- Detected profile: ",
                 "  - SPLADECTL_BATCH_SIZE=4"):
        assert line in result.stdout


def test_env_json(cli):
    result = cli("env", "--json", env={"CUDA_VISIBLE_DEVICES": "0"})
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    expected = {"spladectl", "python", "torch", "transformers", "platform", "hardware", "profile", "environment",
                "distributed_backends"}
    assert expected <= set(data)
    assert "gloo" in data["distributed_backends"]  # the CPU backend every torch build with distributed has
    assert data["profile"]["name"] in data["profile"]["resolved"]["name"]
    assert data["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_env_never_prints_secrets(cli):
    result = cli("env", "--json", env={"SPLADECTL_WANDB_API_KEY": "s3cret", "HF_TOKEN": "hf_abc"})
    data = json.loads(result.stdout)
    assert data["environment"]["SPLADECTL_WANDB_API_KEY"] == "***"
    assert "s3cret" not in result.stdout and "hf_abc" not in result.stdout


def test_env_still_reports_with_a_broken_profile(cli, tmp_path):
    folder = tmp_path / "config" / "spladectl" / "profiles"
    folder.mkdir(parents=True)
    (folder / "bad.toml").write_text("batch_size = 3\n")
    result = cli("env")
    assert result.exit_code == 0, result.output
    assert "- Profiles: error: " in result.stdout and "bad.toml: missing key 'description'" in result.stdout
