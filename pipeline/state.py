"""The pipeline's state: typed values of the Faust tables, their codec, and batch overlays over the tables.

Every table value is a msgspec Struct encoded with MessagePack.

Consistency under at-least-once (docs/pipeline.md, "Exactly once in ClickHouse"): a batch's effects — ClickHouse rows,
facts and results published to Kafka — are made durable *before* the state that records them is written. Each
stage-1 state also holds the highest source offset folded into it, so a record read again after a crash
(offset <= that watermark) is recognised as already done and skipped, instead of being mistaken for a
partner's duplicate.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Final, Generic, TypeVar

import msgspec
from faust.streams import _current_event  # see `in_partition_of`

from pipeline.facts import SessionFact

S = TypeVar("S", bound=msgspec.Struct)
Reader = Callable[[str], bytes | None]  # a table's current value of a key, in one partition (None: absent)
# How many event ids an object's state remembers (`pipeline.stage.seen_before`): a producer that resends a record
# the broker wrote but did not acknowledge puts the same event on the topic again, at most a producer batch later.
# A batch is up to 16 KiB per partition (aiokafka's `max_batch_size`), and a burst of a hub's status updates fills
# one with a single Location's events: 60 to 90 of them (an event's Avro record is 180 to 270 bytes at its smallest),
# whose copies each come that many events of the Location later. A copy not recognised is remembered in turn and
# pushes the next original out, so with a smaller window every copy of such a batch was folded in again.
RECENT_EVENT_IDS: Final = 128


class Parked(msgspec.Struct, frozen=True, kw_only=True):
    """An event that waits for its object (a PATCH before its PUT, an EVSE before its Location)."""

    value: bytes  # the Avro record, decoded again when it is retried
    topic: str
    partition: int
    offset: int
    event_id: str
    received_at: datetime
    # The fact token (`facts.fact_token`) of the `cdr_token` a Session PATCH brings, kept when the state retention
    # pass pseudonymised its uid (which the token cannot be derived from afterwards), for the fact sent when it is
    # applied (`state_retention.keep_fact_token`); None for any other event, and in states from before.
    fact_token: str | None = None


class SessionState(msgspec.Struct, kw_only=True):
    object_json: bytes | None = None  # OCPI JSON of the current Session
    status: str | None = None
    last_updated: datetime | None = None
    last_identity: str = ""  # identity and `dedup.fingerprint` of the last applied event (dedup)
    last_hash: str = ""
    confirmed: datetime | None = None  # newest last_updated of a dropped duplicate (see pipeline.ordering)
    version: int = 0  # row version of the current state
    applied_event_id: str = ""
    applied_at: datetime | None = None  # received_at of the last applied event (idle detection)
    recent_event_ids: list[str] = []  # the last RECENT_EVENT_IDS events folded in, oldest first (resent copies)
    final_at: datetime | None = None  # received_at of the event that made it COMPLETED/INVALID
    # received_at of the first applied event (its PUT); None in states from before (`stage.replayed_orphan`)
    created_at: datetime | None = None
    fact: SessionFact | None = None  # the last fact sent to stage 2
    offset: int = -1  # highest source offset folded into this state
    parked: list[Parked] = []
    # The last RECENT_EVENT_IDS events ORPHANED at once, the parked ones being at their bound (PARK_OVERFLOW), or
    # ORPHANED when their wait expired (`sessions.process_sessions`): refused for good, so a replayed copy is neither
    # applied nor recorded (`stage.replayed_overflow`).
    overflowed: list[str] = []
    # received_at of the newest event folded into it, whatever its outcome: dates a state that holds neither its object
    # nor parked events (events refused or ORPHANED at once) for its expiry (`pipeline.state_retention`); None in
    # states from before.
    seen_at: datetime | None = None


class LocationState(msgspec.Struct, kw_only=True):
    object_json: bytes | None = None  # OCPI JSON of the current Location, EVSEs and Connectors included
    last_identity: str = ""
    last_hash: str = ""
    # identity -> newest last_updated of a duplicate that was dropped: the CPO confirmed the content then, so
    # an older push for that object, arriving later, is stale (the object's own last_updated was not bumped); and
    # of an EVSE or Connector a push left out of the tree, that push's last_updated (an older push is stale too);
    # and of the tree's lists (`dedup.lists_replaced`), when a push last replaced them whole
    # (entries that decide nothing are dropped, `locations._prune_confirmed`, after every push that can remove or
    # back-date an object and once they outgrow the tree: bounded
    # by the tree, not its history)
    confirmed: dict[str, datetime] = {}
    # identity of the Location or an EVSE -> the newest last_updated of the pushes that set its own fields (at its
    # level, or replacing it from above), kept only while a push of one of its children (an EVSE's, a Connector's)
    # raised its last_updated, or confirmed a time of it, beyond that: a PATCH of its own fields is stale against
    # this, not against the children's times (`pipeline.locations`). Empty in states from before: their objects are
    # compared with their last_updated, as they were.
    own_updated: dict[str, datetime] = {}
    version: int = 0
    applied_event_id: str = ""
    # received_at of the event the current `publish_allowed_to` came with (a Location PUT, or a Location PATCH
    # that sets it): personal data, pseudonymised from then on (pipeline.state_retention; its locations rows carry
    # it too, for the ClickHouse sweep). Not the last applied event's: EVSE status updates arrive all the time and
    # would postpone it forever. None in states from before.
    personal_at: datetime | None = None
    recent_event_ids: list[str] = []  # the last RECENT_EVENT_IDS events folded in, oldest first (resent copies)
    offset: int = -1
    parked: list[Parked] = []
    # latest received_at of the events applied to it (`ordering.replayed_earlier`); None in states from before
    applied_at: datetime | None = None
    # received_at of the first event applied to it (its Location PUT); None in states from before
    # (`stage.replayed_orphan`)
    created_at: datetime | None = None
    # The last RECENT_EVENT_IDS events ORPHANED at once, the parked ones being at their bound (PARK_OVERFLOW), or
    # ORPHANED when their wait expired (`locations.process_locations`): refused for good, so a replayed copy is neither
    # applied nor recorded (`stage.replayed_overflow`).
    overflowed: list[str] = []
    # received_at of the newest event folded into it, whatever its outcome: dates a state that holds neither its object
    # nor parked events (events refused or ORPHANED at once) for its expiry (`pipeline.state_retention`); None in
    # states from before.
    seen_at: datetime | None = None
    # The date_to of the complete pulled list that no longer held the Location (full sync, `locations.unlist`), while
    # no push dated at or after it came, nor a later pull's PUT of it (`locations.lists_again`): its rows say
    # `unlisted`, and a push dated before it is stale. None: listed.
    unlisted_at: datetime | None = None


class CdrState(msgspec.Struct, kw_only=True):
    content_hash: str
    event_id: str
    offset: int
    received_at: datetime
    # `ocpi.canonical.cdr_content_hash` of the stored CDR; "" in a state written before it was kept.
    same_hash: str = ""


class Codec(Generic[S]):
    """MessagePack codec of one state type."""

    def __init__(self, kind: type[S]) -> None:
        self._encoder = msgspec.msgpack.Encoder()
        self._decoder = msgspec.msgpack.Decoder(kind)

    def encode(self, value: S) -> bytes:
        return self._encoder.encode(value)

    def decode(self, data: bytes) -> S:
        return self._decoder.decode(data)


class Overlay:
    """One batch's view of a table for one partition: reads fall through, writes are held until `changes`.

    `read` loads a key from the table (in the right partition); writes stay here until the batch's effects
    are durable, then the agent writes `changes` to the table.
    """

    def __init__(self, read: Reader) -> None:
        self._read = read
        self._changes: dict[str, bytes | None] = {}

    def get(self, key: str) -> bytes | None:
        if key in self._changes:
            return self._changes[key]
        return self._read(key)

    def set(self, key: str, value: bytes | None) -> None:
        self._changes[key] = value

    @property
    def changes(self) -> dict[str, bytes | None]:
        return self._changes


class TypedView(Generic[S]):
    """Typed access to one state type through an Overlay."""

    def __init__(self, overlay: Overlay, codec: Codec[S]) -> None:
        self.overlay = overlay
        self.codec = codec

    def get(self, key: str) -> S | None:
        data = self.overlay.get(key)
        return None if data is None else self.codec.decode(data)

    def set(self, key: str, value: S) -> None:
        self.overlay.set(key, self.codec.encode(value))


class _AnchorMessage:
    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic = topic
        self.partition = partition


class PartitionAnchor:
    """Stands in for an event of `topic`/`partition` where Faust wants a current event (table reads and writes
    of a partition outside an agent's stream: bulk batches, timers). Faust only reads `.message.partition`."""

    __slots__ = ("__weakref__", "message")

    def __init__(self, topic: str, partition: int) -> None:
        self.message = _AnchorMessage(topic, partition)


@contextmanager
def in_partition_of(event: Any) -> Iterator[None]:
    """Make Faust table reads and writes use `event`'s partition.

    Faust picks a table key's partition (store lookup and changelog partition) from the stream's *current
    event*. Outside a stream (batches, timers) there is none, so each key is read and written with an event of
    its partition (a `PartitionAnchor`) as current event — the same context Faust sets for a per-event agent.
    `_current_event` is the ContextVar behind `faust.current_event()`.
    """
    token = _current_event.set(weakref.ref(event))
    try:
        yield
    finally:
        _current_event.reset(token)
