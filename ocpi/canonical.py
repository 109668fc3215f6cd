"""Canonical forms of OCPI values: the content hash, builtins for Avro, and OCPI wire JSON.

content_hash(obj) is the sha256 hex of the sorted-key JSON of the object's canonical builtins:
- every `last_updated` key is removed, at any depth, so a re-push that only bumps timestamps hashes equal;
- `null` values are removed (OCPI: absent and null mean the same for `?`/`*` fields; for PATCH bodies our
  policy makes null mean "unchanged", i.e. absent);
- empty lists are removed (absent, null and `[]` all mean "empty" for `*` fields), except at the top level
  of a PATCH body, where `[]` replaces the stored list and so is content — but not a Session PATCH's
  `charging_periods`, which are appended: there `[]` leaves them unchanged, as absence does (09 §3.4);
- numbers are written as normalised decimal text (`8.50` and `8.5` are the same amount);
- datetimes are written in UTC with microseconds (`+00:00` form), whatever tzinfo they carry;
- a charging period's `dimensions` are sorted: they are a set of measurements, which a CPO serialising them from
  an unordered map sends in any order (`ocpi.patch` compares periods so too); every other list keeps its order.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any, Final

import msgspec

from ocpi._generated import PATCHES, SessionPatch
from ocpi.datetime import format_exact_datetime

__all__ = ["canonical_json", "content_hash", "number_text", "to_builtins", "to_ocpi_json"]

_PATCH_TYPES: Final = frozenset(PATCHES.values())
_SORTED: Final = msgspec.json.Encoder(order="sorted")
_WIRE: Final = msgspec.json.Encoder(decimal_format="number")
_LAST_UPDATED: Final = "last_updated"
_DIMENSIONS: Final = "dimensions"  # ChargingPeriod.dimensions, the only member of that name

canonical_json: Final = _SORTED.encode
"""The JSON `content_hash` hashes, of a canonical tree: keys sorted."""


def to_builtins(obj: Any) -> Any:
    """msgspec builtins keeping `datetime` and `Decimal` objects (for the Avro codec); UNSET dropped."""
    return msgspec.to_builtins(obj, builtin_types=(datetime, Decimal))


def content_hash(obj: Any) -> str:
    """sha256 hex of the canonical content (see module docstring); equal for equal content."""
    tree = msgspec.to_builtins(obj, builtin_types=(datetime, Decimal))
    keep_empty_lists = type(obj) in _PATCH_TYPES
    if type(obj) is SessionPatch and tree.get("charging_periods") == []:
        del tree["charging_periods"]  # appended: `[]` changes nothing
    return hashlib.sha256(_SORTED.encode(_canonical(tree, keep_empty_lists=keep_empty_lists))).hexdigest()


def to_ocpi_json(obj: Any) -> bytes:
    """OCPI wire JSON: DateTimes via format_exact_datetime (UTC, <= 25 chars, exact), exact numbers, nulls omitted.

    msgspec's own datetime encoding writes 6 fraction digits, which can exceed OCPI's 25 characters.
    """
    return _WIRE.encode(_wire(msgspec.to_builtins(obj, builtin_types=(datetime, Decimal))))


def _canonical(value: Any, *, keep_empty_lists: bool = False) -> Any:
    kind = type(value)
    if kind is dict:
        tree = {
            key: _canonical(item)
            for key, item in value.items()
            if key != _LAST_UPDATED and item is not None and (keep_empty_lists or item != [])
        }
        if type(tree.get(_DIMENSIONS)) is list:
            tree[_DIMENSIONS] = sorted(tree[_DIMENSIONS], key=_SORTED.encode)
        return tree
    if kind is list:
        return [_canonical(item) for item in value]
    if kind is Decimal:
        return number_text(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an OCPI value: OCPI DateTimes are UTC")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    return value


def number_text(value: Decimal) -> str:
    """Normalised positional text: 8.50 → "8.5", 1E+2 → "100", -0 → "0"."""
    if not value:
        return "0"
    # normalize() strips the trailing zeros; under _EXACT it never rounds (any finite Decimal has fewer digits).
    return format(value.normalize(_EXACT), "f")


_EXACT: Final = Context(prec=MAX_PREC, Emax=MAX_EMAX, Emin=MIN_EMIN)


def _wire(value: Any) -> Any:
    kind = type(value)
    if kind is dict:
        return {key: _wire(item) for key, item in value.items() if item is not None}
    if kind is list:
        return [_wire(item) for item in value]
    if isinstance(value, datetime):
        return format_exact_datetime(value)
    return value
