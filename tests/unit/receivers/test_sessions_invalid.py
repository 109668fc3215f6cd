"""One invalid variant per constraint kind for Session and SessionPatch: refused with 2001, the field's JSON
path and the reason, and nothing is published."""

from __future__ import annotations

import pytest

from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    BASE,
    PATCHED,
    SESSION_URL,
    Pushes,
    Refusal,
    changed,
    check_refusal,
    make_pushes_fixture,
    pushes_fixture,
    session,
)


def session_patch() -> dict[str, object]:
    return {"kwh": 12.5, "status": "ACTIVE",
            "charging_periods": [{"start_date_time": "2019-06-24T12:00:00Z",
                                  "dimensions": [{"type": "ENERGY", "volume": 1.2}]}],
            "last_updated": PATCHED}


CASES = [
    Refusal("Session: missing required field", "PUT", SESSION_URL, changed(session, "cdr_token"), "$.cdr_token",
            "missing required field"),
    Refusal("Session: missing nested field", "PUT", SESSION_URL, changed(session, "cdr_token.contract_id"),
            "$.cdr_token.contract_id", "missing required field"),
    Refusal("Session: over-long string", "PUT", SESSION_URL, changed(session, "meter_id", "M" * 256),
            "$.meter_id", "longer than 255 characters"),
    Refusal("Session: bad enum", "PUT", SESSION_URL, changed(session, "auth_method", "PIN"), "$.auth_method",
            "not one of AUTH_REQUEST"),
    Refusal("Session: bad DateTime", "PUT", SESSION_URL,
            changed(session, "start_date_time", "2015-06-29T22:39:09+00:00"), "$.start_date_time",
            "numeric offsets are not allowed"),
    Refusal("Session: wrong id in the URL", "PUT", f"{BASE}/sessions/BE/BEC/102", session, "$.id",
            "'101' differs from '102' in the URL"),
    # The object's identity, whose URL could not hold an empty part: refused as a pulled one is (ocpi._validate).
    Refusal("Session: empty identity", "PUT", SESSION_URL, changed(session, "party_id", ""), "$.party_id",
            "empty: an object is named by its owner and id"),
    Refusal("Session: nested bad enum", "PUT", SESSION_URL,
            changed(session, "charging_periods.1.dimensions.0.type", "VOLTAGE"),
            "$.charging_periods[1].dimensions[0].type", "not one of CURRENT"),
    Refusal("Session: number as string", "PUT", SESSION_URL, changed(session, "kwh", "41.12"), "$.kwh",
            "expected a number, got a string"),
    Refusal("SessionPatch: missing last_updated", "PATCH", SESSION_URL, changed(session_patch, "last_updated"),
            "$.last_updated", "missing required field"),
    Refusal("SessionPatch: over-long string", "PATCH", SESSION_URL,
            changed(session_patch, "authorization_reference", "A" * 37), "$.authorization_reference",
            "longer than 36 characters"),
    Refusal("SessionPatch: bad enum", "PATCH", SESSION_URL, changed(session_patch, "status", "STOPPED"),
            "$.status", "not one of ACTIVE, COMPLETED, INVALID, PENDING, RESERVATION"),
    Refusal("SessionPatch: bad DateTime", "PATCH", SESSION_URL,
            changed(session_patch, "charging_periods.0.start_date_time", "2019-06-24T12:00"),
            "$.charging_periods[0].start_date_time", "invalid DateTime"),
    Refusal("SessionPatch: wrong id in the URL", "PATCH", SESSION_URL, changed(session_patch, "id", "102"),
            "$.id", "'102' differs from '101' in the URL"),
    Refusal("SessionPatch: empty + list", "PATCH", SESSION_URL,
            changed(session_patch, "charging_periods.0.dimensions", []), "$.charging_periods[0].dimensions",
            "must not be empty"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_invalid_pushes_are_refused_naming_the_field(pushes: Pushes, case: Refusal) -> None:
    check_refusal(pushes, case)


def test_every_object_has_every_constraint_kind() -> None:
    kinds = {"missing", "over-long string", "bad enum", "bad DateTime", "wrong id in the URL"}
    for obj in ("Session", "SessionPatch"):
        names = [case.name.split(": ", 1)[1] for case in CASES if case.name.split(": ")[0] == obj]
        assert {kind for kind in kinds if any(name.startswith(kind) for name in names)} == kinds, obj
