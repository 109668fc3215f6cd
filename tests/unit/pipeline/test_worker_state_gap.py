"""A worker whose state starts empty over a store that already holds objects says so (README, Replay): the state,
not ClickHouse, refuses a conflicting CDR, links a credit once, tells a stale update and matches a late CDR."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.settings import load_settings
from pipeline import worker
from tests.conftest import unique


class Started(Exception):
    """The start got past the state check."""


def test_an_empty_store_needs_no_restore(chdb_dsn: str) -> None:
    client = connect(chdb_dsn)
    database = unique("gap")
    migrate(client, database)
    client.database = database
    assert worker.state_gap(client) is None


def test_a_store_with_cdrs_asks_for_the_state_to_be_restored(chdb_dsn: str) -> None:
    client = connect(chdb_dsn)
    database = unique("gap")
    migrate(client, database)
    client.database = database
    # Dated now: the billing records' TTL would drop a row of 1970 (the column's default) as it is written.
    client.command("INSERT INTO cdrs (country_code, party_id, cdr_id, start_date_time, end_date_time, received_at)"
                   " VALUES ('BE', 'BEC', 'CDR1', now(), now(), now())")
    warning = worker.state_gap(client)
    assert warning is not None
    assert warning.startswith("the store holds 1 CDR, 0 session and 0 location rows")
    assert "replay --from-archive" in warning


def test_the_gap_counts_objects_not_their_versions(chdb_dsn: str) -> None:
    """A CDR written twice (a pseudonymisation rewrite, a reprocessed batch), its versions not merged yet, is one
    CDR the state does not know, not two."""
    client = connect(chdb_dsn)
    database = unique("gap")
    migrate(client, database)
    client.database = database
    for _ in range(2):
        client.command("INSERT INTO cdrs (country_code, party_id, cdr_id, start_date_time, end_date_time, "
                       "received_at) VALUES ('BE', 'BEC', 'CDR1', now(), now(), now())")
    warning = worker.state_gap(client)
    assert warning is not None
    assert warning.startswith("the store holds 1 CDR, 0 session and 0 location rows"), warning


def test_a_worker_starting_without_changelogs_logs_the_gap(monkeypatch: pytest.MonkeyPatch,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(worker, "resolve_bootstrap", lambda _settings: "127.0.0.1:1")
    monkeypatch.setattr(worker, "check_pseudonym_key", lambda _settings: None)
    monkeypatch.setattr(worker, "apply_configured_ttls", lambda _settings: None)
    monkeypatch.setattr(worker, "drop_state_without_changelog", lambda *_args: False)
    monkeypatch.setattr(worker, "sink_client", lambda _settings: object())
    monkeypatch.setattr(worker, "state_gap", lambda _client: "the store holds 3 CDR rows")
    changelogs: list[bool] = [False]
    monkeypatch.setattr(worker, "has_changelog", lambda *_args: changelogs[0])

    def stop(*_args: Any) -> None:
        raise Started

    monkeypatch.setattr(worker, "prepare_topics", stop)
    settings = load_settings({"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_CLICKHOUSE_DSN": "http://u:p@127.0.0.1:1"})
    with caplog.at_level(logging.WARNING, logger="pipeline.worker"), pytest.raises(Started):
        worker.run_worker(settings)
    assert [r.getMessage() for r in caplog.records] == ["the store holds 3 CDR rows"]

    caplog.clear()
    changelogs[0] = True  # the state is the changelogs': nothing to say
    with caplog.at_level(logging.WARNING, logger="pipeline.worker"), pytest.raises(Started):
        worker.run_worker(settings)
    assert caplog.records == []


@pytest.mark.clickhouse
def test_a_starting_worker_sets_the_configured_ttls_before_it_processes_anything(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The TTLs were set at the first sweep, which waits until the group has no backlog: a store restored from an
    archive (`replay --from-archive` into a fresh database, whose migrations set 30 days raw, 365 history and 7
    years billing) had every CDR between 7 and the configured 10 years dropped as the worker inserted it
    (ClickHouse drops the rows a TTL has expired on insert), and so on for the other classes."""
    from pipeline import retention

    client = connect(chdb_dsn)
    database = unique("ttl")
    migrate(client, database)
    settings = load_settings({"OCPI_KAFKA_BOOTSTRAP": "127.0.0.1:1", "OCPI_CLICKHOUSE_DSN": chdb_dsn,
                              "OCPI_CLICKHOUSE_DATABASE": database, "OCPI_RETENTION_BILLING_YEARS": "10",
                              "OCPI_RETENTION_RAW_DAYS": "60", "OCPI_RETENTION_HISTORY_DAYS": "730"})
    monkeypatch.setattr(worker, "resolve_bootstrap", lambda _settings: "127.0.0.1:1")
    monkeypatch.setattr(worker, "check_pseudonym_key", lambda _settings: None)

    def stop(*_args: Any) -> None:
        raise Started

    monkeypatch.setattr(worker, "drop_state_without_changelog", stop)  # the first step that leads to processing
    try:
        with pytest.raises(Started):
            worker.run_worker(settings)
        wanted = {ttl.table: ttl.expression for data_class in retention.policy(settings) for ttl in data_class.ttls}
        current = retention.current_ttls(client, database)
        assert {table: current[table] for table in wanted} == wanted
    finally:
        client.command(f"DROP DATABASE IF EXISTS {database}")
