"""Stage 1 against delivery order, batching and crashes (hypothesis).

What README ("The pipeline: from pushes to billing truth") promises, checked on generated histories of one object:

- batching and crashes change nothing: the same arrival order folded in any split into batches, with batches
  whose state was lost in a crash read again (their rows written twice), ends with the same state and the same rows
  ClickHouse keeps (`ReplacingMergeTree(version)`: per key the highest version, of equal ones the last inserted);
- those rows are the final state: the row ClickHouse keeps per key is the one of the state's current version, and
  every applied state outranks every state written before it for that key, across batches;
- delivery order: where the rules make no exception (older pushes are STALE, equal `last_updated` is a tie the
  later arrival wins, PATCHes merge the fields they set), every permutation of a CPO's pushes, with retries,
  bumped `last_updated` re-pushes and resends, ends in the state a CPO's own order gives.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra.codec import DecodedEvent
from pipeline.agents import fold
from pipeline.cdrs import process_cdrs
from pipeline.locations import process_locations
from pipeline.projection import (
    CDR_COLUMNS,
    CONNECTOR_COLUMNS,
    EVSE_COLUMNS,
    LOCATION_COLUMNS,
    SESSION_COLUMNS,
)
from pipeline.records import Record
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.stage import StageOutput
from pipeline.state import CdrState, Codec, LocationState, SessionState

from .builders import (
    PSEUDONYM_KEY,
    DictStore,
    Feed,
    cdr,
    connector,
    event,
    evse,
    iso,
    location,
    session,
    stage_rules,
    ts,
)

# Table -> (key columns, version column) as the migrations declare them (ORDER BY of ReplacingMergeTree(version)).
KEYS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "sessions": (SESSION_COLUMNS, ("country_code", "party_id", "session_id")),
    "locations": (LOCATION_COLUMNS, ("country_code", "party_id", "location_id")),
    "evses": (EVSE_COLUMNS, ("country_code", "party_id", "location_id", "evse_uid")),
    "connectors": (CONNECTOR_COLUMNS, ("country_code", "party_id", "location_id", "evse_uid", "connector_id")),
    "cdrs": (CDR_COLUMNS, ("country_code", "party_id", "cdr_id")),
}
# ORDER_EXAMPLES=2000 to search longer (about 10 s per 1000 examples of a test).
FAST = settings(max_examples=int(os.environ.get("ORDER_EXAMPLES", "40")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])
RULES = stage_rules(park_ttl_min=10_000, park_max=50)
_ROW = msgspec.json.Encoder(decimal_format="number")


@dataclass
class Worker:
    """Stage 1 as the agent runs it (`agents.fold` over overlays of a table), without Kafka and ClickHouse: rows go
    to `inserted` in insertion order, states to `store` only when a batch is committed."""

    process: Any
    codec: Codec[Any]
    store: DictStore = field(default_factory=DictStore)
    inserted: list[tuple[str, list[Any]]] = field(default_factory=list)
    pseudonym: Pseudonymizer = field(default_factory=lambda: Pseudonymizer(PSEUDONYM_KEY))

    def batch(self, records: Sequence[Record], *, crash: bool = False) -> None:
        out = StageOutput(self.pseudonym)
        overlays = fold(records, lambda _anchor: self.store.data.get, self.codec, self.process, RULES, out)
        for table, rows in out.batch.tables().items():
            self.inserted.extend((table, row) for row in rows)
        if crash:  # rows written, state lost: the records are read again
            return
        for _anchor, overlay in overlays:
            self.store.commit(overlay)

    def final(self) -> dict[str, dict[tuple[Any, ...], list[Any]]]:
        """What `SELECT ... FINAL` reads per table: per key the highest version, of equal ones the last inserted."""
        kept: dict[str, dict[tuple[Any, ...], list[Any]]] = {}
        for table, row in self.inserted:
            if table == "raw_events":  # no version: the row inserted last (migration 0006)
                kept.setdefault(table, {})[(row[0],)] = row
                continue
            if table not in KEYS:
                continue
            columns, key_columns = KEYS[table]
            key = tuple(row[columns.index(c)] for c in key_columns)
            version = row[columns.index("version")]
            held = kept.setdefault(table, {}).get(key)
            if held is None or version >= held[columns.index("version")]:
                kept[table][key] = row
        return kept

    def state(self, key: str) -> Any:
        data = self.store.data.get(key)
        return None if data is None else self.codec.decode(data)


def records_of(events: Sequence[DecodedEvent]) -> list[Record]:
    feed = Feed()
    return [feed.record(e) for e in events]


def run(process: Any, state_type: type, records: Sequence[Record], cuts: Sequence[int] = (),
        crashes: Collection[int] = ()) -> Worker:
    """Fold `records` (one partition, in offset order) in batches cut at `cuts`; the batches numbered in `crashes`
    lose their state and are read again (at-least-once)."""
    worker = Worker(process, Codec(state_type))
    bounds = sorted({c for c in cuts if 0 < c < len(records)})
    batches = [list(records[a:b]) for a, b in zip([0, *bounds], [*bounds, len(records)], strict=True)]
    for number, batch in enumerate(batches):
        if number in crashes:
            worker.batch(batch, crash=True)
        worker.batch(batch)
    return worker


def text(value: Any) -> str:
    return _ROW.encode(value).decode()


def comparable(rows: dict[str, dict[tuple[Any, ...], list[Any]]]) -> dict[str, dict[tuple[Any, ...], Any]]:
    """The kept rows as text (nothing of them may differ between two runs of the same history)."""
    return {table: {key: text(row) for key, row in kept.items()} for table, kept in rows.items()}


def check_versions(worker: Worker) -> None:
    """Every state outranks the states written before it for its key: a row carries a version higher than every
    earlier row of its key, unless it repeats one of them (a batch read again after a crash), version and content."""
    seen: dict[tuple[str, tuple[Any, ...]], dict[int, str]] = {}
    for table, row in worker.inserted:
        if table not in KEYS:
            continue
        columns, key_columns = KEYS[table]
        key = (table, tuple(row[columns.index(c)] for c in key_columns))
        version = row[columns.index("version")]
        content = text([v for c, v in zip(columns, row, strict=True) if c not in ("event_id", "received_at")])
        versions = seen.setdefault(key, {})
        if version in versions:
            assert versions[version] == content, f"{key}: two states with version {version}"
        else:
            assert not versions or version > max(versions), (
                f"{key}: a later state ({version}) does not outrank an earlier one ({max(versions)})")
            versions[version] = content


# --- Sessions ---------------------------------------------------------------------------------------------------

SESSION_KEY = "NL/TNM/S1"


@st.composite
def session_histories(draw: st.DrawFn) -> list[DecodedEvent]:
    """PUTs and PATCHes of one Session: any mix of kwh, cost and status changes, equal or distinct last_updated,
    retries (same body), re-pushes with a bumped last_updated."""
    count = draw(st.integers(1, 6))
    events: list[DecodedEvent] = []
    for _ in range(count):
        minute = draw(st.integers(0, 5))
        kwh = draw(st.sampled_from(["1", "2", "3"]))
        if events and draw(st.integers(0, 3)) == 0:  # a retry: the same push again, or with a bumped time
            previous = draw(st.sampled_from(events))
            payload = dict(previous.payload)
            if draw(st.booleans()):
                payload["last_updated"] = ts(minute)
            kind = "SessionPatch" if previous.operation == "PATCH" else "Session"
            events.append(event(kind, _json_body(payload), object_id="S1", received=minute))
        elif draw(st.booleans()):
            status = draw(st.sampled_from(["ACTIVE", "ACTIVE", "COMPLETED"]))
            events.append(event("Session", session(kwh=kwh, status=status, updated=minute), received=minute))
        else:
            body: dict[str, Any] = {"kwh": Decimal(kwh), "last_updated": iso(ts(minute))}
            if draw(st.booleans()):
                body["total_cost"] = {"excl_vat": Decimal(kwh), "incl_vat": Decimal(kwh)}
            events.append(event("SessionPatch", body, object_id="S1", received=minute))
    return events


def _json_body(payload: dict[str, Any]) -> dict[str, Any]:
    """A decoded payload as the JSON body it came from (datetimes as OCPI DateTimes)."""
    def convert(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: convert(v) for k, v in value.items()}
        if isinstance(value, list):
            return [convert(v) for v in value]
        if hasattr(value, "tzinfo"):
            return iso(value)
        return value
    return convert(payload)


@FAST
@given(session_histories(), st.lists(st.integers(1, 8), max_size=4), st.sets(st.integers(0, 4), max_size=2))
def test_sessions_end_the_same_in_any_batches_and_after_crashes(history: list[DecodedEvent], cuts: list[int],
                                                                crashes: set[int]) -> None:
    records = records_of(history)
    whole = run(process_sessions, SessionState, records)
    split = run(process_sessions, SessionState, records, cuts, crashes)
    assert whole.state(SESSION_KEY) == split.state(SESSION_KEY)
    assert comparable(whole.final()) == comparable(split.final())
    for worker in (whole, split):
        check_versions(worker)
        state = worker.state(SESSION_KEY)
        kept = worker.final().get("sessions", {})
        if state.object_json is None:
            assert not kept
        else:
            (row,) = kept.values()
            assert row[SESSION_COLUMNS.index("version")] == state.version
            assert json.loads(text(row[SESSION_COLUMNS.index("payload_json")])) == json.loads(state.object_json)


@st.composite
def session_deliveries(draw: st.DrawFn) -> tuple[list[DecodedEvent], str | None, str | None]:
    """A CPO's pushes of one Session that each set its kwh (PUTs that differ in nothing else, PATCHes of kwh), at
    distinct times, the last one possibly the PUT that completes it; delivered in any order, some of them twice (a
    retry: a new event, the same body). Returns the deliveries and the kwh and status the CPO's own order ends in."""
    minutes = draw(st.lists(st.integers(0, 9), min_size=1, max_size=5, unique=True))
    pushes = [(minute, draw(st.booleans()), draw(st.sampled_from(["1", "2", "3"]))) for minute in minutes]
    completes = draw(st.booleans())
    last = max(minutes)
    events: list[tuple[int, bool, str]] = []
    for minute, is_put, kwh in pushes:
        events.append((minute, is_put or (completes and minute == last), kwh))
    truth_kwh: str | None = None
    for _minute, is_put, kwh in sorted(events):
        if is_put or truth_kwh is not None:
            truth_kwh = kwh
    status = None if truth_kwh is None else ("COMPLETED" if completes else "ACTIVE")
    order = draw(st.permutations(events + draw(st.lists(st.sampled_from(events), max_size=3))))

    def build(minute: int, is_put: bool, kwh: str) -> DecodedEvent:
        if is_put:
            return event("Session", session(kwh=kwh, updated=minute,
                                            status="COMPLETED" if completes and minute == last else "ACTIVE"))
        return event("SessionPatch", {"kwh": Decimal(kwh), "last_updated": iso(ts(minute))}, object_id="S1")

    return [build(*push) for push in order], truth_kwh, status


@FAST
@given(session_deliveries(), st.lists(st.integers(1, 8), max_size=3), st.sets(st.integers(0, 3), max_size=2))
def test_a_sessions_pushes_end_in_the_cpos_state_in_any_delivery_order(
        delivered: tuple[list[DecodedEvent], str | None, str | None], cuts: list[int], crashes: set[int]) -> None:
    history, kwh, status = delivered
    worker = run(process_sessions, SessionState, records_of(history), cuts, crashes)
    check_versions(worker)
    kept = worker.final().get("sessions", {})
    if kwh is None:
        assert not kept
        return
    (row,) = kept.values()
    assert (row[SESSION_COLUMNS.index("kwh")], row[SESSION_COLUMNS.index("status")]) == (Decimal(kwh), status)
    state = worker.state(SESSION_KEY)
    assert row[SESSION_COLUMNS.index("version")] == state.version
    assert json.loads(text(row[SESSION_COLUMNS.index("payload_json")])) == json.loads(state.object_json)


# --- Locations --------------------------------------------------------------------------------------------------

LOCATION_KEY = "NL/TNM/LOC1"
UIDS = ["E1", "E2"]
STATUSES = ["AVAILABLE", "CHARGING", "BLOCKED"]


def _connectors(draw: st.DrawFn, minute: int) -> list[dict[str, Any]]:
    ids = draw(st.sampled_from([["1"], ["1", "2"], ["2"]]))
    return [connector(cid, updated=minute, power=draw(st.sampled_from([11000, 22000]))) for cid in ids]


def _evse(draw: st.DrawFn, uid: str, minute: int) -> dict[str, Any]:
    return evse(uid, status=draw(st.sampled_from(STATUSES)), updated=minute, connectors=_connectors(draw, minute))


def _spelled(draw: st.DrawFn, ident: str) -> str:
    """An id as one push or another spells it (CiString: compared ignoring case)."""
    return draw(st.sampled_from([ident, ident.lower()]))


@st.composite
def location_pushes(draw: st.DrawFn) -> DecodedEvent:
    """One push of Location LOC1's tree at any level, at minute 0-5, ids in either case."""
    minute = draw(st.integers(0, 5))
    lid = _spelled(draw, "LOC1")
    uid = _spelled(draw, draw(st.sampled_from(UIDS)))
    cid = draw(st.sampled_from(["1", "2"]))
    kind = draw(st.sampled_from(["Location", "LocationPatch", "EVSE", "EVSEPatch", "Connector", "ConnectorPatch"]))
    if kind == "Location":
        uids = draw(st.sampled_from([UIDS, ["E1"], ["E2"], ["E2", "E1"]]))
        return event(kind, location(lid, evses=[_evse(draw, _spelled(draw, u), minute) for u in uids],
                                    updated=minute, name=draw(st.sampled_from(["A", "B"]))))
    if kind == "LocationPatch":
        change = draw(st.sampled_from(["name", "publish", "allowed", "evses"]))
        body: dict[str, Any] = {"last_updated": iso(ts(minute))}
        if change == "name":
            body["name"] = draw(st.sampled_from(["A", "B"]))
        elif change == "publish":  # true while publish_allowed_to is set: an invalid merge
            body["publish"] = draw(st.booleans())
        elif change == "allowed":
            body["publish_allowed_to"] = [{"uid": "TOK1", "type": "RFID"}]
        else:
            body["evses"] = [_evse(draw, _spelled(draw, u), minute) for u in draw(st.sampled_from([UIDS, ["E2"]]))]
        return event(kind, body, object_id=lid)
    if kind == "EVSE":
        return event(kind, _evse(draw, uid, minute), object_id=lid, evse_uid=uid)
    if kind == "EVSEPatch":
        return event(kind, {"status": draw(st.sampled_from(STATUSES)), "last_updated": iso(ts(minute))},
                     object_id=lid, evse_uid=uid)
    if kind == "Connector":
        return event(kind, connector(cid, updated=minute, power=draw(st.sampled_from([11000, 22000]))),
                     object_id=lid, evse_uid=uid, connector_id=cid)
    return event(kind, {"max_electric_power": draw(st.sampled_from([11000, 22000])), "last_updated": iso(ts(minute))},
                 object_id=lid, evse_uid=uid, connector_id=cid)


def again(previous: DecodedEvent, minute: int | None) -> DecodedEvent:
    """A retry of `previous` (a new event, the same body), its last_updated bumped to `minute` if given."""
    payload = dict(previous.payload)
    if minute is not None:
        payload["last_updated"] = ts(minute)
    return event(previous.payload_type, _json_body(payload), object_id=previous.object_id,
                 evse_uid=previous.evse_uid, connector_id=previous.connector_id)


@st.composite
def location_histories(draw: st.DrawFn) -> list[DecodedEvent]:
    events: list[DecodedEvent] = []
    for _ in range(draw(st.integers(1, 7))):
        if events and draw(st.integers(0, 3)) == 0:
            events.append(again(draw(st.sampled_from(events)), draw(st.none() | st.integers(0, 5))))
        else:
            events.append(draw(location_pushes()))
    return events


@FAST
@given(location_histories(), st.lists(st.integers(1, 8), max_size=4), st.sets(st.integers(0, 4), max_size=2))
def test_locations_end_the_same_in_any_batches_and_after_crashes(history: list[DecodedEvent], cuts: list[int],
                                                                 crashes: set[int]) -> None:
    records = records_of(history)
    whole = run(process_locations, LocationState, records)
    split = run(process_locations, LocationState, records, cuts, crashes)
    assert whole.state(LOCATION_KEY) == split.state(LOCATION_KEY)
    assert comparable(whole.final()) == comparable(split.final())
    for worker in (whole, split):
        check_versions(worker)
        state = worker.state(LOCATION_KEY)
        kept = worker.final()
        if state.object_json is None:
            assert "locations" not in kept
            continue
        tree = json.loads(state.object_json)
        (row,) = kept["locations"].values()
        assert row[LOCATION_COLUMNS.index("version")] == state.version
        assert json.loads(text(row[LOCATION_COLUMNS.index("payload_json")])) == tree
        present = {key[3]: row for key, row in kept.get("evses", {}).items()
                   if row[EVSE_COLUMNS.index("present")]}
        assert {e["uid"].upper(): e for e in tree["evses"]} == {
            uid: json.loads(text(row[EVSE_COLUMNS.index("payload_json")])) for uid, row in present.items()}
        connectors = {(key[3], key[4]): json.loads(text(row[CONNECTOR_COLUMNS.index("payload_json")]))
                      for key, row in kept.get("connectors", {}).items() if row[CONNECTOR_COLUMNS.index("present")]}
        assert connectors == {(e["uid"].upper(), c["id"].upper()): c for e in tree["evses"] for c in e["connectors"]}


@st.composite
def evse_status_deliveries(draw: st.DrawFn) -> tuple[list[DecodedEvent], dict[str, str], int | None]:
    """A Location PUT at minute 0 (with E1, maybe E2) and EVSE status pushes (PUT or PATCH) of E1 and E2 at distinct
    times per EVSE (E2 perhaps never PUT: its PATCHes then wait); delivered in any order, some twice, some again
    with a bumped time. Returns the deliveries, each EVSE's status and the Location's last_updated in the CPO's
    own order (minutes; None: the Location was never delivered)."""
    base_uids = draw(st.sampled_from([["E1"], ["E1", "E2"]]))
    base = [(0, "Location", "", {uid: draw(st.sampled_from(STATUSES)) for uid in base_uids})]
    pushes: list[tuple[int, str, str, dict[str, str]]] = []
    for uid in UIDS:
        for minute in draw(st.lists(st.integers(1, 9), max_size=3, unique=True)):
            kind = draw(st.sampled_from(["EVSE", "EVSEPatch"]))
            pushes.append((minute, kind, uid, {uid: draw(st.sampled_from(STATUSES))}))
    # A re-push of an EVSE push with a bumped time: the same content, newer (the CPO confirmed it then).
    for minute, kind, uid, status in draw(st.lists(st.sampled_from(pushes), max_size=2)) if pushes else []:
        later = draw(st.integers(minute + 1, 12))
        if all(m != later for m, _, u, _ in pushes if u == uid):
            pushes.append((later, kind, uid, status))
    statuses: dict[str, str] = {}
    updated: int | None = None
    for minute, kind, uid, change in sorted(base + pushes):
        if kind == "Location" or kind == "EVSE" or uid in statuses:
            statuses.update(change)
            updated = minute if updated is None else max(updated, minute)
    order = draw(st.permutations(base + pushes + draw(st.lists(st.sampled_from(base + pushes), max_size=3))))

    def build(minute: int, kind: str, uid: str, change: dict[str, str]) -> DecodedEvent:
        if kind == "Location":
            return event(kind, location(evses=[evse(u, status=s) for u, s in change.items()]))
        if kind == "EVSE":
            return event(kind, evse(uid, status=change[uid], updated=minute), object_id="LOC1", evse_uid=uid)
        return event(kind, {"status": change[uid], "last_updated": iso(ts(minute))}, object_id="LOC1", evse_uid=uid)

    return [build(*push) for push in order], statuses, updated


@FAST
@given(evse_status_deliveries(), st.lists(st.integers(1, 8), max_size=3), st.sets(st.integers(0, 3), max_size=2))
def test_evse_statuses_end_as_the_cpo_sent_them_in_any_delivery_order(
        delivered: tuple[list[DecodedEvent], dict[str, str], int | None], cuts: list[int], crashes: set[int]) -> None:
    history, statuses, updated = delivered
    worker = run(process_locations, LocationState, records_of(history), cuts, crashes)
    check_versions(worker)
    kept = worker.final()
    state = worker.state(LOCATION_KEY)
    if updated is None:
        assert state.object_json is None and "locations" not in kept
        return
    tree = json.loads(state.object_json)
    assert {e["uid"]: e["status"] for e in tree["evses"]} == statuses
    # Not `updated` itself: a re-push with a bumped time that repeats the last applied push is a duplicate, which
    # makes no version (README, "duplicate"); but a parent is never older than its children (08 §3).
    assert all(tree["last_updated"] >= e["last_updated"] for e in tree["evses"])
    assert {key[3]: row[EVSE_COLUMNS.index("status")] for key, row in kept["evses"].items()} == statuses
    (row,) = kept["locations"].values()
    assert row[LOCATION_COLUMNS.index("version")] == state.version


# --- CDRs -------------------------------------------------------------------------------------------------------


@st.composite
def cdr_deliveries(draw: st.DrawFn) -> list[DecodedEvent]:
    """POSTs of CDRs C1 and C2: two contents each, posted again, with a bumped last_updated or not."""
    events = []
    for _ in range(draw(st.integers(1, 6))):
        cid = draw(st.sampled_from(["C1", "C2"]))
        events.append(event("CDR", cdr(cid, cost=draw(st.sampled_from(["2.50", "3.00"])),
                                       updated=draw(st.integers(60, 65)))))
    return events


@FAST
@given(cdr_deliveries(), st.lists(st.integers(1, 8), max_size=3), st.sets(st.integers(0, 3), max_size=2))
def test_a_cdr_is_stored_once_as_it_first_came_whatever_follows(history: list[DecodedEvent], cuts: list[int],
                                                                crashes: set[int]) -> None:
    worker = run(process_cdrs, CdrState, records_of(history), cuts, crashes)
    check_versions(worker)
    kept = worker.final()["cdrs"]
    first: dict[str, DecodedEvent] = {}
    for e in history:
        first.setdefault(e.payload["id"].upper(), e)
    assert {key[2]: row[CDR_COLUMNS.index("event_id")] for key, row in kept.items()} == {
        cid: e.event_id for cid, e in first.items()}
    for cid, e in first.items():
        assert worker.state(f"NL/TNM/{cid}").content_hash == e.content_hash
