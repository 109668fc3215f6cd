"""`ocpi-pipeline demo`: the settings it runs its own stack with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from infra.settings import Settings
from pipeline.cli import cli
from pipeline.stack import Stack, StackError


def test_the_demo_pushes_to_its_own_receivers_whatever_the_public_url(monkeypatch: pytest.MonkeyPatch,
                                                                      tmp_path: Path) -> None:
    """The demo runs its own stack on a free port, but kept OCPI_PUBLIC_URL: its simulated CPOs pushed to
    `Stack.base_url`, the production receivers' public address (or the container's, in docker-compose), not to
    the demo's own receivers."""
    seen: list[Settings] = []

    async def fake_run_demo(settings: Settings, **_options: Any) -> None:
        seen.append(settings)
        raise StackError("stopped by the test")

    monkeypatch.setattr("pipeline.cli.services.run_demo", fake_run_demo)
    result = CliRunner().invoke(cli, ["demo", "--data-dir", str(tmp_path / "demo")],
                                env={"OCPI_PUBLIC_URL": "https://ocpi.example.com", "OCPI_HTTP_PORT": "8080"})
    assert "stopped by the test" in result.output, result.output
    stack = Stack(seen[0], http_port=40123)
    assert stack.base_url == "http://127.0.0.1:40123"
    assert stack.child_environment()["OCPI_PUBLIC_URL"] == "http://127.0.0.1:40123"
