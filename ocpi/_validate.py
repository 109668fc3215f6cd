"""The checks msgspec.Meta cannot express, run on every decoded value after msgspec has validated it.

- the cross-field `constraints` of ocpi-2.2.1-objects.json (CONSTRAINTS maps each rule to its check, and a
  test verifies that every rule of the JSON has one);
- `#NA` only in the fields where the spec allows it (relaxation NA_IN_ANY_REQUIRED_STRING);
- the d2 max lengths of the fields whose Struct accepts the post-d2 errata length (ERRATA_MAX_LENGTH);
- PATCH bodies: explicit null → UNSET, `last_updated` required; a Location PATCH's own `publish: true` with a
  non-empty `publish_allowed_to` breaks the Location's rule whatever is stored;
- `?` fields with a documented default: null → the default.
- a Connector's `max_voltage`/`max_amperage`/`max_electric_power` within 0..2**32-1 (the store's UInt32).
- each EVSE uid once in a Location's `evses`, each Connector id once in an EVSE's `connectors` (CiString).
- the decoded object's `country_code`, `party_id` and `id` not empty (they name it: push URLs, our CDR POST answer).
- a CDR's `charging_periods` at most 65536 (the store numbers them in a UInt16, `cdr_charging_periods`), and its
  `tariffs` at most 65536 of one key (`cdr_tariffs.tariff_occurrence`, a UInt16 too).

The walk only descends into fields that can reach a checked class, so a Session (no cross-field rules)
costs almost nothing. The `#NA` scan needs every string, so it runs only when the body contains a `#` or
a backslash (an escape could spell `#NA`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from functools import cache
from typing import Any, Final, NamedTuple

import msgspec
import msgspec.inspect as mi

from ocpi._generated import (
    CDR,
    D2_MAX_LENGTH,
    NA_ALLOWED,
    NULL_MEANS_DEFAULT,
    OBJECTS,
    PATCHES,
    CdrDimensionType,
    Credentials,
    Hours,
    Location,
    LocationPatch,
    PublishTokenType,
    RegularHours,
    Tariff,
    TariffDimensionType,
)
from ocpi.compat import Relaxation
from ocpi.errors import OcpiValidationError
from ocpi.identity import ci_normalize
from ocpi.types import OcpiObject

NA: Final = "#NA"
_PATCH_TYPES: Final = frozenset(PATCHES.values())
_BASE_OF_PATCH: Final[dict[type, type]] = {patch: OBJECTS[name] for name, patch in PATCHES.items()}


class Context:
    """Per-decode state: the enabled relaxations and the list the applied ones are recorded in."""

    __slots__ = ("applied", "enabled", "scan_na")

    def __init__(self, enabled: frozenset[Relaxation], applied: list[str], *, scan_na: bool) -> None:
        self.enabled = enabled
        self.applied = applied
        self.scan_na = scan_na

    def relax(self, relaxation: Relaxation, path: str) -> bool:
        """Record and allow the relaxation if enabled; the caller raises otherwise."""
        if relaxation in self.enabled:
            record = f"{relaxation.value}:{path}"
            if record not in self.applied:  # recorded already by the repair that made the value checkable
                self.applied.append(record)
            return True
        return False


Check = Callable[[Any, str, Context], None]


# --- cross-field rules (ocpi-2.2.1-objects.json `constraints`) -------------------------------------------

_SESSION_ONLY_DIMENSIONS: Final = frozenset(
    {
        CdrDimensionType.CURRENT,
        CdrDimensionType.ENERGY_EXPORT,
        CdrDimensionType.ENERGY_IMPORT,
        CdrDimensionType.POWER,
        CdrDimensionType.STATE_OF_CHARGE,
    }
)
_RESERVATION_COMPONENTS: Final = frozenset({TariffDimensionType.FLAT, TariffDimensionType.TIME})
_NON_CREDIT_ID_MAX: Final = 36


def _cdr_credit_reference(cdr: CDR, path: str, ctx: Context) -> None:
    # An empty reference names no CDR: the credit could cancel nothing (10 §1.1: it is the original's id).
    if cdr.credit is True and not cdr.credit_reference_id:
        raise OcpiValidationError(f"{path}.credit_reference_id", "required when credit is true")


def _cdr_id_length(cdr: CDR, path: str, ctx: Context) -> None:
    if cdr.credit is not True and len(cdr.id) > _NON_CREDIT_ID_MAX:
        raise OcpiValidationError(
            f"{path}.id", f"longer than {_NON_CREDIT_ID_MAX} characters (only credit CDR ids may have 39)"
        )


def _cdr_session_only_dimensions(cdr: CDR, path: str, ctx: Context) -> None:
    for i, period in enumerate(cdr.charging_periods):
        for j, dimension in enumerate(period.dimensions):
            if dimension.type in _SESSION_ONLY_DIMENSIONS:
                raise OcpiValidationError(
                    f"{path}.charging_periods[{i}].dimensions[{j}].type",
                    f"{dimension.type.value} is a Session-only dimension, not allowed in a CDR",
                )


def _credentials_unique_roles(credentials: Credentials, path: str, ctx: Context) -> None:
    seen: set[tuple[str, str, str]] = set()
    for i, role in enumerate(credentials.roles):
        key = (role.role.value, role.party_id.upper(), role.country_code.upper())
        if key in seen:
            raise OcpiValidationError(f"{path}.roles[{i}]", "duplicate (role, party_id, country_code)")
        seen.add(key)


def _hours_regular_when_not_247(hours: Hours, path: str, ctx: Context) -> None:
    if hours.twentyfourseven is False and not hours.regular_hours:
        raise OcpiValidationError(f"{path}.regular_hours", "required when twentyfourseven is false")


def _hours_no_regular_when_247(hours: Hours, path: str, ctx: Context) -> None:
    if hours.twentyfourseven is True and hours.regular_hours:
        raise OcpiValidationError(f"{path}.regular_hours", "not allowed when twentyfourseven is true")


def _location_publish_allowed_to(location: Location, path: str, ctx: Context) -> None:
    if location.publish is True and location.publish_allowed_to:
        raise OcpiValidationError(f"{path}.publish_allowed_to", "only allowed when publish is false")


def _publish_token_at_least_one(token: PublishTokenType, path: str, ctx: Context) -> None:
    if token.uid is None and token.visual_number is None and token.group_id is None:
        raise OcpiValidationError(path, "needs at least one of uid, visual_number, group_id")


def _publish_token_uid_type(token: PublishTokenType, path: str, ctx: Context) -> None:
    if token.uid is not None and token.type is None:
        raise OcpiValidationError(f"{path}.type", "required when uid is set")


def _publish_token_visual_number_issuer(token: PublishTokenType, path: str, ctx: Context) -> None:
    if token.visual_number is not None and token.issuer is None:
        raise OcpiValidationError(f"{path}.issuer", "required when visual_number is set")


def _regular_hours_order(hours: RegularHours, path: str, ctx: Context) -> None:
    # HH:MM with leading zeros (enforced by the pattern) orders correctly as text.
    if hours.period_end <= hours.period_begin:
        raise OcpiValidationError(f"{path}.period_end", "must be later than period_begin")


def _tariff_reservation_components(tariff: Tariff, path: str, ctx: Context) -> None:
    for i, element in enumerate(tariff.elements):
        if element.restrictions is None or element.restrictions.reservation is None:
            continue
        for j, component in enumerate(element.price_components):
            if component.type not in _RESERVATION_COMPONENTS:
                raise OcpiValidationError(
                    f"{path}.elements[{i}].price_components[{j}].type",
                    "only FLAT and TIME are allowed in an element restricted to reservations",
                )


# (object, rule text exactly as in ocpi-2.2.1-objects.json) → check.
CONSTRAINTS: Final[dict[tuple[str, str], Check]] = {
    ("CDR", "credit == true => credit_reference_id required"): _cdr_credit_reference,
    ("CDR", "id max 36 characters unless credit == true"): _cdr_id_length,
    (
        "CDR",
        "charging_periods[].dimensions[].type must not be a session-only CdrDimensionType",
    ): _cdr_session_only_dimensions,
    ("Credentials", "each role unique by (role, party_id, country_code)"): _credentials_unique_roles,
    (
        "Hours",
        "regular_hours only when twentyfourseven == false, and then at least one entry",
    ): _hours_regular_when_not_247,
    ("Hours", "regular_hours forbidden when twentyfourseven == true"): _hours_no_regular_when_247,
    ("Location", "publish_allowed_to only allowed when publish == false"): _location_publish_allowed_to,
    ("PublishTokenType", "at least one of uid, visual_number, group_id"): _publish_token_at_least_one,
    ("PublishTokenType", "uid set => type set"): _publish_token_uid_type,
    ("PublishTokenType", "visual_number set => issuer set"): _publish_token_visual_number_issuer,
    ("RegularHours", "period_end later than period_begin"): _regular_hours_order,
    (
        "Tariff",
        "a TariffElement whose restrictions.reservation is set may only have FLAT and TIME price components",
    ): _tariff_reservation_components,
}

_CLASSES: Final[dict[str, type[OcpiObject]]] = {
    "CDR": CDR,
    "Credentials": Credentials,
    "Hours": Hours,
    "Location": Location,
    "PublishTokenType": PublishTokenType,
    "RegularHours": RegularHours,
    "Tariff": Tariff,
}


def _errata_lengths(obj: Any, path: str, ctx: Context) -> None:
    for name, limit in D2_MAX_LENGTH[type(obj)].items():
        value = getattr(obj, name)
        if type(value) is not str or len(value) <= limit:
            continue
        if not ctx.relax(Relaxation.ERRATA_MAX_LENGTH, f"{path}.{name}"):
            raise OcpiValidationError(f"{path}.{name}", f"longer than {limit} characters")


# --- the walk ---------------------------------------------------------------------------------------------


class _Plan(NamedTuple):
    checks: tuple[Check, ...]
    checked_children: tuple[tuple[str, bool], ...]  # (field, is_list) that can reach a check
    all_children: tuple[tuple[str, bool], ...]
    strings: tuple[tuple[str, bool, bool], ...]  # (field, is_list, required in the full object)


# ISO 4217 alphabetic codes are three upper-case letters. The model only says string(3); billing sums per currency,
# so an original in "eur" and its credit in "EUR" (or a currency "E") would never net: refused instead.
_ISO_4217: Final = re.compile(r"[A-Z]{3}")


def _iso_4217_currency(obj: Any, path: str, ctx: Context) -> None:
    currency = obj.currency
    if type(currency) is str and _ISO_4217.fullmatch(currency) is None:
        raise OcpiValidationError(f"{path}.currency", "not an ISO 4217 currency code (three upper-case letters)")


# A Connector's ratings are OCPI `int`s, stored in UInt32 columns (`connectors`): a negative value would make
# ClickHouse refuse the insert of its whole batch (retried forever), a larger one would be stored wrapped.
_RATINGS: Final = ("max_voltage", "max_amperage", "max_electric_power")
_UINT32_MAX: Final = 2**32 - 1


def _location_tree(value: Any) -> None:
    """The store's rules of the Location tree, checked in one pass from whichever of its objects was pushed:
    a Location lists each EVSE uid once and an EVSE each Connector id once (CiString identities: one listed
    twice would be two objects under one identity, one row, one GET answer, PATCHes reaching only the first),
    and a Connector's ratings fit the store. Plain loops, with a path built only for an error: walking the tree
    object by object for these cost every EVSE status push several µs (each re-validates its whole Location)."""
    fields = getattr(type(value), "__struct_fields__", ())
    if "evses" in fields:
        evses = value.evses
        if type(evses) is list:
            _unique_ids(evses, "uid", "$.evses")
            for i, evse in enumerate(evses):
                connectors = evse.connectors
                # The usual EVSE, one Connector that fits, needs no path (this runs for every EVSE status push).
                if type(connectors) is list and (len(connectors) > 1 or not all(map(_fits, connectors))):
                    _evse_tree(evse, f"$.evses[{i}]")
    elif "connectors" in fields:
        _evse_tree(value, "$")
    elif "max_voltage" in fields:
        _connector_ratings([value], None)


def _evse_tree(evse: Any, path: str) -> None:
    connectors = evse.connectors
    if type(connectors) is list:
        _unique_ids(connectors, "id", path + ".connectors")
        _connector_ratings(connectors, path)


def _storable(rating: Any) -> bool:
    """Whether a Connector rating fits the store's UInt32 column (a value not an int is the decoder's to judge)."""
    return type(rating) is not int or 0 <= rating <= _UINT32_MAX


def _fits(connector: Any) -> bool:
    return (_storable(connector.max_voltage) and _storable(connector.max_amperage)
            and _storable(connector.max_electric_power))


def _connector_ratings(connectors: list[Any], evse_path: str | None) -> None:
    """The Connectors of the EVSE at `evse_path`, or (None) one Connector pushed on its own."""
    for i, connector in enumerate(connectors):
        for name in _RATINGS:
            if not _storable(getattr(connector, name)):
                where = "$" if evse_path is None else f"{evse_path}.connectors[{i}]"
                raise OcpiValidationError(f"{where}.{name}", f"out of range: 0 to {_UINT32_MAX} (not storable)")


def _unique_ids(items: list[Any], attribute: str, path: str) -> None:
    """Each item's `attribute` (a CiString identity) differs from the others' ignoring case."""
    if len(items) < 2:
        return
    keys = [ci_normalize(getattr(item, attribute)) for item in items]
    if len(set(keys)) == len(keys):
        return
    seen: set[str] = set()
    for i, key in enumerate(keys):
        if key in seen:
            raise OcpiValidationError(f"{path}[{i}].{attribute}", f"{getattr(items[i], attribute)!r} is listed "
                                                                  f"twice ({attribute} is the identity, CiString)")
        seen.add(key)


# A CDR may give an unknown start or end as the Unix epoch only where both parties agreed (10 §4): accepted blindly,
# such a CDR would be billed on 1970-01-01, outside every billing period, with no word to the CPO.
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)


def _cdr_epoch_times(cdr: CDR, path: str, ctx: Context) -> None:
    for name in ("start_date_time", "end_date_time"):
        if getattr(cdr, name) == _EPOCH and not ctx.relax(Relaxation.EPOCH_UNKNOWN_TIME, f"{path}.{name}"):
            raise OcpiValidationError(f"{path}.{name}", "the Unix epoch (an unknown time) is accepted only by "
                                                        "agreement with the partner (relaxation EPOCH_UNKNOWN_TIME)")


_IDENTITY: Final = ("country_code", "party_id", "id")


def _identity_present(value: Any) -> None:
    """An object that carries its identity (a Location, Session, CDR or Tariff, or a PATCH that repeats it) has none
    of its parts empty: it is named by them, in a push's URL (which cannot hold an empty segment:
    `receivers.pushes.check_url_ids`) and in the URL a CDR POST's answer names (`.../cdrs/BE/BEC/` reads nothing; a
    second CDR without an id would conflict with the first, which CDRs being immutable keeps, and never be billed).
    A pulled object is named by nothing else. Only the decoded object itself: a copy in another (a CDR's `tariffs`)
    is named by the object it is in."""
    fields = getattr(type(value), "__struct_fields__", ())
    if "id" not in fields or "country_code" not in fields or "party_id" not in fields:
        return
    for name in _IDENTITY:
        if getattr(value, name) == "":
            raise OcpiValidationError(f"$.{name}", "empty: an object is named by its owner and id, none of which "
                                                   "may be empty")


# `cdr_charging_periods` numbers a CDR's periods in a UInt16 column that is part of its key: the 65537th period was
# stored as period 0 again and replaced it, so periods were lost without a word. A pushed CDR cannot have that many
# (the 4 MB body limit holds about 50,000), a pulled one can (a page may be 64 MB).
_CDR_PERIODS_MAX: Final = 2**16


def _cdr_periods_storable(cdr: CDR, path: str, ctx: Context) -> None:
    periods = cdr.charging_periods
    if type(periods) is list and len(periods) > _CDR_PERIODS_MAX:
        raise OcpiValidationError(f"{path}.charging_periods[{_CDR_PERIODS_MAX}]",
                                  f"more than {_CDR_PERIODS_MAX} charging periods (not storable)")


# `cdr_tariffs` numbers the Tariffs of one key (country code, party id, id, as CiStrings) in a UInt16 column of its
# key (`tariff_occurrence`, 0026): the 65537th of a key was stored as occurrence 0 again and replaced the first.
_CDR_TARIFFS_OF_A_KEY_MAX: Final = 2**16


def _cdr_tariffs_storable(cdr: CDR, path: str, ctx: Context) -> None:
    tariffs = cdr.tariffs
    if type(tariffs) is not list or len(tariffs) <= _CDR_TARIFFS_OF_A_KEY_MAX:
        return  # no key can have more (the usual CDR: a few Tariffs, never counted)
    seen: dict[tuple[str, str, str], int] = {}
    for i, tariff in enumerate(tariffs):
        key = (ci_normalize(tariff.country_code), ci_normalize(tariff.party_id), ci_normalize(tariff.id))
        seen[key] = seen.get(key, 0) + 1
        if seen[key] > _CDR_TARIFFS_OF_A_KEY_MAX:
            raise OcpiValidationError(f"{path}.tariffs[{i}]", f"more than {_CDR_TARIFFS_OF_A_KEY_MAX} Tariffs of one "
                                      "key (country_code, party_id, id): not storable")


def _checks_of(cls: type) -> tuple[Check, ...]:
    checks = [check for (name, _), check in CONSTRAINTS.items() if _CLASSES[name] is cls]
    if cls is CDR:
        checks.append(_cdr_epoch_times)
        checks.append(_cdr_periods_storable)
        checks.append(_cdr_tariffs_storable)
    if cls is LocationPatch:
        # The Location's rule on what a PATCH sets itself: `publish: true` with a non-empty `publish_allowed_to`
        # is invalid whatever is stored, so no merge could apply it (either field alone is the merge's to judge).
        checks.append(_location_publish_allowed_to)
    if cls in D2_MAX_LENGTH:
        checks.append(_errata_lengths)
    if "currency" in getattr(cls, "__struct_fields__", ()):
        checks.append(_iso_4217_currency)
    return tuple(checks)


def _unwrap(kind: mi.Type) -> mi.Type:
    if isinstance(kind, mi.UnionType):
        members = [k for k in kind.types if not isinstance(k, mi.NoneType)]
        return members[0] if len(members) == 1 else kind
    return kind


def _struct_children(cls: type) -> Iterator[tuple[str, bool, type]]:
    for field in _struct_info(cls).fields:
        kind = _unwrap(field.type)
        if isinstance(kind, mi.ListType) and isinstance(kind.item_type, mi.StructType):
            yield field.name, True, kind.item_type.cls
        elif isinstance(kind, mi.StructType):
            yield field.name, False, kind.cls


@cache
def _struct_info(cls: type) -> mi.StructType:
    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    return info


@cache
def _reaches_check(cls: type) -> bool:
    return bool(_checks_of(cls)) or any(_reaches_check(child) for _, _, child in _struct_children(cls))


@cache
def plan(cls: type) -> _Plan:
    base = _BASE_OF_PATCH.get(cls, cls)
    required = {f.name for f in _struct_info(base).fields if f.required}
    strings = []
    for field in _struct_info(cls).fields:
        kind = _unwrap(field.type)
        if isinstance(kind, mi.StrType):
            strings.append((field.name, False, field.name in required))
        elif isinstance(kind, mi.ListType) and isinstance(kind.item_type, mi.StrType):
            strings.append((field.name, True, False))
    children = list(_struct_children(cls))
    return _Plan(
        checks=_checks_of(cls),
        checked_children=tuple((name, is_list) for name, is_list, child in children if _reaches_check(child)),
        all_children=tuple((name, is_list) for name, is_list, _ in children),
        strings=tuple(strings),
    )


def walk(value: Any, path: str, ctx: Context) -> None:
    if type(value) is list:
        for i, item in enumerate(value):
            walk(item, f"{path}[{i}]", ctx)
        return
    if not isinstance(value, OcpiObject):
        return
    cls = type(value)
    p = plan(cls)
    for check in p.checks:
        check(value, path, ctx)
    if ctx.scan_na:
        _check_na(value, cls, path, p, ctx)
    for name, is_list in p.all_children if ctx.scan_na else p.checked_children:
        child = getattr(value, name)
        if child is None or child is msgspec.UNSET:
            continue
        if is_list:
            for i, item in enumerate(child):
                walk(item, f"{path}.{name}[{i}]", ctx)
        else:
            walk(child, f"{path}.{name}", ctx)


def _check_na(value: Any, cls: type, path: str, p: _Plan, ctx: Context) -> None:
    allowed = NA_ALLOWED.get(cls, frozenset())
    for name, is_list, required in p.strings:
        field_value = getattr(value, name)
        if is_list:
            if type(field_value) is list and NA in field_value:
                raise OcpiValidationError(f"{path}.{name}[{field_value.index(NA)}]", _NA_REASON)
        elif (
            field_value == NA
            and name not in allowed
            and not (required and ctx.relax(Relaxation.NA_IN_ANY_REQUIRED_STRING, f"{path}.{name}"))
        ):
            raise OcpiValidationError(f"{path}.{name}", _NA_REASON)


_NA_REASON: Final = (
    "#NA is only allowed where the spec names it (a reservation's evse_uid/evse_id/connector_id)"
)


def finish(value: Any, enabled: frozenset[Relaxation], applied: list[str], *, scan_na: bool) -> Any:
    """Normalise and check a value msgspec has decoded; returns the (possibly replaced) value."""
    value = normalise(value)
    walk(value, "$", Context(enabled, applied, scan_na=scan_na))
    _location_tree(value)
    _identity_present(value)
    return value


def normalise(value: Any) -> Any:
    """The top-level rules that replace values: a PATCH's nulls mean absent, some nulls mean a default."""
    cls = type(value)
    if cls in _PATCH_TYPES:
        nulls = {name: msgspec.UNSET for name in value.__struct_fields__ if getattr(value, name) is None}
        if nulls:
            value = msgspec.structs.replace(value, **nulls)
        if value.last_updated is msgspec.UNSET:
            raise OcpiValidationError("$.last_updated", "missing required field")
    defaults = NULL_MEANS_DEFAULT.get(cls)
    if defaults:
        missing = {name: default for name, default in defaults.items() if getattr(value, name) is None}
        if missing:
            value = msgspec.structs.replace(value, **missing)
    return value
