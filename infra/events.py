"""The OcpiEvent envelope of one accepted OCPI object, built the same way for every source.

Pushes (receivers), pulls (`pipeline.jobs.pull`) and anything else that turns a validated OCPI object into
a Kafka record call `build_event`, so the wire contract of ARCHITECTURE.md ("Wire contract") is written in one
place: same identity fields, same content hash, same payload form. The result is the mapping
`infra.codec.encode_event` takes.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from ocpi.canonical import content_hash, to_builtins
from ocpi.decode import Decoded
from ocpi.identity import ObjectKey
from ocpi.model import LocationPatch

SOURCES = ("PUSH", "PULL", "REPLAY")

# What each module's events carry: (MODULE, operation, level) -> payload type. `build_event` writes no other
# combination, and the pipeline turns any other it reads into a dead letter (`pipeline.records.misfit`).
PAYLOAD_TYPES: dict[tuple[str, str, str], str] = {
    ("SESSIONS", "PUT", "SESSION"): "Session", ("SESSIONS", "PATCH", "SESSION"): "SessionPatch",
    ("CDRS", "POST", "CDR"): "CDR",
    ("LOCATIONS", "PUT", "LOCATION"): "Location", ("LOCATIONS", "PATCH", "LOCATION"): "LocationPatch",
    ("LOCATIONS", "PUT", "EVSE"): "EVSE", ("LOCATIONS", "PATCH", "EVSE"): "EVSEPatch",
    ("LOCATIONS", "PUT", "CONNECTOR"): "Connector", ("LOCATIONS", "PATCH", "CONNECTOR"): "ConnectorPatch",
    # Full sync (08 §2.1, schema revision v2): a complete pulled list, up to its date_to, no longer holds the Location.
    ("LOCATIONS", "UNLIST", "LOCATION"): "LocationPatch",
}


def build_event(*, partner_id: str, module: str, operation: str, level: str, key: ObjectKey,
                decoded: Decoded[Any], payload_type: str, source: str, request_id: str, correlation_id: str,
                evse_uid: str | None = None, connector_id: str | None = None,
                from_party: tuple[str, str] | None = None, to_party: tuple[str, str] | None = None,
                received_at: datetime | None = None, event_id: str | None = None) -> dict[str, Any]:
    """The OcpiEvent of a validated object (or PATCH body), ready for `infra.codec.encode_event`.

    `module` is the OCPI module identifier (`sessions`) or its enum name; `from_party`/`to_party` are the
    routing headers' (country_code, party_id) as they came with the object, when there were any.
    """
    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES}")
    if PAYLOAD_TYPES.get((module.upper(), operation, level)) != payload_type:
        raise ValueError(f"a {payload_type} is not what a {module} {operation} at {level} level carries")
    value = decoded.value
    return {
        "event_id": event_id or str(uuid.uuid4()),
        "partner_id": partner_id,
        "module": module.upper(),
        "operation": operation,
        "level": level,
        "country_code": key.country_code,
        "party_id": key.party_id,
        "object_id": key.object_id,
        "evse_uid": evse_uid,
        "connector_id": connector_id,
        "received_at": received_at or datetime.now(UTC),
        "request_id": request_id,
        "correlation_id": correlation_id,
        "from_country_code": from_party[0] if from_party else None,
        "from_party_id": from_party[1] if from_party else None,
        "to_country_code": to_party[0] if to_party else None,
        "to_party_id": to_party[1] if to_party else None,
        "source": source,
        "content_hash": content_hash(value),
        "relaxations": list(decoded.relaxations),
        "payload": (payload_type, to_builtins(value)),
    }


def unlist_event(*, partner_id: str, key: ObjectKey, listed_until: datetime, correlation_id: str,
                 to_party: tuple[str, str] | None = None, received_at: datetime | None = None) -> dict[str, Any]:
    """The UNLIST event of a stored Location a complete pulled list (08 §2.1, full sync) no longer holds: a
    LocationPatch of `last_updated` only, the list's date_to (`listed_until`: it held every Location updated before
    it), keyed by the Location like its pushes. `pipeline.locations.unlist` applies it."""
    return build_event(partner_id=partner_id, module="locations", operation="UNLIST", level="LOCATION", key=key,
                       decoded=Decoded(LocationPatch(last_updated=listed_until)), payload_type="LocationPatch",
                       source="PULL", request_id=str(uuid.uuid4()), correlation_id=correlation_id,
                       to_party=to_party, received_at=received_at)
