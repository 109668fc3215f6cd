"""Records that decode but are not what their topic's rules take (a foreign or buggy producer, an edited archive)
become dead letters, instead of stopping the worker (and with it every partition) on every restart."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import UTC, datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import msgspec

from infra.codec import decode_event, encode_event
from pipeline.agents import ModuleAgent, fold, fold_isolated
from pipeline.projection import DEAD_LETTER_COLUMNS, RAW_EVENT_COLUMNS, SESSION_COLUMNS
from pipeline.records import RawMessage, Record, decode_all, misfit, sort_out
from pipeline.rejections import rejections_batch
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.stage import StageOutput
from pipeline.state import Codec, SessionState

from .builders import DictStore, cdr, event, event_bytes, evse, iso, location, session, stage_rules, ts


def mutated(value: bytes, **changes: Any) -> bytes:
    fields = decode_event(value).to_event()
    fields.update(changes)
    return encode_event(fields)


def test_events_that_do_not_fit_their_topic_are_named() -> None:
    session_put = decode_event(event_bytes("Session", session()))
    assert misfit(session_put, "SESSIONS") is None
    assert misfit(session_put, "CDRS") == "a SESSIONS event on the CDRS topic"
    assert misfit(decode_event(mutated(event_bytes("Session", session()), operation="POST")), "SESSIONS") == (
        "POST at SESSION level is not a SESSIONS push")
    assert misfit(decode_event(mutated(event_bytes("Session", session()), operation="PATCH")), "SESSIONS") == (
        "PATCH at SESSION level carries a SessionPatch, not a Session")
    evse_put = event_bytes("EVSE", evse("E1"), object_id="LOC1", evse_uid="E1")
    assert misfit(decode_event(evse_put), "LOCATIONS") is None
    assert misfit(decode_event(mutated(evse_put, evse_uid=None)), "LOCATIONS") == "an EVSE push without evse_uid"
    # An identity of a level below the event's: handled under an identity no stored time of it matches.
    location_put = event_bytes("Location", location(), object_id="LOC1")
    assert misfit(decode_event(location_put), "LOCATIONS") is None
    assert misfit(decode_event(mutated(location_put, evse_uid="E1")), "LOCATIONS") == (
        "a LOCATION push with evse_uid 'E1'")
    assert misfit(decode_event(mutated(evse_put, connector_id="1")), "LOCATIONS") == (
        "an EVSE push with connector_id '1'")
    assert misfit(decode_event(mutated(event_bytes("Session", session()), evse_uid="E1")), "SESSIONS") == (
        "a SESSION push with evse_uid 'E1'")


def test_sort_out_keeps_the_fitting_records_and_makes_dead_letters_of_the_others() -> None:
    messages = [RawMessage("sessions", 0, 0, b"NL/TNM/S1", event_bytes("Session", session())),
                RawMessage("sessions", 0, 1, b"NL/TNM/C1", event_bytes("CDR", cdr("C1")))]
    records, dead = decode_all(messages)
    kept, misfits = sort_out(records, "SESSIONS")
    assert [r.offset for r in kept] == [0] and dead == []
    [letter] = misfits
    assert (letter.topic, letter.partition, letter.offset, letter.key) == ("sessions", 0, 1, b"NL/TNM/C1")
    assert letter.value == messages[1].value and "a CDRS event on the SESSIONS topic" in letter.error


def records_of(*events: Any) -> list[Record]:
    return [Record(e, "sessions", 0, offset, encode_event(e.to_event())) for offset, e in enumerate(events)]


def test_a_batch_the_rules_fail_on_is_applied_record_by_record_without_the_bad_one() -> None:
    put = event("Session", session(kwh="1"), received=1)
    bad = event("SessionPatch", {"kwh": Decimal("2"), "last_updated": iso(ts(2))}, object_id="S1", received=2)
    good = event("SessionPatch", {"kwh": Decimal("3"), "last_updated": iso(ts(3))}, object_id="S1", received=3)
    other = event("Session", session("S2"), received=4)
    records = records_of(put, bad, good, other)

    def rules(view: Any, key: str, group: list[Record], stage: Any, out: StageOutput) -> None:
        if any(r.event.event_id == bad.event_id for r in group):
            raise KeyError("a field the rules expect")
        process_sessions(view, key, group, stage, out)

    store, pseudonym = DictStore(), Pseudonymizer(b"k" * 32)
    out = StageOutput(pseudonym)
    try:
        fold(records, lambda _anchor: store.data.get, Codec(SessionState), rules, stage_rules(), out)
    except KeyError:
        out = StageOutput(pseudonym)
        overlays, dead = fold_isolated(records, lambda _anchor: store.data.get, Codec(SessionState), rules,
                                       stage_rules(), out)
    assert [d.offset for d in dead] == [1] and "a field the rules expect" in dead[0].error
    applied = dict(zip([r[RAW_EVENT_COLUMNS.index("event_id")] for r in out.batch.tables()["raw_events"]],
                       [r[RAW_EVENT_COLUMNS.index("outcome")] for r in out.batch.tables()["raw_events"]],
                       strict=True))
    assert applied == {put.event_id: "APPLIED", good.event_id: "APPLIED", other.event_id: "APPLIED"}
    sessions = {(r[SESSION_COLUMNS.index("session_id")], r[SESSION_COLUMNS.index("kwh")])
                for r in out.batch.tables()["sessions"]}
    assert sessions == {("S1", Decimal("3")), ("S2", Decimal("0"))}  # a session's last version of the batch
    for _anchor, overlay in overlays:
        store.data.update({k: v for k, v in overlay.changes.items() if v is not None})
    assert Codec(SessionState).decode(store.data["NL/TNM/S1"]).offset == 2  # the good PATCH's, after the bad


async def test_the_agent_writes_dead_letters_and_goes_on() -> None:
    written: list[dict[str, list[list[Any]]]] = []
    states: list[Any] = []

    async def write(batch: Any) -> None:
        written.append(batch.tables())

    async def publish(topic: str, records: list[Any]) -> None:
        pass

    async def write_batch(context: Any, changes: list[Any]) -> None:
        states.extend(changes)

    context = SimpleNamespace(app=None, pseudonym=Pseudonymizer(b"k" * 32), sink=SimpleNamespace(write=write),
                              publish=publish, stage_rules=stage_rules(),
                              progress=SimpleNamespace(outcomes=Counter(), replayed=0),
                              settings=SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts="facts")))
    table = SimpleNamespace(reader=lambda _anchor: DictStore().data.get, write_batch=write_batch, lock=asyncio.Lock())
    agent = ModuleAgent(context, table, Codec(SessionState), process_sessions, "SESSIONS")  # type: ignore[arg-type]
    foreign = event_bytes("CDR", cdr("C1"))
    await agent.handle([RawMessage("sessions", 0, 0, b"NL/TNM/S1", event_bytes("Session", session())),
                        RawMessage("sessions", 0, 1, b"NL/TNM/C1", foreign)])
    [tables] = written
    [letter] = tables["dead_letters"]
    assert letter[DEAD_LETTER_COLUMNS.index("kafka_offset")] == 1
    assert [r[RAW_EVENT_COLUMNS.index("outcome")] for r in tables["raw_events"]] == ["APPLIED"]
    assert states  # the good record's state is written


def test_a_rejection_record_that_does_not_decode_is_a_dead_letter() -> None:
    """Not JSON, the wrong shape, invalid UTF-8 in a string (msgspec's UnicodeDecodeError), or JSON nested deeper than
    the parser goes (a RecursionError): a dead letter each, and the rejections agent goes on."""
    now = datetime(2026, 1, 1, tzinfo=UTC)
    batch = rejections_batch([("rejections", 0, offset, b"k", value) for offset, value in
                              enumerate([b"not json", b"[]", b'{"reason": "\xff"}', b'{"x":' * 100_000])], now)
    assert len(batch.rows.get("dead_letters", [])) == 4 and not batch.rows.get("rejections")


def test_an_event_keyed_otherwise_than_by_its_object_is_a_dead_letter_with_the_key_it_had() -> None:
    """The receivers key an event by its object (`CC/PID/ID`): that keeps an object's events in order in the
    partition that holds its state. An event keyed otherwise (another object's key, none at all) would be applied
    on a partition that does not hold its state, as a second copy of the object beside the first: a dead letter,
    kept with the key it had."""
    value = event_bytes("Session", session())
    messages = [RawMessage("sessions", 0, 0, b"NL/TNM/S1", value), RawMessage("sessions", 0, 1, b"nl/tnm/s1", value),
                RawMessage("sessions", 0, 2, b"NL/TNM/S2", value), RawMessage("sessions", 0, 3, None, value)]
    records, dead = decode_all(messages)
    kept, misfits = sort_out(records, "SESSIONS")
    assert [r.offset for r in kept] == [0] and dead == []
    assert [(letter.offset, letter.key) for letter in misfits] == [(1, b"nl/tnm/s1"), (2, b"NL/TNM/S2"), (3, b"")]
    assert all("keyed" in letter.error and "NL/TNM/S1" in letter.error for letter in misfits)
    assert all(letter.value == value for letter in misfits)


def test_an_event_keyed_by_its_object_in_another_partition_than_its_keys_is_a_dead_letter() -> None:
    value = event_bytes("Session", session())  # NL/TNM/S1: partition 2 of 4
    messages = [RawMessage("sessions", 2, 0, b"NL/TNM/S1", value), RawMessage("sessions", 1, 0, b"NL/TNM/S1", value)]
    records, dead = decode_all(messages)
    kept, misfits = sort_out(records, "SESSIONS", partitions=4)
    assert [(r.partition, r.offset) for r in kept] == [(2, 0)] and dead == []
    assert [(letter.partition, letter.offset, letter.key) for letter in misfits] == [(1, 0, b"NL/TNM/S1")]
    assert "partition 2" in misfits[0].error
    assert sort_out(records, "SESSIONS")[1] == []  # the topic's partition count not known: not checked


async def test_the_agent_makes_a_dead_letter_of_an_event_in_another_partition_than_its_keys() -> None:
    """Keyed right but in another partition than the key's (murmur2 of the key, as the receivers' producer and
    Kafka's Java client place it; librdkafka's default partitioner, kcat's say, does not): applied there, on a
    partition that does not hold its object's state, it made a second copy of the object (a CDR stored again with
    other content instead of a CONFLICT). A dead letter, with the partition, offset and key it had."""
    written: list[dict[str, list[list[Any]]]] = []

    async def write(batch: Any) -> None:
        written.append(batch.tables())

    async def publish(topic: str, records: list[Any]) -> None:
        pass

    async def write_batch(context: Any, changes: list[Any]) -> None:
        pass

    consumer = SimpleNamespace(topic_partitions=lambda topic: 4 if topic == "sessions" else None)
    context = SimpleNamespace(app=SimpleNamespace(consumer=consumer), pseudonym=Pseudonymizer(b"k" * 32),
                              sink=SimpleNamespace(write=write), publish=publish, stage_rules=stage_rules(),
                              progress=SimpleNamespace(outcomes=Counter(), replayed=0),
                              settings=SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts="facts")))
    table = SimpleNamespace(reader=lambda _anchor: DictStore().data.get, write_batch=write_batch, lock=asyncio.Lock())
    agent = ModuleAgent(context, table, Codec(SessionState), process_sessions, "SESSIONS")  # type: ignore[arg-type]
    await agent.handle([RawMessage("sessions", 1, 7, b"NL/TNM/S1", event_bytes("Session", session()))])
    [tables] = written
    [letter] = tables["dead_letters"]
    assert (letter[DEAD_LETTER_COLUMNS.index("kafka_partition")], letter[DEAD_LETTER_COLUMNS.index("kafka_offset")],
            letter[DEAD_LETTER_COLUMNS.index("key_hex")]) == (1, 7, b"NL/TNM/S1".hex())
    assert "raw_events" not in tables


def test_a_payload_whose_identity_differs_from_its_event_does_not_fit() -> None:
    """The receivers refuse a body whose identity differs from its URL's (2001); a record whose payload names
    another object than its event would store that other object's row from this object's state."""
    assert misfit(decode_event(event_bytes("Session", session("S2"), object_id="S1")), "SESSIONS") == (
        "a payload with id 'S2' in an event of 'S1'")
    assert misfit(decode_event(event_bytes("Session", session("s1"), object_id="S1")), "SESSIONS") is None
    assert misfit(decode_event(mutated(event_bytes("CDR", cdr("C1")), party_id="XYZ")), "CDRS") == (
        "a payload with party_id 'TNM' in an event of 'XYZ'")
    assert misfit(decode_event(event_bytes("EVSE", evse("E2"), object_id="LOC1", evse_uid="E1")), "LOCATIONS") == (
        "a payload with uid 'E2' in an event of 'E1'")
    patch = {"kwh": Decimal("2"), "last_updated": iso(ts(2))}
    assert misfit(decode_event(event_bytes("SessionPatch", patch, object_id="S1")), "SESSIONS") is None
    assert misfit(decode_event(event_bytes("SessionPatch", {**patch, "id": "S2"}, object_id="S1")), "SESSIONS") == (
        "a payload with id 'S2' in an event of 'S1'")


async def test_a_stored_object_the_rules_no_longer_accept_makes_dead_letters_not_a_stopped_worker() -> None:
    """A Session stored with a DateTime today's rules refuse (an earlier version accepted DateTimes outside
    1970..2149; a foreign producer writes anything) raises OcpiValidationError when its state is read back for the
    next event. That error is the rules failing on a record like any other: the record becomes a dead letter and the
    rest of its batch is applied, where the worker stopped (exit 70) on the same batch at every restart."""
    agent, store, written = _sessions_agent()
    completed = session(status="COMPLETED", end=60, cost="2.50")
    fields = decode_event(event_bytes("Session", completed)).to_event()
    fields["payload"][1]["end_date_time"] = datetime(2200, 1, 1, tzinfo=UTC)  # refused by the receivers now
    await agent.handle([RawMessage("sessions", 0, 0, b"NL/TNM/S1", encode_event(fields))])
    assert store.data  # stored, as an earlier version stored it

    again = event_bytes("Session", {**completed, "kwh": Decimal("5"), "last_updated": iso(ts(90))})
    await agent.handle([RawMessage("sessions", 0, 1, b"NL/TNM/S1", again),
                        RawMessage("sessions", 0, 2, b"NL/TNM/S2", event_bytes("Session", session("S2")))])
    tables = written[-1]
    [letter] = tables["dead_letters"]
    assert letter[DEAD_LETTER_COLUMNS.index("kafka_offset")] == 1
    assert "not storable" in letter[DEAD_LETTER_COLUMNS.index("error")]
    assert [(r[RAW_EVENT_COLUMNS.index("object_id")], r[RAW_EVENT_COLUMNS.index("outcome")])
            for r in tables["raw_events"]] == [("S2", "APPLIED")]


async def test_a_parked_event_of_a_schema_revision_this_worker_does_not_know_makes_a_dead_letter_not_a_stopped_worker(
        ) -> None:
    """A worker rolled back below the schema revision a newer one parked events with (README, "Upgrading") cannot
    decode them when a later event of their object releases or counts them (AvroCodecError). Like a record it
    cannot decode, that is a dead letter (the releasing record, replayed once the newer version runs again), and
    the rest of the batch is applied, where the worker stopped (exit 70) on the same batch at every restart."""
    agent, store, written = _sessions_agent()
    patch = event_bytes("SessionPatch", {"kwh": Decimal("2"), "last_updated": iso(ts(2))}, object_id="S1", received=2)
    await agent.handle([RawMessage("sessions", 0, 0, b"NL/TNM/S1", patch)])
    state = Codec(SessionState).decode(store.data["NL/TNM/S1"])
    [parked] = state.parked
    newer = parked.value[:2] + bytes.fromhex("0123456789abcdef") + parked.value[10:]  # a revision unknown here
    state.parked = [msgspec.structs.replace(parked, value=newer)]
    store.data["NL/TNM/S1"] = Codec(SessionState).encode(state)

    put = event_bytes("Session", session(kwh="1"), received=3)
    await agent.handle([RawMessage("sessions", 0, 1, b"NL/TNM/S1", put),
                        RawMessage("sessions", 0, 2, b"NL/TNM/S2", event_bytes("Session", session("S2")))])
    tables = written[-1]
    [letter] = tables["dead_letters"]
    assert letter[DEAD_LETTER_COLUMNS.index("kafka_offset")] == 1
    assert "unknown schema fingerprint" in letter[DEAD_LETTER_COLUMNS.index("error")]
    assert [(r[RAW_EVENT_COLUMNS.index("object_id")], r[RAW_EVENT_COLUMNS.index("outcome")])
            for r in tables["raw_events"]] == [("S2", "APPLIED")]


def _sessions_agent() -> tuple[ModuleAgent, DictStore, list[dict[str, list[list[Any]]]]]:
    """The Sessions agent on an in-memory state store, with the tables of each batch it writes."""
    written: list[dict[str, list[list[Any]]]] = []
    store = DictStore()

    async def write(batch: Any) -> None:
        written.append(batch.tables())

    async def publish(topic: str, records: list[Any]) -> None:
        pass

    async def write_batch(context: Any, changes: list[Any]) -> None:
        for _anchor, overlay_changes in changes:
            store.data.update({k: v for k, v in overlay_changes.items() if v is not None})

    context = SimpleNamespace(app=None, pseudonym=Pseudonymizer(b"k" * 32), sink=SimpleNamespace(write=write),
                              publish=publish, stage_rules=stage_rules(),
                              progress=SimpleNamespace(outcomes=Counter(), replayed=0),
                              settings=SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts="facts")))
    table = SimpleNamespace(reader=lambda _anchor: store.data.get, write_batch=write_batch, lock=asyncio.Lock())
    agent = ModuleAgent(context, table, Codec(SessionState), process_sessions, "SESSIONS")  # type: ignore[arg-type]
    return agent, store, written
