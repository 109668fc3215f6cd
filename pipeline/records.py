"""What flows through the rules: decoded Kafka records, outcomes and anomalies (plain data, no I/O)."""

from __future__ import annotations

import enum
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec

from infra.codec import AvroCodecError, DecodedEvent, decode_event
from infra.events import PAYLOAD_TYPES
from infra.kafka.bulk import key_partition
from ocpi.identity import ci_equal, ci_normalize, owner_key_part


class Outcome(enum.StrEnum):
    """What the pipeline did with one raw event (raw_events.outcome)."""

    APPLIED = "APPLIED"  # changed the stored object
    DUPLICATE = "DUPLICATE"  # same identity and content as the last applied event: dropped
    STALE = "STALE"  # older last_updated than the stored object: not applied
    PARKED = "PARKED"  # waits for the PUT of its object
    ORPHANED = "ORPHANED"  # waited in vain: the PUT did not come in time
    INVALID = "INVALID"  # the merged object failed validation: not stored
    REJECTED = "REJECTED"  # an illegal lifecycle transition out of a final state: not applied
    CONFLICT = "CONFLICT"  # a CDR id seen before with different content: the original is kept


class Anomaly(enum.StrEnum):
    """Kinds of rows in the anomalies table."""

    STALE_UPDATE = "STALE_UPDATE"
    ORPHAN_EVENT = "ORPHAN_EVENT"
    PARK_OVERFLOW = "PARK_OVERFLOW"
    INVALID_MERGE = "INVALID_MERGE"
    ILLEGAL_TRANSITION = "ILLEGAL_TRANSITION"
    UPDATE_AFTER_FINAL = "UPDATE_AFTER_FINAL"
    SESSION_IDLE = "SESSION_IDLE"
    EVSE_MISSING_FROM_PUT = "EVSE_MISSING_FROM_PUT"
    CDR_CONFLICT = "CDR_CONFLICT"
    CREDIT_WITHOUT_REFERENCE = "CREDIT_WITHOUT_REFERENCE"
    CREDIT_POSITIVE_COST = "CREDIT_POSITIVE_COST"
    CREDIT_UNKNOWN_REFERENCE = "CREDIT_UNKNOWN_REFERENCE"
    CREDIT_AMOUNT_MISMATCH = "CREDIT_AMOUNT_MISMATCH"
    DUPLICATE_CREDIT = "DUPLICATE_CREDIT"
    CREDIT_OF_CREDIT = "CREDIT_OF_CREDIT"
    CDR_FOR_INVALID_SESSION = "CDR_FOR_INVALID_SESSION"
    CDR_OF_ANOTHER_EMSP = "CDR_OF_ANOTHER_EMSP"  # a CDR of a token none of OCPI_TOKEN_PARTIES issued
    SESSION_OF_ANOTHER_EMSP = "SESSION_OF_ANOTHER_EMSP"  # a Session (or its new token) of such a token
    FUTURE_LAST_UPDATED = "FUTURE_LAST_UPDATED"  # a CPO clock ahead: its push would make later ones STALE
    ROW_REFUSED = "ROW_REFUSED"  # ClickHouse refused a row for its values (`pipeline.sink`): the row is the detail


class Record(msgspec.Struct, frozen=True):
    """One decoded Kafka record of a module topic (a Struct: one is built per record read, several times
    cheaper than a frozen dataclass)."""

    event: DecodedEvent
    topic: str
    partition: int
    offset: int
    value: bytes  # the Avro record as read: parked events are kept in this form and decoded again later
    key: bytes | None = None  # the Kafka key as read (b"" for none); None: not known (a parked event decoded again)

    @property
    def received_at(self) -> datetime:
        return self.event.received_at

    def dead_letter(self, error: str) -> DeadLetter:
        """This record as a dead letter, with the key it was read with (its object's, as the receivers key it,
        where that is not known)."""
        key = object_key(self.event).encode() if self.key is None else self.key
        return DeadLetter(self.topic, self.partition, self.offset, key, self.value, error)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A Kafka record that could not be decoded or applied: kept whole, with the reason."""

    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    error: str


class Message(Protocol):
    """The parts of a Kafka message the pipeline reads (a Faust `Message` has them)."""

    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def key(self) -> bytes | None: ...
    @property
    def value(self) -> bytes | None: ...


class RawMessage(msgspec.Struct, frozen=True):
    """A `Message` built by hand (tests, benchmarks)."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None


def decode_all(messages: Iterable[Message]) -> tuple[list[Record], list[DeadLetter]]:
    """Decode a batch in one pass; undecodable records become dead letters instead of stopping the batch."""
    records: list[Record] = []
    dead: list[DeadLetter] = []
    for m in messages:
        value = m.value or b""
        try:
            event = decode_event(value)
        except AvroCodecError as exc:
            dead.append(DeadLetter(m.topic, m.partition, m.offset, m.key or b"", value, f"undecodable record: {exc}"))
            continue
        records.append(Record(event, m.topic, m.partition, m.offset, value, bytes(m.key or b"")))
    return records, dead


def misfit(event: DecodedEvent, module: str) -> str | None:
    """Why a well-formed event does not belong on `module`'s topic (a foreign or buggy producer, an edited
    archive), or None. The rules assume what the receivers publish; such an event is a dead letter instead."""
    if event.module != module:
        return f"a {event.module} event on the {module} topic"
    payload_type = PAYLOAD_TYPES.get((module, event.operation, event.level))
    if payload_type is None:
        return f"{event.operation} at {event.level} level is not a {module} push"
    if event.payload_type != payload_type:
        return f"{event.operation} at {event.level} level carries a {payload_type}, not a {event.payload_type}"
    if event.level in ("EVSE", "CONNECTOR") and not event.evse_uid:
        return f"an {event.level} push without evse_uid"
    if event.level == "CONNECTOR" and not event.connector_id:
        return "a CONNECTOR push without connector_id"
    # An identity below the event's level would file it under an object whose stored times never match it.
    article = "an" if event.level[:1] in "AEIOU" else "a"
    if event.evse_uid and event.level not in ("EVSE", "CONNECTOR"):
        return f"{article} {event.level} push with evse_uid {event.evse_uid!r}"
    if event.connector_id and event.level != "CONNECTOR":
        return f"{article} {event.level} push with connector_id {event.connector_id!r}"
    for field_name, expected in _identity(event):
        value = event.payload.get(field_name)
        if value is not None and not ci_equal(value, expected):
            return f"a payload with {field_name} {value!r} in an event of {expected!r}"
    return None


def _identity(event: DecodedEvent) -> tuple[tuple[str, str | None], ...]:
    """(payload field, the event's value) of the identity a payload may carry, which the receivers check against
    the push URL (`receivers.pushes.check_identity`; a CDR's owner and id are the URL's)."""
    if event.level == "EVSE":
        return (("uid", event.evse_uid),)
    if event.level == "CONNECTOR":
        return (("id", event.connector_id),)
    return ("country_code", event.country_code), ("party_id", event.party_id), ("id", event.object_id)


def misfit_key(record: Record) -> str | None:
    """Why `record` is not keyed by its object (`object_key`), as the receivers key every event, or None.

    The key places an object's events in order in one partition, the one whose state holds the object: an event
    keyed otherwise (another object's key, another spelling, none) is applied on a partition that may not hold
    its object's state, as a second copy of the object there (no order with its other events, no duplicate or
    conflict found)."""
    expected = object_key(record.event).encode()
    if record.key is None or record.key == expected:
        return None
    return f"keyed {record.key!r}, not by its object's key {expected!r}"


def misfit_partition(key: bytes | None, partition: int, partitions: int | None,
                     placed: dict[bytes, int] | None = None) -> str | None:
    """Why a record keyed `key` (its object's, its party's) is not in its key's partition of a topic of
    `partitions` (None: not known, not checked), or None. The state of its object or party is in the key's
    partition, where every other record of it goes: applied in another (a producer whose partitioner is not
    murmur2, librdkafka's default), it would make a second copy of that state there, as a record keyed otherwise
    would (`misfit_key`). `placed`: the partitions of keys computed before (murmur2 costs microseconds, and a
    batch holds several records of a key)."""
    if not partitions or not key:
        return None
    placed = {} if placed is None else placed
    expected = placed.get(key)
    if expected is None:
        expected = placed[key] = key_partition(key, partitions)
    if partition == expected:
        return None
    return f"in partition {partition}, where its key {key!r} places it in partition {expected}"


def sort_out(records: list[Record], module: str, partitions: int | None = None,
             ) -> tuple[list[Record], list[DeadLetter]]:
    """`records` split into those that belong on `module`'s topic, keyed by their object and in its key's
    partition (of `partitions`, when known), and dead letters for the others."""
    kept: list[Record] = []
    dead: list[DeadLetter] = []
    placed: dict[bytes, int] = {}
    for record in records:
        reason = (misfit(record.event, module) or misfit_key(record)
                  or misfit_partition(record.key, record.partition, partitions, placed))
        if reason is None:
            kept.append(record)
        else:
            dead.append(record.dead_letter(f"does not fit its topic: {reason}"))
    return kept, dead


def object_key(event: DecodedEvent) -> str:
    """`CC/PID/ID` upper-cased, as `ObjectKey.kafka_key`: the Kafka key, the state key and the identity in every
    table."""
    return f"{owner_key_part(event.country_code)}/{owner_key_part(event.party_id)}/{ci_normalize(event.object_id)}"


def group_by_object(records: Sequence[Record]) -> dict[str, list[Record]]:
    """Records per object, each list in offset order (one object's events share a partition)."""
    groups: dict[str, list[Record]] = {}
    for record in records:
        groups.setdefault(object_key(record.event), []).append(record)
    return groups


@dataclass(frozen=True, slots=True)
class AnomalyRow:
    kind: Anomaly
    module: str
    country_code: str
    party_id: str
    object_id: str
    sub_id: str
    event_id: str
    partner_id: str
    detail: str
    observed_at: datetime


@dataclass
class Decision:
    """The outcome of one event and everything it produced besides the object's new state."""

    outcome: Outcome
    detail: str = ""
    anomalies: list[tuple[Anomaly, str]] = field(default_factory=list)


def utc_now() -> datetime:
    return datetime.now(UTC)


def upper(value: str | None) -> str | None:
    return None if value is None else ci_normalize(value)


def sub_id(event: DecodedEvent) -> str:
    """`EVSE` or `EVSE/CONNECTOR` (upper-cased) of a sub-object event; '' for whole objects."""
    parts = [ci_normalize(p) for p in (event.evse_uid, event.connector_id) if p]
    return "/".join(parts)


def describe(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 500 else text[:497] + "..."
