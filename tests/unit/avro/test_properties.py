"""Property tests: decimals, datetimes and strings survive the codec exactly; garbage never escapes as a
fastavro error."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from infra import codec
from infra.codec import EVENT_SCHEMA, AvroCodecError

from .test_codec import GOLDEN_BYTES, SESSION, make_event

# decimal(18, 4): at most 4 places and 18 digits in all, i.e. |value| < 10^14.
decimals = st.decimals(
    min_value=Decimal("-99999999999999.9999"),
    max_value=Decimal("99999999999999.9999"),
    places=4,
    allow_nan=False,
    allow_infinity=False,
) | st.decimals(min_value=-(10**13), max_value=10**13, places=0)
# timestamp-micros: any instant from year 1 to 9999, tz-aware UTC (what the receivers produce).
datetimes = st.datetimes(
    min_value=datetime(1, 1, 2),  # noqa: DTZ001 -- hypothesis bounds are naive; timezones= makes values UTC
    max_value=datetime(9999, 12, 30),  # noqa: DTZ001
    timezones=st.just(UTC),
)
texts = st.text(max_size=300)  # any Unicode, including surrogate-free astral characters and NUL
# No deadline: the first example of whichever test runs first builds the codec's registry (parses every schema,
# compiles the generated reader), about half a second, which Hypothesis's 200 ms deadline turned into a flaky
# failure (FlakyFailure: DeadlineExceeded on the first call only), as could any slow example on a loaded machine.
NO_DEADLINE = settings(deadline=None)


def session_event(**payload: Any) -> dict[str, Any]:
    return make_event("Session", {**SESSION, **payload}, module="SESSIONS", level="SESSION")


@NO_DEADLINE
@given(kwh=decimals, excl=decimals, incl=decimals)
def test_decimals_round_trip_exactly(kwh: Decimal, excl: Decimal, incl: Decimal) -> None:
    event = session_event(kwh=kwh, total_cost={"excl_vat": excl, "incl_vat": incl})
    payload = codec.decode_event(codec.encode_event(event)).payload
    assert payload["kwh"] == kwh
    assert payload["total_cost"] == {"excl_vat": excl, "incl_vat": incl}
    assert payload["kwh"].as_tuple().exponent == -4  # always scale 4 on the way out


@NO_DEADLINE
@given(start=datetimes, end=datetimes, received=datetimes)
def test_datetimes_round_trip_exactly(start: datetime, end: datetime, received: datetime) -> None:
    event = session_event(start_date_time=start, end_date_time=end)
    event["received_at"] = received
    decoded = codec.decode_event(codec.encode_event(event))
    assert decoded.received_at == received and decoded.received_at.tzinfo is UTC
    assert decoded.payload["start_date_time"] == start
    assert decoded.payload["end_date_time"] == end


@NO_DEADLINE
@given(object_id=texts, meter_id=texts, relaxations=st.lists(texts, max_size=5))
def test_strings_round_trip_exactly(object_id: str, meter_id: str, relaxations: list[str]) -> None:
    event = session_event(id=object_id, meter_id=meter_id)
    event["object_id"] = object_id
    event["relaxations"] = relaxations
    decoded = codec.decode_event(codec.encode_event(event))
    assert decoded.object_id == object_id
    assert decoded.payload["id"] == object_id and decoded.payload["meter_id"] == meter_id
    assert decoded.relaxations == relaxations


@NO_DEADLINE
@given(places=st.integers(min_value=5, max_value=12), digits=st.integers(min_value=1, max_value=10**9))
def test_more_than_four_places_is_rejected(places: int, digits: int) -> None:
    value = Decimal(digits).scaleb(-places)
    if value == value.quantize(Decimal("0.0001")):
        value += Decimal(1).scaleb(-places)  # make sure the extra places are not all zero
    try:
        codec.encode_event(session_event(kwh=value.normalize()))
    except AvroCodecError:
        return
    raise AssertionError(f"{value} encoded")


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=400))
def test_random_bodies_decode_or_raise_our_error(body: bytes) -> None:
    data = codec.MARKER + codec.fingerprint(EVENT_SCHEMA) + body
    with contextlib.suppress(AvroCodecError):
        codec.decode_event(data)


@settings(max_examples=300, deadline=None)
@given(position=st.integers(min_value=10, max_value=len(GOLDEN_BYTES) - 1), value=st.integers(0, 255))
def test_corrupted_golden_bytes_decode_or_raise_our_error(position: int, value: int) -> None:
    data = bytearray(GOLDEN_BYTES)
    data[position] = value
    with contextlib.suppress(AvroCodecError):
        codec.decode_event(bytes(data))
