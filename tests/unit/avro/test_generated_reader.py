"""The generated Avro reader (infra.avro_reader) against fastavro: the same values, of the same types and
digits, for every valid record; an AvroCodecError wherever fastavro refuses the bytes."""

from __future__ import annotations

import dataclasses
import re
from datetime import UTC, datetime
from decimal import Decimal
from io import BytesIO
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra import codec
from infra.avro_reader import AvroReadError, compile_reader
from infra.codec import HEADER_SIZE, AvroCodec, AvroCodecError, DecodedEvent, schema_root

from .convert import EXAMPLES, FIXTURES, load_json, ocpi_object
from .test_codec import GOLDEN_BYTES, make_event

GENERATED = AvroCodec.from_directory(schema_root())
REFERENCE = AvroCodec.from_directory(schema_root(), generated_reader=False)


def same(a: Any, b: Any) -> bool:
    """Equal, of the same types at every level, Decimals with the same digits, datetimes in the same zone."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Decimal):
        return a.as_tuple() == b.as_tuple()
    if isinstance(a, datetime):
        return a == b and a.tzinfo is b.tzinfo
    return bool(a == b)


def same_event(a: DecodedEvent, b: DecodedEvent) -> bool:
    return same(a.to_event(), b.to_event()) and a.schema_version == b.schema_version


def valid_events() -> list[bytes]:
    events = [
        GOLDEN_BYTES,
        codec.encode_event(make_event("CDR", ocpi_object("CDR", load_json(FIXTURES / "cdr_example.json")),
                                      module="CDRS", operation="POST", level="CDR")),
        codec.encode_event(make_event("EVSEPatch", {"status": "CHARGING"}, operation="PATCH", level="EVSE",
                                      evse_uid="E1", relaxations=["a", "b"])),
        codec.encode_event(make_event("ConnectorPatch", {"tariff_ids": ["T-1", "T-2"]}, operation="PATCH",
                                      level="CONNECTOR", evse_uid="E1", connector_id="1")),
    ]
    if EXAMPLES.is_dir():
        location = ocpi_object("Location", load_json(EXAMPLES / "location_example.json"))
        session = ocpi_object("Session", load_json(EXAMPLES / "session_example_2_short_finished.json"))
        events += [
            codec.encode_event(make_event("Location", location)),
            codec.encode_event(make_event("EVSE", location["evses"][0], level="EVSE", evse_uid="E")),
            codec.encode_event(make_event("Connector", location["evses"][0]["connectors"][0], level="CONNECTOR")),
            codec.encode_event(make_event("Session", session, module="SESSIONS", level="SESSION")),
            codec.encode_event(make_event("SessionPatch", {"kwh": Decimal("-0.0001"), "charging_periods": []},
                                          module="SESSIONS", operation="PATCH", level="SESSION")),
        ]
    return events


VALID = valid_events()


@pytest.mark.parametrize("data", VALID, ids=range(len(VALID)))
def test_valid_records_decode_as_fastavro_decodes_them(data: bytes) -> None:
    assert same_event(GENERATED.decode_event(data), REFERENCE.decode_event(data))


def test_the_default_codec_uses_the_generated_reader() -> None:
    assert codec._codec()._event_reader is not None
    assert codec._codec()._event_built is not None  # DecodedEvent built by the reader, from the values in order


def test_an_envelope_in_another_order_than_decoded_event_is_read_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader builds the DecodedEvent from the envelope's values by position only where the schema has
    DecodedEvent's fields in its order; otherwise it reads a dict, which the codec takes by name."""
    event = codec._codec()._event
    first, second, *rest = event.parsed["fields"]
    assert codec._event_builder(dataclasses.replace(event, parsed={**event.parsed,
                                                                   "fields": [second, first, *rest]})) is None
    monkeypatch.setattr(codec, "_event_builder", lambda _event: None)
    by_name = AvroCodec.from_directory(schema_root())
    assert by_name._event_reader is not None and by_name._event_built is None
    for data in VALID:
        assert same_event(by_name.decode_event(data), REFERENCE.decode_event(data))


def _outcome(reader: AvroCodec, data: bytes) -> DecodedEvent | str:
    try:
        return reader.decode_event(data)
    except AvroCodecError as exc:
        return str(exc)


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_damaged_records_fail_where_fastavro_fails(data: st.DataObject) -> None:
    """Bytes changed, cut or inserted anywhere in a body: both refuse them, or both read the same event. The one
    difference allowed: bytes that break the spec which fastavro reads anyway and the generated reader refuses
    (a negative union or enum index, taken by fastavro as a Python index from the end; a boolean byte > 1; a
    decimal of more digits than its precision, rounded by fastavro; a long of more than 64 bits, wrapped by
    fastavro)."""
    record = bytearray(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 3))):
        at = data.draw(st.integers(HEADER_SIZE, len(record)))
        change = data.draw(st.sampled_from(["replace", "cut", "insert"]))
        value = data.draw(st.integers(0, 255))
        if change == "replace" and at < len(record):
            record[at] = value
        elif change == "cut":
            del record[at:at + data.draw(st.integers(1, 8))]
        else:
            record.insert(at, value)
    damaged = bytes(record)
    generated, reference = _outcome(GENERATED, damaged), _outcome(REFERENCE, damaged)
    if isinstance(generated, str):
        spec_breach = re.search(
            r"invalid ((union|enum) index -\d|boolean byte|decimal of more than)|long of more than 64 bits", generated)
        assert isinstance(reference, str) or spec_breach, generated
    else:
        assert not isinstance(reference, str), f"the generated reader read what fastavro refuses: {reference}"
        assert same_event(generated, reference)


# --- the generator on types our schema does not use (yet) ----------------------------------------------------

def parse(schema: dict[str, Any]) -> dict[str, Any]:
    parsed = fastavro.parse_schema(schema, named_schemas={})
    assert isinstance(parsed, dict)
    return parsed


OTHER_TYPES = parse({
    "type": "record", "name": "t.Outer", "fields": [
        {"name": "flag", "type": "boolean"},
        {"name": "small", "type": "int"},
        {"name": "ratio", "type": "double"},
        {"name": "single", "type": "float"},
        {"name": "blob", "type": "bytes"},
        {"name": "tags", "type": {"type": "map", "values": ["null", "string"]}},
        {"name": "grid", "type": {"type": "array", "items": {"type": "array", "items": "long"}}},
        {"name": "either", "type": ["null",
                                    {"type": "record", "name": "t.A", "fields": [{"name": "a", "type": "long"}]},
                                    {"type": "record", "name": "t.B", "fields": [{"name": "b", "type": "string"}]},
                                    "string"]},
        {"name": "again", "type": ["null", "t.A"]},
        {"name": "suit", "type": {"type": "enum", "name": "t.Suit", "symbols": ["HEARTS", "SPADES"]}},
    ],
})


def _fastavro(schema: Any, data: bytes) -> Any:
    return fastavro.schemaless_reader(BytesIO(data), schema, None, return_record_name=True,
                                      return_record_name_override=True)


@given(
    flag=st.booleans(), small=st.integers(-(2**31), 2**31 - 1), ratio=st.floats(allow_nan=False),
    single=st.floats(width=32, allow_nan=False), blob=st.binary(max_size=40),
    tags=st.dictionaries(st.text(max_size=5), st.none() | st.text(max_size=5), max_size=4),
    grid=st.lists(st.lists(st.integers(-(2**63), 2**63 - 1), max_size=3), max_size=3),
    either=st.sampled_from([None, ("t.A", {"a": -5}), ("t.B", {"b": "x"}), "plain"]),
    again=st.none() | st.just({"a": 2**40}), suit=st.sampled_from(["HEARTS", "SPADES"]),
)
def test_other_types_read_as_fastavro_reads_them(**datum: Any) -> None:
    out = BytesIO()
    fastavro.schemaless_writer(out, OTHER_TYPES, datum)
    data = out.getvalue()
    read = compile_reader(OTHER_TYPES)
    assert read is not None
    value, end = read(data, 0)
    assert end == len(data)
    assert same(value, _fastavro(OTHER_TYPES, data))
    stripping = compile_reader(OTHER_TYPES, strip=lambda name: True)
    assert stripping is not None
    stripped = stripping(data, 0)[0]
    assert "again" not in stripped if datum["again"] is None else stripped["again"] == datum["again"]
    assert None not in stripped["tags"].values()


def test_blocks_with_a_negative_count_and_a_byte_size() -> None:
    # Writers may frame array/map blocks as (-count, size in bytes); fastavro never writes that, readers read it.
    schema = parse({"type": "record", "name": "t.L", "fields": [
        {"name": "xs", "type": {"type": "array", "items": "long"}}]})
    # Zigzag longs: a block of -2 items (4 → 2 bytes): 1, 2; a block of 2 items: 3, 4; the end.
    data = bytes([0x03, 0x04, 0x02, 0x04, 0x04, 0x06, 0x08, 0x00])
    read = compile_reader(schema)
    assert read is not None
    assert read(data, 0) == (_fastavro(schema, data), len(data)) == ({"xs": [1, 2, 3, 4]}, len(data))


LONG = parse({"type": "record", "name": "t.N", "fields": [{"name": "n", "type": "long"}]})


@pytest.mark.parametrize(("data", "value"), [
    (bytes([0x00]), 0), (bytes([0x01]), -1), (bytes([0x7E]), 63), (bytes([0x80, 0x01]), 64),
    (bytes([0x7F]), -64), (bytes([0x81, 0x01]), -65), (bytes([0x80, 0x00]), 0),  # a zero of two bytes
    (bytes([0xFE, *[0xFF] * 8, 0x01]), 2**63 - 1), (bytes([0xFF, *[0xFF] * 8, 0x01]), -(2**63)),
    (bytes([0x80, *[0x80] * 8, 0x01]), 2**62),
])  # fmt: skip
def test_longs_at_the_edges_of_their_encoding_read_as_fastavro_reads_them(data: bytes, value: int) -> None:
    read = compile_reader(LONG)
    assert read is not None
    assert read(data, 0) == (_fastavro(LONG, data), len(data)) == ({"n": value}, len(data))


@pytest.mark.parametrize("data", [
    bytes([0xFE, *[0xFF] * 8, 0x7F]),  # fastavro: 2^63 - 1, the bits beyond the 64th dropped
    bytes([0x80, *[0x80] * 8, 0x02]),  # fastavro: 0
    bytes([0x81, *[0x80] * 8, 0x03]),  # fastavro: -2^62 - 1
    bytes([*[0x80] * 10, 0x00]),  # 11 bytes; fastavro: 0
])  # fmt: skip
def test_a_long_of_more_than_64_bits_is_refused(data: bytes) -> None:
    # Not a long; fastavro wraps it to 64 bits (a wrong value), as it rounds a too long decimal.
    read = compile_reader(LONG)
    assert read is not None
    with pytest.raises(AvroReadError, match="long of more than 64 bits"):
        read(data, 0)


def test_a_payload_long_of_more_than_64_bits_is_our_error() -> None:
    # max_voltage 230 in a Connector event, its zigzag varint made 10 bytes that carry bits beyond the 64th.
    connector = {"id": "1", "standard": "IEC_62196_T2", "format": "SOCKET", "power_type": "AC_3_PHASE",
                 "max_voltage": 230, "max_amperage": 1, "last_updated": datetime(2024, 1, 1, tzinfo=UTC)}
    data = codec.encode_event(make_event("Connector", connector, level="CONNECTOR", evse_uid="E", connector_id="1"))
    voltage, wide = _zigzag(230), bytes([0xCC, 0x83, *[0x80] * 7, 0x02])  # 460 = 0b11_1001100, plus bit 64
    assert data.count(voltage) == 1 and _fastavro(LONG, wide) == {"n": 230}  # fastavro drops bit 64
    damaged = data.replace(voltage, wide)
    with pytest.raises(AvroCodecError, match="long of more than 64 bits"):
        GENERATED.decode_event(damaged)


@pytest.mark.parametrize("unsupported", [
    {"type": "fixed", "name": "t.F", "size": 4},
    {"type": "long", "logicalType": "timestamp-millis"},
    {"type": "int", "logicalType": "date"},
])
def test_what_the_generator_lacks_falls_back_to_fastavro(unsupported: dict[str, Any]) -> None:
    schema = parse({"type": "record", "name": "t.R", "fields": [{"name": "x", "type": unsupported}]})
    assert compile_reader(schema) is None


def test_timestamps_keep_microseconds_and_utc() -> None:
    latest = datetime(9999, 12, 30, 23, 59, 59, 999999, tzinfo=UTC)
    event = make_event("EVSEPatch", {"last_updated": datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=UTC)},
                       operation="PATCH", level="EVSE", received_at=latest)
    decoded = GENERATED.decode_event(codec.encode_event(event))
    assert decoded.payload["last_updated"] == datetime(1, 1, 2, 0, 0, 0, 1, tzinfo=UTC)
    assert decoded.received_at.tzinfo is UTC and decoded.received_at.microsecond == 999999


# --- decimals whose bytes do not fit the schema ---------------------------------------------------------------

def _zigzag(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def with_kwh_bytes(unscaled: bytes) -> bytes:
    """A valid SessionPatch whose kwh decimal body is replaced by `unscaled` (big-endian two's complement)."""
    data = codec.encode_event(make_event("SessionPatch", {"kwh": Decimal("1234.5678")}, module="SESSIONS",
                                         operation="PATCH", level="SESSION"))
    original = _zigzag(4) + (12345678).to_bytes(4, "big", signed=True)
    assert data.count(original) == 1
    return data.replace(original, _zigzag(len(unscaled)) + unscaled)


def test_a_decimal_too_long_for_the_decimal_context_is_our_error() -> None:
    # ~1.2 million digits: past the decimal context's exponent range, decimal.Overflow (not InvalidOperation).
    from pipeline.records import RawMessage, decode_all

    damaged = with_kwh_bytes(b"\x7f" + b"\xff" * 499_999)
    for reader in (GENERATED, REFERENCE):
        with pytest.raises(AvroCodecError):
            reader.decode_event(damaged)
    records, dead = decode_all([RawMessage("sessions", 0, 7, b"k", damaged)])
    assert records == [] and [d.offset for d in dead] == [7]


@pytest.mark.parametrize("unscaled", [10**18, -(10**18), 10**20 + 1, 2**200])
def test_a_decimal_of_more_digits_than_its_precision_is_refused_not_rounded(unscaled: int) -> None:
    # decimal(18, 4): fastavro rounds 10^20 + 1 (ten thousand times 10^16 and a ten-thousandth) to 10^16.
    damaged = with_kwh_bytes(unscaled.to_bytes(unscaled.bit_length() // 8 + 1, "big", signed=True))
    with pytest.raises(AvroCodecError, match="decimal of more than 18 digits"):
        GENERATED.decode_event(damaged)


@pytest.mark.parametrize("unscaled", [10**18 - 1, -(10**18) + 1])
def test_the_largest_decimals_of_the_precision_are_read(unscaled: int) -> None:
    data = with_kwh_bytes(unscaled.to_bytes(8, "big", signed=True))
    assert same_event(GENERATED.decode_event(data), REFERENCE.decode_event(data))
    assert GENERATED.decode_event(data).payload["kwh"] == Decimal(unscaled).scaleb(-4)


# --- any valid OcpiEvent body, arrays framed as any writer may frame them -------------------------------------

EVENT_PARSED = GENERATED._event.parsed
_NAMED: dict[str, Any] = {}


def _collect(schema: Any) -> None:
    if isinstance(schema, list):
        for branch in schema:
            _collect(branch)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            _NAMED[schema["name"]] = schema
        for field in schema.get("fields", ()):
            _collect(field["type"])
        if "items" in schema:
            _collect(schema["items"])


_collect(EVENT_PARSED)


def _sized(raw: bytes) -> bytes:
    return _zigzag(len(raw)) + raw


@st.composite
def avro_body(draw: st.DrawFn, schema: Any, depth: int = 0) -> bytes:
    """The binary body of a random valid value of `schema`; arrays in random blocks, some of them with a negative
    count and their size in bytes (Avro spec, "Complex Types: Arrays")."""
    if isinstance(schema, str) and schema in _NAMED:
        schema = _NAMED[schema]
    if isinstance(schema, list):
        index = draw(st.integers(0, len(schema) - 1))
        return _zigzag(index) + draw(avro_body(schema[index], depth))
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = None if isinstance(schema, str) else schema.get("logicalType")
    if logical == "decimal":
        unscaled = draw(st.integers(-(10**18) + 1, 10**18 - 1))
        return _sized(unscaled.to_bytes(unscaled.bit_length() // 8 + 1, "big", signed=True))
    if logical == "timestamp-micros":
        return _zigzag(draw(st.integers(-62135596800 * 10**6, 253402300799 * 10**6 + 999999)))
    if kind == "null":
        return b""
    if kind == "boolean":
        return bytes([draw(st.integers(0, 1))])
    if kind == "long":
        return _zigzag(draw(st.integers(-(2**63), 2**63 - 1)))
    if kind == "string":
        return _sized(draw(st.text(max_size=8)).encode())
    if kind == "enum":
        return _zigzag(draw(st.integers(0, len(schema["symbols"]) - 1)))
    if kind == "record":
        return b"".join(draw(avro_body(field["type"], depth + 1)) for field in schema["fields"])
    if kind == "array":
        count = draw(st.integers(0, 3 if depth < 6 else 0))
        items = [draw(avro_body(schema["items"], depth + 1)) for _ in range(count)]
        out = b""
        while items:
            block = items[:draw(st.integers(1, len(items)))]
            items = items[len(block):]
            raw = b"".join(block)
            out += _zigzag(-len(block)) + _zigzag(len(raw)) + raw if draw(st.booleans()) else _zigzag(len(block)) + raw
        return out + _zigzag(0)
    raise AssertionError(f"no strategy for {kind}")


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=avro_body(EVENT_PARSED))
def test_any_valid_body_decodes_as_fastavro_decodes_it(body: bytes) -> None:
    """Every branch of every union, empty and blocked arrays, the whole long range, any Unicode: the same event."""
    data = codec.MARKER + codec.fingerprint(codec.EVENT_SCHEMA) + body
    assert same_event(GENERATED.decode_event(data), REFERENCE.decode_event(data))
