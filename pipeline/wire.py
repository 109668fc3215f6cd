"""OCPI JSON for decoded payloads and stored objects, and the Structs they convert to/from (no I/O).

Payloads come from `infra.codec.decode_event` as dicts (nulls left out, aware UTC datetimes, exact Decimals).
Stored objects are kept as OCPI wire JSON (what the receivers' GET serves); they were validated before they
were stored, so reading them back (`stored`) checks types only, while every new or merged object goes through
the full `ocpi.decode` rules (`revalidated`: the same result as decoding its JSON with `validated`).
"""

from __future__ import annotations

import re
from datetime import datetime
from decimal import Decimal
from typing import Any, Final, Generic, TypeVar

import msgspec

from ocpi.canonical import to_ocpi_json
from ocpi.compat import RECHECK
from ocpi.datetime import format_exact_datetime
from ocpi.decode import decode, decode_stored, validate_built
from ocpi.types import dec_hook

T = TypeVar("T")

_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")
# msgspec writes a non-zero fraction with 6 digits, which can exceed OCPI's 25 characters: such documents take
# the exact (slower) path through format_exact_datetime. A string value that merely looks like one only costs time.
_SUBSECOND: Final = re.compile(rb'T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z"')


def ocpi_json(payload: Any) -> bytes:
    """OCPI wire JSON of a decoded payload (dicts/lists/datetimes/Decimals): `Z` DateTimes, exact numbers."""
    data = _ENCODER.encode(payload)
    if _SUBSECOND.search(data) is None:
        return data
    return _ENCODER.encode(_wire(payload))


def _wire(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _wire(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_wire(v) for v in value]
    if isinstance(value, datetime):
        return format_exact_datetime(value)
    return value


def to_struct(payload: dict[str, Any], model: type[T]) -> T:
    """A decoded payload as an OCPI Struct (types and field constraints checked by msgspec)."""
    return msgspec.convert(payload, model, dec_hook=dec_hook)


def stored(document: bytes, model: type[T]) -> T:
    """A stored object (validated when it was stored) as a Struct again."""
    return decode_stored(document, model)


class StoredStruct(Generic[T]):
    """A stored object as a Struct, decoded from its JSON once for a run of events on that object.

    An applied event leaves here the Struct it produced with the JSON it stored; that Struct is what the JSON
    decodes to (`revalidated`), so the run's next event starts from it instead of decoding the whole object
    again: a hub's many EVSE status updates, a backlog of one Session's PATCHes.
    """

    __slots__ = ("_document", "_model", "_value")

    def __init__(self, model: type[T]) -> None:
        self._model = model
        self._document: bytes | None = None
        self._value: T | None = None

    def of(self, document: bytes | None) -> T | None:
        """The Struct of `document` (None for None)."""
        if document is None:
            return None
        if document is not self._document:  # the same bytes object: the JSON kept with the Struct
            self._document, self._value = document, stored(document, self._model)
        return self._value

    def keep(self, document: bytes, value: T) -> None:
        """`value` is the Struct of `document` (as `revalidated` returned them)."""
        self._document, self._value = document, value


def validated(document: bytes, model: type[T]) -> T:
    """Decode and validate stored OCPI JSON (the full `ocpi.decode` rules); OcpiValidationError if invalid.
    Values the receivers accepted as they are under their partner's profile are accepted again (`RECHECK`)."""
    return decode(document, model, profile=RECHECK).value


def struct_json(value: Any) -> bytes:
    """OCPI wire JSON of a Struct: the same bytes as `ocpi.canonical.to_ocpi_json`, written by msgspec in C
    unless a DateTime has a fraction, which takes `to_ocpi_json`'s exact path."""
    return _struct_json(value)[0]


def _struct_json(value: Any) -> tuple[bytes, bool]:
    """The OCPI JSON of a Struct, and whether it is its exact image (decoding it gives back an equal Struct).
    Not when a DateTime has a fraction: OCPI's 25 characters leave room for four digits, not six."""
    data = _ENCODER.encode(_without_nulls(value))
    if _SUBSECOND.search(data) is not None:
        return to_ocpi_json(value), False
    return data, True


def _without_nulls(value: Any) -> Any:
    """`value` as msgspec writes it without null members. OCPI Structs omit their None fields themselves
    (`omit_defaults`), except the few with a documented non-null default (a Location): their own None fields are
    set to UNSET, which msgspec never writes; what they hold omits its Nones."""
    cls = type(value)
    if cls.__struct_config__.omit_defaults:
        return value
    nulls = {name: msgspec.UNSET for name in cls.__struct_fields__ if getattr(value, name) is None}
    return msgspec.structs.replace(value, **nulls) if nulls else value


def revalidated(value: T, model: type[T], encoded: tuple[bytes, bool] | None = None) -> tuple[T, bytes]:
    """A merged or converted object validated as `validated(struct_json(value), model)` would, and its OCPI JSON.

    Its parts passed msgspec's checks already, so when the JSON is an exact image only the rule walk runs
    (`ocpi.decode.validate_built`); otherwise the JSON is decoded with the full rules, as received objects are.
    `encoded`: the value's JSON and exactness, when the caller has them (`EvseJson`). OcpiValidationError if
    invalid.
    """
    document, exact = encoded or _struct_json(value)
    if not exact:
        return validated(document, model), document
    return validate_built(value, document, profile=RECHECK), document


class _Evses(msgspec.Struct):
    evses: list[msgspec.Raw] | None = None


_EVSES: Final = msgspec.json.Decoder(_Evses)  # a Location document's EVSEs as their JSON text, the rest skipped


class EvseJson:
    """The OCPI JSON of a run of one Location's trees, each EVSE's JSON reused while the EVSE is unchanged.

    An EVSE or Connector event replaces one EVSE object and keeps the others, so the tree's JSON is the Location's
    own fields with the EVSEs' JSON spliced in: only the changed EVSE is encoded and searched for DateTime
    fractions, not the whole tree (a hub has dozens of EVSEs).
    The same bytes as `struct_json`: an EVSE's JSON is the same alone or in its tree, and `"evses":[]` can only be
    the Location's own member (no other OCPI object has one, and a string cannot hold an unescaped quote).
    """

    __slots__ = ("_known", "_whole")

    _EMPTY: Final = b'"evses":[]'

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, bytes, bool]] = {}  # id(EVSE) -> (the EVSE, kept alive; JSON; exact)
        self._whole: tuple[Any, bytes] | None = None  # a tree encoded whole, and its exact JSON, not split yet

    def encode(self, location: Any) -> tuple[bytes, bool]:
        """`_struct_json(location)`: its JSON, and whether that is an exact image."""
        evses = location.evses
        if not evses:
            return _struct_json(location)
        if self._whole is not None:  # a second tree came: split the first one's JSON into its EVSEs'
            self._learn(*self._whole)
        if not any(id(evse) in self._known for evse in evses):  # nothing to reuse: the tree is encoded whole
            document, exact = _struct_json(location)
            self._known, self._whole = {}, (location, document) if exact else None
            return document, exact
        own, exact = _struct_json(msgspec.structs.replace(location, evses=[]))
        known: dict[int, tuple[Any, bytes, bool]] = {}
        parts = []
        for evse in evses:
            entry = self._known.get(id(evse))
            if entry is None or entry[0] is not evse:
                entry = (evse, *_struct_json(evse))
            known[id(evse)] = entry
            parts.append(entry[1])
            exact = exact and entry[2]
        self._known = known
        if not exact:
            return to_ocpi_json(location), False
        return own.replace(self._EMPTY, b'"evses":[' + b",".join(parts) + b"]", 1), True

    def _learn(self, location: Any, document: bytes) -> None:
        """Each EVSE's JSON out of its tree's exact JSON (the same text `_struct_json` gives the EVSE alone)."""
        self._whole = None
        texts = _EVSES.decode(document).evses or []
        self._known = {id(evse): (evse, bytes(text), True) for evse, text in zip(location.evses, texts, strict=True)}


def builtins(value: Any) -> Any:
    """A Struct as the same builtins a decoded payload has (datetimes and Decimals kept, unset fields dropped)."""
    return msgspec.to_builtins(value, builtin_types=(datetime, Decimal))
