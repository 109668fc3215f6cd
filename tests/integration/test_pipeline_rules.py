"""The pipeline's rules end to end on Tansu and chDB: events published to the module topics as the receivers
publish them, one worker (a child process, as in production), exact rows asserted in ClickHouse.

One worker serves the whole module (its start is the slow part); every test owns a CPO party id, so its rows
are its own. Deadlines are seconds here so that the sweeps can be watched.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import msgspec
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import TopicPartition

from pipeline.reconcile import RECONCILIATION_COLUMNS
from pipeline.stack import Stack
from tests.unit.pipeline.builders import cdr, evse, iso, location, session, ts

from .pipeline_support import pipeline_settings, publish, record, wait_for, wait_rows

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

DEADLINES = {"OCPI_PIPELINE_PARK_TTL": "2", "OCPI_PIPELINE_SESSION_IDLE": "4", "OCPI_RECONCILE_CDR_GRACE": "4",
             "OCPI_RECONCILE_SESSION_GRACE": "4", "OCPI_PIPELINE_SWEEP_INTERVAL": "1"}


@pytest.fixture(scope="module")
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    running = await Stack(pipeline_settings(session_tmp, chdb_dsn, broker, **DEADLINES), run_receivers=False).start()
    yield running
    await running.stop()
    assert all(p.poll() is not None for p in running.children.values())


async def send(stack: Stack, *items: tuple[str, dict[str, Any]] | tuple[str, dict[str, Any], dict[str, Any]],
               pid: str) -> None:
    """Publish (payload type, body[, options]) in order, for party NL/`pid`."""
    records = []
    for item in items:
        payload_type, body = item[0], item[1]
        options = item[2] if len(item) > 2 else {}  # type: ignore[misc]
        if "party_id" in body:
            body = {**body, "party_id": pid}
        records.append(record(stack.settings, payload_type, body, pid=pid, **options))
    await publish(stack.bootstrap, records)


def client(stack: Stack) -> Any:
    assert stack.clickhouse is not None
    return stack.clickhouse


async def outcomes(stack: Stack, pid: str, count: int) -> list[tuple[Any, ...]]:
    return await wait_for(client(stack), "SELECT object_id, operation, outcome FROM raw_events FINAL "
                          f"WHERE party_id = '{pid}' ORDER BY received_at", lambda rows: len(rows) >= count)


async def test_retries_and_bumped_timestamps_are_dropped_and_counted(stack: Stack) -> None:
    body = session(kwh="5", status="COMPLETED", end=60, updated=60)
    await send(stack, ("Session", body), ("Session", body), ("Session", {**body, "last_updated": iso(ts(90))}),
               pid="DUP")
    assert await outcomes(stack, "DUP", 3) == [("S1", "PUT", "APPLIED"), ("S1", "PUT", "DUPLICATE"),
                                              ("S1", "PUT", "DUPLICATE")]
    rows = client(stack).query("SELECT session_id, kwh, last_updated, count() OVER () FROM sessions FINAL "
                               "WHERE party_id = 'DUP'").result_rows
    assert rows == [("S1", Decimal("5.0000"), ts(60), 1)]
    assert client(stack).query("SELECT count() FROM sessions WHERE party_id = 'DUP'").result_rows == [(1,)]


async def test_an_out_of_order_update_is_stale_and_the_newer_state_stays(stack: Stack) -> None:
    await send(stack, ("Session", session(kwh="7", status="COMPLETED", end=60, updated=60)),
               ("Session", session(kwh="3", status="ACTIVE", updated=30)), pid="OOO")
    assert await outcomes(stack, "OOO", 2) == [("S1", "PUT", "APPLIED"), ("S1", "PUT", "STALE")]
    assert client(stack).query("SELECT status, kwh FROM sessions FINAL WHERE party_id = 'OOO'").result_rows == [
        ("COMPLETED", Decimal("7.0000"))]
    assert await wait_rows(client(stack), "SELECT kind, event_id != '' FROM anomalies FINAL WHERE party_id = 'OOO'",
                           [("STALE_UPDATE", True)]) == [("STALE_UPDATE", True)]


async def test_a_patch_before_its_put_is_merged_when_the_put_arrives(stack: Stack) -> None:
    patch = {"status": "COMPLETED", "kwh": Decimal("12.5"), "end_date_time": iso(ts(60)),
             "charging_periods": [{"start_date_time": iso(ts(0)), "dimensions": [{"type": "ENERGY",
                                                                                   "volume": Decimal("12.5")}]}],
             "last_updated": iso(ts(60))}
    await send(stack, ("SessionPatch", patch, {"object_id": "S1"}), ("Session", session(updated=0)), pid="PBP")
    assert await outcomes(stack, "PBP", 2) == [("S1", "PATCH", "APPLIED"), ("S1", "PUT", "APPLIED")]
    [(status, kwh, document)] = client(stack).query(
        "SELECT status, kwh, payload_json FROM sessions FINAL WHERE party_id = 'PBP'").result_rows
    assert (status, kwh, len(json.loads(document)["charging_periods"])) == ("COMPLETED", Decimal("12.5000"), 1)
    history = client(stack).query("SELECT previous_status, status FROM session_status_history FINAL "
                                  "WHERE party_id = 'PBP' ORDER BY version").result_rows
    assert history == [("", "ACTIVE"), ("ACTIVE", "COMPLETED")]


async def test_a_patch_whose_put_never_comes_is_orphaned_by_the_sweep(stack: Stack) -> None:
    await send(stack, ("SessionPatch", {"kwh": Decimal(1), "last_updated": iso(ts(5))}, {"object_id": "S9"}),
               pid="ORP")
    assert await outcomes(stack, "ORP", 1) == [("S9", "PATCH", "PARKED")]
    rows = await wait_rows(client(stack), "SELECT outcome FROM raw_events FINAL WHERE party_id = 'ORP'",
                           [("ORPHANED",)], timeout=30)
    assert rows == [("ORPHANED",)]
    assert client(stack).query("SELECT kind, object_id FROM anomalies FINAL WHERE party_id = 'ORP'").result_rows == [
        ("ORPHAN_EVENT", "S9")]
    assert client(stack).query("SELECT count() FROM sessions WHERE party_id = 'ORP'").result_rows == [(0,)]


async def test_an_illegal_transition_is_recorded_and_the_completed_session_stays(stack: Stack) -> None:
    await send(stack, ("Session", session(status="COMPLETED", kwh="9", end=60, updated=60)),
               ("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(70))}, {"object_id": "S1"}), pid="ILL")
    assert await outcomes(stack, "ILL", 2) == [("S1", "PUT", "APPLIED"), ("S1", "PATCH", "REJECTED")]
    assert client(stack).query("SELECT status FROM sessions FINAL WHERE party_id = 'ILL'").result_rows == [
        ("COMPLETED",)]
    assert await wait_rows(client(stack), "SELECT kind FROM anomalies FINAL WHERE party_id = 'ILL'",
                           [("ILLEGAL_TRANSITION",)]) == [("ILLEGAL_TRANSITION",)]


async def test_an_idle_session_is_flagged_by_the_timer(stack: Stack) -> None:
    await send(stack, ("Session", session(status="ACTIVE")), pid="IDL")
    rows = await wait_rows(client(stack), "SELECT kind, object_id FROM anomalies FINAL WHERE party_id = 'IDL'",
                           [("SESSION_IDLE", "S1")], timeout=30)
    assert rows == [("SESSION_IDLE", "S1")]


async def test_cdrs_are_immutable_duplicates_dropped_conflicts_recorded(stack: Stack) -> None:
    original = cdr("C1", kwh="10", cost="2.50", session_id=None)
    await send(stack, ("CDR", original), ("CDR", original), ("CDR", {**original, "total_energy": Decimal("11")}),
               pid="IMM")
    assert await outcomes(stack, "IMM", 3) == [("C1", "POST", "APPLIED"), ("C1", "POST", "DUPLICATE"),
                                              ("C1", "POST", "CONFLICT")]
    assert client(stack).query("SELECT total_energy, total_cost_excl_vat FROM cdrs FINAL WHERE party_id = 'IMM'"
                               ).result_rows == [(Decimal("10.0000"), Decimal("2.5000"))]
    assert await wait_rows(client(stack), "SELECT kind FROM anomalies FINAL WHERE party_id = 'IMM'",
                           [("CDR_CONFLICT",)]) == [("CDR_CONFLICT",)]


async def test_a_credit_cdr_links_and_billing_nets_it_once(stack: Stack) -> None:
    now = datetime.now(UTC)
    await send(stack, ("CDR", cdr("C1", kwh="10", cost="2.50", session_id=None)),
               ("CDR", cdr("C1-C", kwh="10", cost="-2.50", session_id=None, credit=True, credit_reference="C1"),
                {"received_at": now}),
               ("CDR", cdr("C1-R", kwh="10", cost="2.00", session_id=None)),
               ("CDR", cdr("C1-C2", kwh="10", cost="-2.50", session_id=None, credit=True, credit_reference="C1"),
                {"received_at": now + timedelta(seconds=1)}), pid="CRD")
    want = [("C1-C", "C1", "LINKED", True), ("C1-C2", "C1", "DUPLICATE_CREDIT", True)]
    links = await wait_rows(client(stack), "SELECT credit_cdr_id, credited_cdr_id, status, amount_matches "
                            "FROM credit_links FINAL WHERE party_id = 'CRD' ORDER BY credit_cdr_id", want)
    assert links == want
    assert client(stack).query("SELECT cdrs, credit_cdrs, energy_kwh, cost_excl_vat FROM billing_daily "
                               "WHERE party_id = 'CRD'").result_rows == [(3, 1, Decimal("10.0000"),
                                                                          Decimal("2.0000"))]
    assert client(stack).query("SELECT kind, object_id FROM anomalies FINAL WHERE party_id = 'CRD'"
                               ).result_rows == [("DUPLICATE_CREDIT", "C1-C2")]
    # The credited CDR leaves reconciliation; its correction, with no session, is billed and waits in vain.
    want_rows = [("C1", "CREDITED", None), ("C1-C", "CREDIT", None), ("C1-C2", "CREDIT", None),
                 ("C1-R", "NO_SESSION", None)]
    outcomes = await wait_rows(client(stack), "SELECT subject_id, outcome, session_id FROM reconciliation FINAL "
                               "WHERE party_id = 'CRD' ORDER BY subject_id", want_rows, timeout=30)
    assert outcomes == want_rows


async def test_every_reconciliation_outcome_lands_in_the_table_and_the_topic(stack: Stack) -> None:
    done = {"status": "COMPLETED", "end": 60, "updated": 60, "kwh": "10", "cost": "2.50"}
    await send(
        stack,
        ("Session", session("S1", **done)), ("CDR", cdr("C1")),  # by session id
        ("Session", session("S2", authref="AUTH-2", uid="TOK2", **done)),
        ("CDR", cdr("C2", session_id=None, authref="AUTH-2", uid="TOK2")),  # its own token: no other session fits
        ("Session", session("S3", uid="TOK3", start=5, **done)),
        ("CDR", cdr("C3", session_id=None, uid="TOK3", start=6)),  # by token + location + start
        ("Session", session("S4", **done)), ("CDR", cdr("C4", session_id="S4", kwh="15")),  # mismatch
        ("Session", session("S5", uid="TOK5", **done)),  # no CDR, not even for a while: missing after the grace
        ("CDR", cdr("C6", session_id="S6", uid="TOK6")),  # no session by any key: after the grace
        ("Session", session("S7", status="INVALID", updated=10)),  # not billable
        ("CDR", cdr("C8-C", session_id=None, credit=True, credit_reference="C8", cost="-1")),  # unknown reference
        pid="REC")
    want = [("CDR", "C1", "MATCHED", "SESSION_ID", "S1"), ("CDR", "C2", "MATCHED", "AUTHORIZATION_REFERENCE", "S2"),
            ("CDR", "C3", "MATCHED", "TOKEN_LOCATION_START", "S3"), ("CDR", "C4", "MISMATCH", "SESSION_ID", "S4"),
            ("CDR", "C6", "NO_SESSION", "", None), ("CDR", "C8-C", "CREDIT", "", None),
            ("SESSION", "S1", "MATCHED", "SESSION_ID", "S1"),
            ("SESSION", "S2", "MATCHED", "AUTHORIZATION_REFERENCE", "S2"),
            ("SESSION", "S3", "MATCHED", "TOKEN_LOCATION_START", "S3"),
            ("SESSION", "S4", "MISMATCH", "SESSION_ID", "S4"),  # its CDR bills 15 kWh, not 10
            ("SESSION", "S5", "MISSING_CDR", "", "S5"), ("SESSION", "S7", "NOT_BILLABLE", "", "S7")]
    rows = await wait_rows(client(stack), "SELECT subject, subject_id, outcome, method, session_id FROM "
                           "reconciliation FINAL WHERE party_id = 'REC' ORDER BY subject, subject_id", want, timeout=40)
    assert rows == want
    assert client(stack).query("SELECT delta_kwh, delta_cost_excl_vat, delta_start_s FROM reconciliation FINAL "
                               "WHERE party_id = 'REC' AND subject_id IN ('C3', 'C4') ORDER BY subject_id"
                               ).result_rows == [(Decimal("0.0000"), Decimal("0.0000"), Decimal("60.000000")),
                                                 (Decimal("5.0000"), Decimal("0.0000"), Decimal("0.000000"))]
    assert await wait_rows(client(stack), "SELECT credit_cdr_id, status FROM credit_links FINAL WHERE party_id = 'REC'",
                           [("C8-C", "UNKNOWN_REFERENCE")]) == [("C8-C", "UNKNOWN_REFERENCE")]
    assert client(stack).query("SELECT kind, object_id FROM anomalies FINAL WHERE party_id = 'REC' "
                               "ORDER BY kind").result_rows == [("CREDIT_UNKNOWN_REFERENCE", "C8-C")]
    published = await _latest_results(stack, "REC")
    assert sorted((r["subject"], r["subject_id"], r["outcome"]) for r in published.values()) == sorted(
        (s, i, o) for s, i, o, _m, _sid in want)
    # The waiting outcomes the sweep promoted were there first, with their deadline (the table keeps the last row).
    history = await _histories(stack, "REC")
    assert history["SESSION", "S5"] == [("AWAITING_CDR", True), ("MISSING_CDR", True)]
    assert history["CDR", "C6"] == [("AWAITING_SESSION", True), ("NO_SESSION", True)]


async def test_a_cdr_without_a_session_is_billed_then_matched_late_when_its_session_comes(stack: Stack) -> None:
    now = datetime.now(UTC)
    await send(stack, ("CDR", cdr("C1", kwh="10", cost="2.50"), {"received_at": now}), pid="LAT")
    waiting = await wait_rows(client(stack), "SELECT subject_id, outcome, session_id, late FROM reconciliation FINAL "
                              "WHERE party_id = 'LAT'", [("C1", "NO_SESSION", None, False)], timeout=30)
    assert waiting == [("C1", "NO_SESSION", None, False)]
    assert client(stack).query("SELECT cdrs, energy_kwh, cost_excl_vat FROM billing_daily WHERE party_id = 'LAT'"
                               ).result_rows == [(1, Decimal("10.0000"), Decimal("2.5000"))]  # billed anyway
    await send(stack, ("Session", session("S1", status="COMPLETED", end=60, updated=60, kwh="10", cost="2.50"),
                       {"received_at": max(datetime.now(UTC), now + timedelta(seconds=5))}), pid="LAT")
    ten, cost, zero = Decimal("10.0000"), Decimal("2.5000"), Decimal("0.0000")
    want = [("CDR", "C1", "MATCHED", "SESSION_ID", "S1", ["C1"], ten, ten, zero, cost, cost, zero, True, None),
            ("SESSION", "S1", "MATCHED", "SESSION_ID", "S1", ["C1"], ten, ten, zero, cost, cost, zero, False, None)]
    rows = await wait_rows(client(stack), "SELECT subject, subject_id, outcome, method, session_id, cdr_ids, "
                           "session_kwh, cdr_kwh, delta_kwh, session_cost_excl_vat, cdr_cost_excl_vat, "
                           "delta_cost_excl_vat, late, due_at FROM reconciliation FINAL WHERE party_id = 'LAT' "
                           "ORDER BY subject", want, timeout=30)
    assert rows == want
    assert (await _histories(stack, "LAT"))["CDR", "C1"] == [("AWAITING_SESSION", True), ("NO_SESSION", True),
                                                            ("MATCHED", False)]
    assert client(stack).query("SELECT cdrs, energy_kwh, cost_excl_vat FROM billing_daily WHERE party_id = 'LAT'"
                               ).result_rows == [(1, ten, cost)]  # still billed once
    assert client(stack).query("SELECT count() FROM anomalies FINAL WHERE party_id = 'LAT'").result_rows == [(0,)]


async def test_a_cdr_naming_an_unknown_session_falls_back_to_its_authorization_reference(stack: Stack) -> None:
    # The CDR was received two hours ago: its session (S9) did not come within its grace, so it falls back.
    now = datetime.now(UTC)
    await send(stack, ("CDR", cdr("C1", session_id="S9", authref="AUTH-1", end=61),
                       {"received_at": now - timedelta(hours=2)}),
               ("Session", session("S1", status="COMPLETED", authref="AUTH-1", end=60, updated=60, kwh="10",
                                   cost="2.50"), {"received_at": now}), pid="FBK")
    # Which fact stage 2 sees first decides when the fallback happens, hence `late`, `event_time` and `version`.
    skip = ("late", "event_time", "version")
    columns = ", ".join(c for c in RECONCILIATION_COLUMNS if c not in skip)
    ten, cost, zero = Decimal("10.0000"), Decimal("2.5000"), Decimal("0.0000")
    want = [("NL", "FBK", "CDR", "C1", "p1", "EUR", "MATCHED", "AUTHORIZATION_REFERENCE", "S1", ["C1"], ten, ten,
             zero, cost, cost, zero, Decimal("0.000000"), Decimal("60.000000"), None),
            ("NL", "FBK", "SESSION", "S1", "p1", "EUR", "MATCHED", "AUTHORIZATION_REFERENCE", "S1", ["C1"], ten, ten,
             zero, cost, cost, zero, None, None, None)]
    rows = await wait_rows(client(stack), f"SELECT {columns} FROM reconciliation FINAL WHERE party_id = 'FBK' "
                           "ORDER BY subject", want, timeout=30)
    assert rows == want


async def _histories(stack: Stack, party_id: str) -> dict[tuple[str, str], list[tuple[str, bool]]]:
    """Every (outcome, has a deadline) published per subject of one party, in version order."""
    rows = await _results(stack, party_id)
    return {subject: [(r["outcome"], r["due_at"] is not None) for r in sorted(
        {r["version"]: r for r in published}.values(), key=lambda r: r["version"])]
        for subject, published in rows.items()}


async def _latest_results(stack: Stack, party_id: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The last result per subject of one party on the reconciliation topic."""
    return {subject: max(published, key=lambda r: r["version"])
            for subject, published in (await _results(stack, party_id)).items()}


async def _results(stack: Stack, party_id: str) -> dict[tuple[str, str], list[dict[str, Any]]]:
    """Every result per subject of one party on the reconciliation topic, in the order published."""
    consumer = AIOKafkaConsumer(stack.settings.pipeline.topic_reconciliation, bootstrap_servers=stack.bootstrap,
                                group_id=None, auto_offset_reset="earliest")
    await consumer.start()
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    try:
        # To the topic's end as it is now (a fetch that comes back empty for 2 s on a loaded machine is no end).
        topic = stack.settings.pipeline.topic_reconciliation
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        deadline = time.monotonic() + 60
        while True:
            if not [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                return results
            assert time.monotonic() < deadline, "the reconciliation topic was not read to its end in 60 s"
            batch = await consumer.getmany(timeout_ms=500)
            for messages in batch.values():
                for message in messages:
                    row = msgspec.json.decode(message.value)
                    if row["party_id"] == party_id:
                        results.setdefault((row["subject"], row["subject_id"]), []).append(row)
    finally:
        await consumer.stop()


async def test_evse_status_changes_out_of_order_keep_the_newest_and_their_history(stack: Stack) -> None:
    loc = {**location(evses=[evse("E1"), evse("E2")]), "party_id": "EVS"}
    patch = {"object_id": "LOC1", "evse_uid": "E1"}
    await send(stack, ("Location", loc), ("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(10))}, patch),
               ("EVSEPatch", {"status": "AVAILABLE", "last_updated": iso(ts(30))}, patch),
               ("EVSEPatch", {"status": "BLOCKED", "last_updated": iso(ts(20))}, patch), pid="EVS")
    assert [o for *_, o in await outcomes(stack, "EVS", 4)] == ["APPLIED", "APPLIED", "APPLIED", "STALE"]
    assert client(stack).query("SELECT evse_uid, status FROM evses FINAL WHERE party_id = 'EVS' ORDER BY evse_uid"
                               ).result_rows == [("E1", "AVAILABLE"), ("E2", "AVAILABLE")]
    assert client(stack).query("SELECT evse_uid, previous_status, status FROM evse_status_history FINAL "
                               "WHERE party_id = 'EVS' ORDER BY evse_uid, version").result_rows == [
        ("E1", "", "AVAILABLE"), ("E1", "AVAILABLE", "CHARGING"), ("E1", "CHARGING", "AVAILABLE"),
        ("E2", "", "AVAILABLE")]
    [(document,)] = client(stack).query("SELECT payload_json FROM locations FINAL WHERE party_id = 'EVS'"
                                        ).result_rows
    assert json.loads(document)["last_updated"] == iso(ts(30))


async def test_an_undecodable_record_becomes_a_dead_letter(stack: Stack) -> None:
    topic = stack.settings.kafka.topic_sessions
    await publish(stack.bootstrap, [(topic, b"NL/DLQ/S1", b"not avro")])
    rows = await wait_for(client(stack), f"SELECT kafka_topic, value_hex, error FROM dead_letters "
                          f"WHERE kafka_topic = '{topic}' AND key_hex = lower(hex('NL/DLQ/S1'))",
                          lambda rows: len(rows) == 1)
    assert [(t, bytes.fromhex(v)) for t, v, _e in rows] == [(topic, b"not avro")]
    assert "undecodable record" in rows[0][2]
    await asyncio.sleep(0)


async def test_records_not_keyed_by_their_object_and_tombstones_are_dead_letters_and_the_partition_goes_on(
        stack: Stack) -> None:
    """The receivers key every event by its object (`CC/PID/ID`), which keeps its events in the partition that
    holds its state. An event keyed by another object, or by none, was applied all the same, on a partition that
    may not hold its object's state: a second copy of the object, which no later event of it reaches. Each is a
    dead letter with the key and value it was read with, as is a tombstone; the record after them is applied."""
    topic = stack.settings.kafka.topic_sessions
    _t, key, value = record(stack.settings, "Session", {**session("S1"), "party_id": "KEY"}, pid="KEY")
    _t, good_key, good = record(stack.settings, "Session", {**session("S2"), "party_id": "KEY"}, pid="KEY")
    assert key == b"NL/KEY/S1"
    await publish(stack.bootstrap, [(topic, b"NL/KEY/S9", value), (topic, b"nl/key/s1", value), (topic, None, value),
                                    (topic, b"NL/KEY/T1", None), (topic, good_key, good)])  # type: ignore[list-item]
    assert await outcomes(stack, "KEY", 1) == [("S2", "PUT", "APPLIED")]
    sql = (f"SELECT key_hex, value_hex, error FROM dead_letters FINAL WHERE kafka_topic = '{topic}' AND "
           f"(startsWith(key_hex, lower(hex('NL/KEY/'))) OR startsWith(key_hex, lower(hex('nl/key/'))) "
           f"OR (key_hex = '' AND position(value_hex, lower(hex('KEY'))) > 0)) ORDER BY value_hex = '', key_hex")
    rows = await wait_for(client(stack), sql, lambda rows: len(rows) >= 4)
    assert [(bytes.fromhex(k), bytes.fromhex(v)) for k, v, _e in rows] == [
        (b"", value), (b"NL/KEY/S9", value), (b"nl/key/s1", value), (b"NL/KEY/T1", b"")]  # the partitions' order
    assert [e.split(":")[0] for _k, _v, e in rows] == [
        "does not fit its topic", "does not fit its topic", "does not fit its topic", "undecodable record"]
    assert all("not by its object's key b'NL/KEY/S1'" in e for _k, _v, e in rows[:3])
    assert client(stack).query("SELECT session_id FROM sessions FINAL WHERE party_id = 'KEY'").result_rows == [
        ("S2",)]
