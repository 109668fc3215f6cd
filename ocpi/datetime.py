"""OCPI DateTime (digest 02 §9.1): RFC 3339 in UTC, `Z` optional, no numeric offset, at most 25 characters.

Accepted shapes are exactly the spec's: `2015-06-29T20:39:09Z`, `2015-06-29T20:39:09`,
`2016-12-29T17:45:09.2Z`, `2018-01-01T01:08:01.123` ... A timestamp *without* a zone designator is valid
and means UTC. A numeric offset is invalid, `+00:00` included: the spec calls it "not the same as UTC".
Lower-case `t`/`z` and a space separator are not in the spec's list and are rejected.

Parsed values are always timezone-aware UTC `datetime`s; naive datetimes never leave this module.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = [
    "MAX_LENGTH",
    "InvalidDateTime",
    "format_datetime",
    "format_exact_datetime",
    "parse_datetime",
]

MAX_LENGTH: Final = 25

# Reasons, kept as constants because ocpi.compat recognises them to decide on a relaxation.
BAD_SHAPE: Final = "invalid DateTime: expected YYYY-MM-DDThh:mm:ss[.fraction][Z]"
OFFSET_NOT_ALLOWED: Final = "invalid DateTime: numeric offsets are not allowed (UTC only: use Z or no zone)"
TOO_MANY_FRACTION_DIGITS: Final = "invalid DateTime: more than 5 fractional digits"
TOO_LONG: Final = f"invalid DateTime: longer than {MAX_LENGTH} characters"
NOT_A_CALENDAR_DATE: Final = "invalid DateTime: not a real calendar date and time"
# The spec sets no range, but what we cannot store or bill we must refuse rather than book on a wrong day: billing
# groups by a ClickHouse Date (1970-01-01 to 2149-06-06: outside it a date wraps silently), and row versions are
# microseconds since 1970. No real charging session, CDR or Location update falls outside.
EARLIEST: Final = datetime(1970, 1, 1, tzinfo=UTC)
LATEST: Final = datetime(2149, 6, 6, 23, 59, 59, 999999, tzinfo=UTC)
OUT_OF_RANGE: Final = "invalid DateTime: outside 1970-01-01T00:00:00Z to 2149-06-06T23:59:59Z (not storable)"

# [0-9], not \d: \d also matches non-ASCII digits in str patterns.
_STRICT: Final = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(?:\.[0-9]{1,5})?Z?")
# The same skeleton with any fraction and an RFC 3339 offset: only used to explain a failure precisely and
# by the compatibility repairs, never to accept a value.
_LENIENT: Final = re.compile(
    r"([0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2})(?:\.([0-9]+))?(Z|[+-][0-9]{2}:[0-9]{2})?"
)


class InvalidDateTime(ValueError):
    """A string that is not an OCPI DateTime; `reason` is one of this module's reason constants."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# An object's DateTimes are parsed again at every update of it; datetimes are immutable, so they are shared.
@functools.lru_cache(maxsize=16384)
def parse_datetime(value: str) -> datetime:
    """Parse an OCPI DateTime into an aware UTC datetime; raise InvalidDateTime with a precise reason."""
    if len(value) <= MAX_LENGTH and _STRICT.fullmatch(value) is not None:
        try:
            parsed = datetime.fromisoformat(value)  # 3.11+: understands `Z` and 1-6 fraction digits
        except ValueError:
            raise InvalidDateTime(NOT_A_CALENDAR_DATE) from None
        parsed = parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
        if not EARLIEST <= parsed <= LATEST:
            raise InvalidDateTime(OUT_OF_RANGE)
        return parsed
    raise InvalidDateTime(_explain(value))


def format_datetime(value: datetime) -> str:
    """Format an aware datetime as OCPI DateTime in UTC, always with `Z`, e.g. `2015-06-29T20:39:09Z`.

    Fractional seconds appear only when non-zero, trailing zeros stripped. With `Z` the 25-character limit
    leaves room for 4 fraction digits, so anything below 100 µs is truncated (never rounded up: that
    could move the value into the next second).
    """
    if value.tzinfo is None or value.utcoffset() is None:
        raise ValueError("naive datetime: OCPI DateTimes are UTC, attach tzinfo=UTC")
    v = value.astimezone(UTC)
    text = f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}"
    ten_thousandths = v.microsecond // 100
    if ten_thousandths:
        text += "." + f"{ten_thousandths:04d}".rstrip("0")
    return text + "Z"


def format_exact_datetime(value: datetime) -> str:
    """`format_datetime`, but a value with a 5th fraction digit (one a CPO sent without `Z`, 25 characters:
    `2024-05-01T10:00:00.12345`) is written in that form, also UTC, the only one that holds it: every OCPI DateTime
    comes back exactly. For OCPI documents we keep (stored objects, which later events are merged onto and
    compared with) and serve back; clock readings go through `format_datetime`, always with `Z`."""
    micro = value.microsecond
    if micro % 100 and not micro % 10 and value.tzinfo is not None and value.utcoffset() is not None:
        v = value.astimezone(UTC)
        return f"{v.year:04d}-{v.month:02d}-{v.day:02d}T{v.hour:02d}:{v.minute:02d}:{v.second:02d}.{micro // 10:05d}"
    return format_datetime(value)


def _explain(value: str) -> str:
    match = _LENIENT.fullmatch(value)
    if match is None:
        return BAD_SHAPE
    zone = match[3]
    if zone is not None and zone != "Z":
        return OFFSET_NOT_ALLOWED
    if match[2] is not None and len(match[2]) > 5:
        return TOO_MANY_FRACTION_DIGITS
    if len(value) > MAX_LENGTH:
        return TOO_LONG
    return BAD_SHAPE  # pragma: no cover - the strict pattern accepts everything else the lenient one does


# --- repairs used by ocpi.compat (only ever called on values that failed parse_datetime) ------------------


def offset_to_utc(value: str) -> str | None:
    """`2019-06-24T14:39:09.5+02:00` → `2019-06-24T12:39:09.5Z`; None when there is no offset to convert.

    The fraction is carried over as text, unchanged: RFC 3339 offsets are whole minutes, and a fraction
    that is too long stays a separate problem (and a separate relaxation). A fraction of five digits is written
    without `Z` (UTC all the same), the only form of 25 characters that holds it.
    """
    match = _LENIENT.fullmatch(value)
    if match is None or match[3] is None or match[3] == "Z":
        return None
    zone = match[3]
    try:
        local = datetime.fromisoformat(match[1])
        offset = timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6]))
        if offset >= timedelta(hours=24) or int(zone[4:6]) > 59:
            return None
        utc = local - offset if zone[0] == "+" else local + offset
    except (ValueError, OverflowError):
        return None
    fraction = f".{match[2]}" if match[2] is not None else ""
    zone = "" if len(fraction) == 6 else "Z"  # a dot and five digits fit 25 characters only without `Z`
    return utc.strftime("%Y-%m-%dT%H:%M:%S") + fraction + zone if utc.year >= 1000 else None


def truncate_fraction(value: str) -> str | None:
    """Cut the fraction to what fits 25 characters (4 digits with `Z`, 5 without); None if not applicable."""
    match = _LENIENT.fullmatch(value)
    if match is None or match[2] is None or (match[3] is not None and match[3] != "Z"):
        return None
    zone = match[3] or ""
    keep = MAX_LENGTH - len(match[1]) - 1 - len(zone)
    if len(match[2]) <= keep:
        return None
    digits = match[2][:keep].rstrip("0")
    return match[1] + (f".{digits}" if digits else "") + zone
