"""A crash at every step of a batch (docs/pipeline.md, "Exactly once in ClickHouse, at least once everywhere else").

The agents run as the worker runs them (`ModuleAgent`, `PartyAgent`, `StateTable.write_batch`) over an in-process
world: Kafka logs, committed offsets, ClickHouse rows and the local state stores are what survives a crash; the
agents, their overlays and their positions are not. Each durable step (one ClickHouse table's insert, one record
or record batch acknowledged, one partition database written, one persisted changelog offset, one commit) is a
crash point. For each, the history is run to that point, the process dies, a new one recovers its tables (from
the local store and the changelog past its persisted offset, or from the changelog alone: a new host) and reads
on from the committed offsets; the end result must be the crash-free run's: the ClickHouse tables as
ReplacingMergeTree collapses them, the reconciliation topic's last record per key, and every state table.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import pytest

from infra.codec import AvroCodecError, decode_event
from infra.kafka.bulk import Acked
from pipeline import agents as agents_module
from pipeline import projection, stage
from pipeline.agents import AgentContext, ModuleAgent, PartyAgent, Progress, StateTable
from pipeline.cdrs import process_cdrs
from pipeline.locations import process_locations
from pipeline.records import RawMessage, object_key
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.state import CdrState, Codec, LocationState, SessionState

from .builders import PSEUDONYM_KEY, T0, cdr, event_bytes, evse, iso, location, session, stage_rules, ts
from .test_reconcile import RULES as PARTY_RULES

# ORDER BY of each table the agents write (migrations), and whether it is ReplacingMergeTree(version).
KEYS: dict[str, tuple[tuple[str, ...], bool]] = {
    "raw_events": (("module", "country_code", "party_id", "object_id", "event_id"), False),
    "sessions": (("country_code", "party_id", "session_id"), True),
    "cdrs": (("country_code", "party_id", "cdr_id"), True),
    "locations": (("country_code", "party_id", "location_id"), True),
    "evses": (("country_code", "party_id", "location_id", "evse_uid"), True),
    "connectors": (("country_code", "party_id", "location_id", "evse_uid", "connector_id"), True),
    "session_status_history": (("country_code", "party_id", "session_id", "event_id"), True),
    "evse_status_history": (("country_code", "party_id", "location_id", "evse_uid", "event_id"), True),
    "cdr_charging_periods": (("country_code", "party_id", "cdr_id", "period_index"), True),
    "cdr_tariffs": (("country_code", "party_id", "cdr_id", "tariff_country_code", "tariff_party_id", "tariff_id"),
                    True),
    "credit_links": (("country_code", "party_id", "credit_cdr_id"), True),
    "reconciliation": (("country_code", "party_id", "subject", "subject_id"), True),
    "anomalies": (("kind", "country_code", "party_id", "object_id", "sub_id", "event_id"), False),
    "dead_letters": (("kafka_topic", "kafka_partition", "kafka_offset", "record_hash"), False),
}
FACTS, RECONCILIATION = "party-facts", "reconciliation"
BATCH = 3  # records per batch


class Killed(BaseException):
    """SIGKILL: nothing after it runs."""


@dataclass
class World:
    """What survives a crash."""

    logs: dict[str, list[tuple[bytes | None, bytes | None]]] = field(default_factory=dict)
    committed: dict[str, int] = field(default_factory=dict)  # per source topic (one partition each)
    rows: list[tuple[str, tuple[str, ...], list[Any]]] = field(default_factory=list)  # ClickHouse, in insert order
    stores: dict[str, dict[bytes, bytes]] = field(default_factory=dict)  # local rocksdb, per table (partition 0)
    persisted: dict[str, int] = field(default_factory=dict)  # per table: changelog offset the store holds
    turn: int = 0  # the agent whose batch is next: a restarted worker goes on with the batch it died in, so the
    # facts reach stage 2 in the crash-free run's order (how the agents interleave is not what is tested here)

    def append(self, topic: str, key: bytes | None, value: bytes | None) -> int:
        log = self.logs.setdefault(topic, [])
        log.append((key, value))
        return len(log) - 1

    def clickhouse(self) -> dict[str, dict[tuple[Any, ...], list[Any]]]:
        """Every table as `SELECT … FINAL` reads it: the highest version per key, the last insert on a tie."""
        final: dict[str, dict[tuple[Any, ...], tuple[int, list[Any]]]] = {}
        for table, columns, row in self.rows:
            key_columns, versioned = KEYS[table]
            key = tuple(row[columns.index(c)] for c in key_columns)
            version = row[columns.index("version")] if versioned else 0
            current = final.setdefault(table, {}).get(key)
            if current is None or version >= current[0]:
                final[table][key] = (version, _comparable(table, columns, row))
        return {table: {k: v for k, (_, v) in rows.items()} for table, rows in final.items()}

    def last_per_key(self, topic: str) -> dict[bytes | None, bytes | None]:
        return dict(self.logs.get(topic, []))


def _comparable(table: str, columns: tuple[str, ...], row: list[Any]) -> list[Any]:
    if table == "dead_letters":  # when it was written
        return [v for c, v in zip(columns, row, strict=True) if c != "recorded_at"]
    return row


class Crash:
    """Counts durable steps and kills the process at step `at` (None: never)."""

    def __init__(self, at: int | None, mode: str = "prefix") -> None:
        self.at, self.mode = at, mode
        self.steps: list[str] = []

    def due(self) -> bool:
        return self.at is not None and len(self.steps) == self.at

    def step(self, label: str) -> None:
        if self.due():
            raise Killed(label)
        self.steps.append(label)


class Sink:
    """ClickHouse: each table of a batch is its own insert (`ClickHouseSink` runs them side by side)."""

    def __init__(self, world: World, crash: Crash) -> None:
        self.world, self.crash = world, crash

    async def write(self, batch: Any) -> None:
        tables = [(t, rows) for t, rows in batch.tables().items() if rows]
        for i, (table, rows) in enumerate(tables):
            if self.crash.due():
                # prefix: the inserts before this one are in; all-but: every other insert of the batch is in
                done = tables[:i] if self.crash.mode == "prefix" else tables[:i] + tables[i + 1:]
                for other, other_rows in done:
                    self._insert(other, batch.columns[other], other_rows)
                raise Killed(f"sink {table}")
            self.crash.step(f"sink {table}")
            self._insert(table, batch.columns[table], rows)

    def _insert(self, table: str, columns: Any, rows: list[list[Any]]) -> None:
        self.world.rows.extend((table, tuple(columns), list(row)) for row in rows)


class Context(AgentContext):
    crash: Crash
    world: World

    async def produce(self, topic: str, records: Any, *, batch_bytes: int | None = None) -> list[Acked]:
        if not records:
            return []
        if batch_bytes is not None:  # one record batch: written whole or not at all
            self.crash.step(f"produce {topic} x{len(records)}")
            offsets = [self.world.append(topic, key, value) for key, value, _partition in records]
            return [Acked(0, offsets[0], offsets[-1])]
        acks = []
        for key, value, _partition in records:  # producer-size batches: any prefix may be acknowledged
            self.crash.step(f"produce {topic}")
            offset = self.world.append(topic, key, value)
            acks.append(Acked(0, offset, offset))
        return acks


class WriteBatch:
    def __init__(self, raw_mode: bool = True) -> None:
        self.ops: list[tuple[bytes, bytes | None]] = []

    def put(self, key: bytes, value: bytes) -> None:
        self.ops.append((key, value))

    def delete(self, key: bytes) -> None:
        self.ops.append((key, None))


class Db:
    def __init__(self, name: str, world: World, crash: Crash) -> None:
        self.name, self.world, self.crash = name, world, crash
        self.data = world.stores[name]

    def get(self, key: bytes) -> bytes | None:
        return self.data.get(key)

    def write(self, batch: WriteBatch) -> None:
        self.crash.step(f"rocksdb {self.name}")
        for key, value in batch.ops:  # a write batch is atomic
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


class Store:
    def __init__(self, name: str, world: World, crash: Crash) -> None:
        self.name, self.world, self.crash = name, world, crash
        self.db = Db(name, world, crash)
        self._key_index: dict[bytes, int] = {}

    def _db_for_partition(self, partition: int) -> Db:
        return self.db

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.crash.step(f"persisted offset {self.name}")
        self.world.persisted[self.name] = offset


def changelog(table: str) -> str:
    return f"app-{table}-changelog"


def recover(world: World, table: str, *, lost: bool) -> None:
    """Faust's table recovery: the changelog from the persisted offset on, into the local store (all of it when
    the store is lost)."""
    if lost:
        world.stores[table] = {}
        world.persisted.pop(table, None)
    store = world.stores.setdefault(table, {})
    log = world.logs.get(changelog(table), [])
    start = world.persisted.get(table, -1) + 1
    for key, value in log[start:]:
        assert key is not None
        if value is None:
            store.pop(key, None)
        else:
            store[key] = value
    if log:
        world.persisted[table] = len(log) - 1


SOURCES = {"sessions": "session-state", "cdrs": "cdr-state", "locations": "location-state", FACTS: "party-state"}


def worker(world: World, crash: Crash) -> list[tuple[str, Callable[[list[Any]], Any]]]:
    """A (re)started worker: its agents over the world's durable state."""
    settings = SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts=FACTS,
                                                        topic_reconciliation=RECONCILIATION))
    context = Context(app=None, settings=settings, topics=None, sink=Sink(world, crash),  # type: ignore[arg-type]
                      progress=Progress(), stage_rules=stage_rules(park_ttl_min=5, park_max=2),
                      party_rules=PARTY_RULES, pseudonym=Pseudonymizer(PSEUDONYM_KEY))
    context.crash, context.world = crash, world
    tables = {}
    for name in SOURCES.values():
        world.stores.setdefault(name, {})
        data = Store(name, world, crash)
        table = SimpleNamespace(data=data, changelog_topic=SimpleNamespace(get_topic_name=lambda n=name: changelog(n)))
        tables[name] = StateTable(table, whole_batches=name == "party-state")  # type: ignore[arg-type]
    return [
        ("sessions", ModuleAgent(context, tables["session-state"], Codec(SessionState), process_sessions,
                                 "SESSIONS").handle),
        ("cdrs", ModuleAgent(context, tables["cdr-state"], Codec(CdrState), process_cdrs, "CDRS").handle),
        ("locations", ModuleAgent(context, tables["location-state"], Codec(LocationState), process_locations,
                                  "LOCATIONS").handle),
        (FACTS, PartyAgent(context, tables["party-state"]).handle),
    ]


async def run_to_end(world: World, crash: Crash) -> None:
    """Deliver every topic's records in batches, round robin over the agents, until nothing is left; a batch's
    offset is committed once its handler is over."""
    agents = worker(world, crash)
    idle = 0
    while idle < len(agents):
        topic, handler = agents[world.turn]
        start = world.committed.get(topic, 0)
        log = world.logs.get(topic, [])[start:start + BATCH]
        if log:
            await handler([RawMessage(topic, 0, start + i, key, value) for i, (key, value) in enumerate(log)])
            crash.step(f"commit {topic}")
            world.committed[topic] = start + len(log)
        idle = 0 if log else idle + 1
        world.turn = (world.turn + 1) % len(agents)


@functools.cache
def _history() -> World:
    """Sessions, PATCHes (one before its PUT), a resent record, a partner's retry, CDRs, credits (one of an
    unknown CDR, one duplicate), a CDR before its session, Locations with a parked EVSE update, a poison record."""
    world = World()

    def put(topic: str, value: bytes, times: int = 1) -> None:
        try:  # keyed by its object, as the receivers key it
            key = object_key(decode_event(value)).encode()
        except AvroCodecError:
            key = b"k"
        for _ in range(times):
            world.append(topic, key, value)

    def patch(sid: str, minute: float, received: float, **fields: Any) -> bytes:
        return event_bytes("SessionPatch", {"last_updated": iso(ts(minute)), **fields}, object_id=sid,
                           received=received)

    put("sessions", event_bytes("Session", session("S1", kwh="1"), received=1))
    put("sessions", patch("S1", 2, 2, kwh=Decimal("5")), times=2)  # a producer's resend
    put("sessions", patch("S2", 3, 3, kwh=Decimal("4")))  # before its PUT: parked
    put("sessions", event_bytes("Session", session("S2", kwh="1", updated=1), received=4))
    put("sessions", event_bytes("Session", session("S1", status="COMPLETED", kwh="10", cost="2.50", end=60,
                                                   updated=60), received=61))
    put("sessions", event_bytes("Session", session("S1", status="COMPLETED", kwh="10", cost="2.50", end=60,
                                                   updated=60), received=61.5))  # a partner's retry
    put("sessions", patch("S3", 5, 5, kwh=Decimal("1")))  # parked for a PUT that never comes
    put("sessions", event_bytes("Session", session("S2", status="COMPLETED", kwh="4", cost="1.00", end=60,
                                                   updated=60), received=62))
    put("sessions", event_bytes("Session", session("S4", status="COMPLETED", kwh="7", cost="1.75", end=60,
                                                   updated=60, uid="TOK4"), received=63))
    put("sessions", b"not avro")  # a poison record: a dead letter
    put("sessions", patch("S3", 6, 70, kwh=Decimal("2")))  # its wait is over: the first is orphaned

    put("cdrs", event_bytes("CDR", cdr("C1"), received=64))
    put("cdrs", event_bytes("CDR", cdr("C1"), received=65))  # a partner's retry: DUPLICATE
    put("cdrs", event_bytes("CDR", cdr("C2", session_id="S2", kwh="4.5", cost="1.00"), received=66))  # off in kWh
    put("cdrs", event_bytes("CDR", cdr("K1", session_id=None, cost="-2.50", credit=True, credit_reference="C1"),
                            received=67))
    put("cdrs", event_bytes("CDR", cdr("K2", session_id=None, cost="-2.50", credit=True, credit_reference="C1"),
                            received=68), times=2)  # a second credit of C1, resent
    put("cdrs", event_bytes("CDR", cdr("K3", session_id=None, cost="-1.00", credit=True, credit_reference="C7"),
                            received=69))  # credits a CDR still to come
    put("cdrs", event_bytes("CDR", cdr("C5", session_id="S5"), received=70))  # its session comes later
    put("cdrs", event_bytes("CDR", cdr("C1", kwh="11"), received=71))  # a conflicting C1
    put("cdrs", event_bytes("CDR", cdr("C7", session_id="S4", uid="TOK4", kwh="7", cost="1.00"), received=72))
    put("sessions", event_bytes("Session", session("S5", status="COMPLETED", kwh="10", cost="2.50", end=60,
                                                   updated=60), received=73))

    put("locations", event_bytes("Location", location(evses=[evse("E1")]), received=1))
    put("locations", event_bytes("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(2))},
                                 object_id="LOC1", evse_uid="E1", received=2), times=2)
    put("locations", event_bytes("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(5))},
                                 object_id="LOC1", evse_uid="E9", received=5))  # parked: E9 is not there yet
    put("locations", event_bytes("EVSE", evse("E9", updated=4), object_id="LOC1", evse_uid="E9", received=6))
    put("locations", event_bytes("EVSEPatch", {"status": "AVAILABLE", "last_updated": iso(ts(3))},
                                 object_id="LOC1", evse_uid="E1", received=3))
    return world


def history() -> World:
    """The same history (the same event ids) for every run."""
    return World(logs={topic: list(log) for topic, log in _history().logs.items()})


@dataclass(frozen=True)
class Outcome:
    clickhouse: dict[str, Any]
    reconciliation: dict[Any, Any]
    states: dict[str, dict[bytes, bytes]]


def run(at: int | None, mode: str = "prefix", *, lost: bool = False) -> tuple[Outcome, list[str]]:
    world = history()
    crash = Crash(at, mode)
    try:
        asyncio.run(run_to_end(world, crash))
    except Killed:
        for table in SOURCES.values():
            recover(world, table, lost=lost)
        asyncio.run(run_to_end(world, Crash(None)))
    states = {}
    for table in SOURCES.values():  # what a new owner of each partition would recover
        recovered = World(logs=world.logs)
        recover(recovered, table, lost=True)
        assert recovered.stores[table] == world.stores[table], f"{table}: the local store is not the changelog's"
        states[table] = recovered.stores[table]
    return Outcome(world.clickhouse(), world.last_per_key(RECONCILIATION), states), crash.steps


@pytest.fixture(autouse=True)
def _frozen_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    now = T0.replace(hour=20)
    for module in (agents_module, stage, projection):
        monkeypatch.setattr(module, "utc_now", lambda: now)
    monkeypatch.setattr(agents_module, "WriteBatch", WriteBatch)


def differences(expected: Outcome, got: Outcome) -> list[str]:
    found = []
    for table in sorted(set(expected.clickhouse) | set(got.clickhouse)):
        want, have = expected.clickhouse.get(table, {}), got.clickhouse.get(table, {})
        for key in sorted(set(want) | set(have), key=repr):
            if want.get(key) != have.get(key):
                found.append(f"clickhouse {table} {key}: {want.get(key)} != {have.get(key)}")
    for key in sorted(set(expected.reconciliation) | set(got.reconciliation), key=repr):
        if expected.reconciliation.get(key) != got.reconciliation.get(key):
            found.append(f"reconciliation topic {key!r}")
    for table, want_state in expected.states.items():
        have_state = got.states[table]
        for key in sorted(set(want_state) | set(have_state)):
            if want_state.get(key) != have_state.get(key):
                found.append(f"state {table} {key!r}")
    return found


def test_a_crash_at_any_step_leaves_the_crash_free_result() -> None:
    expected, steps = run(None)
    assert len(steps) > 100
    failures = []
    for mode, lost in (("prefix", False), ("all-but", False), ("prefix", True)):
        for at in range(len(steps)):
            got, _ = run(at, mode, lost=lost)
            if found := differences(expected, got):
                failures.append(f"crash before step {at} ({steps[at]}, {mode}, store lost: {lost}): {found[:3]}")
    assert not failures, f"{len(failures)} crash points change the result:\n" + "\n".join(failures[:20])
