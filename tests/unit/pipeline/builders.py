"""Test data for the pipeline: OCPI bodies, events as they come off the wire, records, a dict-backed state.

Events are built exactly as the receivers build them (decode → content_hash → Avro encode) and decoded with
`infra.codec.decode_event`, so the rules see the payload shapes of production (Decimals with 4 places, UTC
datetimes, nulls left out).
"""

from __future__ import annotations

import uuid
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec

from infra.codec import DecodedEvent, decode_event, encode_event
from ocpi import model
from ocpi.canonical import content_hash, to_builtins
from ocpi.compat import CompatProfile
from ocpi.datetime import format_datetime
from ocpi.decode import decode
from pipeline.records import Record
from pipeline.state import Overlay

# Yesterday 08:00 UTC: recent enough for every TTL (ages count from received_at), and a day boundary far away.
T0 = (datetime.now(UTC) - timedelta(days=1)).replace(hour=8, minute=0, second=0, microsecond=0)
_JSON = msgspec.json.Encoder(decimal_format="number")


def ts(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def iso(moment: datetime) -> str:
    return format_datetime(moment)


def token(uid: str = "TOK1") -> dict[str, Any]:
    return {"country_code": "NL", "party_id": "EMS", "uid": uid, "type": "RFID", "contract_id": f"NL-EMS-{uid}"}


def session(sid: str = "S1", *, status: str = "ACTIVE", kwh: str = "0", updated: float = 0, start: float = 0,
            end: float | None = None, cost: str | None = None, uid: str = "TOK1", authref: str | None = None,
            location: str = "LOC1", periods: list[dict[str, Any]] | None = None, cc: str = "NL",
            pid: str = "TNM") -> dict[str, Any]:
    body: dict[str, Any] = {
        "country_code": cc, "party_id": pid, "id": sid, "start_date_time": iso(ts(start)), "kwh": Decimal(kwh),
        "cdr_token": token(uid), "auth_method": "WHITELIST", "location_id": location, "evse_uid": "E1",
        "connector_id": "1", "currency": "EUR", "status": status, "last_updated": iso(ts(updated)),
    }
    if end is not None:
        body["end_date_time"] = iso(ts(end))
    if cost is not None:
        body["total_cost"] = {"excl_vat": Decimal(cost), "incl_vat": (Decimal(cost) * Decimal("1.21")).quantize(
            Decimal("0.0001"))}
    if authref is not None:
        body["authorization_reference"] = authref
    if periods is not None:
        body["charging_periods"] = periods
    return body


def period(start: float, kwh: str) -> dict[str, Any]:
    return {"start_date_time": iso(ts(start)), "dimensions": [{"type": "ENERGY", "volume": Decimal(kwh)}]}


def cdr(cid: str = "C1", *, session_id: str | None = "S1", kwh: str = "10", cost: str = "2.50", start: float = 0,
        end: float = 60, uid: str = "TOK1", authref: str | None = None, location: str = "LOC1",
        credit: bool | None = None, credit_reference: str | None = None, cc: str = "NL", pid: str = "TNM",
        updated: float | None = None, tariffs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "country_code": cc, "party_id": pid, "id": cid, "start_date_time": iso(ts(start)),
        "end_date_time": iso(ts(end)), "cdr_token": token(uid), "auth_method": "WHITELIST",
        "cdr_location": {"id": location, "name": "Station", "address": "Main Street 1", "city": "Utrecht",
                         "postal_code": "3511AB", "country": "NLD",
                         "coordinates": {"latitude": "52.090736", "longitude": "5.121420"},
                         "evse_uid": "E1", "evse_id": "NL*TNM*E1", "connector_id": "1",
                         "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
                         "connector_power_type": "AC_3_PHASE"},
        "currency": "EUR",
        "charging_periods": [{"start_date_time": iso(ts(start)),
                              "dimensions": [{"type": "ENERGY", "volume": Decimal(kwh).copy_abs()},
                                             {"type": "TIME", "volume": Decimal("1")}], "tariff_id": "T1"}],
        "total_cost": {"excl_vat": Decimal(cost), "incl_vat": (Decimal(cost) * Decimal("1.21")).quantize(
            Decimal("0.0001"))},
        "total_energy": Decimal(kwh), "total_time": Decimal("1"),
        "last_updated": iso(ts(end if updated is None else updated)),
    }
    if session_id is not None:
        body["session_id"] = session_id
    if authref is not None:
        body["authorization_reference"] = authref
    if credit is not None:
        body["credit"] = credit
    if credit_reference is not None:
        body["credit_reference_id"] = credit_reference
    if tariffs is not None:
        body["tariffs"] = tariffs
    return body


def connector(cid: str = "1", *, updated: float = 0, power: int = 22000) -> dict[str, Any]:
    return {"id": cid, "standard": "IEC_62196_T2", "format": "SOCKET", "power_type": "AC_3_PHASE",
            "max_voltage": 230, "max_amperage": 32, "max_electric_power": power, "last_updated": iso(ts(updated))}


def evse(uid: str = "E1", *, status: str = "AVAILABLE", updated: float = 0,
         connectors: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"uid": uid, "evse_id": f"NL*TNM*{uid}", "status": status,
            "connectors": connectors if connectors is not None else [connector(updated=updated)],
            "last_updated": iso(ts(updated))}


def location(lid: str = "LOC1", *, evses: list[dict[str, Any]] | None = None, updated: float = 0,
             name: str = "Station", **extra: Any) -> dict[str, Any]:
    body = {"country_code": "NL", "party_id": "TNM", "id": lid, "publish": True, "name": name,
            "address": "Main Street 1", "city": "Utrecht", "country": "NLD",
            "coordinates": {"latitude": "52.090736", "longitude": "5.121420"}, "time_zone": "Europe/Amsterdam",
            "evses": evses if evses is not None else [evse(updated=updated)], "last_updated": iso(ts(updated))}
    body.update(extra)
    return body


_LEVELS = {"Session": ("SESSIONS", "SESSION"), "SessionPatch": ("SESSIONS", "SESSION"), "CDR": ("CDRS", "CDR"),
           "Location": ("LOCATIONS", "LOCATION"), "LocationPatch": ("LOCATIONS", "LOCATION"),
           "EVSE": ("LOCATIONS", "EVSE"), "EVSEPatch": ("LOCATIONS", "EVSE"),
           "Connector": ("LOCATIONS", "CONNECTOR"), "ConnectorPatch": ("LOCATIONS", "CONNECTOR")}


def event(payload_type: str, body: dict[str, Any], *, received: float = 0, object_id: str | None = None,
          evse_uid: str | None = None, connector_id: str | None = None, event_id: str | None = None,
          source: str = "PUSH", partner: str = "p1", cc: str = "NL", pid: str = "TNM",
          profile: CompatProfile | None = None) -> DecodedEvent:
    """An event as a receiver would publish it (decoded under the partner's `profile`), read back from its Avro
    bytes."""
    return decode_event(event_bytes(payload_type, body, received=received, object_id=object_id, evse_uid=evse_uid,
                                    connector_id=connector_id, event_id=event_id, source=source, partner=partner,
                                    cc=cc, pid=pid, profile=profile))


def event_bytes(payload_type: str, body: dict[str, Any], *, received: float = 0, object_id: str | None = None,
                evse_uid: str | None = None, connector_id: str | None = None, event_id: str | None = None,
                source: str = "PUSH", partner: str = "p1", cc: str = "NL", pid: str = "TNM",
                received_at: datetime | None = None, profile: CompatProfile | None = None) -> bytes:
    module, level = _LEVELS[payload_type]
    decoded = decode(_JSON.encode(body), getattr(model, payload_type), profile=profile)
    value = decoded.value
    operation = "POST" if module == "CDRS" else ("PATCH" if payload_type.endswith("Patch") else "PUT")
    if object_id is None:
        object_id = body.get("id") if level in ("SESSION", "CDR", "LOCATION") else None
    assert object_id is not None, "sub-object events need object_id (the Location id)"
    return encode_event({
        "event_id": event_id or str(uuid.uuid4()), "partner_id": partner, "module": module, "operation": operation,
        "level": level, "country_code": body.get("country_code", cc), "party_id": body.get("party_id", pid),
        "object_id": object_id, "evse_uid": evse_uid, "connector_id": connector_id,
        "received_at": received_at or ts(received), "request_id": str(uuid.uuid4()),
        "correlation_id": str(uuid.uuid4()), "from_country_code": None, "from_party_id": None,
        "to_country_code": None, "to_party_id": None, "source": source, "content_hash": content_hash(value),
        "relaxations": list(decoded.relaxations), "payload": (payload_type, to_builtins(value)),
    })


class Feed:
    """Hands out Kafka positions: one partition per test, offsets in order."""

    def __init__(self, topic: str = "t", partition: int = 0) -> None:
        self.topic = topic
        self.partition = partition
        self.offsets: dict[int, int] = defaultdict(int)

    def record(self, event: DecodedEvent) -> Record:
        offset = self.offsets[self.partition]
        self.offsets[self.partition] += 1
        from infra.codec import encode_event as _encode

        return Record(event, self.topic, self.partition, offset, _encode(event.to_event()))


class DictStore:
    """A Faust table stand-in: overlays read from it, commit writes their changes."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def overlay(self) -> Overlay:
        return Overlay(self.data.get)

    def commit(self, overlay: Overlay) -> None:
        for key, value in overlay.changes.items():
            if value is None:
                self.data.pop(key, None)
            else:
                self.data[key] = value


def rows(batch: Any, table: str) -> list[list[Any]]:
    return batch.tables().get(table, [])


def column(batch: Any, table: str, columns: tuple[str, ...], name: str) -> list[Any]:
    index = columns.index(name)
    return [row[index] for row in rows(batch, table)]


PSEUDONYM_KEY = b"k" * 32


def stage_rules(park_ttl_min: float = 5, park_max: int = 3, idle_min: float = 60, skew_min: float = 24 * 60,
                margin_min: float = 0) -> Any:
    """The rules of the tests: a clock skew of a day by default, since test events are dated freely around their
    receipt (`test_a_push_dated_ahead_of_its_receipt_is_flagged` sets it)."""
    from pipeline.stage import StageRules

    return StageRules(park_ttl=timedelta(minutes=park_ttl_min), park_max=park_max,
                      session_idle=timedelta(minutes=idle_min), clock_skew=timedelta(minutes=skew_min),
                      arrival_margin=timedelta(minutes=margin_min))


class Harness:
    """Runs one stage-1 processor over batches of events, keeping state between batches like the agent."""

    def __init__(self, process: Any, state_type: type, rules: Any = None) -> None:
        from pipeline.retention import Pseudonymizer
        from pipeline.state import Codec

        self.process = process
        self.codec = Codec(state_type)
        self.rules = rules or stage_rules()
        self.store = DictStore()
        self.feed = Feed()
        self.pseudonym = Pseudonymizer(PSEUDONYM_KEY)

    def run(self, *items: DecodedEvent | Record) -> Any:
        from pipeline.records import group_by_object
        from pipeline.stage import StageOutput
        from pipeline.state import TypedView

        out = StageOutput(self.pseudonym)
        records = [item if isinstance(item, Record) else self.feed.record(item) for item in items]
        for key, group in group_by_object(records).items():
            overlay = self.store.overlay()
            self.process(TypedView(overlay, self.codec), key, group, self.rules, out)
            self.store.commit(overlay)
        return out

    def state(self, key: str) -> Any:
        data = self.store.data.get(key)
        return None if data is None else self.codec.decode(data)
