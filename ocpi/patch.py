"""PATCH and sub-object PUT merge rules, as pure functions over frozen Structs.

- A PATCH field that is set replaces the stored field as a whole, nested objects and lists included
  (digest ambiguity #4: replace-the-field). Absent and `null` mean "unchanged" (project policy, see the
  Patch classes).
- Session PATCH: `charging_periods` are APPENDED (09 §3.4); a period identical to one already stored (same
  start, tariff and dimensions, the dimensions in any order) is skipped, so a retried PATCH does not double
  them; empty or absent leaves the list unchanged.
- A PATCH cannot change identity: a set identity field must equal the stored one case-insensitively.
- Parent `last_updated` (08 §3): a PUT or PATCH of an EVSE raises the Location's `last_updated`, of a
  Connector the EVSE's and the Location's, to the child's — but never lowers it (digest ambiguity #2: the
  literal "set to the new value" would move the parent back in time for an older child).
- The object's own `last_updated` is taken from the PATCH as sent, but a Location's or an EVSE's is never
  lowered: a PATCH of its own fields dated before a child push that raised it (applied in the pipeline, see
  `pipeline.locations`) leaves it at the child's. Whether a stale PATCH is applied at all is the ordering policy
  of the pipeline, not of these functions.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any, Final, TypeVar

import msgspec

from ocpi._generated import (
    EVSE,
    ChargingPeriod,
    Connector,
    ConnectorPatch,
    EVSEPatch,
    Location,
    LocationPatch,
    Session,
    SessionPatch,
)
from ocpi.errors import OcpiValidationError, UnknownObjectError
from ocpi.identity import ci_equal, ci_index, ci_normalize
from ocpi.types import OcpiObject

__all__ = [
    "merge_connector",
    "merge_evse",
    "merge_location",
    "merge_session",
    "patch_connector",
    "patch_evse",
    "put_connector",
    "put_evse",
]

S = TypeVar("S", bound=OcpiObject)

_OWNER_IDENTITY: Final = ("country_code", "party_id", "id")


def _is_set(value: Any) -> bool:
    return value is not None and value is not msgspec.UNSET


def _changes(current: OcpiObject, patch: OcpiObject, identity: tuple[str, ...]) -> dict[str, Any]:
    """The fields a PATCH sets, minus identity fields (checked to be unchanged)."""
    changes: dict[str, Any] = {}
    for name in patch.__struct_fields__:
        value = getattr(patch, name)
        if not _is_set(value):
            continue
        if name in identity:
            if not ci_equal(value, getattr(current, name)):
                raise OcpiValidationError(f"$.{name}", "a PATCH cannot change the object's identity")
            continue  # keep the stored spelling
        changes[name] = value
    if "last_updated" not in changes:
        raise OcpiValidationError("$.last_updated", "missing required field")
    return changes


def merge_session(current: Session, patch: SessionPatch) -> Session:
    """Apply a Session PATCH: fields replace, charging_periods append (identical periods skipped)."""
    changes = _changes(current, patch, _OWNER_IDENTITY)
    new_periods = changes.pop("charging_periods", None)
    if new_periods:
        periods = list(current.charging_periods or ())
        known = {_period_key(period) for period in periods}
        for period in new_periods:
            key = _period_key(period)
            if key not in known:
                periods.append(period)
                known.add(key)
        changes["charging_periods"] = periods
    return msgspec.structs.replace(current, **changes)


def _period_key(period: ChargingPeriod) -> tuple[Any, ...]:
    """What makes two ChargingPeriods identical: the same start, tariff (a CiString: in any case) and dimensions,
    the dimensions in any order (a set of measurements; a CPO serialising them from an unordered map changes their
    order)."""
    dimensions = sorted((str(d.type), d.volume) for d in period.dimensions)
    tariff = None if period.tariff_id is None else ci_normalize(period.tariff_id)
    return period.start_date_time, tariff, tuple(dimensions)


def merge_location(current: Location, patch: LocationPatch) -> Location:
    """Apply a Location-level PATCH (fields replace, `evses` included; `last_updated` never lowered)."""
    return msgspec.structs.replace(current, **_parent_changes(current, patch, _OWNER_IDENTITY))


def merge_evse(current: EVSE, patch: EVSEPatch) -> EVSE:
    """Apply an EVSE PATCH to the EVSE alone (use patch_evse to also update the Location; `last_updated` never
    lowered)."""
    return msgspec.structs.replace(current, **_parent_changes(current, patch, ("uid",)))


def _parent_changes(current: Location | EVSE, patch: OcpiObject, identity: tuple[str, ...]) -> dict[str, Any]:
    """`_changes` of a PATCH of an object with children: its `last_updated` stays the later of the stored one (which
    a child push may have raised beyond the PATCH) and the PATCH's."""
    changes = _changes(current, patch, identity)
    changes["last_updated"] = _later(current.last_updated, changes["last_updated"])
    return changes


def merge_connector(current: Connector, patch: ConnectorPatch) -> Connector:
    """Apply a Connector PATCH to the Connector alone (use patch_connector to also update its parents)."""
    return msgspec.structs.replace(current, **_changes(current, patch, ("id",)))


def put_evse(location: Location, evse: EVSE) -> Location:
    """PUT of an EVSE into a stored Location: replaces the EVSE with the same uid, or adds it."""
    evses = _replace_or_append(location.evses, evse, "uid", evse.uid)
    return _with_children(location, evses=evses, child_updated=evse.last_updated)


def patch_evse(location: Location, evse_uid: str, patch: EVSEPatch) -> Location:
    """PATCH of an EVSE inside a stored Location; UnknownObjectError if the Location has no such EVSE."""
    index = _index(location.evses, "uid", evse_uid)
    if index is None:
        raise UnknownObjectError(f"EVSE {evse_uid!r} is not part of Location {location.id!r}")
    evses = list(location.evses or ())
    evses[index] = merged = merge_evse(evses[index], patch)
    return _with_children(location, evses=evses, child_updated=merged.last_updated)


def put_connector(location: Location, evse_uid: str, connector: Connector) -> Location:
    """PUT of a Connector into an EVSE of a stored Location: replaces the same id, or adds it."""
    return _update_connector(location, evse_uid, connector.id, lambda _current: connector)


def patch_connector(location: Location, evse_uid: str, connector_id: str, patch: ConnectorPatch) -> Location:
    """PATCH of a Connector inside a stored Location; UnknownObjectError for an unknown EVSE or Connector."""

    def update(current: Connector | None) -> Connector:
        if current is None:
            raise UnknownObjectError(f"Connector {connector_id!r} is not part of EVSE {evse_uid!r}")
        return merge_connector(current, patch)

    return _update_connector(location, evse_uid, connector_id, update)


# --- helpers ----------------------------------------------------------------------------------------------


def _update_connector(
    location: Location, evse_uid: str, connector_id: str, update: Callable[[Connector | None], Connector]
) -> Location:
    evse_index = _index(location.evses, "uid", evse_uid)
    if evse_index is None:
        raise UnknownObjectError(f"EVSE {evse_uid!r} is not part of Location {location.id!r}")
    evses = list(location.evses or ())
    evse = evses[evse_index]
    connectors = list(evse.connectors)
    connector_index = _index(connectors, "id", connector_id)
    connector = update(connectors[connector_index] if connector_index is not None else None)
    if connector_index is None:
        connectors.append(connector)
    else:
        connectors[connector_index] = connector
    evses[evse_index] = msgspec.structs.replace(
        evse, connectors=connectors, last_updated=_later(evse.last_updated, connector.last_updated)
    )
    return _with_children(location, evses=evses, child_updated=connector.last_updated)


def _with_children(location: Location, *, evses: list[EVSE], child_updated: datetime) -> Location:
    last_updated = _later(location.last_updated, child_updated)
    return msgspec.structs.replace(location, evses=evses, last_updated=last_updated)


def _later(parent: datetime, child: datetime) -> datetime:
    return child if child > parent else parent


def _index(items: list[S] | None, attribute: str, wanted: str) -> int | None:
    return ci_index([getattr(item, attribute) for item in items or ()], wanted)


def _replace_or_append(items: list[S] | None, new: S, attribute: str, wanted: str) -> list[S]:
    result = list(items or ())
    index = _index(result, attribute, wanted)
    if index is None:
        result.append(new)
    else:
        result[index] = new
    return result
