"""Every field of ocpi-2.2.1-objects.json, one by one, through `ocpi.decode` (test_generated compares the Structs'
declared constraints with the file; this checks what decoding a body does with each field): its length limit
(accepted at the limit, refused one over, at its path), its cardinality (null or absent for `?`/`*`, missing or
`[]` refused for `1`/`+`), every value of its enum and no other, and `#NA` where the spec allows it, in the full
object and in its PATCH variant."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from ocpi import decode
from ocpi._generated import D2_MAX_LENGTH, OBJECTS, OPEN_ENUM_FIELDS, PATCHES
from ocpi.compat import CompatProfile

from .samples import DATETIME, ENUMS, minimal
from .samples import OBJECTS as SPEC_OBJECTS
from .support import assert_invalid, dumps

Field = tuple[str, dict[str, Any]]
# A field a cross-field rule of the minimal object needs (PublishTokenType: uid, and type for uid).
NEEDED_BY_A_RULE = {("PublishTokenType", "uid"), ("PublishTokenType", "type")}
# What another field of the minimal object needs once this one is set (PublishTokenType: visual_number => issuer).
COMPANIONS = {("PublishTokenType", "visual_number"): {"issuer": "x"}}
# A non-credit CDR's id is 36 at most (the Struct's 39 are for credit CDRs: test_invalid).
RULE_LENGTH = {("CDR", "id"): 36}


def _fields(predicate: Any) -> list[Field]:
    return [(name, field) for name, obj in SPEC_OBJECTS.items() if name != "OcpiResponse"
            for field in obj["fields"] if predicate(field)]


def _id(case: Field) -> str:
    return f"{case[0]}.{case[1]['name']}"


def _with(name: str, field: dict[str, Any], value: Any) -> dict[str, Any]:
    body = minimal(name) | COMPANIONS.get((name, field["name"]), {})
    body[field["name"]] = [value] if field["list"] else value
    return body


def _path(field: dict[str, Any]) -> str:
    return f"$.{field['name']}[0]" if field["list"] else f"$.{field['name']}"


def _patch(name: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"last_updated": DATETIME} | body


def _bounded(field: dict[str, Any]) -> bool:
    return field["type"] in ("CiString", "string", "URL") and "max_length" in field and "pattern" not in field


@pytest.mark.parametrize("case", _fields(_bounded), ids=_id)
def test_a_string_field_takes_its_length_and_not_one_more(case: Field) -> None:
    name, field = case
    limit = RULE_LENGTH.get((name, field["name"]),
                            D2_MAX_LENGTH.get(OBJECTS[name], {}).get(field["name"], field["max_length"]))
    fill = "E" if field["name"] == "currency" else "e"  # a currency is an ISO 4217 code (ocpi._validate)
    decode(dumps(_with(name, field, fill * limit)), OBJECTS[name])
    assert_invalid(_with(name, field, fill * (limit + 1)), OBJECTS[name], _path(field), f"longer than {limit}")
    if name in PATCHES:
        patch = PATCHES[name]
        decode(dumps(_patch(name, {field["name"]: _with(name, field, fill * limit)[field["name"]]})), patch)
        assert_invalid(_patch(name, {field["name"]: _with(name, field, fill * (limit + 1))[field["name"]]}), patch,
                       _path(field), f"longer than {limit}")


@pytest.mark.parametrize("case", _fields(lambda f: f["cardinality"] in ("?", "*")), ids=_id)
def test_an_optional_field_may_be_null_or_absent(case: Field) -> None:
    name, field = case
    if (name, field["name"]) in NEEDED_BY_A_RULE:
        return
    body = minimal(name)
    body.pop(field["name"], None)
    decode(dumps(body), OBJECTS[name])
    decode(dumps(body | {field["name"]: None}), OBJECTS[name])
    if field["cardinality"] == "*":
        decode(dumps(body | {field["name"]: []}), OBJECTS[name])


@pytest.mark.parametrize("case", _fields(lambda f: f["cardinality"] in ("1", "+")), ids=_id)
def test_a_required_field_must_be_there_but_not_in_a_patch(case: Field) -> None:
    name, field = case
    body = minimal(name)
    del body[field["name"]]
    assert_invalid(body, OBJECTS[name], f"$.{field['name']}", "missing required field")
    if field["cardinality"] == "+":
        assert_invalid(body | {field["name"]: []}, OBJECTS[name], f"$.{field['name']}", "must not be empty")
    if name in PATCHES and field["name"] != "last_updated":
        decode(dumps(_patch(name, {})), PATCHES[name])
        if field["cardinality"] == "+":
            assert_invalid(_patch(name, {field["name"]: []}), PATCHES[name], f"$.{field['name']}",
                           "must not be empty")


def _enum_fields(field: dict[str, Any]) -> bool:
    return field["kind"] == "enum"


@pytest.mark.parametrize("case", _fields(_enum_fields), ids=_id)
def test_an_enum_field_takes_every_value_of_its_enum_and_no_other(case: Field) -> None:
    name, field = case
    values = ENUMS[field["enum"]]["values"]
    model = OBJECTS[name]
    for value in values:
        if name == "CDR" or (name, field["name"]) == ("CdrDimension", "type"):
            break  # a CDR's dimensions leave out the Session-only ones: test_invalid
        decode(dumps(_with(name, field, value)), model)
    if model in OPEN_ENUM_FIELDS and field["name"] in OPEN_ENUM_FIELDS[model]:
        decode(dumps(_with(name, field, "x-unknown")), model)  # open: unknown values are skipped, not refused
        return
    for other in (values[0].lower(), values[0] + " ", "", "NOT_A_VALUE"):
        if other not in values:
            assert_invalid(_with(name, field, other), model, _path(field), "not one of")


def _na_candidates() -> Iterator[Field]:
    for name, field in _fields(lambda f: f["cardinality"] == "1" and f["type"] in ("CiString", "string")):
        if "pattern" not in field and field.get("max_length", 3) >= 3:
            yield name, field


NA_BY_AGREEMENT = CompatProfile.from_names("NA_IN_ANY_REQUIRED_STRING")


@pytest.mark.parametrize("case", list(_na_candidates()), ids=_id)
def test_na_where_the_spec_allows_it_and_in_any_required_string_by_agreement(case: Field) -> None:
    name, field = case
    bodies = [(OBJECTS[name], _with(name, field, "#NA"))]
    if name in PATCHES:
        bodies.append((PATCHES[name], _patch(name, {field["name"]: "#NA"})))
    for model, body in bodies:
        if field.get("na_allowed"):
            assert decode(dumps(body), model).relaxations == ()
            continue
        if field["name"] == "currency":  # an ISO 4217 code, by agreement or not: billing sums per currency
            assert_invalid(body, model, _path(field), "ISO 4217", profile=NA_BY_AGREEMENT)
            continue
        assert_invalid(body, model, _path(field), "#NA")
        relaxed = decode(dumps(body), model, profile=NA_BY_AGREEMENT)
        assert relaxed.relaxations == (f"NA_IN_ANY_REQUIRED_STRING:{_path(field)}",)


def _scalar(kind: str) -> Any:
    return lambda field: field["kind"] == "primitive" and field["type"] == kind


@pytest.mark.parametrize("case", _fields(_scalar("number")), ids=_id)
def test_a_number_field_takes_four_decimals_and_fourteen_integer_digits(case: Field) -> None:
    name, field = case
    low, high = field.get("minimum"), field.get("maximum")
    if high is not None:  # a percentage: 0 to 100
        decode(dumps(_with(name, field, high)), OBJECTS[name])
        decode(dumps(_with(name, field, low)), OBJECTS[name])
        assert_invalid(_with(name, field, high + 0.0001), OBJECTS[name], _path(field), "between 0 and 100")
    else:
        widest = dumps(_with(name, field, 7.25)).replace(b"7.25", b"-99999999999999.9999")  # exact, not a float
        decode(widest, OBJECTS[name])
        assert_invalid(_with(name, field, 1e14), OBJECTS[name], _path(field), "more than 14 integer digits")
    assert_invalid(_with(name, field, 1.00001), OBJECTS[name], _path(field), "more than 4 decimal places")
    assert_invalid(_with(name, field, "1"), OBJECTS[name], _path(field), "expected a number, got a string")


@pytest.mark.parametrize("case", _fields(_scalar("int")), ids=_id)
def test_an_int_field_takes_its_digits_and_bounds(case: Field) -> None:
    name, field = case
    digits = field.get("max_digits")
    high = min(10**digits - 1 if digits else 2**63 - 1, field.get("maximum", 2**63))
    low = max(-(10**digits - 1) if digits else -(2**63), field.get("minimum", -(2**63) - 1))
    if name == "Connector":  # the store's UInt32 (ocpi._validate)
        low, high = 0, 2**32 - 1
    for value in (low, high):
        decode(dumps(_with(name, field, value)), OBJECTS[name])
    for value in (low - 1, high + 1):
        assert_invalid(_with(name, field, value), OBJECTS[name], _path(field))
    assert_invalid(_with(name, field, 1.5), OBJECTS[name], _path(field), "expected an integer")


@pytest.mark.parametrize("case", _fields(_scalar("DateTime")), ids=_id)
def test_a_datetime_field_takes_utc_with_or_without_z_and_no_offset(case: Field) -> None:
    name, field = case
    for value in ("2015-06-29T20:39:09", "2015-06-29T20:39:09.1234Z", "2015-06-29T20:39:09.12345"):
        decode(dumps(_with(name, field, value)), OBJECTS[name])
    for value, reason in (("2015-06-29T20:39:09+00:00", "numeric offsets"), ("2015-06-29 20:39:09Z", "expected"),
                          ("2015-06-29T20:39:09.12345Z", "longer than 25")):
        assert_invalid(_with(name, field, value), OBJECTS[name], _path(field), reason)
