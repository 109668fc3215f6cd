"""Every official example decodes (or, for the two known-invalid ones, fails naming the field)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from ocpi import Decoded, OcpiValidationError, decode, decode_list
from ocpi.model import (
    CDR,
    EVSE,
    Credentials,
    DisplayText,
    EnergyMix,
    EVSEPatch,
    Hours,
    Location,
    LocationPatch,
    OcpiResponse,
    Session,
    SessionPatch,
    SessionStatus,
    Status,
    Tariff,
    Version,
    VersionDetails,
)

from .support import EXAMPLES, dumps, example

# file → (model, key of the fragment inside the file or None for the whole file)
WHOLE: dict[str, type] = {
    "credentials_example.json": Credentials,
    "credentials_example2.json": Credentials,
    "credentials_example3.json": Credentials,
    "credentials_example4.json": Credentials,
    "location_example.json": Location,
    "location_example_uc2_destination_charger.json": Location,
    "location_example_uc3_destination_charger_not_published.json": Location,
    "location_example_uc5_home_charge_point.json": Location,
    "location_hours_247_open_exception_closing.json": Hours,
    "location_hours_opening_hours_with_exceptional_closing.json": Hours,
    "location_patch_example_location.json": LocationPatch,
    "location_patch_example_status.json": EVSEPatch,
    "session_example_2_short_finished.json": Session,
    "session_patch_example_total_cost.json": SessionPatch,
    "type_displaytext_example.json": DisplayText,
    "version_details_example.json": VersionDetails,
    "version_details_example2.json": VersionDetails,
    "transport_and_format_get_token_example.json": OcpiResponse,
    "transport_and_format_get_token_list_example.json": OcpiResponse,
    "transport_and_format_version_details_example.json": OcpiResponse,
    "transport_and_format_version_info_example.json": OcpiResponse,
}
FRAGMENTS: dict[str, tuple[str, type]] = {
    "location_energymix_example_complete.json": ("energy_mix", EnergyMix),
    "location_energymix_example_energy_provider.json": ("energy_mix", EnergyMix),
    "location_energymix_example_simple.json": ("energy_mix", EnergyMix),
    "location_regularhours_example.json": ("opening_times", Hours),
}
LISTS: dict[str, type] = {"versions_info_example.json": Version}
INVALID: dict[str, tuple[type, str]] = {
    # 00-README: not a valid EVSE (connector lacks power_type, max_voltage, ...; physical_reference a number).
    "location_put_example_add_evse.json": (EVSE, "$.connectors[0].power_type"),
    # 00-README: lacks the required last_updated.
    "tariff_put_example.json": (Tariff, "$.last_updated"),
}
TARIFFS = sorted(p.name for p in EXAMPLES.glob("tariff*.json") if p.name not in INVALID)


def test_every_example_file_is_covered() -> None:
    covered = set(WHOLE) | set(FRAGMENTS) | set(LISTS) | set(INVALID) | set(TARIFFS)
    assert {p.name for p in EXAMPLES.glob("*.json")} == covered


@pytest.mark.parametrize("name", sorted(WHOLE))
def test_example_decodes(name: str) -> None:
    decoded: Decoded[Any] = decode((EXAMPLES / name).read_bytes(), WHOLE[name])
    assert decoded.relaxations == ()


@pytest.mark.parametrize("name", TARIFFS)
def test_tariff_example_decodes(name: str) -> None:
    tariff = decode((EXAMPLES / name).read_bytes(), Tariff).value
    assert tariff.elements


@pytest.mark.parametrize("name", sorted(FRAGMENTS))
def test_fragment_example_decodes(name: str) -> None:
    key, model = FRAGMENTS[name]
    decode(dumps(example(name)[key]), model)


def test_version_list_examples_decode() -> None:
    results = decode_list((EXAMPLES / "versions_info_example.json").read_bytes(), Version)
    assert [r.value.version for r in results if isinstance(r, Decoded)] == ["2.1.1", "2.2.1"]
    envelope = decode(
        (EXAMPLES / "transport_and_format_version_info_example.json").read_bytes(), OcpiResponse
    )
    assert all(isinstance(r, Decoded) for r in decode_list(msgspec.json.encode(envelope.value.data), Version))
    details = decode(
        (EXAMPLES / "transport_and_format_version_details_example.json").read_bytes(), OcpiResponse
    )
    assert decode(msgspec.json.encode(details.value.data), VersionDetails).value.version == "2.2"


@pytest.mark.parametrize("name", sorted(INVALID))
def test_invalid_examples_fail_naming_the_field(name: str) -> None:
    model, path = INVALID[name]
    with pytest.raises(OcpiValidationError) as info:
        decode((EXAMPLES / name).read_bytes(), model)
    assert info.value.path == path
    assert info.value.reason == "missing required field"
    assert info.value.status == 2001


def test_session_example_values() -> None:
    session = decode((EXAMPLES / "session_example_2_short_finished.json").read_bytes(), Session).value
    assert session.kwh == Decimal("41.12") and type(session.kwh) is Decimal
    assert session.start_date_time == datetime(2015, 6, 29, 22, 39, 9, tzinfo=UTC)
    assert session.status is SessionStatus.COMPLETED
    assert session.charging_periods is not None
    assert session.charging_periods[2].dimensions[0].volume == Decimal("0.718")
    assert session.charging_periods[2].tariff_id == "12"
    assert session.total_cost is not None and session.total_cost.excl_vat == Decimal("8.50")


def test_location_example_values() -> None:
    location = decode((EXAMPLES / "location_example.json").read_bytes(), Location).value
    assert location.charging_when_closed is True  # spec default when absent
    assert location.evses is not None and location.evses[1].status is Status.RESERVED
    assert location.evses[0].connectors[1].tariff_ids == ["13"]
    assert location.last_updated.tzinfo is UTC


def test_patch_examples_only_set_what_was_sent() -> None:
    patch = decode((EXAMPLES / "location_patch_example_status.json").read_bytes(), EVSEPatch).value
    assert patch.status is Status.CHARGING
    sent = {name for name in patch.__struct_fields__ if getattr(patch, name) is not msgspec.UNSET}
    assert sent == {"status", "last_updated"}


def test_cdr_from_the_digest_decodes() -> None:
    """A complete CDR (10-cdrs.md example shape) decodes, with exact numbers."""
    cdr = decode(dumps(_cdr()), CDR).value
    assert cdr.total_cost.incl_vat == Decimal("4.41")
    assert cdr.cdr_location.evse_id == "NL*CPX*E0000009001"


def _cdr() -> dict[str, Any]:
    return {
        "country_code": "BE",
        "party_id": "BEC",
        "id": "12345",
        "start_date_time": "2015-06-29T21:39:09Z",
        "end_date_time": "2015-06-29T23:37:32Z",
        "cdr_token": {
            "country_code": "DE",
            "party_id": "TNM",
            "uid": "012345678",
            "type": "RFID",
            "contract_id": "DE8ACC12E46L89",
        },
        "auth_method": "WHITELIST",
        "cdr_location": {
            "id": "LOC1",
            "name": "Gent Zuid",
            "address": "F.Rooseveltlaan 3A",
            "city": "Gent",
            "postal_code": "9000",
            "country": "BEL",
            "coordinates": {"latitude": "3.729944", "longitude": "51.047599"},
            "evse_uid": "E-9-1",
            "evse_id": "NL*CPX*E0000009001",
            "connector_id": "1",
            "connector_standard": "IEC_62196_T2",
            "connector_format": "SOCKET",
            "connector_power_type": "AC_1_PHASE",
        },
        "currency": "EUR",
        "tariffs": [
            {
                "country_code": "BE",
                "party_id": "BEC",
                "id": "12",
                "currency": "EUR",
                "elements": [
                    {"price_components": [{"type": "TIME", "price": 2.00, "vat": 10.0, "step_size": 300}]}
                ],
                "last_updated": "2015-02-02T14:15:01Z",
            }
        ],
        "charging_periods": [
            {
                "start_date_time": "2015-06-29T21:39:09Z",
                "dimensions": [{"type": "TIME", "volume": 1.973}],
                "tariff_id": "12",
            }
        ],
        "total_cost": {"excl_vat": 4.00, "incl_vat": 4.41},
        "total_energy": 15.342,
        "total_time": 1.973,
        "total_time_cost": {"excl_vat": 4.00, "incl_vat": 4.40},
        "last_updated": "2015-06-29T22:01:13Z",
    }


def test_null_means_the_documented_default() -> None:
    body = example("location_example.json") | {"charging_when_closed": None}
    assert decode(dumps(body), Location).value.charging_when_closed is True
    assert decode(dumps(body | {"charging_when_closed": False}), Location).value.charging_when_closed is False


def test_decode_list_keeps_going_past_bad_elements() -> None:
    good = example("location_example.json")
    bad = copy.deepcopy(good)
    bad["evses"][1]["uid"] = "u" * 37
    results = decode_list(dumps([good, bad, good]), Location)
    assert [type(r).__name__ for r in results] == ["Decoded", "OcpiValidationError", "Decoded"]
    error = results[1]
    assert isinstance(error, OcpiValidationError) and error.path == "$[1].evses[1].uid"
    with pytest.raises(OcpiValidationError) as info:
        decode_list(b'{"not": "a list"}', Location)
    assert info.value.path == "$"
