"""Rows for ClickHouse from decoded events: plain functions, no I/O."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

import msgspec

from infra.codec import DecodedEvent

_json = msgspec.json.Encoder(decimal_format="number")

RAW_EVENT_COLUMNS = (
    "event_id", "partner_id", "module", "operation", "level", "country_code", "party_id", "object_id",
    "evse_uid", "connector_id", "received_at", "request_id", "correlation_id", "source", "content_hash",
    "relaxations", "payload_json", "kafka_topic", "kafka_partition", "kafka_offset",
)

SESSION_COLUMNS = (
    "country_code", "party_id", "session_id", "partner_id", "status", "start_date_time", "end_date_time", "kwh",
    "auth_method", "authorization_reference", "token_uid", "token_type", "contract_id", "location_id",
    "evse_uid", "connector_id", "currency", "total_cost_excl_vat", "total_cost_incl_vat", "last_updated",
    "payload_json", "event_id", "version",
)

CDR_COLUMNS = (
    "country_code", "party_id", "cdr_id", "partner_id", "start_date_time", "end_date_time", "session_id",
    "auth_method", "authorization_reference", "token_uid", "token_type", "contract_id", "location_id",
    "evse_uid", "connector_id", "currency", "total_energy", "total_time", "total_parking_time",
    "total_cost_excl_vat", "total_cost_incl_vat", "credit", "credit_reference_id", "last_updated",
    "payload_json", "event_id", "version",
)


def payload_json(payload: dict[str, Any]) -> str:
    """The payload as OCPI JSON (DateTimes with Z, exact decimals), for GET answers and audits."""
    return _json.encode(_to_ocpi_json(payload)).decode()


def _to_ocpi_json(value: Any) -> Any:
    from ocpi.datetime import format_datetime

    if isinstance(value, dict):
        return {k: _to_ocpi_json(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_to_ocpi_json(v) for v in value]
    if isinstance(value, datetime):
        return format_datetime(value)
    return value


def version_of(moment: datetime) -> int:
    """ReplacingMergeTree version from an OCPI timestamp: microseconds since the epoch."""
    return int(moment.timestamp() * 1_000_000)


def raw_event_row(event: DecodedEvent, topic: str, partition: int, offset: int) -> list[Any]:
    return [
        event.event_id, event.partner_id, event.module, event.operation, event.level, event.country_code,
        event.party_id, event.object_id, event.evse_uid, event.connector_id, event.received_at, event.request_id,
        event.correlation_id, event.source, event.content_hash, list(event.relaxations),
        payload_json(event.payload), topic, partition, offset,
    ]


def _price(price: dict[str, Any] | None) -> tuple[Decimal | None, Decimal | None]:
    if not price:
        return None, None
    return price.get("excl_vat"), price.get("incl_vat")


def session_row(event: DecodedEvent, session: dict[str, Any]) -> list[Any]:
    """The current-state row of a full Session (after any PATCH merge)."""
    token = session["cdr_token"]
    excl, incl = _price(session.get("total_cost"))
    return [
        session["country_code"].upper(), session["party_id"].upper(), session["id"].upper(), event.partner_id,
        session["status"], session["start_date_time"], session.get("end_date_time"), session["kwh"],
        session["auth_method"], session.get("authorization_reference"), token["uid"], token["type"],
        token["contract_id"], session["location_id"], session["evse_uid"], session["connector_id"],
        session["currency"], excl, incl, session["last_updated"], payload_json(session), event.event_id,
        version_of(session["last_updated"]),
    ]


def cdr_row(event: DecodedEvent, cdr: dict[str, Any]) -> list[Any]:
    token = cdr["cdr_token"]
    location = cdr["cdr_location"]
    excl, incl = _price(cdr["total_cost"])
    return [
        cdr["country_code"].upper(), cdr["party_id"].upper(), cdr["id"].upper(), event.partner_id,
        cdr["start_date_time"], cdr["end_date_time"], cdr.get("session_id"), cdr["auth_method"],
        cdr.get("authorization_reference"), token["uid"], token["type"], token["contract_id"], location["id"],
        location["evse_uid"], location["connector_id"], cdr["currency"], cdr["total_energy"], cdr["total_time"],
        cdr.get("total_parking_time"), excl, incl, bool(cdr.get("credit")), cdr.get("credit_reference_id"),
        cdr["last_updated"], payload_json(cdr), event.event_id, 1,
    ]
