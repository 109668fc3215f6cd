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

content_hash(obj, ci=ci_spec(Model)) also compares as OCPI does: every CiString value of the model is upper-cased
(02 §9: CiStrings are case-insensitive), so two values differing only in the case of those are the same content.
"""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from decimal import MAX_EMAX, MAX_PREC, MIN_EMIN, Context, Decimal
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from ocpi._generated import CDR, PATCHES, SessionPatch
from ocpi.datetime import format_exact_datetime
from ocpi.identity import ci_normalize
from ocpi.types import CI_STRING_PATTERN

__all__ = ["CiSpec", "canonical_json", "cdr_content_hash", "ci_spec", "content_hash", "number_text", "to_builtins",
           "to_ocpi_json"]

CiSpec = dict[str, Any]
"""Where a model's CiString values are: key → True (a CiString, or a list of them) or the nested object's CiSpec."""

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


def content_hash(obj: Any, *, ci: CiSpec | None = None) -> str:
    """sha256 hex of the canonical content (see module docstring); equal for equal content.

    `ci` (`ci_spec` of obj's model): upper-case the CiString values it names first."""
    if type(obj) in _PATCH_TYPES:
        tree = _canonical_patch(to_builtins(obj), ci, charging_periods_appended=type(obj) is SessionPatch)
    elif type(obj) is dict:
        try:  # a dict of builtins, as the Avro decoder gives, is canonicalised without a copy
            tree = _canonical(obj, ci)
        except _NotBuiltin:
            tree = _canonical(to_builtins(obj), ci)
    else:
        tree = _canonical(to_builtins(obj), ci)
    return hashlib.sha256(_SORTED.encode(tree)).hexdigest()


def ci_spec(model: type) -> CiSpec | None:
    """The CiSpec of an OCPI model (a msgspec Struct type): every member typed CiString, at any depth."""
    return _ci_spec(mi.type_info(model))


def cdr_content_hash(cdr: dict[str, Any]) -> str:
    """The content hash of a CDR (as builtins: a decoded event's payload, `to_builtins` of a CDR) as OCPI compares
    it: every CiString value upper-cased (02 §9), and `credit`/`home_charging_compensation` `false` as absent (absent
    is `false`). Two CDRs with equal ones are the same CDR sent twice (the pipeline's DUPLICATE, a receiver's
    idempotent answer to a second POST)."""
    if cdr.get("credit") is False or cdr.get("home_charging_compensation") is False:  # _FALSE_MEANS_ABSENT
        cdr = {key: item for key, item in cdr.items() if not (item is False and key in _FALSE_MEANS_ABSENT)}
    return content_hash(cdr, ci=_CDR_CI)


def to_ocpi_json(obj: Any) -> bytes:
    """OCPI wire JSON: DateTimes via format_exact_datetime (UTC, <= 25 chars, exact), exact numbers, nulls omitted.

    msgspec's own datetime encoding writes 6 fraction digits, which can exceed OCPI's 25 characters.
    """
    return _WIRE.encode(_wire(msgspec.to_builtins(obj, builtin_types=(datetime, Decimal))))


def _ci_spec(kind: Any) -> Any:
    if isinstance(kind, mi.StrType):
        return True if kind.pattern == CI_STRING_PATTERN else None
    if isinstance(kind, mi.UnionType):
        return next((spec for member in kind.types if (spec := _ci_spec(member)) is not None), None)
    if isinstance(kind, (mi.ListType, mi.SetType, mi.FrozenSetType, mi.VarTupleType)):
        return _ci_spec(kind.item_type)
    if isinstance(kind, mi.StructType):
        spec = {field.encode_name: sub for field in kind.fields if (sub := _ci_spec(field.type)) is not None}
        return spec or None
    return None


class _NotBuiltin(Exception):
    """A value `_canonical` does not take as it is (a Struct, an enum, a tuple …): msgspec.to_builtins it first."""


_LEAVES: Final = frozenset((str, bool, int, float))  # canonical as they are (outside a CiString)


def _canonical(value: Any, ci: Any) -> Any:
    """The canonical form of a tree of builtins, CiStrings upper-cased where `ci` says; a leaf is not recursed
    into (this runs for every event)."""
    kind = type(value)
    if kind is str:
        if ci is not True:
            return value
        return value.upper() if value.isascii() else ci_normalize(value)  # ci_normalize's ASCII case, inlined
    if kind is dict:
        return _canonical_dict(value, None if ci is True else ci)
    if kind is list:
        return [_canonical(item, ci) for item in value]
    if value is None or kind in _LEAVES or kind is tuple:  # to_builtins keeps a tuple, and so does the hash
        return value
    if isinstance(value, Decimal):
        return number_text(value)
    if isinstance(value, datetime):
        return _datetime_text(value)
    raise _NotBuiltin


def _canonical_dict(value: dict[str, Any], ci: CiSpec | None) -> dict[str, Any]:
    """`_canonical` of a dict (`ci`: its members' CiSpec, or None). The usual members (strings, amounts, times,
    nested objects) are made canonical in this loop rather than by a call each: a CDR holds about thirty, and the
    calls were a third of its hash. Anything else (lists, None, other types) goes through `_canonical`."""
    # Exact types are tested (no subclass overriding __eq__): a member of one is never None nor [], so it is kept
    # without comparing; `Decimal(...) != []` alone costs about 0.4 µs (Decimal tries to convert the list first).
    tree = {}
    for key, item in value.items():
        if key == _LAST_UPDATED:
            continue
        kind = type(item)
        if kind is str:
            if ci is not None and ci.get(key) is True:
                item = item.upper() if item.isascii() else ci_normalize(item)
        elif kind is dict:
            item = _canonical_dict(item, None if ci is None or (sub := ci.get(key)) is True else sub)
        elif kind is Decimal:
            item = number_text(item)
        elif kind is datetime:
            item = _datetime_text(item)
        elif kind in _LEAVES:
            pass
        elif item is None or item == []:
            continue
        else:
            item = _canonical(item, None if ci is None else ci.get(key))
        tree[key] = item
    if type(tree.get(_DIMENSIONS)) is list:
        tree[_DIMENSIONS] = sorted(tree[_DIMENSIONS], key=_SORTED.encode)
    return tree


def _datetime_text(value: datetime) -> str:
    """UTC with microseconds, `+00:00`; a value already in `UTC` (every decoded one) needs no conversion."""
    if value.tzinfo is UTC:
        return value.isoformat(timespec="microseconds")
    if value.tzinfo is None:
        raise ValueError("naive datetime in an OCPI value: OCPI DateTimes are UTC")
    return value.astimezone(UTC).isoformat(timespec="microseconds")


def _canonical_patch(body: dict[str, Any], ci: CiSpec | None, *, charging_periods_appended: bool) -> dict[str, Any]:
    """A PATCH body's canonical form: at its top level `[]` replaces the stored list, so it is content, but
    a Session PATCH's `charging_periods` are appended, so there `[]` changes nothing."""
    specs = ci or {}
    return {key: _canonical(item, specs.get(key)) for key, item in body.items()
            if key != _LAST_UPDATED and item is not None
            and not (charging_periods_appended and key == "charging_periods" and item == [])}


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


_FALSE_MEANS_ABSENT: Final = ("credit", "home_charging_compensation")  # `?` booleans whose absence is `false`
_CDR_CI: Final = ci_spec(CDR)
