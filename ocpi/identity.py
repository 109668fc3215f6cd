"""Identity of client-owned objects: (country_code, party_id, id), compared case-insensitively.

CiString values are case-insensitive (digest 02 §9): `nl/tnm/loc1` and `NL/TNM/LOC1` are the same object,
so equality, hashing and the Kafka key use the upper-cased form, while the attributes keep the values as sent
(they are echoed and stored as received).
"""

from __future__ import annotations

import re
import string
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Protocol

__all__ = ["ObjectKey", "ci_equal", "ci_index", "ci_normalize", "owner_from_key_part", "owner_key_part"]

# ASCII-only upper-casing: str.upper() would also fold non-ASCII ("ß" → "SS"), which CiString never holds
# but URL segments might; such values must stay distinct rather than collide.
_ASCII_UPPER: Final = str.maketrans(string.ascii_lowercase, string.ascii_uppercase)


def ci_normalize(value: str) -> str:
    """The comparison form of a CiString: ASCII letters upper-cased, everything else unchanged."""
    # str.upper() is the same mapping on an all-ASCII string (isascii() is a flag check) and several times
    # faster than translate(); this runs a few dozen times per event in the pipeline.
    return value.upper() if value.isascii() else value.translate(_ASCII_UPPER)


def ci_equal(a: str | None, b: str | None) -> bool:
    """Case-insensitive CiString equality; None equals only None."""
    if a is None or b is None:
        return a is b
    return a == b or ci_normalize(a) == ci_normalize(b)


def ci_index(values: Iterable[str], wanted: str) -> int | None:
    """Position of the first value equal to `wanted` ignoring ASCII case (an EVSE uid among a Location's EVSEs)."""
    target = ci_normalize(wanted)  # once, not once per value compared
    for i, value in enumerate(values):
        if value == wanted or ci_normalize(value) == target:
            return i
    return None


def owner_key_part(value: str) -> str:
    """A country code or party id as one part of a `/`-joined key, normalised. CiString allows `/` (and `%`),
    which would make owners `N/` + `L` and `N` + `/L` one key: those two characters are escaped as in a URL.
    Real codes (ISO 3166, ISO 15118) are alphanumeric, so their keys are unchanged."""
    value = ci_normalize(value)
    if "/" in value or "%" in value:
        return value.replace("%", "%25").replace("/", "%2F")
    return value


def owner_from_key_part(part: str) -> str:
    """The inverse of `owner_key_part` (the value normalised): `%2F` (or `%2f`) and `%25` read back, in one pass;
    any other `%` stays as it is."""
    return _KEY_PART_ESCAPE.sub(_unescape, part) if "%" in part else part


_KEY_PART_ESCAPE: Final = re.compile(r"%(2[Ff]|25)")


def _unescape(match: re.Match[str]) -> str:
    return "%" if match.group(1) == "25" else "/"


class _Owned(Protocol):
    @property
    def country_code(self) -> str: ...
    @property
    def party_id(self) -> str: ...
    @property
    def id(self) -> str: ...


@dataclass(frozen=True, slots=True, eq=False)
class ObjectKey:
    """Identity of a Location, Session, CDR or Tariff. Equality and hash ignore ASCII case."""

    country_code: str
    party_id: str
    object_id: str

    @classmethod
    def of(cls, obj: _Owned) -> ObjectKey:
        """The key of an object that carries its own identity (Location, Session, CDR, Tariff)."""
        return cls(obj.country_code, obj.party_id, obj.id)

    @property
    def normalized(self) -> tuple[str, str, str]:
        return ci_normalize(self.country_code), ci_normalize(self.party_id), ci_normalize(self.object_id)

    def kafka_key(self) -> bytes:
        """`CC/PID/ID` upper-cased, UTF-8: one object's events land in one partition, in order.

        Unambiguous: a `/` in the country code or party id is escaped (`owner_key_part`); only the id, the
        last part, may hold one as it is.
        """
        country_code, party_id, object_id = self.normalized
        return f"{owner_key_part(country_code)}/{owner_key_part(party_id)}/{object_id}".encode()

    def same_as(self, country_code: str, party_id: str, object_id: str) -> bool:
        """Case-insensitive comparison with identity parts, e.g. URL segments against a body."""
        return self == ObjectKey(country_code, party_id, object_id)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ObjectKey):
            return NotImplemented
        return self.normalized == other.normalized

    def __hash__(self) -> int:
        return hash(self.normalized)

    def __str__(self) -> str:
        return f"{self.country_code}/{self.party_id}/{self.object_id}"
