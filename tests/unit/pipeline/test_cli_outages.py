"""The operator's commands when something they depend on is missing, down or misconfigured: one line naming what
is wrong, a non-zero exit within seconds, never a traceback."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kafka.errors
import pytest
from click.testing import CliRunner, Result

import pipeline.stack
import pipeline.worker
from infra.kafka.embedded import free_port
from pipeline.cli import cli
from pipeline.jobs.archive import _PartFile
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
    _PartFile(tmp_path / "cdrs" / "2024-05-01", "part-x", {}).commit("part-x.avro")  # an archive to replay
    result = invoke([a.format(tmp=tmp_path) for a in args],
                    {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert_one_line_error(result, "Kafka", bootstrap)


def test_consumer_lag_against_a_kafka_that_is_down_names_the_setting(tmp_path: Path) -> None:
    """`report consumer-lag` said `report failed: KafkaConnectionError: Unable to bootstrap from [('127.0.0.1', 1,
    <AddressFamily.AF_INET: 2>)]`: neither the broker as configured nor the setting to check, as the other
    commands say them."""
    bootstrap = f"127.0.0.1:{free_port()}"  # nothing listens there
    result = invoke(["report", "consumer-lag"], {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, f"Kafka at {bootstrap}", "OCPI_KAFKA_BOOTSTRAP")


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


def test_a_worker_without_kafka_configured_says_so(tmp_path: Path) -> None:
    """No OCPI_KAFKA_BOOTSTRAP and no `dev` to borrow its broker from: the worker ended in a KafkaNotConfigured
    traceback."""
    result = invoke(["worker"], {"OCPI_KAFKA_BOOTSTRAP": "", "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "OCPI_KAFKA_BOOTSTRAP")


class WrongPassword(http.server.BaseHTTPRequestHandler):
    """A ClickHouse server that refuses our password, as a server (or a `dev` shim) does."""

    def do_GET(self) -> None:
        self._refuse()

    def do_POST(self) -> None:
        self._refuse()

    def _refuse(self) -> None:
        body = b"Code: 516. DB::Exception: Authentication failed: password is incorrect\n"
        self.send_response(401)
        self.send_header("X-ClickHouse-Exception-Code", "516")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def refusing_clickhouse() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WrongPassword)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://default:wrong@127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_worker_with_a_wrong_clickhouse_password_stops_at_once(refusing_clickhouse: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A ClickHouse that answered "password is incorrect" (or "database does not exist") was taken for one not
    answering yet: the worker logged "ClickHouse does not answer yet" every second for 120 s, then ended in a
    traceback. Only a ClickHouse that does not answer is waited for; one that refuses is a configuration error."""

    def no_wait(_seconds: float) -> None:
        raise AssertionError("the worker waited for a ClickHouse that answered")

    monkeypatch.setattr(pipeline.worker.time, "sleep", no_wait)
    result = invoke(["worker"], {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                                 "OCPI_CLICKHOUSE_DSN": refusing_clickhouse, "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "password is incorrect")


def test_a_worker_gives_up_on_a_clickhouse_that_does_not_answer_in_one_line(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """It waits for a ClickHouse that does not answer (KEY_CHECK_WAIT_S), then stopped with a traceback."""
    clock = iter(range(0, 10_000, 100))
    monkeypatch.setattr(pipeline.worker.time, "monotonic", lambda: float(next(clock)))
    monkeypatch.setattr(pipeline.worker.time, "sleep", lambda _seconds: None)
    dsn = f"http://default:x@127.0.0.1:{free_port()}"
    result = invoke(["worker"], {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "OCPI_CLICKHOUSE_DSN": dsn,
                                 "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "cannot reach ClickHouse")


@pytest.mark.clickhouse
def test_a_worker_on_a_database_not_migrated_stops_at_once(chdb_dsn: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    def no_wait(_seconds: float) -> None:
        raise AssertionError("the worker waited for a database that does not exist")

    monkeypatch.setattr(pipeline.worker.time, "sleep", no_wait)
    database = unique("unmigrated")
    result = invoke(["worker"], {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "OCPI_CLICKHOUSE_DSN": chdb_dsn,
                                 "OCPI_CLICKHOUSE_DATABASE": database, "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, database, "ocpi-pipeline migrate")


@pytest.mark.parametrize("args", [
    ["migrate"],
    ["partners", "list"],
    ["retention", "apply"],
    ["worker"],
    ["export", "{tmp}/archive", "--source", "clickhouse"],
])
def test_a_data_dir_that_cannot_be_used_is_named(args: list[str], tmp_path: Path) -> None:
    """An OCPI_DATA_DIR the process cannot create or write (here: below a file) ended every command in an OSError
    traceback (reading the run file, creating the store, the secrets or a job's directory)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke([a.format(tmp=tmp_path) for a in args],
                    {"OCPI_DATA_DIR": str(blocker / "data"), "OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}"})
    assert_one_line_error(result, str(blocker / "data"), "OCPI_DATA_DIR")


def test_dev_against_a_kafka_that_is_down_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`dev` with OCPI_KAFKA_BOOTSTRAP set to a Kafka that does not answer ended in a KafkaTimeoutError traceback
    (after the admin client's bootstrap timeout): it answered only its own errors, the store's and the embedded
    broker's with one line."""
    bootstrap = f"127.0.0.1:{free_port()}"

    def ensure_topics(*_args: Any, **_options: Any) -> list[str]:
        raise kafka.errors.KafkaTimeoutError(f"Unable to bootstrap from {bootstrap}")

    monkeypatch.setattr(pipeline.stack, "ensure_topics", ensure_topics)
    result = invoke(["dev"], {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_HTTP_PORT": str(free_port()),
                              "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "Kafka", bootstrap, "OCPI_KAFKA_BOOTSTRAP")


def test_a_worker_on_a_database_that_exists_but_was_never_migrated_says_to_migrate(chdb_dsn: str,
                                                                                   tmp_path: Path) -> None:
    """A database created by hand (or by a DBA) but not migrated: the key check's query ended in a DatabaseError
    traceback (UNKNOWN_TABLE)."""
    from infra.clickhouse.client import connect

    database = unique("empty")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    try:
        result = invoke(["worker"], {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}",
                                     "OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": database,
                                     "OCPI_DATA_DIR": str(tmp_path)})
        assert_one_line_error(result, database, "ocpi-pipeline migrate")
    finally:
        owner.command(f"DROP DATABASE IF EXISTS {database}")


@pytest.mark.parametrize("command", ["worker", "dev"])
def test_topic_configs_kafka_refuses_stop_the_start_in_one_line(command: str, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.kafka.admin import TopicConfigError

    def refused(*_args: Any, **_options: Any) -> None:
        raise TopicConfigError("Kafka refused the configs of t: POLICY_VIOLATION")

    monkeypatch.setattr(pipeline.worker, "prepare_topics", refused)
    monkeypatch.setattr(pipeline.worker, "check_pseudonym_key", lambda *_a, **_k: None)
    monkeypatch.setattr(pipeline.worker, "apply_configured_ttls", lambda *_a, **_k: None)
    monkeypatch.setattr(pipeline.worker, "drop_state_without_changelog", lambda *_a, **_k: False)
    monkeypatch.setattr(pipeline.worker, "has_changelog", lambda *_a, **_k: True)
    monkeypatch.setattr(pipeline.stack, "ensure_topics", refused)
    result = invoke([command], {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "OCPI_HTTP_PORT": str(free_port()),
                                "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "POLICY_VIOLATION")


class _FailingMidway:
    """A ClickHouse client that answers its first query, then fails as a server (or the `dev` shim) gone does."""

    def __init__(self, first: list[tuple[Any, ...]]) -> None:
        self.first: list[tuple[Any, ...]] | None = first
        self.closed = False

    def query(self, *_args: Any, **_kwargs: Any) -> Any:
        from types import SimpleNamespace

        from clickhouse_connect.driver.exceptions import OperationalError

        if self.first is None:
            raise OperationalError("Error HTTPConnectionPool(host='127.0.0.1', port=8123): Connection refused")
        rows, self.first = self.first, None
        return SimpleNamespace(result_rows=rows, column_names=["day", "count()"])

    def close(self) -> None:
        self.closed = True


def test_export_from_clickhouse_failing_midway_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`export --source clickhouse` answered a ClickHouse that did not answer at connect in one line, but one that
    failed once the export had begun (a server restarted, `dev` stopped) ended in an OperationalError traceback."""
    import datetime

    import pipeline.cli.jobs

    client = _FailingMidway([(datetime.date(2024, 5, 1), 3)])
    monkeypatch.setattr(pipeline.cli.jobs, "connect_for", lambda *_a, **_k: client)
    result = invoke(["export", str(tmp_path / "archive"), "--source", "clickhouse", "--module", "cdrs"],
                    {"OCPI_KAFKA_BOOTSTRAP": "", "OCPI_DATA_DIR": str(tmp_path / "data")})
    assert_one_line_error(result, "ClickHouse", "Connection refused", "run it again")
    assert client.closed


class _Store:
    def close(self) -> None:
        pass


def _kafka_failing_after_answering(monkeypatch: pytest.MonkeyPatch) -> None:
    import infra.kafka.admin
    import pipeline.cli.retention
    import pipeline.retention

    def failed(*_args: Any, **_kwargs: Any) -> Any:
        raise kafka.errors.KafkaTimeoutError("Timeout after waiting for 10 secs")

    monkeypatch.setattr(pipeline.cli.retention, "connect_for", lambda *_a, **_k: _Store())
    monkeypatch.setattr(pipeline.cli.retention, "reachable", lambda *_a, **_k: True)  # it accepted the connection
    monkeypatch.setattr(infra.kafka.admin, "topic_configs", failed)
    monkeypatch.setattr(infra.kafka.admin, "set_topic_configs", failed)
    monkeypatch.setattr(pipeline.retention, "report_rows", lambda *_a, **_k: [])
    monkeypatch.setattr(pipeline.retention, "leftover_rebuilds", lambda *_a, **_k: [])
    monkeypatch.setattr(pipeline.retention, "load_key", lambda *_a, **_k: b"k" * 32)
    monkeypatch.setattr(pipeline.retention, "check_key", lambda *_a, **_k: None)
    monkeypatch.setattr(pipeline.retention, "apply_ttls", lambda *_a, **_k: [])
    monkeypatch.setattr(pipeline.retention, "pseudonymise_due", lambda *_a, **_k: {})


def test_retention_report_on_a_kafka_failing_after_answering_says_so(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kafka that accepted the connection and then failed (timed out, refused the describe) ended `retention report`
    in a traceback after the ClickHouse tables; a Kafka that does not answer at all is a line of the topics' table,
    and so is this now: the rest of the report stands."""
    _kafka_failing_after_answering(monkeypatch)
    bootstrap = f"127.0.0.1:{free_port()}"
    result = invoke(["retention", "report"], {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_DATA_DIR": str(tmp_path)})
    assert result.exit_code == 0, (result.output, result.exception)
    assert "not available" in result.output and "KafkaTimeoutError" in result.output


def test_retention_apply_on_a_kafka_failing_after_answering_says_so(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _kafka_failing_after_answering(monkeypatch)
    bootstrap = f"127.0.0.1:{free_port()}"
    result = invoke(["retention", "apply"], {"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "topics not changed", "Kafka", bootstrap, "KafkaTimeoutError")


@pytest.mark.parametrize("command", ["report", "apply"])
def test_retention_on_a_clickhouse_failing_after_the_connect_says_so(command: str, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A ClickHouse that failed after the connect (a server restarted, `dev` and its shim stopped) ended `retention
    report` or `apply` in a traceback; one that did not answer at connect was already one line."""
    from clickhouse_connect.driver.exceptions import OperationalError

    import pipeline.retention

    _kafka_failing_after_answering(monkeypatch)

    def gone(*_args: Any, **_kwargs: Any) -> Any:
        raise OperationalError("Error HTTPConnectionPool(host='127.0.0.1', port=8123): Connection refused")

    monkeypatch.setattr(pipeline.retention, "report_rows", gone)
    monkeypatch.setattr(pipeline.retention, "apply_ttls", gone)
    result = invoke(["retention", command], {"OCPI_KAFKA_BOOTSTRAP": "", "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "ClickHouse", "Connection refused")


@pytest.mark.parametrize("command", ["dev", "demo"])
def test_a_migration_dev_cannot_apply_stops_it_in_one_line(command: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """`dev` (and `demo`) migrate the store at start: a migration that failed, or one recorded with another
    checksum, ended in a MigrationError traceback, where `migrate` and `partners` say it in one line."""
    from types import SimpleNamespace

    from infra.clickhouse.migrations import MigrationError

    def failed(*_args: Any, **_options: Any) -> None:
        raise MigrationError("migration 0020_dead_letters_record_key failed: Code: 497. ACCESS_DENIED")

    monkeypatch.setattr(pipeline.stack, "ensure_topics", lambda *_a, **_k: [])
    monkeypatch.setattr(pipeline.stack, "connect", lambda *_a, **_k: SimpleNamespace(close=lambda: None))
    monkeypatch.setattr(pipeline.stack, "migrate", failed)
    # demo's own embedded broker, which it stops again
    monkeypatch.setattr(pipeline.stack.EmbeddedBroker, "start", lambda broker: broker)
    monkeypatch.setattr(pipeline.stack.EmbeddedBroker, "bootstrap", "127.0.0.1:9", raising=False)
    monkeypatch.setattr(pipeline.stack.EmbeddedBroker, "stop", lambda broker: None)
    args = [command] if command == "dev" else [command, "--sessions", "1"]
    result = invoke(args, {"OCPI_KAFKA_BOOTSTRAP": f"127.0.0.1:{free_port()}", "OCPI_HTTP_PORT": str(free_port()),
                           "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "0020_dead_letters_record_key", "ACCESS_DENIED")


def test_migrate_on_a_server_refusing_its_ledger_says_so_in_one_line(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`migrate` on a ClickHouse that accepts the connection but refuses the migration ledger (a user without the
    CREATE DATABASE grant, a read-only user) ended in a DatabaseError traceback: only a failing migration's statement
    was told in one line."""
    from types import SimpleNamespace

    from clickhouse_connect.driver.exceptions import DatabaseError

    import pipeline.cli.store

    def refused(*_args: Any, **_kwargs: Any) -> None:
        raise DatabaseError("Code: 497. DB::Exception: default: Not enough privileges. (ACCESS_DENIED)")

    client = SimpleNamespace(command=refused, query=refused, insert=refused, database="")
    monkeypatch.setattr(pipeline.cli.store, "connect", lambda *_a, **_k: client)
    result = invoke(["migrate"], {"OCPI_CLICKHOUSE_DSN": "http://127.0.0.1:8123", "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "schema_migrations", "ACCESS_DENIED")


@pytest.mark.clickhouse
def test_migrate_as_a_user_that_may_not_create_says_so(chdb_dsn: str, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """`migrate` answered only a ClickHouse that did not answer at connect in one line: one that answered and then
    refused (a read-only user or one without the CREATE grant, a server restarted after the connect) ended in a
    DatabaseError traceback from its first statement."""
    import pipeline.cli.store
    from infra.clickhouse.client import connect

    # A read-only server user: the connect succeeds, CREATE DATABASE is refused.
    monkeypatch.setattr(pipeline.cli.store, "connect", lambda dsn, **kw: connect(dsn, readonly=True, **kw))
    result = invoke(["migrate"], {"OCPI_CLICKHOUSE_DSN": chdb_dsn, "OCPI_CLICKHOUSE_DATABASE": unique("ro"),
                                  "OCPI_KAFKA_BOOTSTRAP": "", "OCPI_DATA_DIR": str(tmp_path)})
    assert_one_line_error(result, "readonly")
