"""README stays true: the settings table and the command list are checked against the code."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from infra.settings import documented_settings
from pipeline.cli import cli

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _commands(group: click.Group, prefix: str = "") -> list[tuple[str, click.Command]]:
    found = []
    for name, command in group.commands.items():
        found.append((f"{prefix}{name}", command))
        if isinstance(command, click.Group):
            found.extend(_commands(command, f"{prefix}{name} "))
    return found


def test_settings_table_matches_the_settings_module() -> None:
    table = README.split("<!-- settings-table:start -->")[1].split("<!-- settings-table:end -->")[0]
    rows = re.findall(r"^\| `(OCPI_[A-Z_]+)` \| (.*?) \| (.*?) \|$", table, re.MULTILINE)
    documented = [(var, default, doc) for _s, var, default, doc in documented_settings()]
    assert [(v, d.replace("\\|", "|")) for v, _df, d in rows] == [(v, doc) for v, _df, doc in documented]
    for (var, shown_default, _), (_, default, _) in zip(rows, documented, strict=True):
        assert shown_default == (f"`{default}`" if default else "*(empty)*"), var


@pytest.mark.parametrize(("name", "command"), _commands(cli))
def test_every_command_has_help_and_is_in_the_readme(name: str, command: click.Command) -> None:
    result = CliRunner().invoke(cli, [*name.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output
    assert f"ocpi-pipeline {name}" in README, f"`ocpi-pipeline {name}` is not documented in README.md"
