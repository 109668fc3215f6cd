"""A run of one object's events in one batch gives the rows and state it gives one event per batch.

Within a run the Struct an applied event produced is kept for the next event (`wire.StoredStruct`) instead of
being decoded again from the stored JSON; nothing may depend on which of the two the next event started from.
"""

from __future__ import annotations

from typing import Any, Final

import pytest

from pipeline import wire
from pipeline.locations import process_locations
from pipeline.projection import LOCATION_COLUMNS, SESSION_COLUMNS
from pipeline.sessions import process_sessions
from pipeline.state import LocationState, SessionState

from .builders import Harness, connector, event, evse, iso, location, period, session, ts


def location_events() -> list[Any]:
    def status(uid: str, value: str, minute: float) -> Any:
        return event("EVSEPatch", {"status": value, "last_updated": iso(ts(minute))}, object_id="LOC1",
                     evse_uid=uid, received=minute)

    return [
        status("E1", "CHARGING", 1),  # before its Location: parked, then applied
        event("Location", location(evses=[evse("E1"), evse("E2"), evse("E3")]), received=2),
        status("E2", "CHARGING", 3),
        status("E2", "CHARGING", 3),  # the same content again: a duplicate
        status("E3", "OUTOFORDER", 4),
        status("E2", "AVAILABLE", 2.5),  # older than what is stored for E2: stale
        event("ConnectorPatch", {"max_electric_power": 11000, "last_updated": iso(ts(5))}, object_id="LOC1",
              evse_uid="E1", connector_id="1", received=5),
        event("EVSE", {**evse("E4"), "last_updated": iso(ts(6))}, object_id="LOC1", evse_uid="E4", received=6),
        event("LocationPatch", {"publish": False, "publish_allowed_to": [{"visual_number": "1", "issuer": "I"}],
                                "last_updated": iso(ts(7))}, object_id="LOC1", received=7),
        event("LocationPatch", {"publish": True, "last_updated": iso(ts(8))}, object_id="LOC1",
              received=8),  # publish_allowed_to is only allowed when publish is false: an invalid merge
        event("Connector", {**connector("2"), "last_updated": iso(ts(9))}, object_id="LOC1", evse_uid="E4",
              connector_id="2", received=9),
        status("E4", "CHARGING", 10),
    ]


def session_events() -> list[Any]:
    def patch(minute: float, **fields: Any) -> Any:
        return event("SessionPatch", {**fields, "last_updated": iso(ts(minute))}, object_id="S1", received=minute)

    return [
        patch(1, kwh=1),  # before its PUT: parked, then applied
        event("Session", session(updated=2), received=2),
        patch(3, kwh=2, charging_periods=[period(0, "2")]),
        patch(4, kwh=3, charging_periods=[period(3, "1")]),
        patch(4, kwh=3, charging_periods=[period(3, "1")]),  # a duplicate
        patch(5, total_cost={"excl_vat": 1, "incl_vat": 1.21}),
        patch(6, status="COMPLETED", end_date_time=iso(ts(6))),
        patch(7, status="ACTIVE"),  # out of a final state: rejected
        patch(8, kwh=4),
    ]


@pytest.mark.parametrize(("process", "state_type", "events", "key"), [
    (process_locations, LocationState, location_events, "NL/TNM/LOC1"),
    (process_sessions, SessionState, session_events, "NL/TNM/S1"),
])
def test_one_batch_and_one_batch_per_event_agree(process: Any, state_type: type, events: Any, key: str) -> None:
    together, apart = Harness(process, state_type), Harness(process, state_type)
    run = events()
    out = together.run(*run)
    outs = [apart.run(item) for item in run]
    assert comparable(out.batch.tables()) == comparable(merged_tables(outs))
    assert sum((o.outcomes for o in outs), start=out.outcomes.__class__()) == out.outcomes
    assert together.state(key) == apart.state(key)
    assert set(out.outcomes) > {"APPLIED"}  # the run covers more than applied events


# Current-state tables whose row carries the whole object: a batch writes an object's last version only.
_CURRENT: Final = {"locations": LOCATION_COLUMNS.index("version"), "sessions": SESSION_COLUMNS.index("version")}


def comparable(tables: dict[str, list[list[Any]]]) -> dict[str, Any]:
    """raw_events rows replace each other by event id (a parked event's row, then its outcome's): the last one
    of each counts; of `locations` and `sessions`, what ReplacingMergeTree keeps (an object's highest version);
    every other table's rows in order."""
    found: dict[str, Any] = {}
    for table, rows in tables.items():
        if table == "raw_events":
            found[table] = {row[0]: row for row in rows}
        elif table in _CURRENT:
            version = _CURRENT[table]
            found[table] = {tuple(row[:3]): row for row in sorted(rows, key=lambda row: row[version])}
        else:
            found[table] = rows
    return found


def merged_tables(outs: list[Any]) -> dict[str, list[list[Any]]]:
    tables: dict[str, list[list[Any]]] = {}
    for out in outs:
        for table, rows in out.batch.tables().items():
            tables.setdefault(table, []).extend(rows)
    return tables


def test_a_stored_struct_is_decoded_once_per_document() -> None:
    document = wire.struct_json(wire.validated(wire.ocpi_json(session()), wire_model()))
    kept = wire.StoredStruct(wire_model())
    assert kept.of(None) is None
    first = kept.of(document)
    assert kept.of(document) is first  # the same bytes object: not decoded again
    assert kept.of(bytes(bytearray(document))) == first  # an equal copy is decoded again, to an equal Struct
    merged = wire.validated(document, wire_model())
    kept.keep(document, merged)
    assert kept.of(document) is merged


def wire_model() -> Any:
    from ocpi.model import Session

    return Session
