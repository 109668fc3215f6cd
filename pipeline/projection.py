"""Rows for ClickHouse from decoded events and stored objects: plain functions, no I/O.

Identity columns hold the upper-cased CiString (the contract with the receivers' GET), and so do the CiString
columns that refer to another object (a Session's or CDR's location, EVSE and connector, a CDR's session and
credited CDR, a CDR period's tariff): they are compared case-insensitively, and billing groups and joins by them.
payload_json keeps the object as the CPO sent it (OCPI JSON). Objects arrive as builtins: dicts with aware
datetimes and Decimals.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any, Final

import msgspec

from infra.codec import DecodedEvent
from ocpi.identity import ci_normalize
from pipeline import wire
from pipeline.records import Anomaly, AnomalyRow, DeadLetter, Outcome, upper, utc_now
from pipeline.retention import PERSONAL_TABLES, Pseudonymizer, pseudonymised_json
from pipeline.sink import RefusedRow

RAW_EVENT_COLUMNS = (
    "event_id", "partner_id", "module", "operation", "level", "country_code", "party_id", "object_id",
    "evse_uid", "connector_id", "received_at", "request_id", "correlation_id", "source", "content_hash",
    "relaxations", "payload_json", "kafka_topic", "kafka_partition", "kafka_offset", "outcome", "outcome_detail",
)

SESSION_COLUMNS = (
    "country_code", "party_id", "session_id", "partner_id", "status", "start_date_time", "end_date_time", "kwh",
    "auth_method", "authorization_reference", "token_uid", "token_type", "contract_id", "location_id",
    "evse_uid", "connector_id", "currency", "total_cost_excl_vat", "total_cost_incl_vat", "last_updated",
    "payload_json", "event_id", "version", "received_at",
)

SESSION_HISTORY_COLUMNS = (
    "country_code", "party_id", "session_id", "event_id", "previous_status", "status", "transition",
    "last_updated", "received_at", "version",
)

LOCATION_COLUMNS = (
    "country_code", "party_id", "location_id", "partner_id", "name", "city", "country", "publish", "evse_count",
    "last_updated", "payload_json", "event_id", "version", "received_at", "personal_at", "unlisted",
)

EVSE_COLUMNS = (
    "country_code", "party_id", "location_id", "evse_uid", "evse_id", "status", "present", "capabilities",
    "connector_count", "last_updated", "payload_json", "event_id", "version",
)

CONNECTOR_COLUMNS = (
    "country_code", "party_id", "location_id", "evse_uid", "connector_id", "standard", "format", "power_type",
    "max_voltage", "max_amperage", "max_electric_power", "tariff_ids", "present", "last_updated", "payload_json",
    "event_id", "version",
)

EVSE_HISTORY_COLUMNS = (
    "country_code", "party_id", "location_id", "evse_uid", "event_id", "previous_status", "status", "changed_at",
    "received_at", "version",
)

CDR_COLUMNS = (
    "country_code", "party_id", "cdr_id", "partner_id", "start_date_time", "end_date_time", "session_id",
    "auth_method", "authorization_reference", "token_uid", "token_type", "contract_id", "location_id",
    "evse_uid", "connector_id", "currency", "total_energy", "total_time", "total_parking_time",
    "total_cost_excl_vat", "total_cost_incl_vat", "credit", "credit_reference_id", "last_updated",
    "payload_json", "event_id", "version", "received_at", "home_charging_compensation", "token_of_another_emsp",
)

CDR_PERIOD_COLUMNS = (
    "country_code", "party_id", "cdr_id", "period_index", "start_date_time", "tariff_id", "dimension_types",
    "dimension_volumes", "received_at", "version",
)

CDR_TARIFF_COLUMNS = (
    "country_code", "party_id", "cdr_id", "tariff_country_code", "tariff_party_id", "tariff_id", "currency",
    "tariff_type", "tariff_json", "received_at", "version", "tariff_occurrence",
)

ANOMALY_COLUMNS = (
    "kind", "module", "country_code", "party_id", "object_id", "sub_id", "event_id", "partner_id", "detail",
    "observed_at",
)

DEAD_LETTER_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset", "key_hex", "value_hex", "error",
                       "recorded_at", "record_hash")

CDR_ROW_VERSION = 1  # CDRs are immutable: the first one is the only one the pipeline ever writes


def json_column(document: bytes) -> msgspec.Raw:
    """A JSON document for a String column (payload_json, tariff_json): written into the row as the JSON object
    it is, which ClickHouse stores as its text (`input_format_json_read_objects_as_strings`, set by the sink),
    instead of as a string whose every quote must be escaped on both sides."""
    return msgspec.Raw(document)


def version_of(moment: datetime) -> int:
    """Microseconds since the epoch (the thin slice's version; row versions build on it)."""
    return int(moment.timestamp() * 1_000_000)


def next_version(previous: int, last_updated: datetime) -> int:
    """Row version of a new state: grows with last_updated (x1000 leaves room for equal timestamps) and always
    exceeds the previous version, so ReplacingMergeTree keeps the newest state however often rows repeat.

    By 2 at least: the retention pass rewrites a current row pseudonymised at its version + 1 (read, then
    inserted), so a state the worker writes meanwhile must outrank that rewrite whichever is inserted last; with
    + 1 they tied, the later insert won, and the pass's copy of the older state could hide the new one."""
    return max(previous + 2, version_of(last_updated) * 1000)


def raw_event_row(event: DecodedEvent, topic: str, partition: int, offset: int, outcome: Outcome,
                  detail: str = "") -> list[Any]:
    return [
        event.event_id, event.partner_id, event.module, event.operation, event.level, event.country_code,
        event.party_id, event.object_id, event.evse_uid, event.connector_id, event.received_at, event.request_id,
        event.correlation_id, event.source, event.content_hash, list(event.relaxations),
        json_column(wire.ocpi_json(event.payload)), topic, partition, offset, outcome.value, detail,
    ]


def _price(price: dict[str, Any] | None) -> tuple[Decimal | None, Decimal | None]:
    if not price:
        return None, None
    return price.get("excl_vat"), price.get("incl_vat")


def session_row(event: DecodedEvent, session: dict[str, Any], document: bytes, version: int,
                applied_at: datetime) -> list[Any]:
    """The current-state row of a full Session (after any PATCH merge), in effect since `applied_at` (the
    session idle sweep reads it as `received_at`)."""
    token = session["cdr_token"]
    excl, incl = _price(session.get("total_cost"))
    return [
        ci_normalize(session["country_code"]), ci_normalize(session["party_id"]), ci_normalize(session["id"]),
        event.partner_id, session["status"], session["start_date_time"], session.get("end_date_time"),
        session["kwh"], session["auth_method"], session.get("authorization_reference"), token["uid"],
        token["type"], token["contract_id"], ci_normalize(session["location_id"]), ci_normalize(session["evse_uid"]),
        ci_normalize(session["connector_id"]), session["currency"], excl, incl, session["last_updated"],
        json_column(document), event.event_id, version, applied_at,
    ]


def session_history_row(event: DecodedEvent, session: dict[str, Any], previous: str | None, transition: str,
                        version: int) -> list[Any]:
    return [
        ci_normalize(session["country_code"]), ci_normalize(session["party_id"]), ci_normalize(session["id"]),
        event.event_id, previous or "", session["status"], transition, session["last_updated"], event.received_at,
        version,
    ]


def location_row(event: DecodedEvent, location: dict[str, Any], document: bytes, version: int,
                 personal_at: datetime | None, *, evse_count: int, unlisted: bool = False) -> list[Any]:
    """The current-state row of a Location (`location`: its own fields; `document`: the whole tree's JSON);
    `personal_at` is when its `publish_allowed_to` was received (`LocationState.personal_at`), which retention
    dates the row's personal data by. None: this event's. `unlisted`: a complete pulled list no longer holds it
    (`locations.unlist`, migration 0030)."""
    return [
        ci_normalize(location["country_code"]), ci_normalize(location["party_id"]), ci_normalize(location["id"]),
        event.partner_id, location.get("name"), location["city"], location["country"], location["publish"],
        evse_count, location["last_updated"], json_column(document), event.event_id, version,
        event.received_at, personal_at or event.received_at, unlisted,
    ]


def evse_row(location: dict[str, Any], evse: dict[str, Any], *, present: bool, event_id: str,
             version: int) -> list[Any]:
    return [
        ci_normalize(location["country_code"]), ci_normalize(location["party_id"]), ci_normalize(location["id"]),
        ci_normalize(evse["uid"]), evse.get("evse_id"), evse["status"], present, list(evse.get("capabilities") or ()),
        len(evse["connectors"]), evse["last_updated"], json_column(wire.ocpi_json(evse)), event_id, version,
    ]


def connector_row(location: dict[str, Any], evse_uid: str, connector: dict[str, Any], *, present: bool,
                  event_id: str, version: int) -> list[Any]:
    return [
        ci_normalize(location["country_code"]), ci_normalize(location["party_id"]), ci_normalize(location["id"]),
        ci_normalize(evse_uid), ci_normalize(connector["id"]), connector["standard"], connector["format"],
        connector["power_type"], connector["max_voltage"], connector["max_amperage"],
        connector.get("max_electric_power"), list(connector.get("tariff_ids") or ()), present,
        connector["last_updated"], json_column(wire.ocpi_json(connector)), event_id, version,
    ]


def evse_history_row(location: dict[str, Any], evse: dict[str, Any], previous: str | None, event: DecodedEvent,
                     version: int, *, changed_at: datetime | None = None, status: str | None = None) -> list[Any]:
    """`changed_at`: when the status changed, if not the EVSE's `last_updated` (a PATCH of its status dated before a
    Connector push that raised it). `status`: the status it changed to, if not the EVSE's (`''`: it left the tree)."""
    return [
        ci_normalize(location["country_code"]), ci_normalize(location["party_id"]), ci_normalize(location["id"]),
        ci_normalize(evse["uid"]), event.event_id, previous or "", evse["status"] if status is None else status,
        changed_at or evse["last_updated"], event.received_at, version,
    ]


def cdr_row(event: DecodedEvent, cdr: dict[str, Any], document: bytes, *, token_of_another_emsp: bool,
            ) -> list[Any]:
    """`token_of_another_emsp`: its token is of none of OCPI_TOKEN_PARTIES, so billing leaves it out (0029)."""
    token = cdr["cdr_token"]
    location = cdr["cdr_location"]
    excl, incl = _price(cdr["total_cost"])
    return [
        ci_normalize(cdr["country_code"]), ci_normalize(cdr["party_id"]), ci_normalize(cdr["id"]), event.partner_id,
        cdr["start_date_time"], cdr["end_date_time"], upper(cdr.get("session_id")), cdr["auth_method"],
        cdr.get("authorization_reference"), token["uid"], token["type"], token["contract_id"],
        ci_normalize(location["id"]), ci_normalize(location["evse_uid"]), ci_normalize(location["connector_id"]),
        cdr["currency"], cdr["total_energy"], cdr["total_time"], cdr.get("total_parking_time"), excl, incl,
        bool(cdr.get("credit")), upper(cdr.get("credit_reference_id")), cdr["last_updated"], json_column(document),
        event.event_id, CDR_ROW_VERSION, event.received_at, bool(cdr.get("home_charging_compensation")),
        token_of_another_emsp,
    ]


def cdr_period_rows(cdr: dict[str, Any], received_at: datetime) -> list[list[Any]]:
    cc, pid, cid = ci_normalize(cdr["country_code"]), ci_normalize(cdr["party_id"]), ci_normalize(cdr["id"])
    rows = []
    for index, period in enumerate(cdr["charging_periods"]):
        dimensions = period["dimensions"]
        rows.append([cc, pid, cid, index, period["start_date_time"], upper(period.get("tariff_id")),
                     [d["type"] for d in dimensions], [d["volume"] for d in dimensions], received_at,
                     CDR_ROW_VERSION])
    return rows


def cdr_tariff_rows(cdr: dict[str, Any], received_at: datetime) -> list[list[Any]]:
    """One row per Tariff of the CDR. Two may share a key (a CiString id sent in two cases, or one id for two
    types): `tariff_occurrence` counts those of the same key before it, so the second does not replace the first
    (migration 0026)."""
    cc, pid, cid = ci_normalize(cdr["country_code"]), ci_normalize(cdr["party_id"]), ci_normalize(cdr["id"])
    seen: Counter[tuple[str, str, str]] = Counter()
    rows = []
    for t in cdr.get("tariffs") or ():
        key = (ci_normalize(t["country_code"]), ci_normalize(t["party_id"]), ci_normalize(t["id"]))
        rows.append([cc, pid, cid, *key, t["currency"], t.get("type"), json_column(wire.ocpi_json(t)), received_at,
                     CDR_ROW_VERSION, seen[key]])
        seen[key] += 1
    return rows


def anomaly_row(anomaly: AnomalyRow) -> list[Any]:
    return [anomaly.kind.value, anomaly.module, upper(anomaly.country_code), upper(anomaly.party_id),
            upper(anomaly.object_id), anomaly.sub_id, anomaly.event_id, anomaly.partner_id, anomaly.detail,
            anomaly.observed_at]


def refused_row_anomalies(refused_rows: list[RefusedRow], pseudonym: Pseudonymizer,
                          ) -> tuple[str, Sequence[str], list[list[Any]]]:
    """Rows ClickHouse refused for their values, as `ROW_REFUSED` anomalies (`sink.RefusedRows`): the object they
    belong to where their columns say, and the whole row as JSON in the detail, to be settled by hand. Keyed by
    a hash of the row, so a batch applied again records each refused row once. Anomalies are kept longer than
    personal data stays in clear, so the row's personal identifiers are pseudonymised in the detail. Dated by the
    row's `received_at` (a reconciliation row's `event_time`, a refusal's `rejected_at`), as other anomalies by their
    event's: anomalies collapse within a month's partition only, so the same row refused again in another month (a
    replay) must carry the same date. Connector and EVSE rows hold none: theirs is the time they were refused
    (refused again in another month, they are recorded twice)."""
    now = utc_now()
    rows = []
    for refused in refused_rows:
        values = _pseudonymised(dict(zip(refused.columns, refused.row, strict=True)), pseudonym)
        observed_at = next((values[c] for c in _EVENT_TIME_COLUMNS if isinstance(values.get(c), datetime)), now)
        row_json = _ROW_ENCODER.encode(values).decode()
        object_id = next((str(values[c]) for c in _OBJECT_ID_COLUMNS if values.get(c)), "")
        rows.append(anomaly_row(AnomalyRow(
            Anomaly.ROW_REFUSED, refused.table, str(values.get("country_code") or ""),
            str(values.get("party_id") or ""), object_id,
            hashlib.blake2b(row_json.encode(), digest_size=8).hexdigest(), str(values.get("event_id") or ""),
            str(values.get("partner_id") or ""), f"{refused.error}; row: {row_json}", observed_at)))
    return "anomalies", ANOMALY_COLUMNS, rows


_ROW_ENCODER = msgspec.json.Encoder(decimal_format="number")
# The column dating the event a refused row comes from, the first a row holds.
_EVENT_TIME_COLUMNS: Final = ("received_at", "event_time", "rejected_at")
# The column naming the object a refused row is of, the first a row holds: a CDR's row holds its own id and its
# session's (a CDR lost from billing is named by its own), a credit link's its credit CDR's, a reconciliation row its
# subject's, a Location tree's rows their Location's.
_OBJECT_ID_COLUMNS: Final = ("object_id", "cdr_id", "credit_cdr_id", "subject_id", "session_id", "location_id",
                             "event_id")
_PERSONAL_COLUMNS: Final = frozenset(column for table in PERSONAL_TABLES for column in table.columns)


def _pseudonymised(values: dict[str, Any], pseudonym: Pseudonymizer) -> dict[str, Any]:
    for name, value in values.items():
        if name in _PERSONAL_COLUMNS and isinstance(value, str) and value:
            values[name] = pseudonym(value)
        elif isinstance(value, msgspec.Raw) and (document := pseudonymised_json(bytes(value), pseudonym)):
            values[name] = msgspec.Raw(document)  # payload_json: the OCPI object as stored
    return values


def dead_letter_row(dead: DeadLetter, recorded_at: datetime) -> list[Any]:
    """Keyed by the Kafka coordinates and `record_hash`: offsets start again from 0 on a new broker (an embedded
    one restarted), and a dead letter must not replace an older one that had the same coordinates."""
    return [dead.topic, dead.partition, dead.offset, dead.key.hex(), dead.value.hex(), dead.error, recorded_at,
            record_hash(dead.key, dead.value)]


def record_hash(key: bytes, value: bytes) -> int:
    """A stable 64-bit hash of a Kafka record's key and value (never 0, which marks rows from before it)."""
    digest = hashlib.blake2b(len(key).to_bytes(4, "big") + key + value, digest_size=8).digest()
    return int.from_bytes(digest, "big") or 1
