"""Shared fixtures."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


def pytest_collection_modifyitems(config, items):
    """Soak and compile tests run only when asked for (`pytest -m soak`, `-m compiles`): they take minutes."""
    selected = config.getoption("markexpr") or ""
    for marker, why in (("soak", "a soak test"), ("compiles", "compiles with torch.compile")):
        if marker in selected:
            continue
        skip = pytest.mark.skip(reason=f"{why}: run it with `pytest -m {marker}`")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def cli():
    """`cli("profile", "list", "--json", env={...})` runs the real `spladectl` app in-process and returns the result.

    build_app() registers every command module on one module-level app, so it runs once per session.
    """
    from spladectl.cli.app import build_app

    app = build_app()
    runner = CliRunner()

    def invoke(*args: str, env: dict[str, str | None] | None = None):
        return runner.invoke(app, list(args), env=env)

    return invoke


@pytest.fixture
def toy_beir(tmp_path):
    """A small BEIR directory (CRLF qrels with a header), written fresh for each test."""
    from test_data import write_toy_beir

    return write_toy_beir(tmp_path / "toy")


@pytest.fixture(autouse=True)
def _private_user_cache(tmp_path, monkeypatch):
    """Keep the ~/.cache fallback of mining caches inside each test's tmp_path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))


@pytest.fixture
def pm():
    """The plugin manager with every built-in plugin (and installed ones), as `spladectl train` builds it."""
    from spladectl.plugin_loading import load_plugins

    return load_plugins()


@pytest.fixture
def registered(pm):
    """Register plugin objects for one test and always unregister them: `registered(plugin)` returns the plugin."""
    added = []

    def add(plugin):
        pm.register(plugin)
        added.append(plugin)
        return plugin

    yield add
    for plugin in added:
        if pm.is_registered(plugin):
            pm.unregister(plugin)
