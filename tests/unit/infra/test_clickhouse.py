"""Migrations and the chDB HTTP shim on the session's chDB path (one engine path per process)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import clickhouse_connect
import pytest
from clickhouse_connect.driver.client import Client

from infra.clickhouse import migrations
from infra.clickhouse.client import ClickHouseUnavailable, chdb_path, connect, insert_first
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


async def test_a_read_only_request_to_the_shim_writes_no_file(chdb_dsn: str, tmp_path: Path) -> None:
    """`query` asks with readonly=1 and README says the endpoint enforces it; but ClickHouse's readonly does not
    cover INTO OUTFILE, which chDB carries out in the process holding the store (`dev`): a "read-only" query wrote
    files wherever that process may (APPEND adds to an existing one)."""
    connect(chdb_dsn)  # this process holds the engine, as `dev` does
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()
    target = tmp_path / "written.tsv"
    statements = [f"SELECT 1 INTO OUTFILE '{target}'", f"SELECT 1 INTO /* c */ OutFile '{target}' FORMAT CSV",
                  f"SELECT 'x' INTO OUTFILE '{target}' APPEND"]

    def use() -> list[str]:
        reader = connect(shim.dsn, readonly=True, compress=False)
        refusals = []
        for sql in statements:
            with pytest.raises(Exception) as refused:
                reader.query(sql)
            refusals.append(str(refused.value))
        return refusals

    try:
        refusals = await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert not target.exists()
    assert all("164" in refusal for refusal in refusals), refusals


async def test_an_insert_through_the_shim_waits_in_the_store_not_the_system_temp_dir(
        chdb_dsn: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """chDB reads an insert's rows (personal data in clear) from a file: it was written to the system's temp
    directory, where one a process killed mid-insert left stayed. It lives with the store now, and the next engine
    on the path removes what a dead process left (not what a live one is writing)."""
    import tempfile

    database = unique("shimf")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    owner.command(f"CREATE TABLE {database}.t (a UInt32) ENGINE = MergeTree ORDER BY a")
    system_temp = tmp_path / "system-temp"
    system_temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_temp))
    engine = ChdbEngine(chdb_path(chdb_dsn))
    infiles: list[str] = []
    real_connection = engine.connection

    class Recording:
        def __init__(self, conn: object) -> None:
            self.conn = conn

        def query(self, sql: str, *args: object, **kwargs: object) -> object:
            if " INFILE " in sql:
                infiles.append(sql.split("INFILE '")[1].split("'")[0])
                assert Path(infiles[-1]).exists()
            return self.conn.query(sql, *args, **kwargs)  # type: ignore[attr-defined]

    monkeypatch.setattr(engine, "connection", lambda readonly: Recording(real_connection(readonly)))
    shim = await ClickHouseShim(engine, "s3cret").start()
    try:
        def use() -> None:
            writer = connect(shim.dsn, compress=False)
            writer.database = database
            writer.insert("t", [[1], [2]], column_names=["a"])

        await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert owner.query(f"SELECT sum(a) FROM {database}.t").result_rows == [(3,)]
    assert len(infiles) == 1 and Path(infiles[0]).parent == engine.inserts and not Path(infiles[0]).exists()
    assert engine.inserts.is_relative_to(chdb_path(chdb_dsn)) and engine.inserts.stat().st_mode & 0o077 == 0
    assert list(system_temp.iterdir()) == []
    dead = 4_194_304 + 1  # above Linux's pid_max ceiling: no process has it
    (engine.inserts / f"{dead}-left.bin").write_bytes(b"1\n")
    (engine.inserts / f"{os.getpid()}-writing.bin").write_bytes(b"1\n")
    ChdbEngine(chdb_path(chdb_dsn))
    assert sorted(p.name for p in engine.inserts.iterdir()) == [f"{os.getpid()}-writing.bin"]
    (engine.inserts / f"{os.getpid()}-writing.bin").unlink()


async def test_several_statements_are_told_apart_through_the_shim_too(chdb_dsn: str) -> None:
    """`query` asks ClickHouse's parser whether its SQL holds several statements (chDB would run them all and mix
    their rows), on the read-only connection it queries with: also through the shim of a running `dev`."""
    from infra.clickhouse.client import several_statements

    connect(chdb_dsn)
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()

    def use() -> list[bool]:
        reader = connect(shim.dsn, readonly=True, compress=False)
        return [several_statements(reader, sql) for sql in ("SELECT 1; SELECT 2", "SELECT 1;", "SELECT ';'",
                                                              "SELEC 1")]

    try:
        assert await asyncio.to_thread(use) == [True, False, False, False]
    finally:
        await shim.stop()


@pytest.mark.parametrize("compress", ["lz4", "zstd", "gzip", False])
async def test_a_compressed_insert_of_several_blocks_reaches_the_store_whole(chdb_dsn: str, compress: str) -> None:
    """clickhouse-connect compresses each block of an insert (1-2 MB of data) as a frame of its own: the shim
    decompressed the first frame only, answered 200, and the rows of every later block were lost."""
    database = unique("shimz")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    owner.command(f"CREATE TABLE {database}.t (a UInt32, s String) ENGINE = MergeTree ORDER BY a")
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()
    rows = [[i, "x" * 100_000] for i in range(60)]  # 6 MB: several blocks

    def use() -> None:
        writer = clickhouse_connect.get_client(dsn=shim.dsn, database=database, compress=compress,
                                               autogenerate_session_id=False)
        writer.insert("t", rows, column_names=["a", "s"])

    try:
        await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert owner.query(f"SELECT count(), sum(a) FROM {database}.t").result_rows == [(60, sum(range(60)))]


async def test_an_insert_whose_values_hold_the_word_format_runs_whole_through_the_shim(chdb_dsn: str) -> None:
    """An INSERT ... VALUES reaches the shim as the request body (clickhouse-connect's `command`), which the shim
    read as a data insert's head up to the first `FORMAT <word>` anywhere in it: a credentials claim of a partner
    whose id ends in `format` (its deduplication token `credentials handshake acme-format 3fa9...`) was cut there,
    run as an insert of the rest in format `3fa9...`, and the handshake failed on the embedded store."""
    database = unique("shimf")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    owner.command(f"CREATE TABLE {database}.claims (subject String, value String, at DateTime64(6, 'UTC')) "
                  "ENGINE = MergeTree ORDER BY subject SETTINGS non_replicated_deduplication_window = 100")
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()

    def use() -> object:
        writer = connect(shim.dsn, database=database, compress=False)
        return insert_first(writer, "claims (subject, value, at)", "%(subject)s, %(value)s, now64(6, 'UTC')",
                            token="credentials handshake acme-format 3fa9c0de",
                            in_force="SELECT value FROM claims WHERE subject = %(subject)s ORDER BY at LIMIT 1",
                            parameters={"subject": "acme-format", "value": "see format x"})

    try:
        assert await asyncio.to_thread(use) == "see format x"
    finally:
        await shim.stop()
    assert owner.query(f"SELECT subject, value FROM {database}.claims").result_rows == [("acme-format", "see format x")]


def test_the_first_insert_with_a_token_wins_and_every_inserter_reads_it_back(chdb_dsn: str) -> None:
    """`insert_first`: a later insert with the same token is dropped (the table keeps a deduplication window) and
    reads back the first one's value; another token inserts. Values are bound, quotes and `%` included."""
    database = unique("first")
    client = connect(chdb_dsn)
    client.command(f"CREATE DATABASE {database}")
    client.command(f"CREATE TABLE {database}.claims (subject String, value String, at DateTime64(6, 'UTC')) "
                   "ENGINE = MergeTree ORDER BY subject SETTINGS non_replicated_deduplication_window = 100")

    def first(subject: str, value: str) -> object:
        return insert_first(client, f"{database}.claims (subject, value, at)",
                            "%(subject)s, %(value)s, now64(6, 'UTC')", token=f"claim {subject}",
                            in_force=f"SELECT value FROM {database}.claims WHERE subject = %(subject)s "
                                     "ORDER BY at, value LIMIT 1",
                            parameters={"subject": subject, "value": value})

    assert first("a", "it's 100% mine") == "it's 100% mine"
    assert first("a", "mine") == "it's 100% mine"
    assert first("b", "mine") == "mine"
    assert client.query(f"SELECT subject, value FROM {database}.claims ORDER BY subject").result_rows == [
        ("a", "it's 100% mine"), ("b", "mine")]


def test_the_first_insert_is_synchronous_where_a_server_buffers_inserts() -> None:
    """A server whose profile sets async_insert = 1 would answer the insert before its row can be read (chDB
    inserts synchronously either way, so this looks at what is sent)."""
    sent: list[dict[str, object]] = []

    class Client:
        def command(self, sql: str, parameters: dict[str, object], settings: dict[str, object]) -> None:
            sent.append(settings)

        def query(self, sql: str, parameters: dict[str, object] | None) -> object:
            return type("Result", (), {"result_rows": [("v",)]})()

    assert insert_first(Client(), "t (v)", "%(v)s", token="k", in_force="SELECT v FROM t",  # type: ignore[arg-type]
                        parameters={"v": "v"}) == "v"
    assert sent == [{"async_insert": 0}]


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



def test_raw_events_from_before_inserted_at_take_the_time_they_are_read(chdb_dsn: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # docs/upgrading.md, "Data written by earlier versions": an event stored before 0014 has no insert time, and
    # ClickHouse fills the column's default (now64) when it reads the row (or merges its part), so the health report's
    # ingestion lag counts such an event as late as it is old.
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    [added] = [m for m in every if m.name == "rejections_and_lag"]
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version < added.version])
    migrate(client, database)
    received = datetime.now(UTC) - timedelta(hours=1)  # within the raw TTL, which drops older rows as inserted
    client.insert(f"{database}.raw_events", [["e1", received]], column_names=["event_id", "received_at"])
    monkeypatch.undo()
    migrate(client, database)
    before = datetime.now(UTC)
    [(inserted,)] = client.query(f"SELECT inserted_at FROM {database}.raw_events").result_rows
    assert inserted >= before
    client.command(f"DROP DATABASE {database}")


# A CDR row as the code before the billing migration wrote it (projection.cdr_row at d2cbbb8: the columns of 0002).
_CDR_COLUMNS = ["country_code", "party_id", "cdr_id", "partner_id", "start_date_time", "end_date_time", "session_id",
                "auth_method", "authorization_reference", "token_uid", "token_type", "contract_id", "location_id",
                "evse_uid", "connector_id", "currency", "total_energy", "total_time", "total_parking_time",
                "total_cost_excl_vat", "total_cost_incl_vat", "credit", "credit_reference_id", "last_updated",
                "payload_json", "event_id", "version"]


# Yesterday 10:00 UTC, not a fixed date: the rows above give no received_at, which defaults to last_updated (0009),
# and the billing TTL counts from it: CDRs dated 2026-11-25 would be deleted by it from 2033-11-25 on.
_CDR_END = (datetime.now(UTC) - timedelta(days=1)).replace(hour=10, minute=0, second=0, microsecond=0)


def _cdr(cdr_id: str, energy: str, excl: str, incl: str, *, credit: bool = False, credited: str | None = None,
         end: datetime = _CDR_END, payload: str = "{}") -> list[object]:
    from decimal import Decimal

    return ["NL", "TNM", cdr_id, "p1", end, end, None, "WHITELIST", None, "U1", "RFID", "C1", "LOC1", "E1", "1", "EUR",
            Decimal(energy), Decimal("1"), None, Decimal(excl), Decimal(incl), credit, credited, end, payload,
            f"e-{cdr_id}", 1]


def test_cdrs_stored_before_the_billing_migration_are_billed_after_the_upgrade(chdb_dsn: str,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    # billing_lines is filled by a materialized view on inserts into cdrs (0012): CDRs the worker stored before
    # 0012 never passed it, and migrating added no line for them. The revenue report, billing_daily and the
    # billing dashboard left them out (until pseudonymisation rewrote the CDR rows, months later).
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    [billing] = [m for m in every if m.name == "billing"]
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= 5])
    migrate(client, database)
    client.insert(f"{database}.cdrs", [_cdr("CDR1", "10.5", "5.25", "6.30"),
                                       _cdr("CDR2", "2", "1.00", "1.20"),
                                       _cdr("CR2", "2", "-1.00", "-1.20", credit=True, credited="CDR2")],
                  column_names=_CDR_COLUMNS)
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= billing.version])
    migrate(client, database)
    client.insert(f"{database}.cdrs", [_cdr("CDR3", "1", "0.50", "0.60")], column_names=_CDR_COLUMNS)  # after 0012
    monkeypatch.undo()
    migrate(client, database)
    assert migrate(client, database) == []

    lines = client.query(f"SELECT cdr_id, credit, energy_kwh, cost_excl_vat, cost_incl_vat FROM "
                         f"{database}.billing_lines FINAL ORDER BY cdr_id").result_rows
    assert [(cdr_id, credit, str(kwh), str(excl), str(incl)) for cdr_id, credit, kwh, excl, incl in lines] == [
        ("CDR1", False, "10.5000", "5.2500", "6.3000"), ("CDR2", False, "2.0000", "1.0000", "1.2000"),
        ("CDR3", False, "1.0000", "0.5000", "0.6000"), ("CR2", True, "-2.0000", "-1.0000", "-1.2000")]
    assert client.query(f"SELECT count() FROM {database}.billing_lines").result_rows == [(4,)]  # no line twice
    totals = client.query(f"SELECT sum(energy_kwh), sum(cost_excl_vat) FROM {database}.billing_daily").result_rows
    assert [(str(kwh), str(excl)) for kwh, excl in totals] == [("11.5000", "5.7500")]
    client.command(f"DROP DATABASE {database}")



def test_a_cdr_stored_before_0012_whose_key_joined_with_slashes_another_line_has_is_billed_after_the_upgrade(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 0022 wrote the line of every CDR stored before 0012 that had none, looking the lines up by `CC/PID/ID` joined
    # with `/`, which a CiString may hold (0024 says why for billable_lines): NL/T's CDR M/D (stored before 0012)
    # and NL/T/M's CDR D (billed since) are both `NL/T/M/D`, so the first was taken for billed and left out of
    # every billing total for good (nothing rewrites a CDR pseudonymised before 0012).
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    [billing] = [m for m in every if m.name == "billing"]

    def of(party_id: str, row: list[object]) -> list[object]:
        return [row[0], party_id, *row[2:]]

    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= 5])
    migrate(client, database)
    client.insert(f"{database}.cdrs", [of("T", _cdr("M/D", "10", "5.00", "6.00"))], column_names=_CDR_COLUMNS)
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= billing.version])
    migrate(client, database)
    client.insert(f"{database}.cdrs", [of("T/M", _cdr("D", "2", "1.00", "1.20"))], column_names=_CDR_COLUMNS)
    monkeypatch.undo()
    migrate(client, database)
    assert migrate(client, database) == []

    assert client.query(f"SELECT party_id, cdr_id, energy_kwh FROM {database}.billable_lines ORDER BY party_id"
                        ).result_rows == [("T", "M/D", Decimal("10")), ("T/M", "D", Decimal("2"))]
    assert client.query(f"SELECT count() FROM {database}.billing_lines").result_rows == [(2,)]  # no line twice
    client.command(f"DROP DATABASE {database}")


def test_home_charging_compensation_cdrs_stored_before_0027_are_billed_apart_after_the_upgrade(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The flag was only inside payload_json: billing counted a compensation CDR (and its credit) as charging. After
    # 0027 the rows stored before read it from their payload, their billing lines have it, and a row an earlier
    # worker inserts without the column (running on while 0027 migrates) gets it too.
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= 26])
    migrate(client, database)
    home, credit_of_home = '{"id": "H1", "home_charging_compensation": true}', '{"home_charging_compensation":true}'
    charging = '{"home_charging_compensation": false}'
    client.insert(f"{database}.cdrs", [_cdr("C1", "10", "5.00", "6.00", payload=charging),
                                       _cdr("H1", "4", "1.00", "1.20", payload=home),
                                       _cdr("HC1", "4", "-1.00", "-1.20", credit=True, credited="H1",
                                            payload=credit_of_home)],
                  column_names=_CDR_COLUMNS)
    # Up to 0028: a rerun of 0027 (below) can only happen before 0029 adds a column its INSERT does not name.
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= 28])
    assert [m.version for m in migrate(client, database)] == [27, 28]
    [(lines,)] = client.query(f"SELECT count() FROM {database}.billing_lines").result_rows
    client.insert(f"{database}.cdrs", [_cdr("H2", "3", "0.90", "1.00", payload=home)], column_names=_CDR_COLUMNS)
    [compensation] = [m for m in every if m.version == 27]
    for statement in compensation.statements():  # a rerun from the first statement writes no line again
        migrations._run_in(client, database, statement)
    assert client.query(f"SELECT count() FROM {database}.billing_lines").result_rows == [(lines + 1,)]

    assert client.query(f"SELECT cdr_id, home_charging_compensation FROM {database}.cdrs FINAL ORDER BY cdr_id"
                        ).result_rows == [("C1", False), ("H1", True), ("H2", True), ("HC1", True)]
    assert client.query(f"SELECT cdr_id, home_charging_compensation FROM {database}.billing_lines FINAL "
                        "ORDER BY cdr_id").result_rows == [("C1", False), ("H1", True), ("H2", True), ("HC1", True)]
    daily = client.query(f"SELECT home_charging_compensation, cdrs, credit_cdrs, energy_kwh, cost_excl_vat "
                         f"FROM {database}.billing_daily ORDER BY home_charging_compensation").result_rows
    assert [(flag, n, credits, str(kwh), str(excl)) for flag, n, credits, kwh, excl in daily] == [
        (False, 1, 0, "10.0000", "5.0000"), (True, 3, 1, "3.0000", "0.9000")]
    monkeypatch.undo()
    assert [m.version for m in migrate(client, database)] == [m.version for m in every if m.version > 28]
    client.command(f"DROP DATABASE {database}")


def test_cdrs_of_another_emsps_token_have_billing_lines_but_are_not_billed(chdb_dsn: str,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # OCPI_TOKEN_PARTIES names the eMSP parties whose tokens we bill: a CDR of another's token (and its credit) keeps
    # its billing line, flagged, and billable_lines and billing_daily leave it out. Rows stored before 0029 were
    # never judged: billed as before. A CDR stored while 0029 swaps the views gets its flagged line all the same.
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    monkeypatch.setattr(migrations, "available_migrations", lambda: [m for m in every if m.version <= 28])
    migrate(client, database)
    client.insert(f"{database}.cdrs", [_cdr("OLD", "10", "5.00", "6.00")], column_names=_CDR_COLUMNS)
    monkeypatch.undo()
    assert [m.version for m in migrate(client, database)] == [m.version for m in every if m.version >= 29]
    flagged = [*_CDR_COLUMNS, "token_of_another_emsp"]
    client.insert(f"{database}.cdrs", [[*_cdr("OURS", "2", "1.00", "1.20"), False],
                                       [*_cdr("THEIRS", "4", "2.00", "2.40"), True],
                                       [*_cdr("THEIRS-C", "4", "-2.00", "-2.40", credit=True, credited="THEIRS"),
                                        True]], column_names=flagged)
    [swap] = [m for m in every if m.version == 29]
    client.command(f"DROP VIEW {database}.billing_lines_v3_mv")  # as between its CREATE and the old view's DROP
    client.command(f"CREATE MATERIALIZED VIEW {database}.billing_lines_v2_mv TO {database}.billing_lines AS SELECT "
                   "toDate(end_date_time) AS day, partner_id, country_code, party_id, location_id, cdr_id, currency, "
                   "credit, total_energy AS energy_kwh, total_cost_excl_vat AS cost_excl_vat, total_cost_incl_vat AS "
                   f"cost_incl_vat, received_at, version, home_charging_compensation FROM {database}.cdrs")
    client.insert(f"{database}.cdrs", [[*_cdr("MEANWHILE", "1", "0.50", "0.60"), True]], column_names=flagged)
    for statement in swap.statements():  # and a rerun from the first statement writes no line again
        migrations._run_in(client, database, statement)
    [(lines,)] = client.query(f"SELECT count() FROM {database}.billing_lines").result_rows
    for statement in swap.statements():
        migrations._run_in(client, database, statement)
    assert client.query(f"SELECT count() FROM {database}.billing_lines").result_rows == [(lines,)]

    assert client.query(f"SELECT cdr_id, token_of_another_emsp FROM {database}.billing_lines FINAL ORDER BY cdr_id"
                        ).result_rows == [("MEANWHILE", True), ("OLD", False), ("OURS", False), ("THEIRS", True),
                                          ("THEIRS-C", True)]
    assert client.query(f"SELECT cdr_id FROM {database}.billable_lines ORDER BY cdr_id").result_rows == [
        ("OLD",), ("OURS",)]
    daily = client.query(f"SELECT sum(cdrs), sum(energy_kwh), sum(cost_excl_vat) FROM {database}.billing_daily"
                         ).result_rows
    assert [(n, str(kwh), str(excl)) for n, kwh, excl in daily] == [(2, "12.0000", "6.0000")]
    client.command(f"DROP DATABASE {database}")

# 0016 as it was released (78cede0) before a comment was added to it (3b671b0): the checksum databases migrated then
# recorded.
_RELEASED_0016 = "69d027d751f2936bad708d07601aa09704462b8d8f3fe423f89869b12b64a624"
_ADDED_COMMENT = ("-- Values this version adds without a schema change: credit_links.status DUPLICATE_CREDIT;"
                  " reconciliation.outcome\n-- CREDITED (a CDR a credit cancels).\n")


def test_a_database_migrated_with_0016_as_first_released_upgrades(chdb_dsn: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # The comment added to 0016 after its release changed the file's checksum: `migrate` (and `dev`, `partners`)
    # refused every database migrated before, naming 0016 as "changed after it was applied", and applied nothing
    # after it (0017-0021), so the new code ran against a schema it does not fit.
    every = available_migrations()
    [current] = [m for m in every if m.version == 16]
    released = migrations.Migration(16, current.name, current.sql.replace(_ADDED_COMMENT, ""))
    assert released.checksum == _RELEASED_0016
    assert released.statements() == current.statements()
    assert upgraded_over(chdb_dsn, monkeypatch, released) == [m.version for m in every if m.version > 16]


def upgraded_over(chdb_dsn: str, monkeypatch: pytest.MonkeyPatch, older: migrations.Migration) -> list[int]:
    """Migrate a fresh database with `older` (a form of one migration some databases recorded) and the migrations
    before it, then with today's files: the versions applied then (a third run applies none)."""
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    monkeypatch.setattr(migrations, "available_migrations",
                        lambda: [older if m.version == older.version else m for m in every
                                 if m.version <= older.version])
    migrate(client, database)
    monkeypatch.undo()
    applied = [m.version for m in migrate(client, database)]
    assert migrate(client, database) == []
    client.command(f"DROP DATABASE {database}")
    return applied


# 0025 as its first commit (f5afa49) wrote it, before its comment was reworded (5c3a37f): the checksum databases
# migrated then recorded.
_FIRST_0025 = "f1eabe6a1e92978145719c3aaea8ddb439eb1b49216c1f9c87b1b44e387a51dc"
_FIRST_0025_COMMENT = """\
-- One row per credentials handshake (a partner's POST or PUT on our credentials endpoint) about to save: what it
-- claims (`subject`: the partner), the state it read (`generation`: the partner's inbound tokens) and the hash of
-- the Token C it issues. Two handshakes that read the same state (two POSTs with one Token A, or two PUTs, reaching
-- two receiver processes) insert with the same deduplication token, so the table keeps the first insert that lands
-- and drops the other; both read back which one won, and only that one saves
"""


def test_a_database_migrated_with_0025_as_first_committed_upgrades(chdb_dsn: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # 0025's comment was reworded one commit after it was added: `migrate`, `dev` and `partners` refused every
    # database migrated in between, naming 0025 as "changed after it was applied", though its statement is the same.
    every = available_migrations()
    [current] = [m for m in every if m.version == 25]
    rest = current.sql[current.sql.index("-- (receivers.registry.PartnerRegistry.claim)"):]
    first = migrations.Migration(25, current.name, _FIRST_0025_COMMENT + rest)
    assert first.checksum == _FIRST_0025
    assert first.statements() == current.statements()
    assert upgraded_over(chdb_dsn, monkeypatch, first) == [m.version for m in every if m.version > 25]


def test_a_released_migration_is_never_edited() -> None:
    # A database records each migration's checksum and refuses to migrate further when a file changed, even in a
    # comment (0016 was, see above): a change is a new migration. The checksums as released; never change one.
    released = {
        1: "451bd78ba3d8c6930bcc780bb3a692e944c220efe316c16eb4eac44404800c89",
        2: "1b8b2adf27d4c1591416dbd209fdc73bace9c1dae7a4f5144114bef506314e1c",
        3: "a10e94742e90cb3c2b1ab2b56e36443ecc5f5706e048ba287ca3562af3c1a0a7",
        4: "4a6d7c7703b1ed82791503f9314c5d190bc765feb8f53c03c961a0c5c2690958",
        5: "9e339072938e466d6e01346b1c1e1ac6c5051611d48b1e213a88bfae33ef76fa",
        6: "6f8507a795919d6f7a027655061c5b5f0b94d6ed491d882372ceb6857c5d5e26",
        7: "9e2afe376338b61c679b525bff16d67c8a322f36c80dadfff80d7e1c13ba5b13",
        8: "87d8d6deabc9a1358bec95187ddd88efd85c3a204ce8c00918fdae2d36aca57a",
        9: "5ed2339b9f00148ae871ce293f871505b74141b6c618baa139451bb6d042d7ad",
        10: "a83a24ddc58850027af8006aee7c3a51089399269a7575dcf4a393d95c49bb54",
        11: "06a7f7ab6d0fcdfb5ab9a955e1743af1583d202b61ffc653813c0ac132d3d5bd",
        12: "c1b9234ad40fd8f2915d80db4f364885e7d72acc8f986664da66d6eff0a8ca2a",
        13: "dae45c049d783fcb6fec91aade2324d235f9e53d49f54055816fad4770e4cc54",
        14: "0ce6cf26b6e1e07e4f82f924c8bb64e71aed78e5b745ddf04ec8469c9025fbb8",
        15: "eb9040234fb635ef664f18aff8ec16d7f046466f016959fcd74acf009e0fdde3",
        16: "a82f1942169928462169b883b3cf0d17752f4f04a0c2e0493dae35d30239003e",
        17: "7e43aec7676befccccf1f416123c1019f98db170f0d0bfe3baa55ff7fc9583cb",
        18: "d29538f194d47c6b91ca736e1bb64e6d3bba5ab2fe86116c08b9adbfa2f4b820",
        19: "66da48b115218650f628f5abe4e1721a5da272d9f6c0a835e11cdf4a8d4c55d8",
        20: "0c025cbb887c5ce2d554f25140d6aba7cddb4ce01cb223ec8812032f6b964f82",
        21: "69f19db938056ae54960b33dbcfa74c32bb26b21e45e72f972a91ef2e8335482",
        22: "b44b018dfcfe2ab0c07dfd3aa90fd79351a3ebb710a4d0d33de72aa1ae7df510",
        23: "b9d6b93927a6e5e9f2db34d8d8cab554ba021fd2b39ec33f66749fd0d62b3c39",
        24: "47c62276dcc7c8dc312abdbec4dfb86c2f9c9739eccd8f5b8fa7350090fc2915",
        25: "b9deba87ced98d62e7954054cd76fa42298a787c64a26afe0a7f11eac2441217",
        26: "09e9157093d683b380f980d592c7f128cbe193825ac9be5b5f09cc2aa1cf33f8",
    }
    current = {m.version: m.checksum for m in available_migrations()}
    assert {v: current.get(v) for v in released} == released


def test_a_migration_failing_halfway_says_to_run_migrate_again_which_resumes_it(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # DDL is not transactional: the statements before the failing one stay applied. The error named only the
    # migration and the server's message, not that a rerun resumes (README "Upgrading": every statement is
    # idempotent, so the migration is run again from its first statement).
    client = connect(chdb_dsn)
    database = unique("mig")
    every = available_migrations()
    version = every[-1].version + 1
    halfway = migrations.Migration(version, "halfway", "CREATE TABLE IF NOT EXISTS t1 (x UInt8) ENGINE = MergeTree "
                                   "ORDER BY x;\nALTER TABLE t2 ADD COLUMN IF NOT EXISTS y UInt8;\n")
    after = migrations.Migration(version + 1, "after", "CREATE TABLE IF NOT EXISTS t3 (x UInt8) ENGINE = MergeTree "
                                 "ORDER BY x;\n")
    monkeypatch.setattr(migrations, "available_migrations", lambda: [*every, halfway, after])
    with pytest.raises(migrations.MigrationError) as failed:
        migrate(client, database)
    message = str(failed.value)
    assert f"{version:04d}_halfway" in message
    assert "ocpi-pipeline migrate" in message and "again" in message, message
    assert version not in migrations.applied_migrations(client, database)
    client.command(f"CREATE TABLE `{database}`.t2 (x UInt8) ENGINE = MergeTree ORDER BY x")  # the cause mended
    assert [m.version for m in migrate(client, database)] == [version, version + 1]
    assert migrate(client, database) == []
    client.command(f"DROP DATABASE {database}")


def _schema(client: Client, database: str) -> dict[str, str]:
    names = client.query(f"SELECT name FROM system.tables WHERE database = '{database}'").result_rows
    return {name: client.query(f"SHOW CREATE TABLE `{database}`.`{name}`").result_rows[0][0]
            .replace(f"{database}.", "db.") for (name,) in names}


def _insert_rows(client: Client, database: str) -> None:
    """A few random rows into every table (views aside), through the columns without a default expression."""
    tables = client.query(f"SELECT name FROM system.tables WHERE database = '{database}' AND engine LIKE '%MergeTree'"
                          " AND name != 'schema_migrations'").result_rows
    for (table,) in tables:
        columns = client.query(f"SELECT name, type FROM system.columns WHERE database = '{database}' AND table = "
                               f"'{table}' AND default_kind = ''").result_rows
        structure = ", ".join(f"`{name}` {kind}" for name, kind in columns).replace("'", "\\'")
        client.command(f"INSERT INTO `{database}`.`{table}` ({', '.join(f'`{name}`' for name, _ in columns)}) "
                       f"SELECT * FROM generateRandom('{structure}', 1, 10, 2) LIMIT 3")


def test_migrating_one_release_at_a_time_over_data_gives_the_fresh_schema_and_can_run_again(
        chdb_dsn: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # An installation is upgraded migration by migration over the rows it holds, and a migration interrupted
    # after some of its statements (or run by two processes at once) runs them again: both must end with the
    # schema of a fresh install.
    client = connect(chdb_dsn)
    fresh, upgraded = unique("fresh"), unique("upgraded")
    every = available_migrations()
    migrate(client, fresh)
    for release in every:
        monkeypatch.setattr(migrations, "available_migrations",
                            lambda release=release: [m for m in every if m.version <= release.version])
        assert migrate(client, upgraded) == [release]
        _insert_rows(client, upgraded)
    monkeypatch.undo()
    assert _schema(client, upgraded) == _schema(client, fresh)
    for migration in every:
        for statement in migration.statements():
            if migration.version in (22, 27, 28) and statement.lstrip().startswith("INSERT INTO billing_lines\n"):
                # These INSERTs name no columns: each fills billing_lines as it was before a later migration (0027,
                # 0029) added one, so each runs only before that (as every migration does: `migrate` runs a
                # migration again only until it is recorded).
                continue
            migrations._run_in(client, upgraded, statement)
    assert _schema(client, upgraded) == _schema(client, fresh)
    client.command(f"DROP DATABASE {fresh}")
    client.command(f"DROP DATABASE {upgraded}")


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


def _first_bytes_sent_to(dsn_of: Callable[[int], str]) -> bytes:
    """The first bytes `connect` sends to a server at the DSN `dsn_of(port)` gives (a listener that answers nothing)."""
    received: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]

        def accept() -> None:
            conn, _ = server.accept()
            with conn:
                conn.settimeout(5)
                received.append(conn.recv(5))

        thread = threading.Thread(target=accept, daemon=True)
        thread.start()
        with pytest.raises(ClickHouseUnavailable):
            connect(dsn_of(port), connect_timeout=2, send_receive_timeout=2)
        thread.join(5)
    return received[0]


def test_an_https_dsn_is_spoken_over_tls_whatever_its_port() -> None:
    """clickhouse-connect takes no interface from a DSN's scheme: on a port other than 443/8443 it spoke plain HTTP
    to an `https://` DSN, the password in clear on the network."""
    assert _first_bytes_sent_to(lambda port: f"https://ocpi:secret@127.0.0.1:{port}")[:1] == b"\x16"  # ClientHello
    assert _first_bytes_sent_to(lambda port: f"http://ocpi:secret@127.0.0.1:{port}")[:4] in (b"POST", b"GET ")


async def test_slow_read_only_queries_do_not_hold_the_writes_back(chdb_dsn: str) -> None:
    """The shim ran every request on the event loop's default executor, min(32, cores + 4) threads (6 on two
    cores): as many slow read-only queries at once (`query`, reports, the receivers' GET reads) held every thread,
    and the worker's inserts and the partner registry's writes waited for one of them to finish, however long."""
    database = unique("shimq")
    owner = connect(chdb_dsn)
    owner.command(f"CREATE DATABASE {database}")
    owner.command(f"CREATE TABLE {database}.t (a UInt32) ENGINE = MergeTree ORDER BY a")
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()
    slow_queries = min(32, (os.cpu_count() or 1) + 4)

    def slow() -> None:
        reader = connect(shim.dsn, database=database, readonly=True, compress=False, send_receive_timeout=30)
        reader.query("SELECT sleep(2.9)")

    def insert() -> float:
        writer = connect(shim.dsn, database=database, compress=False, send_receive_timeout=30)
        time.sleep(0.5)  # the slow queries are running
        started = time.monotonic()
        writer.insert("t", [[1]], column_names=["a"])
        return time.monotonic() - started

    loop = asyncio.get_running_loop()
    # The clients' own threads: on the loop's default executor they would take the threads the shim ran on.
    with ThreadPoolExecutor(max_workers=slow_queries + 1) as clients:
        try:
            *_, took = await asyncio.gather(*(loop.run_in_executor(clients, slow) for _ in range(slow_queries)),
                                            loop.run_in_executor(clients, insert))
        finally:
            await shim.stop()
    # Held back, the insert would wait for a slow query's end, some 2.4 s after it came, then take its own time;
    # not held back it took 0.57 s on a loaded two-core machine, so 1.5 s left a slower one too little margin.
    assert took < 2.0, took


async def test_a_query_naming_its_own_format_is_refused_as_a_server_refuses_it(chdb_dsn: str) -> None:
    """clickhouse-connect ends every query with `FORMAT Native`; a query that names a FORMAT of its own then has
    two, which a server refuses (SYNTAX_ERROR). The shim removed the client's and ran the query's: it answered
    CSV (JSON, ...) labelled Native, and `query "... FORMAT CSV"` failed with the whole result as its message."""
    connect(chdb_dsn)
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()

    def use() -> list[Exception]:
        reader = connect(shim.dsn, readonly=True, compress=False)
        refusals: list[Exception] = []
        for sql in ("SELECT 'secret' FORMAT CSV", "SELECT 1 AS a FORMAT JSONEachRow;", "SELECT 1 FORMAT Native"):
            with pytest.raises(Exception) as refused:
                reader.query(sql)
            refusals.append(refused.value)
        return refusals

    try:
        refusals = await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert [getattr(refusal, "code", None) for refusal in refusals] == [62, 62, 62], refusals
    assert "secret" not in str(refusals[0])


async def test_a_query_ordered_by_a_column_named_format_is_not_taken_for_a_second_format_clause(
        chdb_dsn: str) -> None:
    """`connectors.format` is a column: `... ORDER BY format DESC` ends in `format <word>` like a FORMAT clause, so
    the shim took it for a second one (after the client's FORMAT Native) and refused a query a server answers."""
    connect(chdb_dsn)
    shim = await ClickHouseShim(ChdbEngine(chdb_path(chdb_dsn)), "s3cret").start()

    def use() -> list[list[tuple[str, ...]]]:
        reader = connect(shim.dsn, readonly=True, compress=False)
        return [[tuple(row) for row in reader.query(f"SELECT arrayJoin(['a', 'b']) AS format ORDER BY format {order}"
                                                    ).result_rows] for order in ("DESC", "ASC")]

    try:
        answers = await asyncio.to_thread(use)
    finally:
        await shim.stop()
    assert answers == [[("b",), ("a",)], [("a",), ("b",)]]
