"""What one stage-1 batch produces besides state: rows, facts for stage 2, counters (plain data, no I/O)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Protocol

from infra.codec import DecodedEvent, decode_event
from infra.kafka.admin import RECORD_MAX_BYTES
from infra.settings import PipelineSettings, token_party_pairs
from ocpi.identity import ci_normalize
from pipeline import ordering, projection
from pipeline.facts import Fact, party_key
from pipeline.records import Anomaly, AnomalyRow, DeadLetter, Outcome, Record, sub_id, utc_now
from pipeline.retention import Pseudonymizer, pseudonymised_growth
from pipeline.sink import Batch
from pipeline.state import RECENT_EVENT_IDS, Parked

# Outcomes of a replayed event (source REPLAY, `ocpi-pipeline replay`) that change nothing: not recorded, so the
# original event's raw_events row (same event_id) keeps its outcome and its source (PUSH, PULL), which partner
# health counts by. A refusal (REJECTED, INVALID, CONFLICT) is the same decision taken again, or, for an event
# applied once and refused now that its object moved on, no reason to rewrite what happened to it.
_NOT_RECORDED_FOR_REPLAYS = frozenset({Outcome.DUPLICATE, Outcome.STALE, Outcome.REJECTED, Outcome.INVALID,
                                       Outcome.CONFLICT})


@dataclass(frozen=True)
class StageRules:
    """The stage-1 rules' parameters, from settings."""

    park_ttl: timedelta
    park_max: int
    session_idle: timedelta
    clock_skew: timedelta = timedelta(minutes=5)
    token_parties: frozenset[tuple[str, str]] = frozenset()  # the eMSP parties whose tokens we bill; empty: any
    # How long after its stamp (`received_at`) an event may land on its topic: OCPI_KAFKA_SEND_TIMEOUT, within which a
    # push or pulled event is acknowledged. A push stamped past a parked event's deadline may land before the PUT it
    # waited for, stamped within it: only one past the deadline by this much ends the wait (`expire_parked`), as the
    # deadline sweep waits as long; the object's own push ends it by its stamp (`orphan_expired`).
    arrival_margin: timedelta = timedelta(0)

    @classmethod
    def from_settings(cls, pipeline: PipelineSettings, *, send_timeout_s: float) -> StageRules:
        return cls(park_ttl=timedelta(seconds=pipeline.park_ttl_s), park_max=pipeline.park_max,
                   session_idle=timedelta(seconds=pipeline.session_idle_s),
                   clock_skew=timedelta(seconds=pipeline.clock_skew_s),
                   token_parties=token_party_pairs(pipeline.token_parties),
                   arrival_margin=timedelta(seconds=send_timeout_s))

    def foreign_issuer(self, token: dict[str, Any]) -> tuple[str, str] | None:
        """The eMSP party (country code, party id: CiStrings, upper-cased) that issued `token`, a `cdr_token`, when
        `token_parties` are given and it is none of them: the CPO sent us another eMSP's data. None otherwise (none
        given: not checked, as a hub carries every eMSP's tokens)."""
        if not self.token_parties:
            return None
        issuer = (ci_normalize(token["country_code"]), ci_normalize(token["party_id"]))
        return None if issuer in self.token_parties else issuer


def foreign_issuer_detail(issuer: tuple[str, str]) -> str:
    """The anomaly detail of a Session or CDR of a token `issuer` issued (`StageRules.foreign_issuer`)."""
    return f"cdr_token of {issuer[0]}/{issuer[1]}, not one of OCPI_TOKEN_PARTIES"


@dataclass
class StageOutput:
    """Rows, facts and counters of one batch."""

    pseudonym: Pseudonymizer
    batch: Batch = field(default_factory=Batch)
    facts: dict[str, list[Fact]] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    replayed: int = 0  # records read again after a crash, already folded into the state
    # (topic, partition) -> the highest state offset a record was skipped under as folded in before (`read_before`)
    skipped_under: dict[tuple[str, int], int] = field(default_factory=dict)
    # Set while parked events are retried: a replayed copy that was parked wrote its PARKED row over the original's,
    # so its outcome is recorded whatever it is (`retrying_parked`).
    record_replays: bool = False

    def outcome(self, record: Record, outcome: Outcome, detail: str = "") -> None:
        event = record.event
        if event.source == "REPLAY" and outcome in _NOT_RECORDED_FOR_REPLAYS and not self.record_replays:
            # A replayed event that changes nothing was processed before: its first outcome stands (same row key).
            self.outcomes[f"REPLAYED_{outcome.value}"] += 1
            return
        self.outcomes[outcome.value] += 1
        self.batch.put("raw_events", projection.RAW_EVENT_COLUMNS, event.event_id,
                       projection.raw_event_row(event, record.topic, record.partition, record.offset, outcome,
                                                detail))

    @contextmanager
    def retrying_parked(self) -> Iterator[None]:
        """Record every outcome of the parked events retried within (`record_replays`)."""
        before, self.record_replays = self.record_replays, True
        try:
            yield
        finally:
            self.record_replays = before

    def flag_future(self, record: Record, last_updated: datetime, rules: StageRules) -> None:
        """Anomaly FUTURE_LAST_UPDATED when the push is dated further ahead of its receipt than the clock skew."""
        ahead = ordering.ahead_of_receipt(last_updated, record.received_at, rules.clock_skew)
        if ahead is not None:
            self.anomaly(Anomaly.FUTURE_LAST_UPDATED, record.event,
                         f"last_updated {last_updated.isoformat()} is {ahead} ahead of its receipt at "
                         f"{record.received_at.isoformat()}: until then, a push dated before it is STALE")

    def anomaly(self, kind: Anomaly, event: DecodedEvent, detail: str, *, event_id: str | None = None,
                observed_at: datetime | None = None, sub: str | None = None) -> None:
        """`sub`: the sub-object (`records.sub_id`) when it is not the event's own (an EVSE a Location PUT left
        out): part of the row's key, so each of several such anomalies of one event is a row of its own."""
        if event.source == "REPLAY" and kind is Anomaly.STALE_UPDATE:
            return  # see `outcome`: a replay of an event applied before
        row = AnomalyRow(kind=kind, module=event.module, country_code=event.country_code, party_id=event.party_id,
                         object_id=event.object_id, sub_id=sub_id(event) if sub is None else sub,
                         event_id=event_id or event.event_id,
                         partner_id=event.partner_id, detail=detail, observed_at=observed_at or event.received_at)
        self.batch.put("anomalies", projection.ANOMALY_COLUMNS,
                       (kind, row.country_code.upper(), row.party_id.upper(), row.object_id.upper(), row.sub_id,
                        row.event_id), projection.anomaly_row(row))

    def fact(self, event: DecodedEvent, fact: Fact) -> None:
        self.facts.setdefault(party_key(event.country_code, event.party_id), []).append(fact)

    def merge(self, other: StageOutput) -> None:
        """Take `other`'s rows, facts and counters (an output of a part of the batch, `agents.fold_isolated`)."""
        for table, rows in other.batch.rows.items():
            self.batch.extend(table, other.batch.columns[table], rows)
        for table, keyed in other.batch.keyed.items():
            for key, row in keyed.items():
                self.batch.put(table, other.batch.columns[table], key, row)
        for party, facts in other.facts.items():
            self.facts.setdefault(party, []).extend(facts)
        self.outcomes.update(other.outcomes)
        self.replayed += other.replayed
        for tp, offset in other.skipped_under.items():
            self.skipped_under[tp] = max(offset, self.skipped_under.get(tp, -1))

    def read_before(self, record: Record, state_offset: int) -> None:
        """`record` is at or below `state_offset`, the highest offset its object's state folded in: read again after a
        crash, its rows are in ClickHouse already. Skipped; the agent checks that its partition's log reaches that
        offset (`agents.check_not_rewound`): one that ends before it is another log, whose records are new."""
        self.replayed += 1
        tp = (record.topic, record.partition)
        self.skipped_under[tp] = max(state_offset, self.skipped_under.get(tp, -1))

    def dead_letters(self, dead: list[DeadLetter]) -> None:
        now = utc_now()
        for letter in dead:
            self.batch.add("dead_letters", projection.DEAD_LETTER_COLUMNS, projection.dead_letter_row(letter, now))


class _Remembering(Protocol):
    recent_event_ids: list[str]
    applied_event_id: str
    parked: list[Parked]


def seen_before(state: _Remembering, record: Record, out: StageOutput) -> bool:
    """Whether `record` is a copy of an event already folded into `state` (counted, nothing recorded).

    Not a partner's retry (which has an event id of its own): the same event twice on the topic, as a producer
    puts it there when it resends a record the broker wrote but did not acknowledge (aiokafka retries retriable
    errors, `infra.kafka.publisher` too; Tansu has no idempotence), a producer batch later at most. Folded in
    again it would be a DUPLICATE or STALE (or parked twice), and its row, keyed by event id, would replace the
    outcome its event had (APPLIED). A replayed event (source REPLAY) keeps its own rule (`StageOutput.outcome`),
    but for one still parked: that event waits already, and its copy would be parked twice, its PARKED row (source
    REPLAY) replacing the original's.
    """
    event_id = record.event.event_id
    replay = record.event.source == "REPLAY"
    if any(parked.event_id == event_id for parked in state.parked):
        out.outcomes["REPLAYED_PARKED" if replay else "RESENT"] += 1
        return True
    if replay or not (event_id == state.applied_event_id or event_id in state.recent_event_ids):
        return False
    out.outcomes["RESENT"] += 1
    return True


def remember(state: _Remembering, event_id: str) -> None:
    """Keep `event_id` among the state's last RECENT_EVENT_IDS events (`seen_before`)."""
    recent = state.recent_event_ids
    if recent and recent[-1] == event_id:  # the event applied and then remembered by its fold loop
        return
    if event_id in recent:
        recent.remove(event_id)
    recent.append(event_id)
    if len(recent) > RECENT_EVENT_IDS:
        del recent[0]


# What a parked event waits for, per module, in the ORPHANED outcome and the anomaly of an event that waited
# in vain (the same words whether a later event of its object or the deadline sweep ends the wait).
_WAITED_FOR: Final = {"SESSIONS": "its Session PUT", "LOCATIONS": "its Location/EVSE/Connector"}


def orphan_details(module: str, ttl: timedelta) -> tuple[str, str]:
    """(outcome detail, anomaly detail) of an event of `module` that was parked for `ttl` in vain."""
    waited_for = _WAITED_FOR.get(module, "its object")
    return f"{waited_for} did not arrive within {ttl}", f"waited {ttl} for {waited_for}"


class _Parking(Protocol):
    parked: list[Parked]


class _Overflowing(Protocol):
    overflowed: list[str]


class _ParkingOverflowing(_Parking, _Overflowing, Protocol):
    pass


def expire_parked(state: _ParkingOverflowing, record: Record, rules: StageRules, out: StageOutput) -> None:
    """Parked events whose wait is over at `record`'s receive time (event time) less the arrival margin become
    ORPHANED: `record`, stamped past a deadline, may have landed before the object's push stamped within it
    (`StageRules.arrival_margin`), which `orphan_expired` then judges by its own stamp."""
    waiting, expired = ordering.split_expired(state.parked, record.received_at - rules.arrival_margin, rules.park_ttl)
    state.parked = waiting
    orphan_expired(state, expired, rules.park_ttl, out)


def orphan_expired(state: _Overflowing, expired: list[Parked], ttl: timedelta, out: StageOutput) -> None:
    """`expired`, parked events whose wait is over (`expire_parked`; or at the receive time of the push of their
    object that came, which they would have waited for in vain), ORPHANED, and remembered as one ORPHANED at once is
    (`overflowed`): `replayed_orphan` dates a wait by the object's first applied event or an event still parked, and
    neither may be past this one's (a PUT stamped before it but written late; an EVSE of the stored Location that
    came since), so its replayed copy would be applied."""
    for parked in expired:
        orphan = parked_record(parked)
        outcome_detail, anomaly_detail = orphan_details(orphan.event.module, ttl)
        out.outcome(orphan, Outcome.ORPHANED, outcome_detail)
        out.anomaly(Anomaly.ORPHAN_EVENT, orphan.event, anomaly_detail)
        overflowed(state, parked.event_id)


class _Created(_Parking, Protocol):
    created_at: datetime | None


def replayed_orphan(record: Record, state: _Created, ttl: timedelta) -> bool:
    """Whether `record`, an event that waits for its object while that is unknown (a PATCH, an EVSE/Connector push),
    is a replayed copy (source REPLAY) of one that was ORPHANED: an event of its object received more than `ttl`
    after it was folded in after it (its object's first applied event, `created_at`, or an event still parked), so it
    was parked and expired then, never applied. `ocpi-pipeline replay` sends its copy after those: it would be
    applied now (dated after the stored object), or parked again, its ORPHANED row (source PUSH) rewritten as a
    REPLAY row."""
    return replayed_before_created(record, state, ttl) or replayed_before_parked(record, state, ttl)


def replayed_before_created(record: Record, state: _Created, ttl: timedelta) -> bool:
    """`replayed_orphan` by the object's first applied event alone."""
    return (record.event.source == "REPLAY" and state.created_at is not None
            and record.received_at + ttl < state.created_at)


def replayed_before_parked(record: Record, state: _Parking, ttl: timedelta) -> bool:
    """`replayed_orphan` by an event still parked alone: for an event that would be parked itself (an event of a
    Location parks for an EVSE or Connector too, so one parked says nothing of an event that needs none)."""
    if record.event.source != "REPLAY":
        return False
    deadline = record.received_at + ttl
    return any(deadline < parked.received_at for parked in state.parked)


def overflowed(state: _Overflowing, event_id: str) -> None:
    """Keep `event_id`, ORPHANED at once by PARK_OVERFLOW or at the end of its wait (`expire_parked`), among the
    state's last RECENT_EVENT_IDS such events."""
    state.overflowed = [*state.overflowed, event_id][-RECENT_EVENT_IDS:]


def replayed_overflow(record: Record, state: _Overflowing) -> bool:
    """Whether `record` is a replayed copy (source REPLAY) of an event ORPHANED at once by PARK_OVERFLOW. It waited
    for nothing and was never applied: `replayed_orphan`, which dates the wait, does not see it (its object may have
    come within the park TTL, or not yet), and its copy would be applied (dated after the stored object) or
    ORPHANED again as a REPLAY row."""
    return record.event.source == "REPLAY" and record.event.event_id in state.overflowed


def parked_record(parked: Parked) -> Record:
    """A parked event as a record again (its Avro value was validated when it was first read)."""
    return Record(decode_event(parked.value), parked.topic, parked.partition, parked.offset, parked.value)


# The most the events parked in one object's state may hold together (their Avro records). A state value is one
# changelog record, which a broker refuses above RECORD_MAX_BYTES (16 MB) for good (the worker would retry its
# batch for ever), and which also holds the object's own JSON: parked by count alone (`park_max`, 32), pushes of
# up to 4 MB each would not fit. One more is an orphan at once, as one beyond `park_max` is.
PARKED_MAX_BYTES: Final = RECORD_MAX_BYTES // 2


def parking_full(parked: list[Parked], record: Record, park_max: int) -> bool:
    """Whether `record` may not be parked beside `parked`: `park_max` of them, or PARKED_MAX_BYTES with it, each
    counted with what pseudonymising its personal identifiers may add (the state retention pass rewrites parked
    events in place, and a one-character uid becomes a 36-character pseudonym)."""
    if len(parked) >= park_max or sum(len(p.value) for p in parked) + len(record.value) > PARKED_MAX_BYTES:
        return True
    grown = sum(len(p.value) + pseudonymised_growth(decode_event(p.value).payload) for p in parked)
    return grown + len(record.value) + pseudonymised_growth(record.event.payload) > PARKED_MAX_BYTES


def to_parked(record: Record) -> Parked:
    return Parked(value=record.value, topic=record.topic, partition=record.partition, offset=record.offset,
                  event_id=record.event.event_id, received_at=record.received_at)
