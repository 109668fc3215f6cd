"""OCPI DateTime (02 §9.1) and number rules."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocpi import InvalidDateTime, decode, format_datetime, parse_datetime
from ocpi.datetime import format_exact_datetime
from ocpi.model import CdrDimension, StatusSchedule

from .support import assert_invalid, dumps

VALID = {
    # the spec's own list of allowed shapes
    "2015-06-29T20:39:09Z": datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC),
    "2015-06-29T20:39:09": datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC),
    "2016-12-29T17:45:09.2Z": datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=UTC),
    "2016-12-29T17:45:09.2": datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=UTC),
    "2018-01-01T01:08:01.123Z": datetime(2018, 1, 1, 1, 8, 1, 123000, tzinfo=UTC),
    "2018-01-01T01:08:01.123": datetime(2018, 1, 1, 1, 8, 1, 123000, tzinfo=UTC),
    # the 25-character limit: 4 digits with Z, 5 without
    "2018-01-01T01:08:01.1234Z": datetime(2018, 1, 1, 1, 8, 1, 123400, tzinfo=UTC),
    "2018-01-01T01:08:01.12345": datetime(2018, 1, 1, 1, 8, 1, 123450, tzinfo=UTC),
    "2016-02-29T23:59:59Z": datetime(2016, 2, 29, 23, 59, 59, tzinfo=UTC),
    # the range we can store and bill by day (ClickHouse Date)
    "1970-01-01T00:00:00Z": datetime(1970, 1, 1, tzinfo=UTC),
    "2149-06-06T23:59:59Z": datetime(2149, 6, 6, 23, 59, 59, tzinfo=UTC),
}
INVALID = {
    "2015-06-29T20:39:09+00:00": "numeric offsets are not allowed",
    "2015-06-29T20:39:09-00:00": "numeric offsets are not allowed",
    "2015-06-29T22:39:09+02:00": "numeric offsets are not allowed",
    "2018-01-01T01:08:01.12345Z": "longer than 25 characters",
    "2018-01-01T01:08:01.123456": "more than 5 fractional digits",
    "2018-01-01T01:08:01.1234567Z": "more than 5 fractional digits",
    "2015-06-29 20:39:09Z": "expected YYYY-MM-DDThh:mm:ss",
    "2015-06-29t20:39:09z": "expected YYYY-MM-DDThh:mm:ss",
    "2015-06-29T20:39Z": "expected YYYY-MM-DDThh:mm:ss",
    "2015-06-29": "expected YYYY-MM-DDThh:mm:ss",
    "2015-6-29T20:39:09Z": "expected YYYY-MM-DDThh:mm:ss",
    "1970-1-1T00:00:00Z": "expected YYYY-MM-DDThh:mm:ss",  # the spec's own epoch slip (ambiguity #12)
    "2015-06-29T20:39:09.Z": "expected YYYY-MM-DDThh:mm:ss",
    "2015-02-29T20:39:09Z": "not a real calendar date",
    "2015-06-29T24:00:00Z": "not a real calendar date",
    "2015-06-29T20:39:60Z": "not a real calendar date",
    "0000-01-01T00:00:00Z": "not a real calendar date",
    # outside what we can store: a billing day would wrap silently (2400 → 2041), a row version overflow
    "1969-12-31T23:59:59Z": "outside 1970-01-01T00:00:00Z to 2149-06-06T23:59:59Z",
    "2149-06-07T00:00:00Z": "outside 1970-01-01T00:00:00Z to 2149-06-06T23:59:59Z",
    "2700-01-01T00:00:00Z": "outside 1970-01-01T00:00:00Z to 2149-06-06T23:59:59Z",
    "２０15-06-29T20:39:09Z": "expected YYYY-MM-DDThh:mm:ss",  # non-ASCII digits
    "2015-06-29T20:39:09Z\n": "expected YYYY-MM-DDThh:mm:ss",
    "": "expected YYYY-MM-DDThh:mm:ss",
}


@pytest.mark.parametrize(("text", "expected"), VALID.items())
def test_valid_datetimes(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text)
    assert parsed == expected
    assert parsed.tzinfo is UTC  # aware, never naive


@pytest.mark.parametrize(("text", "reason"), INVALID.items())
def test_invalid_datetimes(text: str, reason: str) -> None:
    with pytest.raises(InvalidDateTime) as info:
        parse_datetime(text)
    assert reason in info.value.reason


@pytest.mark.parametrize(("text", "reason"), INVALID.items())
def test_invalid_datetimes_in_a_struct(text: str, reason: str) -> None:
    assert_invalid({"period_begin": text, "status": "AVAILABLE"}, StatusSchedule, "$.period_begin", reason)


def test_naive_datetime_is_utc_after_decoding() -> None:
    schedule = decode(b'{"period_begin": "2015-06-29T20:39:09", "status": "AVAILABLE"}', StatusSchedule).value
    assert schedule.period_begin == datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC)
    assert schedule.period_begin.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC), "2015-06-29T20:39:09Z"),
        (datetime(2016, 12, 29, 17, 45, 9, 200000, tzinfo=UTC), "2016-12-29T17:45:09.2Z"),
        (datetime(2018, 1, 1, 1, 8, 1, 123400, tzinfo=UTC), "2018-01-01T01:08:01.1234Z"),
        (
            datetime(2018, 1, 1, 1, 8, 1, 123456, tzinfo=UTC),
            "2018-01-01T01:08:01.1234Z",
        ),  # truncated, not rounded
        (datetime(2018, 1, 1, 1, 8, 1, 99, tzinfo=UTC), "2018-01-01T01:08:01Z"),
        (datetime(2015, 6, 29, 22, 39, 9, tzinfo=timezone(timedelta(hours=2))), "2015-06-29T20:39:09Z"),
        (datetime(999, 1, 1, tzinfo=UTC), "0999-01-01T00:00:00Z"),
    ],
)
def test_format_datetime(value: datetime, text: str) -> None:
    assert format_datetime(value) == text
    assert len(text) <= 25


def test_format_rejects_naive() -> None:
    with pytest.raises(ValueError, match="naive"):
        format_datetime(datetime(2015, 6, 29, 20, 39, 9))  # noqa: DTZ001 - the point of the test


@settings(database=None)
@given(st.datetimes(min_value=datetime(1970, 1, 1), max_value=datetime(2149, 6, 6, 23, 59, 59),  # noqa: DTZ001 - hypothesis wants naive bounds
                    timezones=st.just(UTC)))
def test_round_trip_at_ocpi_precision(value: datetime) -> None:
    text = format_datetime(value)
    parsed = parse_datetime(text)
    assert parsed == value.replace(microsecond=value.microsecond // 100 * 100)
    assert format_datetime(parsed) == text


@pytest.mark.parametrize("text", sorted(VALID))
def test_parse_then_format_is_canonical(text: str) -> None:
    parsed = parse_datetime(text)
    canonical = format_datetime(parsed)
    assert canonical.endswith("Z") and len(canonical) <= 25
    # Exact except for a 5th fraction digit, which only fits without `Z` (documented truncation).
    assert parse_datetime(canonical) == parsed.replace(microsecond=parsed.microsecond // 100 * 100)


@pytest.mark.parametrize("text", sorted(VALID))
def test_every_ocpi_datetime_is_written_back_exactly_for_documents(text: str) -> None:
    """Stored objects are kept as OCPI JSON: a 5th fraction digit (sent without `Z`) must survive, in the only
    25-character form that holds it; everything else as `format_datetime` writes it, with `Z`."""
    parsed = parse_datetime(text)
    written = format_exact_datetime(parsed)
    assert parse_datetime(written) == parsed and len(written) <= 25
    assert written == (format_datetime(parsed) if parsed.microsecond % 100 == 0 else text)


def test_exact_format_of_a_clock_reading_is_format_datetime() -> None:
    assert format_exact_datetime(datetime(2018, 1, 1, 1, 8, 1, 123456, tzinfo=UTC)) == "2018-01-01T01:08:01.1234Z"
    assert format_exact_datetime(datetime(2018, 1, 1, 1, 8, 1, 10, tzinfo=UTC)) == "2018-01-01T01:08:01.00001"
    assert format_exact_datetime(datetime(2018, 1, 1, 3, 8, 1, 123450, tzinfo=timezone(timedelta(hours=2)))
                                 ) == "2018-01-01T01:08:01.12345"
    with pytest.raises(ValueError, match="naive"):
        format_exact_datetime(datetime(2015, 6, 29, 20, 39, 9, 10))  # noqa: DTZ001 - the point of the test


# --- numbers ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("json_number", "expected"),
    [
        ("0", Decimal(0)),
        ("41.12", Decimal("41.12")),
        ("-8.5", Decimal("-8.5")),
        ("0.0001", Decimal("0.0001")),
        ("1.50000", Decimal("1.5")),  # trailing zeros are not precision
        ("1e2", Decimal(100)),
        ("12345678901234.5678", Decimal("12345678901234.5678")),  # fits decimal(18, 4)
        ("0.1", Decimal("0.1")),  # exact: never through float
    ],
)
def test_numbers_decode_exactly(json_number: str, expected: Decimal) -> None:
    value = decode(b'{"type": "ENERGY", "volume": ' + json_number.encode() + b"}", CdrDimension).value.volume
    assert value == expected and type(value) is Decimal
    assert str(value) == str(Decimal(json_number))  # kept as sent


@pytest.mark.parametrize("json_number", ["0e999999999", "-0E+400000", "0.0e20"])
def test_zero_with_a_huge_exponent_decodes_to_a_plain_zero(json_number: str) -> None:
    """`0e999999999` is a valid JSON zero, but kept as Decimal("0E+999999999") the Avro encoder (fastavro's
    decimal writer computes 10**(exponent + scale)) would run for hours with gigabytes of memory: one request
    would block a receiver. The value is 0, and is kept with exponent 0."""
    value = decode(b'{"type": "ENERGY", "volume": ' + json_number.encode() + b"}", CdrDimension).value.volume
    assert value == 0 and type(value) is Decimal
    assert value.as_tuple() == (0, (0,), 0)
    from ocpi.model import EnergySource

    body = b'{"source": "SOLAR", "percentage": ' + json_number.encode() + b"}"
    assert decode(body, EnergySource).value.percentage.as_tuple() == (0, (0,), 0)


@pytest.mark.parametrize(
    ("json_number", "reason"),
    [
        ("0.00001", "more than 4 decimal places"),
        ("1.23456", "more than 4 decimal places"),
        ("1e-5", "more than 4 decimal places"),
        ("100000000000000", "more than 14 integer digits"),
        ("1e14", "more than 14 integer digits"),
        ("1e999999999999999999999", "number out of range"),
        ('"12.5"', "expected a number, got a string"),
        ("true", "expected a number, got a boolean"),
        ("[1]", "expected a number, got an array"),
        ("null", "expected a number, got null"),
    ],
)
def test_invalid_numbers(json_number: str, reason: str) -> None:
    body = b'{"type": "ENERGY", "volume": ' + json_number.encode() + b"}"
    assert_invalid(body, CdrDimension, "$.volume", reason)


def test_percentage_bounds() -> None:
    from ocpi.model import EnergySource

    assert decode(dumps({"source": "SOLAR", "percentage": 100}), EnergySource).value.percentage == 100
    assert_invalid(
        {"source": "SOLAR", "percentage": 100.5}, EnergySource, "$.percentage", "between 0 and 100"
    )
    assert_invalid({"source": "SOLAR", "percentage": -1}, EnergySource, "$.percentage", "between 0 and 100")
