"""The generated Avro writer (infra.avro_writer) against fastavro: the same bytes for every record it writes, and
for anything else fastavro's outcome (its bytes, or its error), since the codec hands such values to fastavro."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from io import BytesIO
from typing import Any

import fastavro
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from infra import codec
from infra.avro_writer import Unwritable, compile_writer
from infra.codec import EVENT_SCHEMA, AvroCodec, AvroCodecError, schema_root

from .test_codec import make_event
from .test_generated_reader import EVENT_PARSED, VALID, avro_body

GENERATED = AvroCodec.from_directory(schema_root())
REFERENCE = AvroCodec.from_directory(schema_root(), generated_writer=False)
WRITE = compile_writer(EVENT_PARSED)


def _outcome(writer: AvroCodec, datum: Any) -> bytes | str:
    try:
        return writer.encode_record(EVENT_SCHEMA, datum)
    except AvroCodecError as exc:
        return str(exc)


def test_the_default_codec_writes_the_event_schema_with_the_generated_writer() -> None:
    assert WRITE is not None
    event = REFERENCE.decode_record(VALID[0])
    assert WRITE(b"", event) == REFERENCE.encode_record(EVENT_SCHEMA, event)[codec.HEADER_SIZE:]


@pytest.mark.parametrize("data", VALID, ids=range(len(VALID)))
def test_every_spec_example_is_written_as_fastavro_writes_it(data: bytes) -> None:
    """A Location, EVSE, Connector, Session, CDR and PATCHes, as events and as the records they decode to."""
    record = REFERENCE.decode_record(data)
    assert WRITE is not None
    WRITE(b"", record)  # written by the generated writer itself, not handed to fastavro
    assert GENERATED.encode_record(EVENT_SCHEMA, record) == REFERENCE.encode_record(EVENT_SCHEMA, record) == data
    event = GENERATED.decode_event(data).to_event()
    assert GENERATED.encode_event(event) == REFERENCE.encode_event(event)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=avro_body(EVENT_PARSED))
def test_any_valid_record_is_written_as_fastavro_writes_it(body: bytes) -> None:
    """Every branch of every union, empty and full arrays, the whole long and decimal ranges, any Unicode."""
    data = codec.MARKER + codec.fingerprint(EVENT_SCHEMA) + body
    record = REFERENCE.decode_record(data)
    assert WRITE is not None
    written = WRITE(codec.MARKER + codec.fingerprint(EVENT_SCHEMA), record)
    assert written == REFERENCE.encode_record(EVENT_SCHEMA, record)


def _paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place in a record (dict keys, list indexes, a tuple's value), the record itself included."""
    found = [path]
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*path, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*path, index))
    elif isinstance(value, tuple):
        found += _paths(value[1], (*path, 1))
    return found


def _replace(value: Any, path: tuple[Any, ...], new: Any) -> Any:
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: _replace(value[head], rest, new)}
    if isinstance(value, list):
        return [*value[:head], _replace(value[head], rest, new), *value[head + 1:]]
    return (value[0], _replace(value[1], rest, new))


ODD_VALUES = [
    None, True, False, 0, -1, 2**63, -(2**63) - 1, 2**31, 1.5, float("nan"), "", "x", "\ud800", b"raw", [], [None],
    {}, {"unknown": 1}, ("ocpi.v2_2_1.Session", {}), ("nope", {}), ("a", "b", "c"),
    Decimal("8.50000"), Decimal("1.23456"), Decimal("NaN"), Decimal("-Infinity"), Decimal("-0"), Decimal("1E+20"),
    Decimal(10**18), datetime(2024, 5, 1, 12, 0),  # noqa: DTZ001 - a naive one on purpose
    datetime(2024, 5, 1, tzinfo=timezone(timedelta(hours=2))),
    datetime(1, 1, 1, tzinfo=UTC), "PUT", "CHARGING",
]


class _Str(str):
    __slots__ = ()


class _Dict(dict[str, Any]):
    pass


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_odd_values_anywhere_get_what_fastavro_alone_gives(data: st.DataObject) -> None:
    """A value of another type, out of range, of a subclass, a key added or removed, anywhere in a record: the
    codec's outcome (the bytes, or the error and its message) is the one of fastavro alone."""
    record = REFERENCE.decode_record(data.draw(st.sampled_from(VALID)))
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(_paths(record)))
        change = data.draw(st.sampled_from(["value", "subclass", "add key", "drop key"]))
        target: Any = record
        for step in path:
            target = target[step]
        if change == "value":
            record = _replace(record, path, data.draw(st.sampled_from(ODD_VALUES)))
        elif change == "subclass" and isinstance(target, str):
            record = _replace(record, path, _Str(target))
        elif change == "subclass" and isinstance(target, dict):
            record = _replace(record, path, _Dict(target))
        elif change == "add key" and isinstance(target, dict):
            record = _replace(record, path, {**target, data.draw(st.sampled_from(["extra", "-type"])): None})
        elif change == "drop key" and isinstance(target, dict) and target:
            dropped = data.draw(st.sampled_from(sorted(target)))
            record = _replace(record, path, {k: v for k, v in target.items() if k != dropped})
    assert _outcome(GENERATED, record) == _outcome(REFERENCE, record)


def test_decimals_with_trailing_zeros_beyond_the_scale_are_fitted_as_before() -> None:
    """Decimal("8.50000"): the writer leaves it to fastavro, which refuses it, and the codec's fitting retry
    writes 8.5 (with the generated writer again)."""
    event = make_event("SessionPatch", {"kwh": Decimal("8.50000")}, module="SESSIONS", operation="PATCH",
                       level="SESSION")
    assert GENERATED.encode_event(event) == REFERENCE.encode_event(event)
    assert GENERATED.decode_event(GENERATED.encode_event(event)).payload["kwh"] == Decimal("8.5")
    with pytest.raises(AvroCodecError, match="more than 4 decimal places"):
        GENERATED.encode_event({**event, "payload": ("SessionPatch", {"kwh": Decimal("8.50001")})})


# --- the builder on types our schema does not use (yet) --------------------------------------------------------

def _parse(schema: dict[str, Any]) -> dict[str, Any]:
    parsed = fastavro.parse_schema(schema, named_schemas={})
    assert isinstance(parsed, dict)
    return parsed


OTHER = _parse({"type": "record", "name": "t.Other", "fields": [
    {"name": "i", "type": "int"}, {"name": "f", "type": "float"}, {"name": "d", "type": "double"},
    {"name": "b", "type": "bytes"}, {"name": "m", "type": {"type": "map", "values": ["null", "long"]}},
    {"name": "u", "type": ["string", "null"], "default": "z"},
    {"name": "self", "type": ["null", "t.Other"], "default": None},
]})


def _fastavro(schema: dict[str, Any], datum: Any) -> bytes:
    out = BytesIO()
    fastavro.schemaless_writer(out, schema, datum, strict_allow_default=True)
    return out.getvalue()


@settings(max_examples=200)
@given(i=st.integers(-(2**31), 2**31 - 1), f=st.floats(width=32), d=st.floats(), b=st.binary(max_size=70),
       m=st.dictionaries(st.text(max_size=4), st.none() | st.integers(-(2**63), 2**63 - 1), max_size=3),
       u=st.none() | st.text(max_size=70), nested=st.booleans())
def test_other_types_are_written_as_fastavro_writes_them(i: int, f: float, d: float, b: bytes, m: dict[str, Any],
                                                         u: str | None, nested: bool) -> None:
    write = compile_writer(OTHER)
    assert write is not None
    datum: dict[str, Any] = {"i": i, "f": f, "d": d, "b": b, "m": m, "u": u}
    if nested:
        datum["self"] = {"i": 1, "f": 0.5, "d": 0.25, "b": b"", "m": {}}  # `u` absent: its default "z"
    assert write(b"", datum) == _fastavro(OTHER, datum)


def test_values_the_writer_is_not_sure_of_are_unwritable() -> None:
    write = compile_writer(OTHER)
    assert write is not None
    good = {"i": 1, "f": 0.5, "d": 0.25, "b": b"", "m": {}}
    for bad in ({**good, "i": True}, {**good, "i": 2**31}, {**good, "f": 1}, {**good, "extra": 1},
                {k: v for k, v in good.items() if k != "i"}, {**good, "m": {"k": "v"}}):
        with pytest.raises(Unwritable):
            write(b"", bad)


@pytest.mark.parametrize("unsupported", [
    {"type": "record", "name": "t.F", "fields": [{"name": "f", "type": {"type": "fixed", "name": "t.X", "size": 2}}]},
    {"type": "record", "name": "t.D", "fields": [{"name": "d", "type": {"type": "int", "logicalType": "date"}}]},
])
def test_what_the_builder_lacks_gets_no_writer(unsupported: dict[str, Any]) -> None:
    assert compile_writer(_parse(unsupported)) is None


def test_the_default_codec_hands_fastavro_nothing_it_can_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparisons above hold just as well if the codec never used the generated writer (both sides would be
    fastavro): with fastavro's writer out of reach, the default codec still writes every spec example, the
    reference cannot."""
    records = [REFERENCE.decode_record(data) for data in VALID]

    def unreachable(*_args: Any, **_kwargs: Any) -> None:
        raise AssertionError("fastavro was asked to write a record the generated writer takes")

    monkeypatch.setattr(codec.fastavro, "schemaless_writer", unreachable)
    fresh = AvroCodec.from_directory(schema_root())  # writers built on first use, here
    assert [fresh.encode_record(EVENT_SCHEMA, record) for record in records] == VALID
    with pytest.raises(AssertionError, match="fastavro was asked"):
        REFERENCE.encode_record(EVENT_SCHEMA, records[0])
