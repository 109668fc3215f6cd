"""Compatibility relaxations: each one applied and recorded when enabled, and rejected when not."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from ocpi import STRICT, CompatProfile, Decoded, Relaxation, compat, content_hash, decode
from ocpi.model import CDR, EVSE, CdrLocation, Connector, Location, Session, SessionPatch, SignedValue

from .samples import minimal
from .support import REPO, assert_invalid, dumps, example

SESSION = example("session_example_2_short_finished.json")
LOCATION = example("location_example.json")


def _session(**changes: Any) -> dict[str, Any]:
    return copy.deepcopy(SESSION) | changes


def _connector_tariffs(tariff_ids: list[Any]) -> dict[str, Any]:
    location = copy.deepcopy(LOCATION)
    location["evses"][0]["connectors"][0]["tariff_ids"] = tariff_ids
    return location


# relaxation → (model, broken body, strict error path, expected records, check of the repaired value)
CASES: dict[Relaxation, tuple[type, dict[str, Any], str, list[str], Any]] = {
    Relaxation.NULL_IN_LIST: (
        Location,
        _connector_tariffs(["11", None, None]),
        "$.evses[0].connectors[0].tariff_ids[1]",
        ["NULL_IN_LIST:$.evses[0].connectors[0].tariff_ids"],
        lambda v: v.evses[0].connectors[0].tariff_ids == ["11"],
    ),
    Relaxation.NUMBER_AS_STRING: (
        Location,
        _connector_tariffs([11, 12.50]),
        "$.evses[0].connectors[0].tariff_ids[0]",
        [
            "NUMBER_AS_STRING:$.evses[0].connectors[0].tariff_ids[0]",
            "NUMBER_AS_STRING:$.evses[0].connectors[0].tariff_ids[1]",
        ],
        lambda v: v.evses[0].connectors[0].tariff_ids == ["11", "12.5"],
    ),
    Relaxation.STRING_AS_NUMBER: (
        Session,
        _session(kwh="41.12"),
        "$.kwh",
        ["STRING_AS_NUMBER:$.kwh"],
        lambda v: v.kwh == Decimal("41.12"),
    ),
    Relaxation.DATETIME_OFFSET: (
        Session,
        _session(end_date_time="2015-06-30T01:50:16.5+02:00"),
        "$.end_date_time",
        ["DATETIME_OFFSET:$.end_date_time"],
        lambda v: v.end_date_time == datetime(2015, 6, 29, 23, 50, 16, 500000, tzinfo=UTC),
    ),
    Relaxation.DATETIME_EXCESS_PRECISION: (
        Session,
        _session(last_updated="2015-06-29T23:50:17.1234567Z"),
        "$.last_updated",
        ["DATETIME_EXCESS_PRECISION:$.last_updated"],
        lambda v: v.last_updated == datetime(2015, 6, 29, 23, 50, 17, 123400, tzinfo=UTC),
    ),
    Relaxation.EXCESS_DECIMALS: (
        Session,
        _session(kwh=41.123450001, total_cost={"excl_vat": 8.50005, "incl_vat": 9.35}),
        "$.kwh",
        ["EXCESS_DECIMALS:$.kwh", "EXCESS_DECIMALS:$.total_cost.excl_vat"],
        lambda v: v.kwh == Decimal("41.1235") and v.total_cost.excl_vat == Decimal("8.5000"),  # half-even
    ),
    Relaxation.EMPTY_STRING_AS_ABSENT: (
        Session,
        _session(end_date_time="", authorization_reference=""),  # "" is a valid CiString: left alone
        "$.end_date_time",
        ["EMPTY_STRING_AS_ABSENT:$.end_date_time"],
        lambda v: v.end_date_time is None and v.authorization_reference == "",
    ),
    Relaxation.ERRATA_MAX_LENGTH: (
        Location,
        copy.deepcopy(LOCATION) | {"address": "a" * 200, "state": "s" * 45},
        "$.address",
        ["ERRATA_MAX_LENGTH:$.address", "ERRATA_MAX_LENGTH:$.state"],
        lambda v: len(v.address) == 200,
    ),
    Relaxation.EPOCH_UNKNOWN_TIME: (
        CDR,
        minimal("CDR") | {"end_date_time": "1970-01-01T00:00:00Z"},  # an end the CPO does not know (10 §4)
        "$.end_date_time",
        ["EPOCH_UNKNOWN_TIME:$.end_date_time"],
        lambda v: v.end_date_time == datetime(1970, 1, 1, tzinfo=UTC),
    ),
    Relaxation.NA_IN_ANY_REQUIRED_STRING: (
        Session,
        _session(location_id="#NA"),
        "$.location_id",
        ["NA_IN_ANY_REQUIRED_STRING:$.location_id"],
        lambda v: v.location_id == "#NA",
    ),
}


def test_a_cdr_with_an_unknown_time_as_the_epoch_is_refused_unless_agreed() -> None:
    # 10 §4: only by agreement; accepted from anyone, the CDR was billed on 1970-01-01, outside every period.
    for name in ("start_date_time", "end_date_time"):
        assert_invalid(minimal("CDR") | {name: "1970-01-01T00:00:00Z"}, CDR, f"$.{name}")
    assert decode(dumps(minimal("CDR") | {"end_date_time": "1970-01-01T00:00:00.0001Z"}), CDR).relaxations == ()


def test_the_epoch_as_the_spec_prints_it_is_accepted_as_agreed() -> None:
    # 10 §4 (digest): the spec writes the unknown time `1970-1-1T00:00:00Z`, not a valid DateTime; where the partner
    # agreement allows the epoch (EPOCH_UNKNOWN_TIME), it is accepted in either form. A CPO sending it as printed
    # had every such CDR refused (2001), agreement or not, and nothing of it billed.
    agreed = CompatProfile(relaxations=frozenset({Relaxation.EPOCH_UNKNOWN_TIME}))
    for name in ("start_date_time", "end_date_time"):
        for spelling in ("1970-1-1T00:00:00Z", "1970-1-1T00:00:00"):
            body = minimal("CDR") | {name: spelling}
            decoded = decode(dumps(body), CDR, profile=agreed)
            assert getattr(decoded.value, name) == datetime(1970, 1, 1, tzinfo=UTC)
            assert decoded.relaxations == (f"EPOCH_UNKNOWN_TIME:$.{name}",)
            assert_invalid(body, CDR, f"$.{name}")  # without the agreement: refused, as any invalid DateTime
    # Only a CDR's start and end: anywhere else the misspelt epoch stays an invalid DateTime.
    assert_invalid(_session(start_date_time="1970-1-1T00:00:00Z"), Session, "$.start_date_time", profile=agreed)
    assert_invalid(minimal("CDR") | {"last_updated": "1970-1-1T00:00:00Z"}, CDR, "$.last_updated", profile=agreed)


def test_every_relaxation_has_a_case() -> None:
    assert set(CASES) == set(Relaxation)


@pytest.mark.parametrize("relaxation", list(Relaxation))
def test_rejected_without_the_relaxation(relaxation: Relaxation) -> None:
    model, body, path, _, _ = CASES[relaxation]
    others = CompatProfile(relaxations=frozenset(set(Relaxation) - {relaxation}))
    for profile in (None, STRICT, others):
        assert_invalid(body, model, path, profile=profile)


@pytest.mark.parametrize("relaxation", list(Relaxation))
def test_applied_and_recorded_with_the_relaxation(relaxation: Relaxation) -> None:
    model, body, _, records, check = CASES[relaxation]
    decoded: Decoded[Any] = decode(
        dumps(body), model, profile=CompatProfile(relaxations=frozenset({relaxation}))
    )
    assert list(decoded.relaxations) == records
    assert check(decoded.value)


@pytest.mark.parametrize("relaxation", list(Relaxation))
def test_all_enabled_gives_the_same_result(relaxation: Relaxation) -> None:
    model, body, _, records, check = CASES[relaxation]
    decoded: Decoded[Any] = decode(dumps(body), model, profile=CompatProfile.from_names(list(Relaxation)))
    assert list(decoded.relaxations) == records
    assert check(decoded.value)


def test_valid_bodies_record_nothing() -> None:
    everything = CompatProfile.from_names(list(Relaxation))
    assert decode(dumps(SESSION), Session, profile=everything).relaxations == ()
    assert decode(dumps(LOCATION), Location, profile=everything).relaxations == ()


def test_unlisted_problems_are_never_relaxed() -> None:
    everything = CompatProfile.from_names(list(Relaxation))
    # a missing cdr_token: no deterministic substitute, so not a relaxation
    body = _session()
    del body["cdr_token"]
    assert_invalid(body, Session, "$.cdr_token", "missing required field", profile=everything)
    # booleans as strings, lower-case DateTime designators, non-number text: not in the list
    assert_invalid(_session(kwh="12,5"), Session, "$.kwh", profile=everything)
    assert_invalid(_session(kwh="NaN"), Session, "$.kwh", profile=everything)
    assert_invalid(
        _session(last_updated="2015-06-29t23:50:17z"), Session, "$.last_updated", profile=everything
    )
    assert_invalid(_session(status=""), Session, "$.status", profile=everything)  # required: not "absent"
    assert_invalid(
        minimal("EVSE") | {"status": "AVAILABLE", "connectors": [None]},
        EVSE,
        "$.connectors",
        "must not be empty",
        profile=everything,
    )  # nulls dropped, then `+` is empty


def test_relaxation_and_remaining_error_reports_the_remaining_error() -> None:
    body = _session(kwh="41.12", currency="EURO")
    assert_invalid(
        body, Session, "$.currency", "longer than 3", profile=CompatProfile.from_names("STRING_AS_NUMBER")
    )


def test_combined_relaxations_on_one_value() -> None:
    profile = CompatProfile.from_names(
        "DATETIME_OFFSET, DATETIME_EXCESS_PRECISION, STRING_AS_NUMBER, EXCESS_DECIMALS"
    )
    body = _session(last_updated="2015-06-30T01:50:17.1234567+02:00", kwh="41.123456")
    decoded = decode(dumps(body), Session, profile=profile)
    assert decoded.value.last_updated == datetime(2015, 6, 29, 23, 50, 17, 123400, tzinfo=UTC)
    assert decoded.value.kwh == Decimal("41.1235")
    assert decoded.relaxations == (
        "STRING_AS_NUMBER:$.kwh",
        "EXCESS_DECIMALS:$.kwh",
        "DATETIME_OFFSET:$.last_updated",
        "DATETIME_EXCESS_PRECISION:$.last_updated",
    )


def test_relaxations_on_patch_bodies_and_int_fields() -> None:
    profile = CompatProfile.from_names("EMPTY_STRING_AS_ABSENT,STRING_AS_NUMBER,NUMBER_AS_STRING")
    patch = decode(
        b'{"status": "", "kwh": "2", "last_updated": "2019-06-23T08:11:00Z"}', SessionPatch, profile=profile
    )
    assert patch.relaxations == ("STRING_AS_NUMBER:$.kwh", "EMPTY_STRING_AS_ABSENT:$.status")
    evse = copy.deepcopy(LOCATION["evses"][0]) | {"physical_reference": 3}
    evse["connectors"][0]["max_voltage"] = "220"
    decoded = decode(dumps(evse), EVSE, profile=profile)
    assert decoded.value.physical_reference == "3" and decoded.value.connectors[0].max_voltage == 220
    assert decoded.relaxations == (
        "STRING_AS_NUMBER:$.connectors[0].max_voltage",
        "NUMBER_AS_STRING:$.physical_reference",
    )


def test_number_as_string_keeps_the_number_as_written() -> None:
    body = dumps(minimal("Connector")).replace(b"}", b', "tariff_ids": [12.50, 7, 1e2, 1.0e0, -0, -0.0]}')
    decoded = decode(body, Connector, profile=CompatProfile.from_names("NUMBER_AS_STRING"))
    assert decoded.value.tariff_ids == ["12.50", "7", "1E+2", "1.0", "0", "-0.0"]  # as ocpi.compat says


def test_errata_lengths_on_nested_objects() -> None:
    profile = CompatProfile.from_names("ERRATA_MAX_LENGTH")
    location = minimal("CdrLocation") | {"address": "a" * 255}
    assert decode(dumps(location), CdrLocation, profile=profile).relaxations == (
        "ERRATA_MAX_LENGTH:$.address",
    )
    assert_invalid(minimal("CdrLocation") | {"address": "a" * 256}, CdrLocation, "$.address", profile=profile)
    value = minimal("SignedValue") | {"plain_data": "p" * 5000}
    assert decode(dumps(value), SignedValue, profile=profile).relaxations == (
        "ERRATA_MAX_LENGTH:$.plain_data",
    )


def test_na_relaxation_only_for_required_fields() -> None:
    profile = CompatProfile.from_names("NA_IN_ANY_REQUIRED_STRING")
    assert_invalid(_session(meter_id="#NA"), Session, "$.meter_id", "#NA", profile=profile)


# --- the profile itself ------------------------------------------------------------------------------------


def test_default_is_strict() -> None:
    assert CompatProfile() == STRICT and not STRICT.relaxations and not STRICT.raw_token


def test_from_names() -> None:
    profile = CompatProfile.from_names(" null_in_list , RAW_TOKEN,NUMBER_AS_STRING,")
    assert profile.raw_token
    assert profile.relaxations == {Relaxation.NULL_IN_LIST, Relaxation.NUMBER_AS_STRING}
    assert profile.allows(Relaxation.NULL_IN_LIST) and not profile.allows(Relaxation.EXCESS_DECIMALS)
    assert CompatProfile.from_names(profile.names) == profile
    assert CompatProfile.from_names([]) == STRICT == CompatProfile.from_names("")
    assert CompatProfile.from_names(["EXCESS_DECIMALS"]).names == ("EXCESS_DECIMALS",)


def test_from_names_rejects_unknown_names_clearly() -> None:
    with pytest.raises(ValueError, match=r"unknown compatibility relaxation 'NULLS'.*NULL_IN_LIST"):
        CompatProfile.from_names("NULLS")
    with pytest.raises(ValueError, match="TRAILING_SLASH"):
        CompatProfile.from_names(["TRAILING_SLASH"])


def test_errors_after_null_in_list_name_the_element_as_sent() -> None:
    """Dropping nulls shifts the later elements; a 2001 must still point at the element in the partner's body."""
    profile = CompatProfile.from_names("NULL_IN_LIST")
    assert_invalid(
        _connector_tariffs([None, "t" * 37]), Location, "$.evses[0].connectors[0].tariff_ids[1]", "longer than 36",
        profile=profile,
    )
    location = copy.deepcopy(LOCATION)
    evse = location["evses"][0]
    evse["connectors"] = [None, evse["connectors"][0] | {"tariff_ids": [None, None, "12", None, "\u00e9"]}]
    location["evses"] = [None, evse]
    assert_invalid(location, Location, "$.evses[1].connectors[1].tariff_ids[4]", "printable ASCII", profile=profile)
    # The rule walk after the repaired decode: its errors and its records.
    cdr = minimal("CDR")
    cdr["charging_periods"] = [None, *cdr["charging_periods"]]
    cdr["charging_periods"][1]["dimensions"] = [None, {"type": "POWER", "volume": 1}]
    assert_invalid(cdr, CDR, "$.charging_periods[1].dimensions[1].type", "Session-only", profile=profile)
    cdr = minimal("CDR") | {"signed_data": minimal("SignedData")}
    cdr["signed_data"]["signed_values"] = [None, minimal("SignedValue") | {"plain_data": "p" * 513}]
    decoded = decode(dumps(cdr), CDR, profile=CompatProfile.from_names("NULL_IN_LIST,ERRATA_MAX_LENGTH"))
    assert decoded.relaxations == (
        "NULL_IN_LIST:$.signed_data.signed_values",
        "ERRATA_MAX_LENGTH:$.signed_data.signed_values[1].plain_data",
    )


def test_excess_decimals_says_how_far_it_may_move_a_value() -> None:
    """Half-even rounding moves a tie by half a unit of the 4th place: 8.50005 becomes 8.5000, changed by 0.00005
    exactly. ocpi.compat and docs/partners.md said it changes a value by less than that."""
    profile = CompatProfile.from_names("EXCESS_DECIMALS")
    for sent, kept in (("8.50005", "8.5000"), ("8.50015", "8.5002"), ("-0.00005", "0.0000"), ("1.000049999", "1.0000")):
        body = b'{"kwh": %s, "last_updated": "2015-06-29T23:50:17Z"}' % sent.encode()
        value = decode(body, SessionPatch, profile=profile).value.kwh
        assert value == Decimal(kept) and abs(value - Decimal(sent)) <= Decimal("0.00005")
    docs = (REPO / "docs" / "partners.md").read_text()
    row = next(line for line in docs.splitlines() if line.startswith("| `EXCESS_DECIMALS` |"))
    for text in (row, compat.__doc__ or ""):
        assert "at most 0.00005" in text and "< 0.00005" not in text


def test_an_offset_datetime_with_five_fraction_digits_is_converted_exactly() -> None:
    """A valid UTC DateTime holds five fraction digits only without `Z` (25 characters). DATETIME_OFFSET wrote every
    converted value with `Z`, so `…09.12345+02:00` became 26 characters: refused (2001) under DATETIME_OFFSET alone,
    and cut to four digits under DATETIME_EXCESS_PRECISION, hashing unlike the same time sent strictly."""
    body = b'{"end_date_time": "%s", "last_updated": "2019-06-24T14:39:09Z"}'
    strict = decode(body % b"2019-06-24T12:39:09.12345", SessionPatch)
    for names in ("DATETIME_OFFSET", "DATETIME_OFFSET,DATETIME_EXCESS_PRECISION"):
        relaxed = decode(body % b"2019-06-24T14:39:09.12345+02:00", SessionPatch,
                         profile=CompatProfile.from_names(names))
        assert relaxed.value.end_date_time == datetime(2019, 6, 24, 12, 39, 9, 123450, tzinfo=UTC)
        assert relaxed.relaxations == ("DATETIME_OFFSET:$.end_date_time",)
        assert content_hash(relaxed.value) == content_hash(strict.value)
    # Four digits or fewer keep their `Z`; more than five are a fraction too long (DATETIME_EXCESS_PRECISION).
    assert compat.relax_datetime("2019-06-24T14:39:09.1234+02:00", {Relaxation.DATETIME_OFFSET}) == (
        "2019-06-24T12:39:09.1234Z", [Relaxation.DATETIME_OFFSET])
    both = {Relaxation.DATETIME_OFFSET, Relaxation.DATETIME_EXCESS_PRECISION}
    assert compat.relax_datetime("2019-06-24T14:39:09.1234567+02:00", both)[0] == "2019-06-24T12:39:09.1234Z"
