"""Per-partner compatibility profile: a CLOSED list of relaxations of the strict OCPI 2.2.1-d2 rules.

Strict is the default (an empty profile). `ocpi.decode.decode` always decodes strictly first; only when that
fails and the partner's profile enables relaxations does it repair the parsed JSON deterministically, record
every repair as `NAME:$.json.path` (e.g. `NULL_IN_LIST:$.tariff_ids`) in `Decoded.relaxations`, and decode
strictly again. A repair is attempted only where the strict rule failed, and nothing outside this list is
ever relaxed. The records travel with the event (Avro field `relaxations`), so every relaxed push stays
visible downstream.

Relaxations
-----------
`NULL_IN_LIST`
    `null` elements inside a list (e.g. `"tariff_ids": ["11", null]`) are dropped. Recorded once per list.
    Error paths and records still name the later elements by their index as sent.
    Trade-off: lossless (a null carries nothing), but a serialiser that emits nulls may have lost data
    elsewhere; a `+` list that becomes empty still fails.
`NUMBER_AS_STRING`
    A JSON number where a string is due (e.g. `"physical_reference": 3`, `"tariff_ids": [12]`) becomes
    its decimal text (`"3"`, `"12"`). Trade-off: ids such as `007` lose their leading zeros at the sender
    already; the text keeps the digits as written (`1.50` stays `1.50`), but not the spelling of an exponent
    (`1e2` becomes `1E+2`, `1.0e0` becomes `1.0`) nor the sign of an integer zero (`-0` becomes `0`).
`STRING_AS_NUMBER`
    A string holding a JSON number where a number or int is due (`"kwh": "12.5"`) becomes that number.
    Only the JSON number grammar is accepted (no `,` decimal separator, no spaces, no `NaN`); an int field
    needs an integer text. Trade-off: none for the value; hides a type bug of the partner.
`DATETIME_OFFSET`
    A DateTime with an RFC 3339 numeric offset (`2019-06-24T14:39:09+02:00`, also `+00:00`) is converted to
    UTC and written with `Z` (without it for a fraction of five digits, which only that form of 25 characters
    holds: `…14:39:09.12345+02:00` becomes `…12:39:09.12345`). Trade-off: exact, but the spec says offsets are
    not UTC, so a partner sending them may also have other time-zone bugs (e.g. local time labelled `+00:00`).
`DATETIME_EXCESS_PRECISION`
    A DateTime with more fractional digits than fit 25 characters (e.g. .NET's 7 digits) is truncated to
    the digits that fit (4 with `Z`, 5 without). Trade-off: loses < 100 µs.
`EXCESS_DECIMALS`
    A number with more than 4 decimal places is rounded half-even to 4. Trade-off: changes the value by
    at most 0.00005 (a tie: 8.50005 becomes 8.5000); amounts that were meant to be exact at a finer precision are
    rounded.
`EMPTY_STRING_AS_ABSENT`
    `""` in an optional (`?`/`*`) field whose type rejects it (an enum, a DateTime, a number, a pattern such
    as `HH:MM`, an object) is treated as absent. Trade-off: for PATCH bodies this means "unchanged"; a
    partner trying to clear a field this way is not honoured (OCPI PATCH cannot clear fields anyway).
`ERRATA_MAX_LENGTH`
    Accept the post-d2 errata lengths: Location/CdrLocation `address` up to 255 (d2: 45) and `state` up to
    45 (d2: 20), SignedValue `plain_data` up to 5000 (d2: 512). The digest advises accepting these.
    Trade-off: none for us; downstream columns must be sized for the longer values.
`NA_IN_ANY_REQUIRED_STRING`
    Strict decoding accepts `#NA` only where the spec names it (Session.evse_uid/connector_id,
    CdrLocation.evse_uid/evse_id/connector_id). The spec also lets a sender use `#NA` in *any* required
    string field it genuinely cannot fill; this relaxation accepts that, but not where the field's own rules
    refuse it: a `currency` stays an ISO 4217 code (billing sums per currency), and a field shorter than three
    characters or whose pattern refuses it (coordinates, `HH:MM`) cannot hold it. Trade-off: `#NA` then
    appears in fields (even identities) that downstream code may treat as real values or foreign keys.
`EPOCH_UNKNOWN_TIME`
    A CDR's `start_date_time` or `end_date_time` given as the Unix epoch (`1970-01-01T00:00:00Z`): the CPO does
    not know that time, which the spec allows only where both parties agreed and local law allows billing such
    sessions (10 §4; strict decoding refuses it). Accepted as it is; the spec's own spelling `1970-1-1T00:00:00Z`
    (no valid DateTime) is read as the epoch too (digest 10 §4: either form). Trade-off: the CDR is billed on
    the UTC day it "ended", 1970-01-01 for an unknown end, outside every billing period; its reconciliation
    deltas are meaningless (the CDR is MISMATCH against its session).

Not relaxations (always accepted by the strict rules, because they are valid 2.2.1): a DateTime without a zone
designator (it means UTC), `null` for any `?`/`*` field, `[]` for `*` fields, unknown extra fields, unknown
ModuleID/VersionNumber values (the spec says to skip them).

Rejected candidates: a missing `cdr_token` on a Session has no deterministic substitute (the token identifies
the billed customer; even `#NA` does not fit `CdrToken.country_code`, a CiString(2)), so such Sessions are
rejected; the CDR carries the token. Trailing slashes in URLs are a transport matter, not a body repair.

Transport flag: `raw_token` (name `RAW_TOKEN` in `from_names`) lets the receivers accept an un-encoded
Authorization token from 2.1.1/2.2-style partners (digest 12 rule 1); ocpi.decode ignores it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Container, Iterable
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final

import msgspec
import msgspec.inspect as mi

from ocpi import datetime as ocpi_datetime
from ocpi import types as ocpi_types
from ocpi._generated import CDR

__all__ = ["STRICT", "CompatProfile", "Relaxation"]

RAW_TOKEN_NAME: Final = "RAW_TOKEN"  # noqa: S105 - a configuration name, not a secret


class Relaxation(enum.StrEnum):
    """The closed list of body relaxations; see the module docstring for each one's trade-off."""

    NULL_IN_LIST = "NULL_IN_LIST"
    NUMBER_AS_STRING = "NUMBER_AS_STRING"
    STRING_AS_NUMBER = "STRING_AS_NUMBER"
    DATETIME_OFFSET = "DATETIME_OFFSET"
    DATETIME_EXCESS_PRECISION = "DATETIME_EXCESS_PRECISION"
    EXCESS_DECIMALS = "EXCESS_DECIMALS"
    EMPTY_STRING_AS_ABSENT = "EMPTY_STRING_AS_ABSENT"
    ERRATA_MAX_LENGTH = "ERRATA_MAX_LENGTH"
    NA_IN_ANY_REQUIRED_STRING = "NA_IN_ANY_REQUIRED_STRING"
    EPOCH_UNKNOWN_TIME = "EPOCH_UNKNOWN_TIME"


class CompatProfile(msgspec.Struct, frozen=True, kw_only=True):
    """What one partner is allowed to get away with. The default instance is strict."""

    raw_token: bool = False
    relaxations: frozenset[Relaxation] = frozenset()

    @classmethod
    def from_names(cls, names: str | Iterable[str], *, raw_token: bool = False) -> CompatProfile:
        """Parse a comma-separated string or an iterable of names (case-insensitive, blanks ignored).

        `RAW_TOKEN` sets the transport flag; every other name must be a Relaxation. An unknown name raises
        ValueError listing the valid ones, so a typo in partner configuration fails at load time.
        """
        items = names.split(",") if isinstance(names, str) else list(names)
        relaxations: set[Relaxation] = set()
        for item in items:
            name = item.strip().upper()
            if not name:
                continue
            if name == RAW_TOKEN_NAME:
                raw_token = True
                continue
            try:
                relaxations.add(Relaxation(name))
            except ValueError:
                valid = ", ".join([RAW_TOKEN_NAME, *Relaxation])
                message = f"unknown compatibility relaxation {item.strip()!r}; valid: {valid}"
                raise ValueError(message) from None
        return cls(raw_token=raw_token, relaxations=frozenset(relaxations))

    @property
    def names(self) -> tuple[str, ...]:
        """The profile as names accepted by from_names, sorted (for configuration round trips)."""
        names = sorted(r.value for r in self.relaxations)
        return (RAW_TOKEN_NAME, *names) if self.raw_token else tuple(names)

    def allows(self, relaxation: Relaxation) -> bool:
        return relaxation in self.relaxations


STRICT: Final = CompatProfile()

ACCEPTED_AS_IS: Final = frozenset({Relaxation.ERRATA_MAX_LENGTH, Relaxation.NA_IN_ANY_REQUIRED_STRING,
                                    Relaxation.EPOCH_UNKNOWN_TIME})
"""The relaxations that accept a value unchanged instead of repairing it: the value stays in the stored object,
so checking that object again (after a merge) must accept it again, whatever the partner's profile is now."""

RECHECK: Final = CompatProfile(relaxations=ACCEPTED_AS_IS)
"""The profile of a re-check of a stored object merged with a new part: every part passed its partner's profile
at the receiver, and a merge cannot make a value longer or turn it into `#NA`, so only what spans fields is new."""


# --- repairs (used by ocpi.decode after a strict failure) ------------------------------------------------

_INT_TEXT: Final = re.compile(r"-?(?:0|[1-9][0-9]{0,18})")
_NUMBER_TEXT: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?")
_MAX_NUMBER_TEXT: Final = 64  # longer "numbers" are garbage; do not feed them to Decimal
_FOUR_PLACES: Final = Decimal(1).scaleb(-ocpi_types.MAX_DECIMAL_PLACES)
_NUMBER_MARKERS: Final = (ocpi_types.Number, ocpi_types.Percentage)
_SEGMENT: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")
# The epoch as 10 §4 prints it (`1970-1-1T00:00:00Z`, no valid DateTime): where the partner agreed to unknown
# times (EPOCH_UNKNOWN_TIME) it is the epoch all the same, in a CDR's start or end only (digest 10 §4).
_SPEC_EPOCH: Final = re.compile(r"1970-(?:1-0?1|01-1)T00:00:00Z?")  # the valid spellings need no repair
_EPOCH_TEXT: Final = "1970-01-01T00:00:00Z"
_CDR_TIMES: Final = frozenset({"start_date_time", "end_date_time"})


class Repairer:
    """Walks the parsed JSON alongside the msgspec type of the model and repairs what the profile allows.

    Every branch mirrors a strict failure: a value the strict decoder would accept is never touched, so
    a repair cannot change the meaning of a valid body.
    """

    def __init__(self, enabled: frozenset[Relaxation], applied: list[str]) -> None:
        self.enabled = enabled
        self.applied = applied
        # List path as sent → the sent index of each kept element, for lists NULL_IN_LIST shortened.
        self.kept: dict[str, list[int]] = {}

    def original_path(self, path: str) -> str:
        """A path into the repaired value (`$.evses[0].uid`) as a path into the body as sent (`$.evses[1].uid`)."""
        if not self.kept:
            return path
        result = "$"
        for segment in _SEGMENT.finditer(path, 1):
            if segment[1] is not None:
                result += f".{segment[1]}"
            else:
                index = int(segment[2])
                kept = self.kept.get(result)
                result += f"[{kept[index] if kept is not None and index < len(kept) else index}]"
        return result

    def record(self, relaxation: Relaxation, path: str) -> None:
        self.applied.append(f"{relaxation.value}:{path}")

    def value(self, node: Any, kind: mi.Type, path: str) -> Any:
        if isinstance(kind, mi.UnionType):
            if node is None:
                return None
            members = [k for k in kind.types if not isinstance(k, mi.NoneType)]
            return self.value(node, members[0], path) if len(members) == 1 else node
        if isinstance(kind, mi.StructType):
            return self.struct(node, kind, path)
        if isinstance(kind, mi.ListType):
            return self.list(node, kind, path)
        if isinstance(kind, mi.StrType):
            return self.string(node, path)
        if isinstance(kind, mi.IntType):
            return self.integer(node, path)
        if isinstance(kind, mi.CustomType):
            if kind.cls is ocpi_types.DateTime:
                return self.datetime(node, path)
            if kind.cls in _NUMBER_MARKERS:
                return self.number(node, path)
        return node

    def struct(self, node: Any, kind: mi.StructType, path: str) -> Any:
        if type(node) is not dict:
            return node
        for field in kind.fields:
            key = field.encode_name
            if key not in node:
                continue
            child = node[key]
            if (
                type(child) is str
                and child == ""
                and not field.required
                and Relaxation.EMPTY_STRING_AS_ABSENT in self.enabled
                and _rejects_empty_string(field.type)
            ):
                del node[key]
                self.record(Relaxation.EMPTY_STRING_AS_ABSENT, f"{path}.{key}")
                continue
            if (
                kind.cls is CDR
                and key in _CDR_TIMES
                and Relaxation.EPOCH_UNKNOWN_TIME in self.enabled
                and type(child) is str
                and _SPEC_EPOCH.fullmatch(child)
            ):
                node[key] = _EPOCH_TEXT  # then accepted by the CDR's epoch check (ocpi._validate), as agreed
                self.record(Relaxation.EPOCH_UNKNOWN_TIME, f"{path}.{key}")
                continue
            node[key] = self.value(child, field.type, f"{path}.{key}")
        return node

    def list(self, node: Any, kind: mi.ListType, path: str) -> Any:
        if type(node) is not list:
            return node
        items: Iterable[tuple[int, Any]] = enumerate(node)
        if Relaxation.NULL_IN_LIST in self.enabled and any(item is None for item in node):
            self.record(Relaxation.NULL_IN_LIST, path)
            items = [(i, item) for i, item in enumerate(node) if item is not None]
            self.kept[path] = [i for i, _ in items]
        # Paths keep the indices as sent, so the records point at the partner's own body.
        return [self.value(item, kind.item_type, f"{path}[{i}]") for i, item in items]

    def string(self, node: Any, path: str) -> Any:
        if Relaxation.NUMBER_AS_STRING in self.enabled and type(node) in (int, Decimal):
            try:
                text = str(node)
            except ValueError:  # an int beyond Python's str conversion limit: leave it to fail
                return node
            self.record(Relaxation.NUMBER_AS_STRING, path)
            return text
        return node

    def integer(self, node: Any, path: str) -> Any:
        if Relaxation.STRING_AS_NUMBER in self.enabled and type(node) is str and _INT_TEXT.fullmatch(node):
            self.record(Relaxation.STRING_AS_NUMBER, path)
            return int(node)
        return node

    def number(self, node: Any, path: str) -> Any:
        if (
            Relaxation.STRING_AS_NUMBER in self.enabled
            and type(node) is str
            and len(node) <= _MAX_NUMBER_TEXT
            and _NUMBER_TEXT.fullmatch(node)
        ):
            try:
                node = Decimal(node)
            except InvalidOperation:  # exponent beyond Decimal's range
                return node
            self.record(Relaxation.STRING_AS_NUMBER, path)
        if Relaxation.EXCESS_DECIMALS in self.enabled and type(node) is Decimal:
            try:
                ocpi_types.check_number(node)
            except ValueError as exc:
                if str(exc) == ocpi_types.EXCESS_DECIMALS:
                    # check_number rejected it for decimals only, so it has <= 14 integer digits; rounded, a value
                    # of 14 nines and .99995 or more becomes 10^14, which validation then refuses as too large.
                    node = node.quantize(_FOUR_PLACES, rounding=ROUND_HALF_EVEN)
                    self.record(Relaxation.EXCESS_DECIMALS, path)
        return node

    def datetime(self, node: Any, path: str) -> Any:
        if type(node) is not str:
            return node
        fixed, applied = relax_datetime(node, self.enabled)
        for relaxation in applied:
            self.record(relaxation, path)
        return fixed


def relax_datetime(value: str, enabled: Container[Relaxation]) -> tuple[str, list[Relaxation]]:
    """A DateTime with the `enabled` DateTime relaxations applied, and those it needed: a numeric offset converted
    to UTC (DATETIME_OFFSET), then a fraction too long for 25 characters truncated (DATETIME_EXCESS_PRECISION).
    Valid, or not mended by them, it comes back as it is (its parse then says why). Bodies (this module's walk)
    and the DateTimes of headers, parameters and envelopes (`receivers.transport.parse_timestamp`) share it."""
    try:
        ocpi_datetime.parse_datetime(value)
        return value, []
    except ocpi_datetime.InvalidDateTime as exc:
        reason = exc.reason
    applied: list[Relaxation] = []
    if reason == ocpi_datetime.OFFSET_NOT_ALLOWED and Relaxation.DATETIME_OFFSET in enabled:
        fixed = ocpi_datetime.offset_to_utc(value)
        if fixed is None:
            return value, applied
        value = fixed
        applied.append(Relaxation.DATETIME_OFFSET)
        try:
            ocpi_datetime.parse_datetime(value)
            return value, applied
        except ocpi_datetime.InvalidDateTime as exc:
            reason = exc.reason
    precision = (ocpi_datetime.TOO_MANY_FRACTION_DIGITS, ocpi_datetime.TOO_LONG)
    if reason in precision and Relaxation.DATETIME_EXCESS_PRECISION in enabled:
        fixed = ocpi_datetime.truncate_fraction(value)
        if fixed is not None:
            value = fixed
            applied.append(Relaxation.DATETIME_EXCESS_PRECISION)
    return value, applied


def _rejects_empty_string(kind: mi.Type) -> bool:
    """Whether `""` is invalid for this type (only then may EMPTY_STRING_AS_ABSENT drop it)."""
    if isinstance(kind, mi.UnionType):
        return all(_rejects_empty_string(k) for k in kind.types if not isinstance(k, mi.NoneType))
    if isinstance(kind, mi.StrType):
        if kind.min_length:
            return True
        return kind.pattern is not None and re.search(kind.pattern, "") is None
    if isinstance(kind, mi.EnumType):
        return "" not in {member.value for member in kind.cls}
    return not isinstance(kind, mi.AnyType)
