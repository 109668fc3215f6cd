"""Minimal valid JSON for every object of the spec, built from ocpi-2.2.1-objects.json itself."""

from __future__ import annotations

from typing import Any

from .support import spec

SPEC = spec()
OBJECTS: dict[str, Any] = SPEC["objects"]
ENUMS: dict[str, Any] = SPEC["enums"]

# Values that satisfy a field's own pattern or a cross-field rule of the minimal object.
BY_PATTERN = {
    r"^-?[0-9]{1,2}\.[0-9]{5,7}$": "51.047599",
    r"^-?[0-9]{1,3}\.[0-9]{5,7}$": "3.729944",
    r"^([0-1][0-9]|2[0-3]):[0-5][0-9]$": "08:00",
    r"^([12][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$": "2015-06-29",
    r"^[\x21-\x7E]+$": "token-b",
}
OVERRIDES: dict[str, dict[str, Any]] = {
    "PublishTokenType": {"uid": "012345678", "type": "RFID"},  # at least one of uid/visual_number/group_id
    "RegularHours": {"period_end": "20:00"},  # later than period_begin
    "CdrDimension": {"type": "ENERGY"},  # CURRENT (the first value) is Session-only, invalid in a CDR
}
DATETIME = "2015-06-29T20:39:09Z"


def field_value(field: dict[str, Any]) -> Any:
    kind, typ = field["kind"], field["type"]
    if kind == "class":
        return minimal(field["class"])
    if kind == "enum":
        return ENUMS[field["enum"]]["values"][0]
    if kind == "any":
        return None
    if "pattern" in field:
        return BY_PATTERN[field["pattern"]]
    if field["name"] == "currency":
        return "EUR"  # an ISO 4217 code (ocpi._validate)
    if typ in ("CiString", "string", "URL"):
        return "x"
    if typ == "DateTime":
        return DATETIME
    if typ == "number":
        return 1.5
    if typ == "int":
        return field.get("minimum", 1)
    if typ == "boolean":
        return True
    raise AssertionError(typ)


def minimal(name: str) -> dict[str, Any]:
    """Only the required fields, each with a valid value."""
    result: dict[str, Any] = {}
    for field in OBJECTS[name]["fields"]:
        if field["cardinality"] == "1":
            result[field["name"]] = field_value(field)
        elif field["cardinality"] == "+":
            result[field["name"]] = [field_value(field)]
    result.update(OVERRIDES.get(name, {}))
    return result
