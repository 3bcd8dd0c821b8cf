"""Profiles: every shipped file loads with the issue's numbers; broken files give errors naming file, key and
expectation; user profiles load from a path, the XDG directory and plugins."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from spladectl.errors import ProfileError
from spladectl.hookspecs import hookimpl
from spladectl.profiles import ProfileRegistry, builtin_dir, default_registry, user_dir

SHIPPED = {"a100", "cpu", "m4-cpu", "rtx3090", "v100"}

GOOD = """\
description = "a test profile"
device = "cuda"
precision = "bf16-mixed"
batch_size = 16
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / f"{name}.toml"
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def shipped() -> ProfileRegistry:
    registry = ProfileRegistry()
    registry.register_dir(builtin_dir(), origin="builtin")
    return registry


def test_builtin_dir_is_the_checkouts_profiles_folder():
    assert builtin_dir() == Path(__file__).resolve().parents[1] / "profiles"
    assert {p.stem for p in builtin_dir().glob("*.toml")} == SHIPPED


def test_every_shipped_profile_loads(shipped):
    assert set(shipped.names()) == SHIPPED
    for profile in shipped.all():
        assert profile.origin == "builtin"
        assert profile.description
        assert profile.match is not None, f"{profile.name} cannot be detected without [match]"


@pytest.mark.parametrize(
    "name, device, precision, batch, batch_32, accum, tf32",
    [
        ("rtx3090", "cuda", "bf16-mixed", 16, 8, 1, False),
        ("a100", "cuda", "bf16-mixed", 24, 12, 1, True),
        ("v100", "cuda", "16-mixed", 14, 8, 1, False),
        ("m4-cpu", "cpu", "32-true", 4, 4, 4, False),
        ("cpu", "cpu", "bf16-mixed", 8, 8, 2, False),
    ],
)
def test_shipped_numbers_are_the_issues(shipped, name, device, precision, batch, batch_32, accum, tf32):
    p = shipped.get(name)
    assert (p.device, p.precision, p.batch_size, p.batch_size_for_32_true, p.grad_accum, p.tf32) == (
        device, precision, batch, batch_32, accum, tf32,
    )


def test_shipped_match_tables(shipped):
    assert shipped.get("a100").match.compute_capability == (8, 0)
    assert shipped.get("v100").match.memory_gib == 16
    assert shipped.get("m4-cpu").match.accelerator == "mps"
    assert "amx_bf16" in shipped.get("cpu").match.cpu_features


@pytest.mark.parametrize(
    "text, expected",
    [
        (GOOD + "batchsize = 3\n", "bad.toml: unknown key 'batchsize' (did you mean 'batch_size'?)"),
        (GOOD.replace("= 16", '= "big"'), "bad.toml: key 'batch_size': expected an integer >= 1, got string \"big\""),
        (GOOD.replace("= 16", "= true"), "bad.toml: key 'batch_size': expected an integer >= 1, got boolean true"),
        (GOOD.replace("= 16", "= 0"), "bad.toml: key 'batch_size': expected an integer >= 1, got integer 0"),
        (GOOD.replace('"cuda"', '"gpu"'), "bad.toml: key 'device': expected one of cuda, mps, cpu, got string \"gpu\""),
        (GOOD.replace('"bf16-mixed"', '"fp8"'), "bad.toml: key 'precision': expected a precision"),
        (GOOD + "tf32 = 1\n", "bad.toml: key 'tf32': expected true or false, got integer 1"),
        (GOOD.replace("batch_size = 16\n", ""), "bad.toml: missing key 'batch_size' (expected an integer >= 1)"),
        (GOOD + "[match]\ngpu = 'A100'\n", "bad.toml: unknown key 'match.gpu'"),
        (GOOD + "[match]\ncompute_capability = 8\n", "bad.toml: key 'match.compute_capability': expected a compute"),
        (GOOD + "extends = 'nowhere'\n", "bad.toml: key 'extends': expected the name of a known profile, got 'nowh"),
        ("device = \n", "bad.toml: not valid TOML"),
    ],
)
def test_broken_profile_names_file_key_and_expectation(tmp_path, text, expected):
    registry = ProfileRegistry()
    with pytest.raises(ProfileError) as caught:
        registry.register(write(tmp_path, "bad", text), origin="user")
        registry.validate()
    assert expected in str(caught.value)
    assert caught.value.exit_code == 2


def test_extends_cycle_is_named(tmp_path):
    write(tmp_path, "a", "extends = 'b'\ndescription = 'a'\n")
    write(tmp_path, "b", "extends = 'a'\n")
    registry = ProfileRegistry()
    registry.register_dir(tmp_path, origin="user")
    with pytest.raises(ProfileError, match=r"b\.toml: key 'extends': .*cycle \(a -> b -> a\)"):
        registry.validate()


def test_extends_inherits_settings_but_not_match(tmp_path, shipped):
    shipped.register(write(tmp_path, "a100-long", "extends = 'a100'\nmax_doc_length = 512\n"), origin="user")
    child = shipped.get("a100-long")
    assert (child.batch_size, child.batch_size_32, child.tf32, child.max_doc_length) == (24, 12, True, 512)
    assert child.extends == "a100" and child.origin == "user"
    assert child.match is None  # a variant is never auto-detected in place of its parent


def test_precision_aliases_become_canonical(tmp_path):
    registry = ProfileRegistry()
    for alias, canonical in [("fp16", "16-mixed"), ("bf16", "bf16-mixed"), ("fp32", "32-true"), ("no", "32-true")]:
        registry.register(write(tmp_path, alias, GOOD.replace("bf16-mixed", alias)), origin="user")
        assert registry.get(alias).precision == canonical


def test_profile_by_path(tmp_path, shipped):
    path = write(tmp_path, "mine", "extends = 'v100'\nbatch_size = 10\n")
    profile = shipped.get(str(path))
    assert (profile.name, profile.origin, profile.batch_size, profile.precision) == ("mine", "path", 10, "16-mixed")
    # a path may even be named like the profile it extends
    same = shipped.get(str(write(tmp_path, "v100", "extends = 'v100'\nbatch_size = 2\n")))
    assert same.batch_size == 2


def test_missing_path_and_unknown_name(shipped):
    with pytest.raises(ProfileError, match="nope.toml: no such profile file"):
        shipped.get("./nope.toml")
    with pytest.raises(ProfileError, match="unknown profile 'a1000'; known profiles: a100, cpu, m4-cpu, rtx3090, v100"):
        shipped.get("a1000")


def test_user_profiles_from_xdg_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = tmp_path / "spladectl" / "profiles"
    folder.mkdir(parents=True)
    write(folder, "workstation", GOOD)
    write(folder, "cpu", "extends = 'm4-cpu'\ndescription = 'my own cpu'\n")
    assert user_dir() == folder
    registry = default_registry(plugins=False)
    assert registry.origin("workstation") == "user"
    assert registry.get("cpu").description == "my own cpu"  # a user file replaces the shipped one of that name
    assert registry.origin("a100") == "builtin"


def test_user_dir_defaults_to_dot_config(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert user_dir() == tmp_path / ".config" / "spladectl" / "profiles"


def test_broken_user_profile_fails_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    folder = tmp_path / "spladectl" / "profiles"
    folder.mkdir(parents=True)
    write(folder, "oops", GOOD + "batch_size_32 = 'x'\n")
    with pytest.raises(ProfileError, match="oops.toml: key 'batch_size_32'"):
        default_registry(plugins=False)


class _ProfilePlugin:
    @hookimpl
    def register_profiles(self, register):
        register({"name": "tpu-ish", "description": "from a plugin", "device": "cpu", "precision": "fp32",
                  "batch_size": 2}, origin="spladectl-example")


def test_plugins_add_profiles_through_the_hook(tmp_path, monkeypatch):
    from spladectl.plugin_loading import load_plugins

    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    pm = load_plugins()
    pm.register(_ProfilePlugin(), name="test-profile-plugin")
    try:
        registry = default_registry()
    finally:
        pm.unregister(name="test-profile-plugin")
    assert registry.origin("tpu-ish") == "spladectl-example"
    assert registry.get("tpu-ish").precision == "32-true"


def test_a_table_needs_a_name():
    with pytest.raises(ProfileError, match="missing key 'name'"):
        ProfileRegistry().register({"description": "x"}, origin="some-plugin")
