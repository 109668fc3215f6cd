"""One invalid variant per constraint kind for Location, EVSE, Connector and their PATCH bodies: each is
refused with 2001, the field's JSON path and the reason, and nothing is published."""

from __future__ import annotations

import pytest

from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    CONNECTOR_URL,
    EVSE_URL,
    LOCATION_URL,
    PATCHED,
    Pushes,
    Refusal,
    changed,
    check_refusal,
    connector,
    evse,
    location,
    make_pushes_fixture,
    pushes_fixture,
)


def location_patch() -> dict[str, object]:
    return {"name": "Gent Zuid P1", "opening_times": {"twentyfourseven": True}, "last_updated": PATCHED}


def evse_patch() -> dict[str, object]:
    return {"status": "CHARGING", "last_updated": PATCHED}


def connector_patch() -> dict[str, object]:
    return {"tariff_ids": ["12"], "max_voltage": 230, "last_updated": PATCHED}


CASES = [
    # Location (PUT, full object)
    Refusal("Location: missing required field", "PUT", LOCATION_URL, changed(location, "address"),
            "$.address", "missing required field"),
    Refusal("Location: over-long string", "PUT", LOCATION_URL, changed(location, "city", "G" * 46),
            "$.city", "longer than 45 characters"),
    Refusal("Location: bad enum", "PUT", LOCATION_URL, changed(location, "parking_type", "GARAGE"),
            "$.parking_type", "not one of ALONG_MOTORWAY"),
    Refusal("Location: bad DateTime", "PUT", LOCATION_URL,
            changed(location, "last_updated", "2015-06-29T20:39:09+02:00"), "$.last_updated",
            "numeric offsets are not allowed"),
    Refusal("Location: wrong id in the URL", "PUT", LOCATION_URL.replace("LOC1", "LOC9"), location,
            "$.id", "'LOC1' differs from 'LOC9' in the URL"),
    Refusal("Location: empty identity", "PUT", LOCATION_URL, changed(location, "country_code", ""), "$.country_code",
            "empty: an object is named by its owner and id"),
    Refusal("Location: nested bad enum", "PUT", LOCATION_URL,
            changed(location, "evses.1.connectors.0.power_type", "AC_4_PHASE"),
            "$.evses[1].connectors[0].power_type", "not one of AC_1_PHASE"),
    Refusal("Location: CiString with non-ASCII", "PUT", LOCATION_URL, changed(location, "evses.0.evse_id", "BÉ*1"),
            "$.evses[0].evse_id", "printable ASCII"),
    # EVSE
    Refusal("EVSE: missing required field", "PUT", EVSE_URL, changed(evse, "status"), "$.status",
            "missing required field"),
    Refusal("EVSE: over-long string", "PUT", EVSE_URL, changed(evse, "physical_reference", "P" * 17),
            "$.physical_reference", "longer than 16 characters"),
    Refusal("EVSE: bad enum", "PUT", EVSE_URL, changed(evse, "capabilities", ["RESERVABLE", "TELEPORT"]),
            "$.capabilities[1]", "not one of"),
    Refusal("EVSE: bad DateTime", "PUT", EVSE_URL, changed(evse, "last_updated", "2015-02-29T08:12:01Z"),
            "$.last_updated", "not a real calendar date"),
    Refusal("EVSE: wrong id in the URL", "PUT", EVSE_URL.replace("3256", "3257"), evse, "$.uid",
            "'3256' differs from '3257' in the URL"),
    Refusal("EVSE: empty + list", "PUT", EVSE_URL, changed(evse, "connectors", []), "$.connectors",
            "must not be empty"),
    # Connector
    Refusal("Connector: missing required field", "PUT", CONNECTOR_URL, changed(connector, "max_amperage"),
            "$.max_amperage", "missing required field"),
    Refusal("Connector: over-long string", "PUT", CONNECTOR_URL, changed(connector, "tariff_ids", ["T" * 37]),
            "$.tariff_ids[0]", "longer than 36 characters"),
    Refusal("Connector: bad enum", "PUT", CONNECTOR_URL, changed(connector, "standard", "SCHUKO"),
            "$.standard", "not one of"),
    Refusal("Connector: bad DateTime", "PUT", CONNECTOR_URL, changed(connector, "last_updated", "yesterday"),
            "$.last_updated", "invalid DateTime"),
    Refusal("Connector: wrong id in the URL", "PUT", CONNECTOR_URL[:-1] + "2", connector, "$.id",
            "'1' differs from '2' in the URL"),
    Refusal("Connector: wrong type", "PUT", CONNECTOR_URL, changed(connector, "max_voltage", "220"),
            "$.max_voltage", "expected an integer, got a string"),
    # LocationPatch
    Refusal("LocationPatch: missing last_updated", "PATCH", LOCATION_URL, changed(location_patch, "last_updated"),
            "$.last_updated", "missing required field"),
    Refusal("LocationPatch: over-long string", "PATCH", LOCATION_URL, changed(location_patch, "name", "N" * 256),
            "$.name", "longer than 255 characters"),
    Refusal("LocationPatch: bad enum", "PATCH", LOCATION_URL,
            changed(location_patch, "facilities", ["CAFE", "DISCO"]), "$.facilities[1]", "not one of"),
    Refusal("LocationPatch: bad DateTime", "PATCH", LOCATION_URL,
            changed(location_patch, "last_updated", "2019-06-24 12:39:09Z"), "$.last_updated", "invalid DateTime"),
    Refusal("LocationPatch: wrong id in the URL", "PATCH", LOCATION_URL, changed(location_patch, "id", "LOC2"),
            "$.id", "'LOC2' differs from 'LOC1' in the URL"),
    Refusal("LocationPatch: nested rule", "PATCH", LOCATION_URL,
            changed(location_patch, "opening_times", {"twentyfourseven": False}), "$.opening_times.regular_hours",
            "required when twentyfourseven is false"),
    Refusal("LocationPatch: publishes and sets publish_allowed_to", "PATCH", LOCATION_URL,
            changed(changed(location_patch, "publish", True), "publish_allowed_to",
                    [{"uid": "012345678", "type": "RFID"}]),
            "$.publish_allowed_to", "only allowed when publish is false"),
    # EVSEPatch
    Refusal("EVSEPatch: missing last_updated", "PATCH", EVSE_URL, changed(evse_patch, "last_updated"),
            "$.last_updated", "missing required field"),
    Refusal("EVSEPatch: over-long string", "PATCH", EVSE_URL, changed(evse_patch, "floor_level", "12345"),
            "$.floor_level", "longer than 4 characters"),
    Refusal("EVSEPatch: bad enum", "PATCH", EVSE_URL, changed(evse_patch, "status", "CHARGED"), "$.status",
            "not one of AVAILABLE"),
    Refusal("EVSEPatch: bad DateTime", "PATCH", EVSE_URL,
            changed(evse_patch, "last_updated", "2019-06-24T12:39:09.123456Z"), "$.last_updated",
            "more than 5 fractional digits"),
    Refusal("EVSEPatch: wrong id in the URL", "PATCH", EVSE_URL, changed(evse_patch, "uid", "3257"), "$.uid",
            "'3257' differs from '3256' in the URL"),
    # ConnectorPatch
    Refusal("ConnectorPatch: missing last_updated", "PATCH", CONNECTOR_URL,
            changed(connector_patch, "last_updated"), "$.last_updated", "missing required field"),
    Refusal("ConnectorPatch: over-long string", "PATCH", CONNECTOR_URL,
            changed(connector_patch, "terms_and_conditions", "https://x.example/" + "t" * 240),
            "$.terms_and_conditions", "longer than 255 characters"),
    Refusal("ConnectorPatch: bad enum", "PATCH", CONNECTOR_URL, changed(connector_patch, "format", "PLUG"),
            "$.format", "not one of SOCKET, CABLE"),
    Refusal("ConnectorPatch: bad DateTime", "PATCH", CONNECTOR_URL,
            changed(connector_patch, "last_updated", 1561379949), "$.last_updated", "expected"),
    Refusal("ConnectorPatch: wrong id in the URL", "PATCH", CONNECTOR_URL, changed(connector_patch, "id", "9"),
            "$.id", "'9' differs from '1' in the URL"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_invalid_pushes_are_refused_naming_the_field(pushes: Pushes, case: Refusal) -> None:
    check_refusal(pushes, case)


def test_every_object_has_every_constraint_kind() -> None:
    kinds = {"missing", "over-long string", "bad enum", "bad DateTime", "wrong id in the URL"}
    for obj in ("Location", "EVSE", "Connector", "LocationPatch", "EVSEPatch", "ConnectorPatch"):
        names = [case.name.split(": ", 1)[1] for case in CASES if case.name.split(": ")[0] == obj]
        assert {kind for kind in kinds if any(name.startswith(kind) for name in names)} == kinds, obj
