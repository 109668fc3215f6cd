"""The ledger of accepted pushes: every event a receiver acknowledged ends with one `raw_events` row and the
outcome of its category, whatever the batches, crashes, resent records and deadline sweeps; the reports count
them the same way.

Stage 1 runs as the agent runs it (`agents.fold` over overlays of the state), its rows go into chDB in batch
order, and the deadline sweep (`sweeps.collect`) ends the waits that passed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from datetime import timedelta
from decimal import Decimal
from typing import Any

from clickhouse_connect.driver.client import Client

from infra.codec import DecodedEvent
from pipeline import reports, sweeps
from pipeline.agents import fold
from pipeline.cdrs import process_cdrs
from pipeline.locations import process_locations
from pipeline.records import Record, utc_now
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.sink import insert_rows
from pipeline.stage import StageOutput
from pipeline.state import CdrState, Codec, LocationState, SessionState

from .builders import PSEUDONYM_KEY, DictStore, cdr, connector, event, evse, iso, location, session, stage_rules, ts

RULES = stage_rules(park_ttl_min=5, park_max=2)
SWEEP_RULES = dataclasses.replace(RULES, arrival_margin=timedelta(seconds=1))  # the sweep waits 1 s past a deadline


class Module:
    """One module topic's stage 1: a partition of records, a state store, rows written to chDB per batch."""

    def __init__(self, client: Client, topic: str, process: Any, state_type: type) -> None:
        self.client, self.topic, self.process = client, topic, process
        self.codec = Codec(state_type)
        self.store = DictStore()
        self.records: list[Record] = []
        self.pseudonym = Pseudonymizer(PSEUDONYM_KEY)

    def append(self, *events: DecodedEvent) -> list[Record]:
        """Put events on the topic (the same event twice: a producer's resend)."""
        from infra.codec import encode_event

        added = [Record(e, self.topic, 0, len(self.records) + i, encode_event(e.to_event()))
                 for i, e in enumerate(events)]
        self.records += added
        return added

    def batch(self, records: Sequence[Record], *, crash: bool = False) -> None:
        out = StageOutput(self.pseudonym)
        overlays = fold(records, lambda _anchor: self.store.data.get, self.codec, self.process, RULES, out)
        for table, rows in out.batch.tables().items():
            insert_rows(self.client, table, out.batch.columns[table], rows)
        if crash:
            return  # rows written, state lost: the batch is read again
        for _anchor, overlay in overlays:
            self.store.commit(overlay)


def status(uid: str, value: str, minute: float, received: float, lid: str = "LOC1") -> DecodedEvent:
    return event("EVSEPatch", {"status": value, "last_updated": iso(ts(minute))}, object_id=lid, evse_uid=uid,
                 received=received)


def kwh(sid: str, value: str, minute: float, received: float, **extra: Any) -> DecodedEvent:
    return event("SessionPatch", {"kwh": Decimal(value), "last_updated": iso(ts(minute)), **extra}, object_id=sid,
                 received=received)


def test_every_acknowledged_push_ends_with_one_row_and_the_outcome_of_its_category(client: Client) -> None:
    expected: dict[str, str] = {}

    def push(outcome: str, e: DecodedEvent) -> DecodedEvent:
        expected[e.event_id] = outcome
        return e

    sessions = Module(client, "t.sessions", process_sessions, SessionState)
    s1_put = push("APPLIED", event("Session", session("S1", kwh="1"), received=1))
    s1_tick = push("APPLIED", kwh("S1", "2", 2, 2))
    first = sessions.append(
        s1_put, push("DUPLICATE", event("Session", session("S1", kwh="1"), received=1.5)),  # a partner's retry
        s1_tick, s1_tick,  # the same record twice: a producer's resend
        push("STALE", kwh("S1", "9", 1.5, 3)),
        push("APPLIED", kwh("S1", "3", 4, 4, status="COMPLETED", end_date_time=iso(ts(4)))),
        push("REJECTED", event("SessionPatch", {"status": "ACTIVE", "last_updated": iso(ts(5))}, object_id="S1",
                               received=5)),
        push("APPLIED", kwh("S2", "4", 3, 1)),  # PATCH before PUT, the PUT comes: applied after it
        push("APPLIED", event("Session", session("S2", kwh="1", updated=1), received=2)),
        push("ORPHANED", kwh("S3", "1", 1, 1)),  # PATCH before a PUT that never comes: the sweep ends the wait
        push("ORPHANED", kwh("S4", "1", 1, 1)),  # ended by a later event of its object (event time)
        push("PARKED", kwh("S5", "1", 1, 1)), push("PARKED", kwh("S5", "2", 2, 1.1)),
        push("ORPHANED", kwh("S5", "3", 3, 1.2)),  # the third waiting PATCH overflows at once (park_max 2)
    )
    sessions.batch(first[:6])
    sessions.batch(first[6:9], crash=True)
    sessions.batch(first[6:])
    # the sweep orphans S3 and S4 at 10 minutes: their wait (5 minutes) is over; S4's next PATCH comes after
    late = sessions.append(push("PARKED", kwh("S4", "5", 20, 20)))
    sessions.batch(late)
    expected.update({e.event_id: "ORPHANED" for e in (first[-3].event, first[-2].event, late[0].event)})

    cdrs = Module(client, "t.cdrs", process_cdrs, CdrState)
    c1 = push("APPLIED", event("CDR", cdr("C1"), received=1))
    cdrs.batch(cdrs.append(c1, push("DUPLICATE", event("CDR", cdr("C1"), received=2)), c1,
                           push("CONFLICT", event("CDR", cdr("C1", kwh="11"), received=3))))

    locations = Module(client, "t.locations", process_locations, LocationState)
    charging = push("APPLIED", status("E1", "CHARGING", 2, 2))
    batch = locations.append(
        push("APPLIED", event("Location", location(evses=[evse("E1")], publish=False,
                                                    publish_allowed_to=[{"uid": "TOK1", "type": "RFID"}]),
                              received=1)),
        charging, push("APPLIED", status("E1", "AVAILABLE", 3, 3)), charging,  # a resent batch
        push("DUPLICATE", status("E1", "AVAILABLE", 3.5, 3.5)),
        push("INVALID", event("LocationPatch", {"publish": True, "last_updated": iso(ts(4))}, object_id="LOC1",
                              received=4)),
        push("APPLIED", status("E9", "CHARGING", 5, 5)),  # before its EVSE: parked, applied when the EVSE comes
        push("APPLIED", event("EVSE", evse("E9", updated=4), object_id="LOC1", evse_uid="E9", received=6)),
        push("ORPHANED", event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(1))},
                               object_id="LOC2", evse_uid="E1", connector_id="1", received=1)),
        push("STALE", event("Connector", connector(updated=-1), object_id="LOC1", evse_uid="E1",
                            connector_id="1", received=7)),
    )
    locations.batch(batch)

    batch_rows, _promoted = sweeps.collect(client, ts(10), SWEEP_RULES,
                                           anomalies_kept=timedelta(days=90))
    for table, rows in batch_rows.tables().items():
        insert_rows(client, table, batch_rows.columns[table], rows)
    # S4's later PATCH is received after that sweep and waits in vain too: a later sweep
    batch_rows, _promoted = sweeps.collect(client, utc_now(), SWEEP_RULES,
                                           anomalies_kept=timedelta(days=90))
    for table, rows in batch_rows.tables().items():
        insert_rows(client, table, batch_rows.columns[table], rows)

    got = dict(client.query("SELECT event_id, outcome FROM raw_events FINAL").result_rows)
    assert got == expected
    assert client.query("SELECT count() FROM raw_events FINAL GROUP BY event_id HAVING count() > 1").result_rows == []
    by_outcome = dict(client.query("SELECT outcome, count() FROM raw_events FINAL GROUP BY outcome").result_rows)
    assert sum(by_outcome.values()) == len(expected)
    columns, rows = reports.run(client, reports.health(reports.Period(), partner=None, raw_days=30))
    assert sum(row[columns.index("pushes")] for row in rows) == len(expected)
    # what was applied is what the current state holds
    assert client.query("SELECT session_id, kwh, status FROM sessions FINAL ORDER BY session_id").result_rows == [
        ("S1", Decimal(3), "COMPLETED"), ("S2", Decimal(4), "ACTIVE")]
    assert client.query("SELECT count() FROM cdrs FINAL").result_rows == [(1,)]
    assert client.query("SELECT evse_uid, status FROM evses FINAL ORDER BY evse_uid").result_rows == [
        ("E1", "AVAILABLE"), ("E9", "CHARGING")]
