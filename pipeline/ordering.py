"""Ordering and merge: stale updates, PATCH merges exactly as the spec says, and parking of early events.

- STALE (digest ambiguity #1, our policy): a PUT or PATCH whose `last_updated` is *older* than the stored
  object's is not applied and is recorded. Equal timestamps are applied (the later arrival wins): some CPOs
  send several changes within one second; but not a replayed copy of an event received no later than the last
  one applied to the object (`replayed_earlier`), whose arrival now is not its arrival. For an EVSE or Connector
  push, "stored" is that EVSE's/Connector's own `last_updated` (for one a newer push left out of the tree, that
  push's: `pipeline.locations`); for a Location-level push it is the Location's, which child pushes raise (never
  lower). But for a PATCH of a Location's or EVSE's own fields (no `evses`/`connectors`) it is the time of the
  newest push that set its own fields (`LocationState.own_updated`), not what its children's pushes raised it to:
  an EVSE status PATCH older than a Connector push arriving after it sets another field and is applied.
  A duplicate (`pipeline.dedup`) creates no version, but its newer `last_updated` still counts: the CPO
  confirmed the content at that time, so an older push arriving after it is stale too.
- Merges are `ocpi.patch`'s: fields that are set replace the stored field (nested objects and lists too),
  absent and `null` mean "unchanged" (null-in-PATCH policy, digest ambiguity #3: PATCH cannot remove
  information), Session `charging_periods` are appended (identical periods skipped), and parents'
  `last_updated` are raised to the child's but never lowered.
- Every merged object is validated again, with the result of decoding its OCPI JSON (`ocpi.decode`): its
  parts passed msgspec's type and field checks already, so `wire.revalidated` runs the rules that span fields
  on the Struct, and decodes the JSON only when it is not an exact image (a DateTime with a fraction). A
  result that is not a valid OCPI object raises `InvalidMerge` and is not stored.
- An event whose object (or parent) is not stored yet raises `NeedsObject`: it is parked until the PUT arrives,
  at most `park_ttl` (by the events' receive times), `park_max` events per object and `stage.PARKED_MAX_BYTES`
  of them together; then it is an orphan. A merge whose JSON would exceed OBJECT_MAX_BYTES is InvalidMerge.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final, TypeVar

from infra.codec import DecodedEvent
from infra.kafka.admin import RECORD_MAX_BYTES
from ocpi.errors import OcpiValidationError, UnknownObjectError
from ocpi.identity import ci_index
from ocpi.model import (
    EVSE,
    Connector,
    ConnectorPatch,
    EVSEPatch,
    Location,
    LocationPatch,
    Session,
    SessionPatch,
)
from ocpi.patch import merge_location, merge_session, patch_connector, patch_evse, put_connector, put_evse
from pipeline import wire
from pipeline.retention import LOCATION_PERSONAL_FIELD, pseudonymised_growth
from pipeline.state import Parked

T = TypeVar("T")


class NeedsObject(Exception):
    """The event's object or parent is not stored yet: park the event."""


class InvalidMerge(Exception):
    """The PATCH (or sub-object push) cannot be applied: the result would not be a valid OCPI object."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def is_stale(stored: datetime | None, incoming: datetime, *, replayed_earlier: bool = False) -> bool:
    """A push older than what is stored is stale (equal is not: the later arrival wins). So is an equal one when
    `replayed_earlier` (see `replayed_earlier`): a replayed copy's arrival now is not its arrival."""
    return stored is not None and (incoming < stored or (replayed_earlier and incoming == stored))


def replayed_earlier(event: DecodedEvent, received_at: datetime, applied_at: datetime | None) -> bool:
    """Whether `event` is a replayed copy (source REPLAY) of an event received no later than the event the stored
    object came from (`applied_at`: the latest receive time of the events applied to it; for the Location tree one
    time for all its objects, so an EVSE's or Connector's copy compares with the last event applied to any of them:
    a copy of an event not applied the first time, a DUPLICATE, is STALE and writes nothing, where the EVSE's own
    time would apply it again).

    `ocpi-pipeline replay` sends events again after everything that followed them: of two pushes with one
    `last_updated` the first's copy would arrive after the second and, applied as "the later arrival", put its
    content back, write a new version and turn its event's row into a REPLAY row. Its arrival was its receipt,
    before the stored event's: stale at an equal `last_updated` too. (A copy received after it was not applied the
    first time, or it would be the stored one; and topics that hold only replayed copies keep their order.)
    `applied_at` None beside a stored object: a state written before it was kept (a Location's), whose events were
    all received before a replay sends their copies: no later than them (only a stored object makes it matter)."""
    return event.source == "REPLAY" and (applied_at is None or received_at <= applied_at)


def ahead_of_receipt(last_updated: datetime, received_at: datetime, skew: timedelta) -> timedelta | None:
    """How far a push's `last_updated` is ahead of our receipt of it, when more than `skew` (None otherwise).

    Such a push comes from a clock ahead of ours. It is applied as any other (the CPO owns the object), but every
    later push dated before it is STALE, so it is flagged where the operator sees the cause, not only the STALEs
    that follow."""
    ahead = last_updated - received_at
    return ahead if ahead > skew else None


def newest(*moments: datetime | None) -> datetime | None:
    """The latest of the known moments (None when none is known)."""
    known = [m for m in moments if m is not None]
    return max(known) if known else None


# --- Sessions -----------------------------------------------------------------------------------------------


# The largest OCPI JSON of an object its stage-1 state may hold. The state is one changelog record, which a broker
# refuses above RECORD_MAX_BYTES (16 MB) for good (the worker would retry its batch for ever), and holds up to
# `stage.PARKED_MAX_BYTES` (8 MB) of parked events and a few other fields besides. A push is at most 4 MB, but a
# Session grows by appended charging periods and a Location by EVSE pushes: a merge beyond this is refused. So is
# a Location that would exceed it once pseudonymised (a one-character uid becomes 36 characters).
OBJECT_MAX_BYTES: Final = RECORD_MAX_BYTES // 2 - 1024 * 1024


def _within_state(kind: str, merged: tuple[T, bytes], growth: int = 0) -> tuple[T, bytes]:
    """`merged` unless its JSON, with the `growth` pseudonymisation may add to it later, exceeds OBJECT_MAX_BYTES:
    the state retention pass rewrites the stored object in place (`pipeline.state_retention`)."""
    size = len(merged[1])
    if size + growth > OBJECT_MAX_BYTES:
        grown = f" ({size + growth} once pseudonymised)" if growth else ""
        raise InvalidMerge(f"the {kind} would be {size} bytes of JSON{grown}, more than {OBJECT_MAX_BYTES} (what its "
                           "state can hold)")
    return merged


def _pseudonymised_growth(location: Location) -> int:
    """What pseudonymising its `publish_allowed_to` (uids, visual numbers) may add to a Location's JSON."""
    allowed = location.publish_allowed_to
    return pseudonymised_growth({LOCATION_PERSONAL_FIELD: wire.builtins(allowed)}) if allowed else 0


def merge_session_patch(stored: wire.StoredStruct[Session], current_json: bytes, patch: dict[str, Any],
                        ) -> tuple[Session, bytes]:
    """The stored Session (`current_json`, decoded through `stored`) with a PATCH applied, validated; returns the
    Session and its OCPI JSON. InvalidMerge beyond OBJECT_MAX_BYTES."""
    try:
        current = stored.of(current_json)
        assert current is not None
        merged = wire.revalidated(merge_session(current, wire.to_struct(patch, SessionPatch)), Session)
    except (OcpiValidationError, ValueError, TypeError) as exc:
        raise InvalidMerge(str(exc)) from exc
    return _within_state("Session", merged)


# --- Locations ----------------------------------------------------------------------------------------------


def target_last_updated(location: Location | None, event: DecodedEvent) -> datetime | None:
    """`last_updated` of the stored object a Locations event targets (None: not stored)."""
    return stored_last_updated(location, event.evse_uid if event.level != "LOCATION" else None,
                               event.connector_id if event.level == "CONNECTOR" else None)


def stored_last_updated(location: Location | None, evse_uid: str | None = None,
                        connector_id: str | None = None) -> datetime | None:
    """`last_updated` of the stored Location, or of its EVSE `evse_uid`, or of that EVSE's Connector
    `connector_id` (None: not stored)."""
    if location is None:
        return None
    if evse_uid is None:
        return location.last_updated
    evse = _find(location.evses or (), "uid", evse_uid)
    if evse is None or connector_id is None:
        return None if evse is None else evse.last_updated
    connector = _find(evse.connectors, "id", connector_id)
    return None if connector is None else connector.last_updated


def apply_location_event(current: Location | None, event: DecodedEvent,
                         evse_json: wire.EvseJson | None = None) -> tuple[Location, bytes]:
    """The stored Location tree after a Locations PUT or PATCH at any level, validated; and its OCPI JSON
    (written through `evse_json`, which reuses unchanged EVSEs' JSON within a run of events).

    Raises NeedsObject when the target's parent (or a PATCH's target) is not stored, InvalidMerge when the
    result is not a valid Location.
    """
    payload = event.payload
    try:
        if event.level == "LOCATION" and event.operation == "PUT":
            location = wire.to_struct(payload, Location)
        elif current is None:
            raise NeedsObject(f"Location {event.object_id!r} is not stored")
        else:
            location = _apply_to(current, event, payload)
        merged = wire.revalidated(location, Location, None if evse_json is None else evse_json.encode(location))
    except UnknownObjectError as exc:
        raise NeedsObject(exc.what) from exc
    except (OcpiValidationError, ValueError, TypeError) as exc:
        raise InvalidMerge(str(exc)) from exc
    return _within_state("Location", merged, _pseudonymised_growth(merged[0]))


def _apply_to(current: Location, event: DecodedEvent, payload: dict[str, Any]) -> Location:
    evse_uid = event.evse_uid or ""
    if event.level == "LOCATION":  # PATCH
        return merge_location(current, wire.to_struct(payload, LocationPatch))
    if event.level == "EVSE":
        if event.operation == "PUT":
            return put_evse(current, wire.to_struct(payload, EVSE))
        return patch_evse(current, evse_uid, wire.to_struct(payload, EVSEPatch))
    connector_id = event.connector_id or ""
    if event.operation == "PUT":
        return put_connector(current, evse_uid, wire.to_struct(payload, Connector))
    return patch_connector(current, evse_uid, connector_id, wire.to_struct(payload, ConnectorPatch))


def _find(items: Sequence[Any], attribute: str, wanted: str | None) -> Any:
    """The item whose `attribute` (a uid or id, never None) equals `wanted` ignoring case; None if none does."""
    index = None if wanted is None else ci_index([getattr(item, attribute) for item in items], wanted)
    return None if index is None else items[index]


# --- Parking ------------------------------------------------------------------------------------------------


def park_deadline(parked: Parked, ttl: timedelta) -> datetime:
    return parked.received_at + ttl


def split_expired(parked: Sequence[Parked], now: datetime, ttl: timedelta) -> tuple[list[Parked], list[Parked]]:
    """(still waiting, expired) at event time `now`: a parked event expires once `now` passes its deadline."""
    waiting: list[Parked] = []
    expired: list[Parked] = []
    for item in parked:
        (expired if now > park_deadline(item, ttl) else waiting).append(item)
    return waiting, expired
