"""Migrations and the chDB HTTP shim on the session's chDB path (one engine path per process)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path

import clickhouse_connect
import pytest

from infra.clickhouse import migrations
from infra.clickhouse.client import chdb_path, connect
from infra.clickhouse.migrations import available_migrations, migrate
from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
from tests.conftest import unique

pytestmark = pytest.mark.clickhouse


def test_migrations_apply_once_and_are_recorded(chdb_dsn: str) -> None:
    client = connect(chdb_dsn)
    database = unique("mig")
    applied = migrate(client, database)
    assert [m.version for m in applied] == [m.version for m in available_migrations()]
    assert migrate(client, database) == []
    client.database = database
    tables = {row[0] for row in client.query("SHOW TABLES").result_rows}
    assert {"raw_events", "sessions", "cdrs", "partners", "dead_letters", "schema_migrations"} <= tables


def test_migration_versions_are_contiguous() -> None:
    versions = [m.version for m in available_migrations()]
    assert versions == list(range(1, len(versions) + 1))


async def test_shim_serves_the_http_client_read_write_and_read_only(chdb_dsn: str) -> None:
    database = unique("shim")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    owner.command(f"CREATE TABLE {database}.t (a UInt32) ENGINE = MergeTree ORDER BY a")
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()

    def use() -> tuple[list, str, str]:
        url = f"http://ocpi:s3cret@127.0.0.1:{shim.port}"
        writer = clickhouse_connect.get_client(dsn=url, database=database, compress=False)
        writer.insert("t", [[1], [2]], column_names=["a"])
        reader = clickhouse_connect.get_client(dsn=url, database=database, compress=False, settings={"readonly": 1})
        rows = reader.query("SELECT sum(a) FROM t").result_rows
        odd = "it's a\\b/c\tü"  # quote, backslash, slash, tab, non-ASCII: parameters arrive escaped
        bound = [reader.query("SELECT {s:String}, {n:UInt32} + sum(a) FROM t", parameters={"s": odd, "n": 4})
                 .result_rows[0], writer.query("SELECT {s:String}", parameters={"s": odd}).result_rows[0][0]]
        assert bound == [(odd, 7), odd]
        with pytest.raises(Exception) as refused:
            reader.command("INSERT INTO t VALUES (3)")
        with pytest.raises(Exception) as denied:
            clickhouse_connect.get_client(dsn=f"http://ocpi:wrong@127.0.0.1:{shim.port}", compress=False)
        return rows, str(refused.value), str(denied.value)

    try:
        rows, refused, denied = await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert rows == [(3,)]
    assert "readonly" in refused.lower() or "164" in refused
    assert "516" in denied or "Authentication" in denied


def test_chdb_path_of_dsn() -> None:
    assert chdb_path("chdb:///abs/path") == Path("/abs/path")


def test_locations_rows_from_before_personal_at_count_from_their_received_at(chdb_dsn: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    [added] = [m for m in every if m.name == "locations_personal_at"]
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version < added.version])
    migrate(client, database)
    received, updated = datetime(2024, 5, 1, 8, tzinfo=UTC), datetime(2024, 4, 1, tzinfo=UTC)
    columns = ["country_code", "party_id", "location_id", "partner_id", "city", "country", "publish", "evse_count",
               "last_updated", "payload_json", "event_id", "version", "received_at"]
    client.insert(f"{database}.locations", [["NL", "TNM", "LOC1", "p1", "Utrecht", "NLD", True, 0, updated, "{}",
                                             "e1", 1, received]], column_names=columns)
    monkeypatch.undo()
    assert [m.version for m in migrate(client, database)] == [m.version for m in every if m.version >= added.version]
    assert client.query(f"SELECT received_at, personal_at FROM {database}.locations FINAL").result_rows == [
        (received, received)]
    client.command(f"DROP DATABASE {database}")



def test_a_store_another_process_holds_is_named_as_held(tmp_path: Path) -> None:
    # chDB's exception says only "Error initializing EmbeddedServer" (its lock error goes to stderr): the friendly
    # message, which tells the user to go through the running instance, never matched it.
    import subprocess
    import sys

    path = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from infra.clickhouse.client import connect; "
         f"c = connect('chdb://{path}'); c.command('SELECT 1'); print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[3])
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        probe = subprocess.run(
            [sys.executable, "-c", "from infra.clickhouse.client import connect\n"
             f"try:\n    connect('chdb://{path}')\nexcept Exception as exc:\n    print(exc)"],
            capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[3])
        assert "is held by another process" in probe.stdout, probe.stdout
    finally:
        holder.communicate(timeout=60)  # stdin closed: the holder ends
    assert holder.returncode == 0
