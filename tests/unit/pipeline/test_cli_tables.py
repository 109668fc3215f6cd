"""The tables the commands print show every value whole, whatever the terminal's width (a pipe's is 80 columns):
a value cut short with an ellipsis cannot be read, nor told apart from another that starts alike."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

import pipeline.cli.retention
from pipeline.cli import cli
from tests.conftest import unique


def invoke(args: list[str], env: dict[str, str]) -> Result:
    result = CliRunner().invoke(cli, args, env={"COLUMNS": "80", **env})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


def column(output: str, index: int) -> str:
    """A rich table's column (0-based) read top to bottom, its lines joined: a folded value reads whole in it."""
    return "".join(parts[index + 1].strip() for parts in (line.split("│") for line in output.splitlines())
                   if len(parts) >= index + 3)


def test_settings_shows_every_variable_and_value_whole() -> None:
    """At 80 columns `settings` cut names and values with an ellipsis: OCPI_RECONCILE_CDR_GRACE and
    OCPI_RECONCILE_COST_TOLERANCE both read `OCPI_RECONCILE_C…`, and OCPI_PUBLIC_URL's value `https://ocpi-gat…`."""
    url = "https://ocpi-gateway.production.example.com/partners/v1"
    output = invoke(["settings"], {"OCPI_PUBLIC_URL": url, "OCPI_TOKEN_PARTIES": "NL/EMS,BE/EMS,DE/EMS"}).output
    assert "…" not in output
    names, values = column(output, 0), column(output, 1)
    assert "OCPI_RECONCILE_CDR_GRACEOCPI_RECONCILE_SESSION_GRACE" in names, names
    assert "OCPI_RECONCILE_COST_TOLERANCEOCPI_RECONCILE_TIME_TOLERANCE" in names, names
    assert url in values and "NL/EMS,BE/EMS,DE/EMS" in values, values


@pytest.mark.clickhouse
def test_retention_report_shows_every_topic_whole(chdb_dsn: str, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A long OCPI_PIPELINE_APP_ID names long changelogs: both state changelogs read
    `ocpi-pipeline-production-…` alike, cut at the table's width."""
    from infra.clickhouse.client import connect
    from infra.clickhouse.migrations import migrate

    database = unique("tables")
    owner = connect(chdb_dsn)
    migrate(owner, database)
    monkeypatch.setattr(pipeline.cli.retention, "_topic_configs_in_effect", lambda _settings: {})
    app_id = "ocpi-pipeline-production-eu-west-1-billing-cluster-blue-green-2026-rollout-b"
    try:
        output = invoke(["retention", "report"], {
            "OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database, "OCPI_KAFKA_BOOTSTRAP": "",
            "OCPI_DATA_DIR": str(tmp_path), "OCPI_PIPELINE_APP_ID": app_id}).output
    finally:
        owner.command(f"DROP DATABASE IF EXISTS {database}")
    assert "…" not in output
    topics = column(output.split("Kafka topics")[1], 0)
    for table in ("session-state", "location-state"):
        assert f"{app_id}-{table}-changelog" in topics, topics


@pytest.mark.clickhouse
def test_partners_list_shows_every_partner_id_whole(chdb_dsn: str, tmp_path: Path) -> None:
    """The id `partners list` shows is the one every other partners command takes: it was cut with an ellipsis
    (`cpo-acme-charging-netherlands-producti…`)."""
    from infra.clickhouse.client import connect

    database = unique("tables")
    env = {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database, "OCPI_DATA_DIR": str(tmp_path)}
    partner = "cpo-acme-charging-netherlands-production-" + "x" * 23  # 64: the longest id
    try:
        invoke(["partners", "invite", partner], env)
        output = invoke(["partners", "list"], env).output
    finally:
        connect(chdb_dsn).command(f"DROP DATABASE IF EXISTS {database}")
    assert "…" not in output
    assert column(output, 0) == partner
