"""OCPI primitive types and the msgspec hooks that enforce the rules msgspec.Meta cannot express.

- `DateTime` fields decode to aware UTC datetimes under the rules of ocpi.datetime.
- `Number` fields decode JSON numbers (never strings) to exact `Decimal`s. Project policy: at most 4
  decimal places (the spec's stated precision; trailing zeros do not count) and at most 14 integer digits,
  so every value fits the Avro/ClickHouse decimal(18, 4) used downstream.
- `Percentage` is a Number in [0, 100] (EnergySource.percentage).

At runtime the three names are marker classes: msgspec treats them as custom types and calls `dec_hook`,
which returns plain `datetime`/`Decimal` objects; the markers' metaclass answers msgspec's isinstance check
on the hook result for those real types. Type checkers see the real types.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Context, Decimal, InvalidOperation
from typing import TYPE_CHECKING, Any, Final

import msgspec

from ocpi.datetime import parse_datetime

__all__ = [
    "CI_STRING_PATTERN",
    "MAX_DECIMAL_PLACES",
    "MAX_INTEGER_DIGITS",
    "STRING_PATTERN",
    "DateTime",
    "Number",
    "OcpiObject",
    "Percentage",
    "check_number",
    "dec_hook",
    "float_hook",
    "json_kind",
]

# `\Z`, not `$`: msgspec uses re.search, and `$` also matches before a trailing newline.
CI_STRING_PATTERN: Final = r"^[\x20-\x7E]*\Z"  # CiString: printable ASCII only
STRING_PATTERN: Final = r"^[^\x00-\x1F\x7F-\x9F]*\Z"  # string: any Unicode except C0/C1 control characters

MAX_DECIMAL_PLACES: Final = 4
MAX_INTEGER_DIGITS: Final = 14

# Reasons recognised by ocpi.compat.
EXCESS_DECIMALS: Final = f"more than {MAX_DECIMAL_PLACES} decimal places"
TOO_LARGE: Final = f"too large: more than {MAX_INTEGER_DIGITS} integer digits"
NOT_FINITE: Final = "not a finite number"
OUT_OF_NUMBER_RANGE: Final = "number out of range"
PERCENTAGE_RANGE: Final = "must be between 0 and 100"

_FOUR_PLACES: Final = Decimal(1).scaleb(-MAX_DECIMAL_PLACES)
_INT_LIMIT: Final = 10**MAX_INTEGER_DIGITS
# Private context: quantize must not depend on (or fail with) a global context someone else configured.
# 40 digits hold any accepted value (14 integer + 4 decimal digits) with room to spare.
_CONTEXT: Final = Context(prec=40)
_ZERO: Final = Decimal(0)
_HUNDRED: Final = Decimal(100)


class OcpiObject(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """Base of every generated OCPI Struct.

    kw_only: the spec's field order puts required fields after optional ones. frozen: the merge rules in
    ocpi.patch are pure functions and must not be able to mutate a stored object in place. omit_defaults: an
    absent optional field (None) is left out of the JSON and builtins msgspec writes, as OCPI wants it absent
    rather than null, without a pass to strip nulls; the few objects with a documented non-null default
    (Location's `charging_when_closed: true`) keep writing every field (`omit_defaults=False`).
    """


if TYPE_CHECKING:
    DateTime = datetime
    Number = Decimal
    Percentage = Decimal
else:

    class _Marker(type):
        """isinstance(x, Marker) answers for the value type the marker stands for.

        Cheaper than abc.ABC.register (one Python call instead of four) and msgspec calls it once per
        decoded DateTime/number.
        """

        value_type: type

        def __instancecheck__(cls, instance: object) -> bool:
            return isinstance(instance, cls.value_type)

    class DateTime(metaclass=_Marker):
        """Marker for OCPI DateTime fields; values are aware UTC datetimes."""

        value_type = datetime

    class Number(metaclass=_Marker):
        """Marker for OCPI number fields; values are Decimals."""

        value_type = Decimal

    class Percentage(metaclass=_Marker):
        """Marker for OCPI number fields bounded to [0, 100]; values are Decimals."""

        value_type = Decimal


def json_kind(value: object) -> str:
    """The JSON type name of a decoded value, in msgspec's vocabulary (used in error messages)."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is bool:
        return "bool"
    if kind is int:
        return "int"
    if kind is float or kind is Decimal:
        return "float"
    if kind is str:
        return "str"
    if kind is list:
        return "array"
    if kind is dict:
        return "object"
    return kind.__name__


def check_number(value: object) -> Decimal:
    """Validate a decoded JSON number (int or Decimal) against the project's number policy."""
    if type(value) is int:
        if -_INT_LIMIT < value < _INT_LIMIT:
            return Decimal(value)
        raise ValueError(TOO_LARGE)
    if type(value) is not Decimal:
        raise TypeError(f"Expected `number`, got `{json_kind(value)}`")
    number = value
    if not number.is_finite():
        raise ValueError(NOT_FINITE)
    if not number and number.adjusted() > 0:
        # A zero written with a positive exponent (`0e999999999`): Avro's decimal writer computes
        # 10**(exponent + scale), which for such a zero takes hours and gigabytes. It is just zero.
        return _ZERO
    if number and number.adjusted() >= MAX_INTEGER_DIGITS:
        raise ValueError(TOO_LARGE)
    # Value-based, so trailing zeros are not decimals: 1.50000 passes (and is kept as sent).
    if number.quantize(_FOUR_PLACES, context=_CONTEXT) != number:
        raise ValueError(EXCESS_DECIMALS)
    return number


def float_hook(text: str) -> Decimal:
    """Decode every untyped JSON float exactly; exponents beyond Decimal's range become a validation error."""
    try:
        return Decimal(text)
    except InvalidOperation:
        raise ValueError(OUT_OF_NUMBER_RANGE) from None


def dec_hook(kind: type, value: Any) -> Any:
    """msgspec decode hook for the marker types. Raising ValueError/TypeError yields a path-tagged error."""
    if kind is Number:
        # Inlined fast path for the common case (a valid JSON decimal); check_number explains failures.
        if (
            type(value) is Decimal
            and value.is_finite()
            and value.adjusted() < MAX_INTEGER_DIGITS  # for a zero: its exponent (0E+20 goes the slow path)
            and value.quantize(_FOUR_PLACES, context=_CONTEXT) == value
        ):
            return value
        return check_number(value)
    if kind is DateTime:
        if type(value) is str:
            return parse_datetime(value)
        if isinstance(value, datetime):  # msgspec.convert from Python objects
            if value.tzinfo is None or value.utcoffset() is None:
                raise ValueError("naive datetime: OCPI DateTimes are UTC")
            return value.astimezone(UTC)
        raise TypeError(f"Expected `DateTime`, got `{json_kind(value)}`")
    if kind is Percentage:
        number = check_number(value)
        if not _ZERO <= number <= _HUNDRED:
            raise ValueError(PERCENTAGE_RANGE)
        return number
    raise NotImplementedError(f"no decoder for {kind!r}")
