"""Imperfect partners: each compatibility relaxation through the HTTP endpoint. With the partner's profile
enabling it the push is accepted and the repair is recorded on the Kafka event (`relaxations`, as
`NAME:$.path`); without it (or with another relaxation only) the same push is 2001 naming the field."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from ocpi.compat import Relaxation
from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    CDRS_URL,
    CONNECTOR_URL,
    EVSE_URL,
    LOCATION_URL,
    PATCHED,
    SESSION_URL,
    Pushes,
    assert_envelope,
    cdr,
    changed,
    connector,
    evse,
    location,
    make_pushes_fixture,
    no_records,
    session,
)


@dataclass(frozen=True)
class Case:
    relaxation: Relaxation
    method: str
    url: str
    body: Callable[[], dict[str, Any]]
    path: str  # where the repair is recorded
    repaired: Callable[[dict[str, Any]], Any]  # the repaired value, read from the event's payload
    expected: Any
    refused_at: str | None = None  # where the strict rule fails, when not at `path`


CASES = [
    Case(Relaxation.NULL_IN_LIST, "PUT", CONNECTOR_URL, changed(connector, "tariff_ids", ["11", None]),
         "$.tariff_ids", lambda p: p["tariff_ids"], ["11"], refused_at="$.tariff_ids[1]"),
    Case(Relaxation.NUMBER_AS_STRING, "PUT", EVSE_URL, changed(evse, "physical_reference", 3),
         "$.physical_reference", lambda p: p["physical_reference"], "3"),
    Case(Relaxation.STRING_AS_NUMBER, "PATCH", SESSION_URL, lambda: {"kwh": "12.5", "last_updated": PATCHED},
         "$.kwh", lambda p: p["kwh"], Decimal("12.5")),
    Case(Relaxation.DATETIME_OFFSET, "PUT", SESSION_URL,
         changed(session, "start_date_time", "2015-06-29T22:39:09+02:00"), "$.start_date_time",
         lambda p: p["start_date_time"], datetime(2015, 6, 29, 20, 39, 9, tzinfo=UTC)),
    Case(Relaxation.DATETIME_EXCESS_PRECISION, "PATCH", EVSE_URL,
         lambda: {"status": "AVAILABLE", "last_updated": "2019-06-24T12:39:09.1234567Z"}, "$.last_updated",
         lambda p: p["last_updated"], datetime(2019, 6, 24, 12, 39, 9, 123400, tzinfo=UTC)),
    Case(Relaxation.EXCESS_DECIMALS, "POST", CDRS_URL, changed(cdr, "total_cost.excl_vat", 4.123456),
         "$.total_cost.excl_vat", lambda p: p["total_cost"]["excl_vat"], Decimal("4.1235")),
    Case(Relaxation.EMPTY_STRING_AS_ABSENT, "PUT", LOCATION_URL, changed(location, "parking_type", ""),
         "$.parking_type", lambda p: "parking_type" in p, False),
    Case(Relaxation.ERRATA_MAX_LENGTH, "PUT", LOCATION_URL, changed(location, "address", "Straat " * 14),
         "$.address", lambda p: p["address"], "Straat " * 14),
    Case(Relaxation.NA_IN_ANY_REQUIRED_STRING, "POST", CDRS_URL, changed(cdr, "cdr_token.contract_id", "#NA"),
         "$.cdr_token.contract_id", lambda p: p["cdr_token"]["contract_id"], "#NA"),
    Case(Relaxation.EPOCH_UNKNOWN_TIME, "POST", CDRS_URL, changed(cdr, "end_date_time", "1970-01-01T00:00:00Z"),
         "$.end_date_time", lambda p: p["end_date_time"], datetime(1970, 1, 1, tzinfo=UTC)),
]


def test_every_relaxation_has_a_case() -> None:
    assert {case.relaxation for case in CASES} == set(Relaxation)


@pytest.mark.parametrize("case", CASES, ids=[case.relaxation.value for case in CASES])
def test_enabled_the_push_is_accepted_and_the_repair_recorded_on_the_event(make_pushes: Any, case: Case) -> None:
    p = make_pushes(compat=(case.relaxation.value,))
    assert_envelope(p.request(case.method, case.url, case.body()), 1000)
    [event] = p.events()
    assert event.relaxations == [f"{case.relaxation.value}:{case.path}"]
    assert case.repaired(event.payload) == case.expected


@pytest.mark.parametrize("case", CASES, ids=[case.relaxation.value for case in CASES])
def test_not_enabled_the_same_push_is_2001(make_pushes: Any, case: Case) -> None:
    # Every *other* relaxation on: each one repairs only its own kind of fault.
    others = tuple(r.value for r in Relaxation if r is not case.relaxation)
    for p in (make_pushes(), make_pushes(compat=others)):
        with no_records(p):
            assert_envelope(p.request(case.method, case.url, case.body()), 2001, http=200,
                            path=case.refused_at or case.path)


def test_the_profile_is_the_partners_own(make_pushes: Any) -> None:
    """Two partners, one app: the relaxed one's push is repaired, the strict one's refused."""
    p = make_pushes(compat_for={("BE", "BEC"): ("STRING_AS_NUMBER",)})
    body = {"kwh": "3.5", "last_updated": PATCHED}
    assert_envelope(p.request("PATCH", SESSION_URL, body), 1000)
    assert_envelope(p.request("PATCH", SESSION_URL.replace("BE/BEC", "NL/TNM"), body), 2001, path="$.kwh")
    [event] = p.events()
    assert event.partner_id == "cpo-be-bec" and event.relaxations == ["STRING_AS_NUMBER:$.kwh"]


def test_a_valid_push_from_a_relaxed_partner_records_nothing(make_pushes: Any) -> None:
    p = make_pushes(compat=tuple(r.value for r in Relaxation))
    assert_envelope(p.request("PUT", SESSION_URL, session()), 1000)
    assert p.events()[0].relaxations == []
