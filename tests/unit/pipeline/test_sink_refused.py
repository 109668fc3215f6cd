"""A row ClickHouse refuses for its values (a validation gap) must not stop the worker: the sink writes the rest
of the batch and records the refused row as a ROW_REFUSED anomaly; a refusal that is not about rows is retried."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Sequence
from decimal import Decimal

import pytest
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from pipeline.locations import process_locations
from pipeline.projection import (
    ANOMALY_COLUMNS,
    CONNECTOR_COLUMNS,
    LOCATION_COLUMNS,
    SESSION_COLUMNS,
    refused_row_anomalies,
)
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.sink import (
    Batch,
    ClickHouseSink,
    RefusedRow,
    insert_isolating,
    insert_rows,
    refusal_reason,
    refused_for_its_data,
)
from pipeline.state import LocationState, SessionState
from tests.conftest import unique

from .builders import Harness, event, evse, location, session

pytestmark = pytest.mark.clickhouse

PSEUDONYM = Pseudonymizer(b"k" * 32)


def location_batch(bad_connector: int | None) -> Batch:
    """The rows of a Location with three EVSEs; the connector row `bad_connector` holds a negative voltage, which
    the UInt32 column cannot (the receivers refuse it now; an event already in Kafka, or a gap like it, may not)."""
    batch = Harness(process_locations, LocationState).run(
        event("Location", location(evses=[evse("E1"), evse("E2"), evse("E3")]), received=1)).batch
    if bad_connector is not None:
        voltage = CONNECTOR_COLUMNS.index("max_voltage")
        connectors = batch.keyed.get("connectors") or {}
        rows = list(connectors.values()) if connectors else batch.rows["connectors"]
        rows[bad_connector][voltage] = -1
    return batch


def count(client: Client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def test_a_refused_row_becomes_an_anomaly_and_the_rest_is_written(client: Client) -> None:
    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    batch = location_batch(bad_connector=1)
    asyncio.run(sink.write(batch))
    asyncio.run(sink.write(batch))  # the batch applied again after a crash: recorded once

    assert count(client, "SELECT count() FROM locations FINAL") == 1
    assert count(client, "SELECT count() FROM evses FINAL") == 3
    assert sorted(r[0] for r in client.query("SELECT evse_uid FROM connectors FINAL").result_rows) == ["E1", "E3"]
    [(module, object_id, detail)] = client.query(
        "SELECT module, object_id, detail FROM anomalies FINAL WHERE kind = 'ROW_REFUSED'").result_rows
    assert (module, object_id) == ("connectors", "LOC1")
    error, row = detail.split("; row: ", 1)
    assert "Code: 72" in error  # CANNOT_PARSE_NUMBER: an unsigned column
    assert json.loads(row)["max_voltage"] == -1 and json.loads(row)["evse_uid"] == "E2"
    assert sink.refused_rows == 2


def test_when_every_row_of_a_table_is_refused_each_is_recorded_and_the_rest_written(client: Client) -> None:
    # All of a Location's Connectors carry the bad value (an event accepted before the receivers refused it): the
    # worker must not stop every partition for it.
    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    batch = location_batch(bad_connector=None)
    voltage = CONNECTOR_COLUMNS.index("max_voltage")
    connectors = batch.keyed.get("connectors") or {}
    for row in (list(connectors.values()) if connectors else batch.rows["connectors"]):
        row[voltage] = -1
    asyncio.run(sink.write(batch))
    assert count(client, "SELECT count() FROM connectors") == 0
    assert count(client, "SELECT count() FROM evses FINAL") == 3
    assert count(client, "SELECT count() FROM anomalies FINAL WHERE kind = 'ROW_REFUSED'") == 3 == sink.refused_rows


@pytest.mark.parametrize("row", [
    ["not an array", True, "X"],  # CANNOT_READ_ARRAY_FROM_TEXT (130)
    [["x"], "maybe", "X"],  # CANNOT_PARSE_BOOL (467)
    [["x"], True, "Z"],  # UNKNOWN_ELEMENT_OF_ENUM (691)
])
def test_the_engine_s_errors_for_values_an_array_bool_or_enum_column_cannot_hold_are_refused_rows(
        client: Client, row: list[object]) -> None:
    """Retried instead, such a row would have stopped the worker on its batch for good."""
    table = unique("refused")
    client.command(f"CREATE TABLE {table} (a Array(String), b Bool, e Enum8('X' = 1)) "
                   "ENGINE = MergeTree ORDER BY tuple()")
    with pytest.raises(DatabaseError) as refused:
        insert_rows(client, table, ["a", "b", "e"], [row])
    assert refused_for_its_data(refused.value)


def test_only_errors_about_values_count_as_refused_rows() -> None:
    assert refused_for_its_data(DatabaseError("Code: 72. DB::Exception: Unsigned type must not contain '-'"))
    assert refused_for_its_data(DatabaseError("Received ClickHouse exception, code: 407, server response: …"))
    assert refused_for_its_data(DatabaseError("generic", code=321))  # over HTTP: from the exception header
    assert not refused_for_its_data(DatabaseError("Code: 72. but the header said", code=241))
    assert not refused_for_its_data(DatabaseError("Code: 60. DB::Exception: Unknown table expression identifier"))
    assert not refused_for_its_data(DatabaseError("Code: 241. DB::Exception: Memory limit exceeded"))
    assert not refused_for_its_data(OSError("Connection refused"))


def test_a_refused_rows_personal_data_is_pseudonymised_in_the_anomaly(client: Client) -> None:
    # Anomalies are kept a year, personal data in clear 90 days: the detail never holds a token in clear.
    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    harness = Harness(process_sessions, SessionState)
    batch = Batch()
    for sid in ("S1", "S2"):
        rows = harness.run(event("Session", session(sid, uid="TOKEN-UID-1", authref="AUTH-REF-1"), received=1)).batch
        for table, table_rows in rows.tables().items():
            batch.extend(table, rows.columns[table], table_rows)
    [bad] = [row for row in batch.rows.get("sessions", []) + list(batch.keyed.get("sessions", {}).values())
             if row[SESSION_COLUMNS.index("session_id")] == "S2"]
    bad[SESSION_COLUMNS.index("kwh")] = Decimal("1e20")  # beyond Decimal(18,4)
    asyncio.run(sink.write(batch))

    assert [r[0] for r in client.query("SELECT session_id FROM sessions FINAL").result_rows] == ["S1"]
    [(object_id, detail)] = client.query(
        "SELECT object_id, detail FROM anomalies FINAL WHERE kind = 'ROW_REFUSED'").result_rows
    assert object_id == "S2" and "Code: 69" in detail  # ARGUMENT_OUT_OF_BOUND: the decimal is too big
    assert "TOKEN-UID-1" not in detail and "AUTH-REF-1" not in detail
    row = json.loads(detail.split("; row: ", 1)[1])
    assert row["token_uid"] == PSEUDONYM("TOKEN-UID-1") and row["payload_json"]["id"] == "S2"


def test_the_input_clickhouse_quotes_in_its_error_is_not_kept_in_clear(client: Client,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    # A value ClickHouse cannot parse at all (CANNOT_PARSE_INPUT) makes it quote the input where it stopped:
    # "expected ',' before: 'NaN,"WHITELIST","AUTH-REF-1","TOKEN-UID-1",…'", the row's later values in clear,
    # cut anywhere. The anomaly (kept a year) and the log must not hold them: the row, pseudonymised, follows.
    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    batch = Harness(process_sessions, SessionState).run(
        event("Session", session("S1", uid="TOKEN-UID-1", authref="AUTH-REF-1"), received=1)).batch
    [row] = batch.rows.get("sessions", []) + list(batch.keyed.get("sessions", {}).values())
    row[SESSION_COLUMNS.index("kwh")] = Decimal("NaN")
    with caplog.at_level("ERROR", logger="pipeline.sink"):
        asyncio.run(sink.write(batch))

    [detail] = [r[0] for r in client.query(
        "SELECT detail FROM anomalies FINAL WHERE kind = 'ROW_REFUSED'").result_rows]
    error, row_json = detail.split("; row: ", 1)
    assert "Code: 27" in error and "before:" in error  # CANNOT_PARSE_INPUT, its quote replaced
    for clear in ("TOKEN-UID-1", "AUTH-REF-1"):
        assert clear not in detail and clear not in caplog.text
    assert json.loads(row_json)["token_uid"] == PSEUDONYM("TOKEN-UID-1")


def test_the_quoted_input_is_left_out_of_the_error_as_a_server_or_the_shim_sends_it() -> None:
    # Over HTTP the client puts its own words before ClickHouse's, and the server's diagnostics follow on more lines.
    exc = DatabaseError("Received ClickHouse exception, code: 27, server response: Code: 27. DB::Exception: Cannot "
                        "parse input: expected ',' before: 'NaN,\"WHITELIST\",\"AUTH-REF-1\",\"TOKEN-UID-1\",\"RF': "
                        "(while reading the value of key kwh): (at row 1)\nRow 1:\nColumn 10, name: token_uid, "
                        "parsed text: \"TOKEN-UID-1\" (for url http://127.0.0.1:8123)", code=27)
    assert refusal_reason(exc) == ("Received ClickHouse exception, code: 27, server response: Code: 27. DB::Exception: "
                                   "Cannot parse input: expected ',' before: (the row's input, not shown): "
                                   "(while reading the value of key kwh): (at row 1)")
    # A quote cut short (no end in its line) goes whole.
    assert refusal_reason(DatabaseError("Code: 27. Cannot parse input: expected ',' before: 'NaN,\"TOKEN-UID-1")) == (
        "Code: 27. Cannot parse input: expected ',' before: (the row's input, not shown)")


def test_a_table_whose_only_row_is_refused_records_it_instead_of_retrying_for_ever(client: Client) -> None:
    # One row refused alone is that row's fault: retried, the batch (and every partition with it) would be stuck.
    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    batch = Harness(process_locations, LocationState).run(event("Location", location(), received=1)).batch
    voltage = CONNECTOR_COLUMNS.index("max_voltage")
    connectors = batch.keyed.get("connectors") or {}
    [row] = list(connectors.values()) if connectors else batch.rows["connectors"]
    row[voltage] = -1
    sink._insert_all(batch.tables(), batch.columns)
    assert count(client, "SELECT count() FROM connectors") == 0 and count(client, "SELECT count() FROM evses") == 1
    assert count(client, "SELECT count() FROM anomalies WHERE kind = 'ROW_REFUSED'") == 1


class _FlakyClient:
    """Refuses the first insert for its data, then fails every insert for another reason (memory, a restart)."""

    def __init__(self) -> None:
        self.calls = 0

    def raw_insert(self, *_args: object, **_kwargs: object) -> None:
        self.calls += 1
        if self.calls == 1:
            raise DatabaseError("Code: 72. DB::Exception: Unsigned type must not contain '-'")
        raise DatabaseError("Code: 241. DB::Exception: Memory limit exceeded")


def test_an_error_not_about_values_while_isolating_is_raised_not_taken_for_a_refused_row() -> None:
    # Good rows must not become ROW_REFUSED anomalies (and be lost to their table) because the server failed
    # meanwhile: the insert is retried as a whole.
    with pytest.raises(DatabaseError, match="Code: 241"):
        insert_isolating(_FlakyClient(), "connectors", ["a"], [[1], [2], [3]])  # type: ignore[arg-type]


def test_a_keyed_row_replaces_the_one_put_before_with_its_key() -> None:
    batch = Batch()
    batch.put("raw_events", ["event_id", "outcome"], "e1", ["e1", "PARKED"])
    batch.put("raw_events", ["event_id", "outcome"], "e1", ["e1", "APPLIED"])
    assert batch.tables() == {"raw_events": [["e1", "APPLIED"]]} and len(batch) == 1


def test_a_table_taken_out_of_a_batch_leaves_the_others() -> None:
    batch = Batch()
    batch.add("anomalies", ("a",), [1])
    batch.put("anomalies", ("a",), "k", [2])
    batch.add("raw_events", ("r",), [3])
    taken = batch.take("anomalies")
    assert (taken.tables(), taken.columns) == ({"anomalies": [[1], [2]]}, {"anomalies": ("a",)})
    assert (batch.tables(), batch.columns) == ({"raw_events": [[3]]}, {"raw_events": ("r",)})
    assert len(batch.take("missing")) == 0


class SlowClient:
    """A ClickHouse client whose insert takes a moment, then succeeds or fails."""

    def __init__(self, fails: bool) -> None:
        self.fails = fails

    def raw_insert(self, *_args: object, **_kwargs: object) -> None:
        import time

        time.sleep(0.2)
        if self.fails:
            raise ConnectionError("ClickHouse went away")


@pytest.mark.parametrize("fails", [False, True])
async def test_a_stop_during_an_insert_acks_the_batch_only_if_the_insert_succeeded(
        monkeypatch: pytest.MonkeyPatch, fails: bool) -> None:
    """The worker stopping (its agent task cancelled) while a batch's insert runs in its thread: the insert is
    waited for; written, the cancellation goes on and the batch is acked as done; failed, the process ends before
    any commit (EXIT_UNWRITTEN_BATCH), so the batch is read again. Acked unwritten, its rows would be lost."""
    import pipeline.sink as sink

    exits: list[int] = []

    class Exited(Exception):  # not SystemExit: the event loop would let that one through the test
        pass

    def exit_(code: int) -> None:
        exits.append(code)
        raise Exited

    monkeypatch.setattr(sink.os, "_exit", exit_)
    writer = ClickHouseSink(lambda: SlowClient(fails))  # type: ignore[arg-type, return-value]
    task = asyncio.ensure_future(writer.write(location_batch(None)))
    await asyncio.sleep(0.05)  # the insert is running in its thread
    task.cancel()
    if fails:
        with pytest.raises(Exited):
            await task
        assert exits == [sink.EXIT_UNWRITTEN_BATCH]
    else:
        with pytest.raises(asyncio.CancelledError):
            await task
        assert exits == [] and writer.inserted_rows == 0  # cancelled after its rows were in: acked as written


class OneTableFailsFast:
    """A ClickHouse client on which one table's insert fails at once while the others take a moment to succeed."""

    def __init__(self, failing: str) -> None:
        import threading

        self.failing = failing
        self.lock = threading.Lock()
        self.running = 0
        self.finished: list[str] = []

    def raw_insert(self, table: str, *_args: object, **_kwargs: object) -> None:
        import time

        if table == self.failing:
            raise DatabaseError("Code: 252. DB::Exception: Too many parts. (TOO_MANY_PARTS)")
        with self.lock:
            self.running += 1
        time.sleep(0.3)
        with self.lock:
            self.running -= 1
            self.finished.append(table)


def test_a_failed_attempt_returns_only_once_none_of_its_inserts_still_runs() -> None:
    """A batch's tables are inserted side by side; when one insert fails, the batch is sent again. An insert of the
    failed attempt still running then could land after the retry, after the next batch even, and a table without a
    version (raw_events keeps the row inserted last) would keep the older row: a PARKED outcome over the APPLIED one
    the next batch wrote. So the attempt is over only once every insert of it is."""
    client = OneTableFailsFast(failing="anomalies")
    writer = ClickHouseSink(lambda: client)  # type: ignore[arg-type, return-value]
    tables = {"anomalies": [[1]], "raw_events": [[2]], "sessions": [[3]]}
    columns: dict[str, Sequence[str]] = {table: ("c",) for table in tables}
    with pytest.raises(DatabaseError):
        writer._insert_all(tables, columns)
    assert client.running == 0 and sorted(client.finished) == ["raw_events", "sessions"]


async def test_a_batch_whose_insert_failed_in_part_is_written_again_whole_and_counts_once(client: Client) -> None:
    """ClickHouse failing one table's insert of a batch (a restart, memory) while the others went in: the sink
    reconnects and sends the whole batch again until it is in, and returns only then (the batch is acked after);
    the tables written twice hold each row once after FINAL."""
    failures = {"connectors": 2}
    made: list[object] = []

    class Failing:
        def raw_insert(self, table: str, *args: object, **kwargs: object) -> None:
            if failures.get(table):
                failures[table] -= 1
                raise DatabaseError("Code: 241. DB::Exception: Memory limit exceeded. (MEMORY_LIMIT_EXCEEDED)")
            client.raw_insert(table, *args, **kwargs)  # type: ignore[arg-type]

    def factory() -> Failing:
        made.append(Failing())
        return made[-1]  # type: ignore[return-value]

    batch = location_batch(None)
    sink = ClickHouseSink(factory, max_backoff_s=0.05)  # type: ignore[arg-type]
    await sink.write(batch)
    assert failures == {"connectors": 0} and len(made) == 3  # a new client for each attempt after a failure
    for table, rows in batch.tables().items():
        assert count(client, f"SELECT count() FROM {table} FINAL") == len(rows), table
    assert count(client, "SELECT count() FROM evses") == 3 * len(batch.tables()["evses"])  # three attempts


def test_an_insert_waits_for_a_servers_asynchronous_insert() -> None:
    """A server profile with async_insert=1 (and its default wait_for_async_insert=1 turned off) acknowledged an
    insert before its rows were stored: the sink committed the offsets behind rows that might never be written.
    chDB stores every insert at once, so this pins what the sink asks of a server."""
    from pipeline.sink import insert_rows

    sent: list[dict[str, object]] = []

    class Recording:
        def raw_insert(self, _table: str, _columns: Sequence[str], *, insert_block: bytes, fmt: str,
                       settings: dict[str, object]) -> None:
            sent.append(settings)

    insert_rows(Recording(), "raw_events", ["event_id"], [["e1"]])  # type: ignore[arg-type]
    assert sent == [{"input_format_json_read_objects_as_strings": 1, "wait_for_async_insert": 1}]


def refused_in_two_months(monkeypatch: pytest.MonkeyPatch, refused: RefusedRow) -> list[list[list[object]]]:
    """The anomaly rows of one refused row recorded at the end of November and again in January."""
    from datetime import UTC, datetime

    from pipeline import projection

    recorded = []
    for now in (datetime(2026, 11, 30, 23, 59, tzinfo=UTC), datetime(2027, 1, 5, tzinfo=UTC)):
        monkeypatch.setattr(projection, "utc_now", lambda now=now: now)
        recorded.append(refused_row_anomalies([refused], PSEUDONYM)[2])
    return recorded


def test_a_refused_row_recorded_again_in_another_month_is_one_anomaly(monkeypatch: pytest.MonkeyPatch) -> None:
    """Anomalies collapse by key within a month's partition (by `observed_at`): stamped with the time it was
    refused, the same row refused again when reprocessed in another month was a second ROW_REFUSED. It takes
    the time its event was received, as every other anomaly does (where the row holds it: not a Connector's or an
    EVSE's)."""
    batch = location_batch(bad_connector=None)
    locations = batch.keyed.get("locations") or {}
    row = list((list(locations.values()) if locations else batch.rows["locations"])[0])
    refused = RefusedRow("locations", LOCATION_COLUMNS, row, "Code: 72. DB::Exception: Unsigned")
    recorded = refused_in_two_months(monkeypatch, refused)
    assert recorded[0] == recorded[1]
    observed = recorded[0][0][ANOMALY_COLUMNS.index("observed_at")]
    assert observed == row[LOCATION_COLUMNS.index("received_at")]


def test_a_refused_cdr_row_names_its_cdr_not_its_session(client: Client) -> None:
    """A refused row's anomaly names the object the row is of: the first id column of the row was taken, and a CDR's
    row holds its session's id before its own (`session_id`, then `cdr_id`), so the CDR lost from billing was
    recorded under its session's id; a credit link's row (`credit_cdr_id`) was recorded under none."""
    from pipeline.cdrs import process_cdrs
    from pipeline.projection import CDR_COLUMNS
    from pipeline.reconcile import CREDIT_LINK_COLUMNS
    from pipeline.state import CdrState

    from .builders import cdr

    sink = ClickHouseSink(lambda: client, refused_rows=functools.partial(refused_row_anomalies, pseudonym=PSEUDONYM))
    batch = Harness(process_cdrs, CdrState).run(event("CDR", cdr("C1", session_id="S1"), received=1)).batch
    [row] = batch.rows["cdrs"]
    row[CDR_COLUMNS.index("total_energy")] = Decimal("1e20")  # beyond Decimal(18,4)
    asyncio.run(sink.write(batch))

    assert client.query("SELECT count() FROM cdrs").result_rows == [(0,)]
    assert client.query("SELECT module, object_id FROM anomalies FINAL WHERE kind = 'ROW_REFUSED'").result_rows == [
        ("cdrs", "C1")]
    link = ["NL", "TNM", "C1-C", "C1", "p1", "LINKED", Decimal("-2.5"), Decimal("2.5"), True, None, None, 2]
    _table, _columns, [anomaly] = refused_row_anomalies(
        [RefusedRow("credit_links", CREDIT_LINK_COLUMNS, link, "Code: 41")], PSEUDONYM)
    assert anomaly[ANOMALY_COLUMNS.index("object_id")] == "C1-C"


def test_a_refused_reconciliation_row_recorded_again_in_another_month_is_one_anomaly(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A reconciliation row holds no received_at but the time of the fact that wrote it (`event_time`): its
    ROW_REFUSED was stamped with the time it was refused, so the same row refused again when reprocessed in another
    month was a second anomaly (anomalies collapse within a month's partition)."""
    from datetime import UTC, datetime

    from pipeline.reconcile import RECONCILIATION_COLUMNS

    at = datetime(2026, 10, 1, 12, tzinfo=UTC)
    row = ["NL", "TNM", "CDR", "C1", "p1", "EUR", "MATCHED", "SESSION_ID", "S1", ["C1"], Decimal(10), Decimal(10),
           Decimal(0), Decimal("2.5"), Decimal("2.5"), Decimal(0), Decimal(0), Decimal(0), False, None, at, 2]
    refused = RefusedRow("reconciliation", RECONCILIATION_COLUMNS, row, "Code: 69. DB::Exception: too big")
    recorded = refused_in_two_months(monkeypatch, refused)
    assert recorded[0] == recorded[1]
    assert recorded[0][0][ANOMALY_COLUMNS.index("observed_at")] == at
