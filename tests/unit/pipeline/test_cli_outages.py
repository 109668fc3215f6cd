"""The operator's commands when something they depend on is missing, down or misconfigured: one line naming what
is wrong, a non-zero exit within seconds, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from infra.kafka.embedded import free_port
from pipeline.cli import cli
from tests.conftest import unique


def invoke(args: list[str], env: dict[str, str]) -> Result:
    return CliRunner().invoke(cli, args, env=env)


def assert_one_line_error(result: Result, *words: str) -> None:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a traceback
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: "), result.output
    for word in words:
        assert word in error, error


@pytest.mark.parametrize("args", [
    ["export", "{tmp}/archive"],
    ["replay", "--dry-run"],
    ["replay", "--module", "cdrs"],
    ["replay", "--rebuild", "--dry-run"],
    ["replay", "--from-archive", "{tmp}"],
])
def test_a_job_against_a_kafka_that_is_down_says_so(args: list[str], tmp_path: Path) -> None:
    """export, replay and replay --rebuild ended in a KafkaConnectionError traceback when the configured Kafka did
    not answer: the jobs' error handler let aiokafka's errors through."""
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = invoke([a.format(tmp=tmp_path) for a in args],
                    {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert_one_line_error(result, "Kafka", bootstrap)


@pytest.mark.clickhouse
@pytest.mark.parametrize("args", [
    ["retention", "report"],
    ["retention", "apply"],
    ["export", "{tmp}/archive", "--source", "clickhouse"],
])
def test_a_command_on_a_database_not_migrated_says_to_migrate(args: list[str], chdb_dsn: str, tmp_path: Path) -> None:
    """On an embedded store whose database `migrate` had not created yet, retention report/apply and export
    --source clickhouse ended in a DatabaseError traceback (UNKNOWN_DATABASE): selecting the database of a chDB
    client raised outside ClickHouseUnavailable, which the commands answer with one line."""
    database = unique("unmigrated")
    result = invoke([a.format(tmp=tmp_path) for a in args],
                    {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database,
                     "OCPI_KAFKA_BOOTSTRAP": "", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert_one_line_error(result, database, "ocpi-pipeline migrate")
