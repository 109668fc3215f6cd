"""Decode request bodies into OCPI Structs with JSON-path errors and optional compatibility relaxations.

`decode(body, Session)` returns `Decoded(value, relaxations)` or raises:
- `OcpiJsonError` when the body is not JSON at all (receivers answer HTTP 400);
- `OcpiValidationError(path, reason)` when it is JSON but not a valid object, e.g.
  `$.charging_periods[0].dimensions[1].type: not one of CURRENT, ENERGY, ...` (receivers answer 2001).

The same function decodes PATCH bodies (`SessionPatch`, ...): explicit nulls become UNSET (project policy:
null = unchanged) and a missing `last_updated` is reported as `$.last_updated: missing required field`.

Fast path: one msgspec decode with the hooks of ocpi.types, then the checks of ocpi._validate. Only when
that fails and the partner's CompatProfile enables relaxations is the body parsed untyped, repaired by
ocpi.compat and decoded strictly again. Errors are msgspec's own (first error, with its `$...` path),
translated into plain reasons; nothing is validated twice by hand.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Any, Final, Generic, TypeVar, cast

import msgspec
import msgspec.inspect as mi

from ocpi import _validate
from ocpi._generated import (
    CREDENTIALS_TOKEN_PATTERN,
    LATITUDE_PATTERN,
    LOCAL_DATE_PATTERN,
    LONGITUDE_PATTERN,
    TIME_OF_DAY_PATTERN,
)
from ocpi.compat import CompatProfile, Relaxation, Repairer
from ocpi.errors import OcpiJsonError, OcpiValidationError
from ocpi.types import CI_STRING_PATTERN, STRING_PATTERN, dec_hook, float_hook

__all__ = ["UNDECODABLE", "UNPARSABLE", "Decoded", "OcpiJsonError", "OcpiValidationError", "decode", "decode_list",
           "invalid_value", "unparsable_reason"]

T = TypeVar("T")

_NO_RELAXATIONS: Final[frozenset[Relaxation]] = frozenset()

# What a msgspec decoder raises for bytes it cannot decode: DecodeError (ValidationError is one), and, for invalid
# UTF-8 inside a JSON string, UnicodeDecodeError, which is not a DecodeError.
UNDECODABLE: Final = (msgspec.DecodeError, UnicodeDecodeError)
# Those, and RecursionError for JSON nested deeper than the parser goes: what parsing bytes from outside may raise.
UNPARSABLE: Final = (*UNDECODABLE, RecursionError)


def unparsable_reason(error: BaseException) -> str:
    """Why bytes that raised one of `UNPARSABLE` are no JSON, for a message."""
    if isinstance(error, RecursionError):
        return _TOO_DEEP
    return str(error)


class Decoded(msgspec.Struct, Generic[T], frozen=True):
    """A decoded value and the relaxations applied to get it (`NAME:$.path`, empty when strict)."""

    value: T
    relaxations: tuple[str, ...] = ()


@cache
def _decoder(model: Any) -> msgspec.json.Decoder[Any]:
    return msgspec.json.Decoder(model, dec_hook=dec_hook, float_hook=float_hook)


_TREE: Final = msgspec.json.Decoder(float_hook=float_hook)  # untyped, numbers exact
_RAW_LIST: Final = msgspec.json.Decoder(list[msgspec.Raw])
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")


def decode(body: bytes | str, model: type[T], *, profile: CompatProfile | None = None) -> Decoded[T]:
    """Decode and validate one OCPI object (or PATCH body) of type `model`."""
    enabled = profile.relaxations if profile is not None else _NO_RELAXATIONS
    applied: list[str] = []
    decoder = _decoder(model)  # type: ignore[arg-type]  # Struct classes are hashable
    repairer: Repairer | None = None
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        repairer = Repairer(enabled, applied)
        value = _after_strict_failure(body, model, decoder, exc, repairer)
    except UNDECODABLE as exc:
        raise OcpiJsonError(_json_reason(exc)) from None
    except RecursionError:
        raise OcpiJsonError(_TOO_DEEP) from None
    if repairer is None or not repairer.kept:
        value = _validate.finish(value, enabled, applied, scan_na=_may_contain_na(body))
        return Decoded(value, tuple(applied))
    # NULL_IN_LIST shortened lists: the walk's paths are into the repaired value, the partner's are as sent.
    repaired = len(applied)
    try:
        value = _validate.finish(value, enabled, applied, scan_na=_may_contain_na(body))
    except OcpiValidationError as exc:
        raise OcpiValidationError(repairer.original_path(exc.path), exc.reason) from None
    for i in range(repaired, len(applied)):
        name, _, path = applied[i].partition(":")
        applied[i] = f"{name}:{repairer.original_path(path)}"
    return Decoded(value, tuple(applied))


def decode_stored(body: bytes, model: type[T]) -> T:
    """An object this system validated and then stored as OCPI JSON, read back: types and constraints checked
    by msgspec, defaults applied, but not the rule walk again (it passed before the object was stored)."""
    try:
        value = _decoder(model).decode(body)  # type: ignore[arg-type]  # Struct classes are hashable
    except msgspec.ValidationError as exc:
        raise _translate(exc, model) from None
    except UNDECODABLE as exc:
        raise OcpiJsonError(_json_reason(exc)) from None
    return cast(T, _validate.normalise(value))


def validate_built(value: T, body: bytes, *, profile: CompatProfile | None = None) -> T:
    """The rules `decode` applies after msgspec, for an object built in code from parts msgspec has checked
    (a stored object merged with a converted PATCH, a converted PUT), whose OCPI JSON is exactly `body`.

    Equal to `decode(body, type(value), profile=profile).value`, without parsing `body` again: every type and
    field constraint (`msgspec.Meta`) held in the parts, and a merge only replaces fields or appends to lists (whose
    only constraints are minimum lengths). What a merge can break is what spans fields, and that is this rule walk.
    """
    enabled = profile.relaxations if profile is not None else _NO_RELAXATIONS
    return cast(T, _validate.finish(value, enabled, [], scan_na=_may_contain_na(body)))


def decode_list(
    body: bytes | str, model: type[T], *, profile: CompatProfile | None = None, max_bytes: int | None = None
) -> list[Decoded[T] | OcpiValidationError]:
    """Decode a JSON array element by element (e.g. a pulled GET page), so one bad object spares the rest.

    Raises only when the body is not JSON or not an array; per-element errors are returned in place, with
    paths starting at the element (`$[3].evses[0].uid`). An element that is not UTF-8 is one (`$[3]`), as a push body
    is no JSON then (`receivers.transport.require_utf8`): splitting the array and decoding the element read only the
    strings the model has, so bytes that are no UTF-8 in a field it lacks (a vendor extension) passed unread.
    `max_bytes`: an element longer than that is one too (`$[3]`), not decoded (a pull: a push body's limit).
    """
    try:
        raws = _RAW_LIST.decode(body)
    except msgspec.ValidationError as exc:
        raise _translate(exc, list[model]) from None  # type: ignore[valid-type]
    except UNDECODABLE as exc:
        raise OcpiJsonError(_json_reason(exc)) from None
    except RecursionError:  # an element nested too deeply: the array cannot even be split into its elements
        raise OcpiJsonError(_TOO_DEEP) from None
    results: list[Decoded[T] | OcpiValidationError] = []
    for i, raw in enumerate(raws):
        element = bytes(raw)
        if max_bytes is not None and len(element) > max_bytes:
            reason = f"{len(element)} bytes, more than the {max_bytes} an object may be"
            results.append(OcpiValidationError(f"$[{i}]", reason))
            continue
        try:
            element.decode("utf-8")
            results.append(decode(element, model, profile=profile))
        except UnicodeDecodeError as exc:
            results.append(OcpiValidationError(f"$[{i}]", _json_reason(exc)))
        except OcpiValidationError as exc:
            results.append(OcpiValidationError(f"$[{i}]{exc.path[1:]}", exc.reason))
        except OcpiJsonError as exc:  # the array split, but its element does not parse (kept as a guard)
            results.append(OcpiValidationError(f"$[{i}]", exc.reason))
    return results


_TOO_DEEP: Final = "JSON nests too deeply"


def invalid_value(value: Any, kind: Any) -> str | None:
    """Why `value` is not a valid `kind` (an OCPI type, e.g. `CiString36` for an id in a URL), in the words of a
    2001; None when it is one."""
    try:
        msgspec.convert(value, kind)
    except msgspec.ValidationError as exc:
        return _translate(exc, kind).reason
    return None


def _after_strict_failure(
    body: bytes | str,
    model: Any,
    decoder: msgspec.json.Decoder[Any],
    error: msgspec.ValidationError,
    repairer: Repairer,
) -> Any:
    # A typed decode stops at the first invalid value, possibly before a syntax error further on, so the
    # body is parsed untyped first: a body that is not JSON must be a JSON error (HTTP 400), not a 2001.
    try:
        tree = _TREE.decode(body)
    except msgspec.ValidationError:  # JSON, but a number beyond any range: nothing to repair
        raise _translate(error, model) from None
    except UNDECODABLE as exc:
        raise OcpiJsonError(_json_reason(exc)) from None
    except RecursionError:
        raise OcpiJsonError(_TOO_DEEP) from None
    if not repairer.enabled:
        raise _translate(error, model) from None
    repaired = repairer.value(tree, _type_info(model), "$")
    if not repairer.applied:
        raise _translate(error, model) from None
    try:
        return decoder.decode(_ENCODER.encode(repaired))
    except msgspec.ValidationError as exc:
        translated = _translate(exc, model)
        raise OcpiValidationError(repairer.original_path(translated.path), translated.reason) from None
    except RecursionError:
        raise OcpiJsonError(_TOO_DEEP) from None


def _may_contain_na(body: bytes | str) -> bool:
    """Cheap pre-check for the `#NA` scan: a `#`, or a backslash (an escape could spell `#NA`).

    Single-byte searches (memchr) are ~10x faster than searching for `#NA` itself.
    """
    if isinstance(body, str):
        return "#" in body or "\\" in body
    data = body if isinstance(body, bytes) else bytes(body)
    return b"#" in data or b"\\" in data


def _json_reason(error: msgspec.DecodeError | UnicodeDecodeError) -> str:
    if isinstance(error, UnicodeDecodeError):  # JSON text is UTF-8 (RFC 8259 §8.1)
        return f"not valid JSON: not UTF-8 at byte {error.start}: {error.reason}"
    return f"not valid JSON: {error}"


# --- error translation ------------------------------------------------------------------------------------

_AT: Final = re.compile(r"(?s)(.*) - at `(\$.*)`")
_MISSING: Final = re.compile(r"Object missing required field `(.+)`")
_STR_TOO_LONG: Final = re.compile(r"Expected `str` of length <= (\d+)")
_ARRAY_TOO_SHORT: Final = re.compile(r"Expected `array` of length >= (\d+)")
_INT_BOUND: Final = re.compile(r"Expected `int` (<=|>=|<|>) (-?\d+)")
_EXPECTED: Final = re.compile(r"Expected `([^`]+)`, got `([^`]+)`")
_SEGMENT: Final = re.compile(r"\.([A-Za-z_][A-Za-z0-9_]*)|\[(\d+)\]")

_KIND_WORDS: Final = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "number": "a number",
    "bool": "a boolean",
    "null": "null",
    "array": "an array",
    "object": "an object",
    "DateTime": "a DateTime string",
}
_PATTERN_REASONS: Final = {
    CI_STRING_PATTERN: "contains characters other than printable ASCII (CiString allows 0x20-0x7E only)",
    STRING_PATTERN: "contains control characters",
    LATITUDE_PATTERN: "not a latitude in decimal degrees with 5-7 decimals (e.g. 51.047599)",
    LONGITUDE_PATTERN: "not a longitude in decimal degrees with 5-7 decimals (e.g. 3.729944)",
    TIME_OF_DAY_PATTERN: "not a time of day HH:MM (00:00-23:59)",
    LOCAL_DATE_PATTERN: "not a date YYYY-MM-DD",
    CREDENTIALS_TOKEN_PATTERN: "must be printable ASCII without spaces (0x21-0x7E)",
}


@cache
def _type_info(model: Any) -> mi.Type:
    return mi.type_info(model)


def _translate(error: msgspec.ValidationError, model: Any) -> OcpiValidationError:
    message = str(error)
    located = _AT.fullmatch(message)
    text, path = (located[1], located[2]) if located else (message, "$")
    missing = _MISSING.fullmatch(text)
    if missing:
        return OcpiValidationError(f"{path}.{missing[1]}", "missing required field")
    return OcpiValidationError(path, _reason(text, model, path))


def _reason(text: str, model: Any, path: str) -> str:
    if match := _STR_TOO_LONG.fullmatch(text):
        return f"longer than {match[1]} characters"
    if match := _ARRAY_TOO_SHORT.fullmatch(text):
        return "must not be empty" if match[1] == "1" else f"needs at least {match[1]} elements"
    if match := _INT_BOUND.fullmatch(text):
        return f"must be {match[1]} {match[2]}"
    if text.startswith("Expected `str` matching regex"):
        kind = _type_at(model, path)
        pattern = kind.pattern if isinstance(kind, mi.StrType) else None
        return _PATTERN_REASONS.get(pattern or "", "does not have the required format")
    if text.startswith("Invalid enum value"):
        kind = _type_at(model, path)
        if isinstance(kind, mi.EnumType):
            return "not one of " + ", ".join(str(member.value) for member in kind.cls)
        return "not an allowed value"
    if match := _EXPECTED.fullmatch(text):
        return f"expected {_describe(match[1])}, got {_describe(match[2])}"
    if text == "Integer value out of range":
        return "integer out of range"
    return text  # the hooks' own reasons (DateTime, number policy) are already human


def _describe(kinds: str) -> str:
    return " or ".join(_KIND_WORDS.get(kind, f"`{kind}`") for kind in kinds.split(" | "))


def _type_at(model: Any, path: str) -> mi.Type | None:
    kind: mi.Type | None = _type_info(model)
    for segment in _SEGMENT.finditer(path, 1):
        kind = _unwrap(kind)
        if segment[1] is not None:
            if not isinstance(kind, mi.StructType):
                return None
            kind = next((f.type for f in kind.fields if f.encode_name == segment[1]), None)
        elif isinstance(kind, mi.ListType):
            kind = kind.item_type
        else:
            return None
    return _unwrap(kind)


def _unwrap(kind: mi.Type | None) -> mi.Type | None:
    if isinstance(kind, mi.UnionType):
        members = [k for k in kind.types if not isinstance(k, mi.NoneType)]
        return members[0] if len(members) == 1 else kind
    return kind
