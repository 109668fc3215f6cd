"""infra.codec: golden bytes, round trips of the official examples, errors, evolution, registry loading."""

from __future__ import annotations

import copy
import json
import zipfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import to_parsing_canonical_form

from infra import codec
from infra.codec import EVENT_SCHEMA, MARKER, AvroCodec, AvroCodecError, DecodedEvent

from .convert import EXAMPLES, FIXTURES, current_schema, load_json, ocpi_object

CURRENT_REVISION = 2  # avro/v2: Operation UNLIST (full sync of Locations)

needs_examples = pytest.mark.skipif(not EXAMPLES.is_dir(), reason="shared OCPI examples not present")


def make_event(payload_type: str, payload: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    event: dict[str, Any] = {
        "event_id": "3d8f0d36-4a3e-4d0e-8a43-6f5f3c1f7b21",
        "partner_id": "BE-BEC",
        "module": "LOCATIONS",
        "operation": "PUT",
        "level": "LOCATION",
        "country_code": "BE",
        "party_id": "BEC",
        "object_id": "LOC1",
        "evse_uid": None,
        "connector_id": None,
        "received_at": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
        "request_id": "req-42",
        "correlation_id": "corr-42",
        "from_country_code": "BE",
        "from_party_id": "BEC",
        "to_country_code": "NL",
        "to_party_id": "TNM",
        "source": "PUSH",
        "content_hash": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        "relaxations": [],
        "payload": (payload_type, payload),
    }
    event.update(overrides)
    return event


def assert_round_trip(event: dict[str, Any]) -> DecodedEvent:
    decoded = codec.decode_event(codec.encode_event(event))
    assert decoded.to_event() == event
    assert decoded.schema_version == CURRENT_REVISION
    return decoded


# --- golden bytes -------------------------------------------------------------------------------------------

GOLDEN_EVENT: dict[str, Any] = {
    "event_id": "6f1c9e0a-3b7d-4c2e-9f8a-1d2e3f4a5b6c",
    "partner_id": "NL-TNM",
    "module": "SESSIONS",
    "operation": "PATCH",
    "level": "SESSION",
    "country_code": "NL",
    "party_id": "TNM",
    "object_id": "101",
    "received_at": datetime(2019, 6, 23, 8, 11, 1, 250000, tzinfo=UTC),
    "request_id": "req-1",
    "correlation_id": "corr-1",
    "to_country_code": "BE",
    "to_party_id": "BEC",
    "source": "PUSH",
    "content_hash": "0123456789abcdef" * 4,
    "relaxations": ["datetime_without_z"],
    "payload": (
        "SessionPatch",
        {
            "kwh": Decimal("12.3456"),
            "total_cost": {"excl_vat": Decimal("0.60"), "incl_vat": Decimal("-0.66")},
            "last_updated": datetime(2019, 6, 23, 8, 11, tzinfo=UTC),
        },
    ),
}
GOLDEN_FINGERPRINT = "f410716ea697d3fe"  # avro/v2
V1_FINGERPRINT = "1b9f74d9f3da99d9"  # avro/v1: the same body, its Operation without UNLIST
GOLDEN_BODY_HEX = (
    ""
    + "48" "36663163396530612d336237642d346332652d396638612d316432653366346135623663"  # event_id
    + "0c" "4e4c2d544e4d"  # partner_id
    + "02" "02" "06"  # module SESSIONS, operation PATCH, level SESSION
    + "04" "4e4c" "06" "544e4d" "06" "313031"  # country_code, party_id, object_id
    + "00" "00"  # evse_uid, connector_id: null
    + "a0ffc9c7a7fec505"  # received_at, µs since the epoch
    + "0a" "7265712d31" "0c" "636f72722d31"  # request_id, correlation_id
    + "00" "00" "02" "04" "4245" "02" "06" "424543"  # from_*: null; to_country_code, to_party_id
    + "00"  # source PUSH
    + "8001" + "30313233343536373839616263646566" * 4  # content_hash
    + "02" "24" "6461746574696d655f776974686f75745f7a" "00"  # relaxations: one block of 1 item, end
    + "10"  # payload union branch 8: SessionPatch
    + "00" * 5  # country_code … end_date_time: null
    + "02" "06" "01e240"  # kwh: decimal bytes, unscaled 123456
    + "00" * 8  # cdr_token … currency: null
    + "00"  # charging_periods: null
    + "02" "04" "1770" "02" "04" "e638"  # total_cost: excl_vat 6000, incl_vat ["null", decimal] -6600
    + "00"  # status: null
    + "02" "80b4b1c6a7fec505"  # last_updated
)  # fmt: skip
GOLDEN_HEX = "c301" + GOLDEN_FINGERPRINT + GOLDEN_BODY_HEX


def crc64_avro(data: bytes) -> bytes:
    """CRC-64-AVRO as specified (Avro spec, "Schema Fingerprints"), little endian like the wire header."""
    empty = 0xC15D213AA4D7A795
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (empty & -(fp & 1))
        table.append(fp)
    fp = empty
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp.to_bytes(8, "little")


def test_crc64_reference_vector() -> None:
    assert crc64_avro(b'"null"') == (0x63DD24E7CC258F8A).to_bytes(8, "little")


def test_golden_bytes() -> None:
    data = codec.encode_event(GOLDEN_EVENT)
    assert data.hex() == GOLDEN_HEX
    assert codec.decode_event(data).to_event() == {
        **GOLDEN_EVENT,
        "evse_uid": None,
        "connector_id": None,
        "from_country_code": None,
        "from_party_id": None,
    }


def test_records_of_revision_v1_are_still_read() -> None:
    """Records a producer of the previous version wrote (avro/v1, before UNLIST) decode as they did."""
    decoded = codec.decode_event(bytes.fromhex("c301" + V1_FINGERPRINT + GOLDEN_BODY_HEX))
    assert decoded.schema_version == 1
    assert decoded.to_event() == codec.decode_event(bytes.fromhex(GOLDEN_HEX)).to_event()


UNLIST_EVENT: dict[str, Any] = {
    **GOLDEN_EVENT, "module": "LOCATIONS", "operation": "UNLIST", "level": "LOCATION", "object_id": "LOC1",
    "source": "PULL", "relaxations": [],
    "payload": ("LocationPatch", {"last_updated": datetime(2019, 6, 23, 8, 11, tzinfo=UTC)}),
}


def test_golden_bytes_of_an_unlist() -> None:
    """Operation UNLIST (v2) is the enum's fourth symbol; its payload a LocationPatch of last_updated only."""
    data = codec.encode_event(UNLIST_EVENT)
    assert data[:10].hex() == "c301" + GOLDEN_FINGERPRINT
    body = data[10:].hex()
    envelope = "48" + "36663163396530612d336237642d346332652d396638612d316432653366346135623663" + "0c4e4c2d544e4d"
    assert body.startswith(envelope + "00" "06" "00")  # module LOCATIONS, operation UNLIST (3), level LOCATION
    decoded = codec.decode_event(data)
    assert (decoded.operation, decoded.payload_type, decoded.payload) == (
        "UNLIST", "LocationPatch", {"last_updated": datetime(2019, 6, 23, 8, 11, tzinfo=UTC)})


def test_header_is_marker_plus_crc64_of_the_canonical_form() -> None:
    canonical = to_parsing_canonical_form(fastavro.parse_schema(current_schema(), named_schemas={}))
    expected = crc64_avro(canonical.encode())
    assert codec.fingerprint(EVENT_SCHEMA) == expected
    assert expected.hex() == GOLDEN_FINGERPRINT
    assert codec.encode_event(GOLDEN_EVENT)[:10] == b"\xc3\x01" + expected


# --- round trips --------------------------------------------------------------------------------------------


@needs_examples
def test_location_example_round_trip() -> None:
    location = ocpi_object("Location", load_json(EXAMPLES / "location_example.json"))
    decoded = assert_round_trip(make_event("Location", location))
    assert decoded.payload["evses"][1]["connectors"][0]["max_voltage"] == 220
    assert decoded.payload["last_updated"] == datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC)
    assert decoded.payload["operator"] == {"name": "BeCharged"}


@needs_examples
def test_session_example_round_trip() -> None:
    session = ocpi_object("Session", load_json(EXAMPLES / "session_example_2_short_finished.json"))
    event = make_event("Session", session, module="SESSIONS", level="SESSION", object_id="101")
    decoded = assert_round_trip(event)
    assert decoded.payload["kwh"] == Decimal("41.12")
    assert isinstance(decoded.payload["kwh"], Decimal)
    assert decoded.payload["total_cost"] == {"excl_vat": Decimal("8.5"), "incl_vat": Decimal("9.35")}
    assert decoded.payload["charging_periods"][2]["dimensions"][0]["volume"] == Decimal("0.718")
    assert decoded.payload["start_date_time"].tzinfo is UTC


def test_cdr_fixture_round_trip() -> None:
    cdr = ocpi_object("CDR", load_json(FIXTURES / "cdr_example.json"))
    event = make_event("CDR", cdr, module="CDRS", operation="POST", level="CDR", object_id=cdr["id"])
    decoded = assert_round_trip(event)
    assert decoded.payload["total_cost"]["incl_vat"] == Decimal("6.9172")
    assert decoded.payload["tariffs"][0]["elements"][1]["restrictions"]["day_of_week"][0] == "MONDAY"
    assert decoded.payload["charging_periods"][2]["start_date_time"].microsecond == 123000
    assert decoded.payload["credit"] is False
    assert decoded.payload["remark"].endswith("café opposite the entrance")


@needs_examples
def test_evse_and_connector_level_round_trips() -> None:
    location = ocpi_object("Location", load_json(EXAMPLES / "location_example.json"))
    evse = location["evses"][0]
    assert_round_trip(make_event("EVSE", evse, level="EVSE", evse_uid=evse["uid"]))
    connector = evse["connectors"][1]
    assert_round_trip(
        make_event("Connector", connector, level="CONNECTOR", evse_uid=evse["uid"], connector_id="2")
    )


@needs_examples
@pytest.mark.parametrize(
    ("payload_type", "example", "level"),
    [
        ("LocationPatch", "location_patch_example_location.json", "LOCATION"),
        ("EVSEPatch", "location_patch_example_status.json", "EVSE"),
        ("SessionPatch", "session_patch_example_total_cost.json", "SESSION"),
    ],
)
def test_patch_examples_round_trip(payload_type: str, example: str, level: str) -> None:
    patch = ocpi_object(payload_type, load_json(EXAMPLES / example))
    decoded = assert_round_trip(make_event(payload_type, patch, operation="PATCH", level=level))
    assert decoded.payload == patch  # only the fields that were sent


def test_connector_patch_round_trip() -> None:
    patch = {"tariff_ids": ["T-1", "T-2"], "last_updated": datetime(2024, 1, 1, tzinfo=UTC)}
    assert_round_trip(make_event("ConnectorPatch", patch, operation="PATCH", level="CONNECTOR"))


def test_explicit_null_in_a_patch_decodes_as_absent() -> None:
    patch = {"name": None, "evses": None, "last_updated": datetime(2024, 1, 1, tzinfo=UTC)}
    decoded = codec.decode_event(codec.encode_event(make_event("LocationPatch", patch, operation="PATCH")))
    assert decoded.payload == {"last_updated": datetime(2024, 1, 1, tzinfo=UTC)}


def test_absent_optional_envelope_fields_encode_as_null() -> None:
    event = make_event("ConnectorPatch", {"last_updated": datetime(2024, 1, 1, tzinfo=UTC)})
    for key in ("evse_uid", "connector_id", "from_country_code", "from_party_id", "to_country_code",
                "to_party_id", "relaxations"):  # fmt: skip
        del event[key]
    decoded = codec.decode_event(codec.encode_event(event))
    assert decoded.evse_uid is None and decoded.to_party_id is None and decoded.relaxations == []


def test_empty_list_stays_distinct_from_absent() -> None:
    payload = {"status_schedule": [], "last_updated": datetime(2024, 1, 1, tzinfo=UTC)}
    decoded = codec.decode_event(codec.encode_event(make_event("EVSEPatch", payload, operation="PATCH")))
    assert decoded.payload == payload


def test_non_utc_datetimes_come_back_as_the_same_instant_in_utc() -> None:
    cet = timezone(timedelta(hours=2))
    patch = {"last_updated": datetime(2024, 5, 1, 14, 0, tzinfo=cet)}
    decoded = codec.decode_event(codec.encode_event(make_event("EVSEPatch", patch)))
    assert decoded.payload["last_updated"] == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert decoded.payload["last_updated"].tzinfo is UTC


def test_trailing_zeros_beyond_four_places_are_accepted() -> None:
    patch = {"kwh": Decimal("41.12000"), "total_cost": {"excl_vat": Decimal("8.500000")}}
    decoded = codec.decode_event(codec.encode_event(make_event("SessionPatch", patch)))
    assert decoded.payload == {"kwh": Decimal("41.12"), "total_cost": {"excl_vat": Decimal("8.5")}}


def test_numbers_with_more_than_four_places_are_named_in_the_error() -> None:
    period = {
        "start_date_time": datetime(2024, 1, 1, tzinfo=UTC),
        "dimensions": [{"type": "ENERGY", "volume": Decimal("0.00001")}],
    }
    patch = {"kwh": Decimal("41.12000"), "charging_periods": [period]}
    with pytest.raises(
        AvroCodecError, match=r"payload\[1\]\.charging_periods\[0\]\.dimensions\[0\]\.volume=0\.00001"
    ):
        codec.encode_event(make_event("SessionPatch", patch))


@pytest.mark.parametrize("kwh", [Decimal("1E+14"), Decimal("-1E+20"), Decimal("12345678901234567.8E+1")])
def test_numbers_beyond_decimal_18_4_are_written_but_not_read(kwh: Decimal) -> None:
    # The documented gap: fastavro's writer counts the digits as given (1E+14: one), the reader the digits read.
    data = codec.encode_event(make_event("SessionPatch", {"kwh": kwh}))
    with pytest.raises(AvroCodecError, match="decimal of more than 18 digits"):
        codec.decode_event(data)


def test_generic_record_helpers_round_trip() -> None:
    datum = {**GOLDEN_EVENT, "payload": ("ocpi.v2_2_1.SessionPatch", GOLDEN_EVENT["payload"][1])}
    data = codec.encode_record(EVENT_SCHEMA, datum)
    assert data == codec.encode_event(GOLDEN_EVENT)
    record = codec.decode_record(data, EVENT_SCHEMA)
    assert record["payload"][0] == "ocpi.v2_2_1.SessionPatch"
    assert record["payload"][1]["status"] is None  # the generic helper keeps nulls
    assert codec.encode_record(EVENT_SCHEMA, record) == data
    assert codec.decode_record(data) == record


# --- errors -------------------------------------------------------------------------------------------------

SESSION_PATCH = GOLDEN_EVENT["payload"][1]


def _with_payload(payload_type: str, payload: Any) -> dict[str, Any]:
    return {**GOLDEN_EVENT, "payload": (payload_type, payload)}


@pytest.mark.parametrize(
    ("event", "message"),
    [
        ({k: v for k, v in GOLDEN_EVENT.items() if k != "partner_id"}, "partner_id"),
        ({**GOLDEN_EVENT, "module": "TARIFFS"}, "TARIFFS"),
        ({**GOLDEN_EVENT, "bogus": 1}, "bogus"),
        ({**GOLDEN_EVENT, "received_at": "2019-06-23T08:11:00Z"}, "cannot encode"),
        ({**GOLDEN_EVENT, "event_id": None}, "cannot encode"),
        ({**GOLDEN_EVENT, "relaxations": 5}, "cannot encode"),
        (_with_payload("SessionPatch", {**SESSION_PATCH, "kwh": Decimal("1.23456")}), "cannot encode"),
        (_with_payload("SessionPatch", {**SESSION_PATCH, "kwh": 1.5}), "cannot encode"),
        (_with_payload("SessionPatch", {**SESSION_PATCH, "kwh": "1.5"}), "cannot encode"),
        (_with_payload("SessionPatch", {**SESSION_PATCH, "status": "RESERVED"}), "RESERVED"),
        (
            _with_payload("SessionPatch", {**SESSION_PATCH, "total_cost": {"incl_vat": Decimal(1)}}),
            "total_cost",
        ),
        (_with_payload("SessionPatch", {**SESSION_PATCH, "unknown_field": 1}), "unknown_field"),
        (_with_payload("Session", SESSION_PATCH), "cannot encode"),  # full Session lacks required fields
        (_with_payload("Tariff", {}), "unknown payload_type"),
        (_with_payload("SessionPatch", None), "cannot encode"),
        ({**GOLDEN_EVENT, "payload": SESSION_PATCH}, "tuple"),
        ({k: v for k, v in GOLDEN_EVENT.items() if k != "payload"}, "tuple"),
    ],
)
def test_invalid_events_raise_our_error(event: dict[str, Any], message: str) -> None:
    with pytest.raises(AvroCodecError, match=message):
        codec.encode_event(event)


GOLDEN_BYTES = bytes.fromhex(GOLDEN_HEX)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "marker"),
        (b"\xc3\x01" + GOLDEN_BYTES[2:9], "marker"),  # header cut short
        (b"\xc3\x02" + GOLDEN_BYTES[2:], "marker"),
        (b"\x00" + GOLDEN_BYTES[1:], "marker"),
        (GOLDEN_BYTES[:2] + bytes(8) + GOLDEN_BYTES[10:], "unknown schema fingerprint 0000000000000000"),
        (GOLDEN_BYTES[:-3], "cannot decode"),  # truncated body
        (GOLDEN_BYTES[:10], "cannot decode"),  # no body at all
        (GOLDEN_BYTES + b"\x00", "1 trailing bytes"),
        (GOLDEN_BYTES[:-9] + b"\x7f" + GOLDEN_BYTES[-8:], "cannot decode"),  # status enum index out of range
    ],
)
def test_invalid_bytes_raise_our_error(data: bytes, message: str) -> None:
    with pytest.raises(AvroCodecError, match=message):
        codec.decode_event(data)


def test_decode_rejects_non_bytes_and_unknown_schema_names() -> None:
    with pytest.raises(AvroCodecError, match="expected bytes"):
        codec.decode_event("c301")  # type: ignore[arg-type]
    with pytest.raises(AvroCodecError, match=r"expected a ocpi\.v2_2_1\.Location record"):
        codec.decode_record(GOLDEN_BYTES, "ocpi.v2_2_1.Location")
    with pytest.raises(AvroCodecError, match="unknown schema"):
        codec.encode_record("ocpi.pipeline.Nope", {})
    with pytest.raises(AvroCodecError, match="unknown schema"):
        codec.fingerprint("ocpi.pipeline.Nope")


SESSION: dict[str, Any] = {
    "country_code": "NL",
    "party_id": "CPX",
    "id": "S-2024-000987",
    "start_date_time": datetime(2024, 5, 1, 16, 30, tzinfo=UTC),
    "kwh": Decimal("12.75"),
    "cdr_token": {
        "country_code": "DE",
        "party_id": "MSP",
        "uid": "04A1B2C3D4E5F6",
        "type": "RFID",
        "contract_id": "DE-MSP-C00000001-X",
    },
    "auth_method": "AUTH_REQUEST",
    "location_id": "LOC-UTR-9",
    "evse_uid": "E-9-1",
    "connector_id": "1",
    "currency": "EUR",
    "status": "ACTIVE",
    "last_updated": datetime(2024, 5, 1, 17, 0, tzinfo=UTC),
}


# --- schema evolution ---------------------------------------------------------------------------------------


def previous_revision(current: dict[str, Any]) -> dict[str, Any]:
    """A stand-in for an older revision: the current schema without fields added later (all with defaults)
    and without the last payload branch (branches are only appended)."""
    previous = copy.deepcopy(current)
    previous["fields"] = [f for f in previous["fields"] if f["name"] != "to_party_id"]
    payload = next(f for f in previous["fields"] if f["name"] == "payload")
    assert payload["type"][-1]["name"] == "SessionPatch"
    payload["type"] = payload["type"][:-1]
    session = next(b for b in payload["type"] if isinstance(b, dict) and b["name"] == "Session")
    session["fields"] = [f for f in session["fields"] if f["name"] != "meter_id"]
    return previous


def write_registry(root: Path, revisions: dict[int, dict[str, Any]]) -> Path:
    for version, schema in revisions.items():
        (root / f"v{version}").mkdir(parents=True)
        (root / f"v{version}" / f"{EVENT_SCHEMA}.avsc").write_text(json.dumps(schema), encoding="utf-8")
    return root


def encode_with(schema: dict[str, Any], datum: dict[str, Any]) -> bytes:
    """What an old producer wrote: single-object encoding with its own (older) schema."""
    parsed = fastavro.parse_schema(schema, named_schemas={})
    header = MARKER + bytes.fromhex(
        fastavro.schema.fingerprint(to_parsing_canonical_form(parsed), "CRC-64-AVRO")
    )
    out = BytesIO(header)
    out.seek(len(header))
    fastavro.schemaless_writer(out, parsed, datum)
    return out.getvalue()


@pytest.fixture
def evolved_codec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], AvroCodec]:
    current = current_schema()
    registry = AvroCodec.from_directory(write_registry(tmp_path, {0: previous_revision(current), 1: current}))
    monkeypatch.setattr(codec, "_codec", lambda: registry)
    return lambda: registry


def test_old_revision_is_read_with_its_writer_schema_and_defaulted(
    evolved_codec: Callable[[], AvroCodec],
) -> None:
    session = dict(SESSION)
    old_event = make_event("Session", session, module="SESSIONS", level="SESSION")
    del old_event["to_party_id"]
    old_event["payload"] = ("ocpi.v2_2_1.Session", session)
    data = encode_with(previous_revision(current_schema()), old_event)
    assert data[2:10] != codec.fingerprint(EVENT_SCHEMA)

    decoded = codec.decode_event(data)  # module function, routed to the registry with both revisions

    assert decoded.schema_version == 0
    assert decoded.to_party_id is None  # field added later: its default
    assert decoded.to_country_code == "NL"
    assert decoded.payload_type == "Session"
    assert decoded.payload == session  # meter_id (added later) defaulted to null, i.e. absent
    # Current records still take the fast path through the same registry.
    assert codec.decode_event(codec.encode_event(GOLDEN_EVENT)).schema_version == 1  # the stand-in registry's


@pytest.mark.parametrize("kwh", [Decimal("100000000000000"), Decimal("123456789012345")])
def test_an_old_revision_record_is_refused_where_a_current_one_is(
    evolved_codec: Callable[[], AvroCodec], kwh: Decimal,
) -> None:
    # A decimal of more digits than decimal(18, 4) holds (what fastavro writes for 10^14 and more): fastavro's reader
    # rounds it to 18 digits (123456789012345.6789 would read as ...345.679), and a record of the current revision
    # is refused for it (a dead letter). A record of an older revision must be refused too, not read as another
    # amount than the one written, and the same holds for the other spec breaches the generated reader refuses.
    session = {**SESSION, "kwh": kwh}
    old_event = make_event("Session", session, module="SESSIONS", level="SESSION")
    del old_event["to_party_id"]
    old_event["payload"] = ("ocpi.v2_2_1.Session", session)
    data = encode_with(previous_revision(current_schema()), old_event)
    with pytest.raises(AvroCodecError, match=r"cannot decode .*\(v0\).*more than 18 digits"):
        codec.decode_event(data)
    with pytest.raises(AvroCodecError, match="more than 18 digits"):
        codec.decode_record(data)
    current = {**old_event, "to_party_id": None, "payload": ("Session", session)}
    with pytest.raises(AvroCodecError, match="more than 18 digits"):
        codec.decode_event(codec.encode_event(current))


# --- registry loading ---------------------------------------------------------------------------------------


def test_schemas_are_parsed_once() -> None:
    assert codec._codec() is codec._codec()


def test_registry_loads_from_a_zip_traversable(tmp_path: Path) -> None:
    # importlib.resources may hand out non-filesystem traversables (zip imports): only Traversable is used.
    archive = tmp_path / "schemas.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in (Path(str(codec.schema_root()))).glob("v*/*.avsc"):
            zf.write(path, f"avro_schemas/{path.parent.name}/{path.name}")
    registry = AvroCodec.from_directory(zipfile.Path(archive, "avro_schemas/"))
    assert registry.fingerprint(EVENT_SCHEMA) == codec.fingerprint(EVENT_SCHEMA)


def test_two_revisions_with_the_same_canonical_form_are_rejected(tmp_path: Path) -> None:
    current = current_schema()
    doc_only = {**current, "doc": "only the doc changed"}
    with pytest.raises(AvroCodecError, match="same fingerprint"):
        AvroCodec.from_directory(write_registry(tmp_path, {1: current, 2: doc_only}))


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "no ocpi.pipeline.OcpiEvent schema"),
        ({"v1/ocpi.pipeline.OcpiEvent.avsc": "{not json"}, "cannot load schema v1/ocpi.pipeline.OcpiEvent"),
        ({"v1/ocpi.pipeline.OcpiEvent.avsc": '{"type": "record", "name": "X", "fields": []}'}, "must define"),
        ({"v1/ocpi.pipeline.OcpiEvent.avsc": '{"type": "record", "name": "ocpi.pipeline.OcpiEvent",'
          ' "fields": [{"name": "payload", "type": ["null"]}]}'}, "payload union lacks"),
        ({"v1/ocpi.pipeline.OcpiEvent.avsc": '{"type": "record", "name": "ocpi.pipeline.OcpiEvent",'
          ' "fields": [{"name": "payload", "type": [{"type": "array", "items": "string"}]}]}'}, "payload union lacks"),
    ],
)  # fmt: skip
def test_unusable_registries_raise_our_error(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(AvroCodecError, match=message):
        AvroCodec.from_directory(tmp_path)


def test_missing_directory_raises_our_error(tmp_path: Path) -> None:
    with pytest.raises(AvroCodecError, match="not found"):
        AvroCodec.from_directory(tmp_path / "nope")
