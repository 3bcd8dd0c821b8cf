"""Shared fixtures."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner


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
