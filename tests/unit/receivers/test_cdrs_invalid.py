"""One invalid variant per constraint kind for a CDR POST: refused with the spec's status, the field's JSON
path and the reason, and nothing is published. A CDR POST has no id in its URL: the owner in the body
stands in for it (a CDR of a party that is not the caller's is hidden: 404 with 2001)."""

from __future__ import annotations

import pytest

from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    CDRS_URL,
    Pushes,
    Refusal,
    assert_envelope,
    cdr,
    changed,
    check_refusal,
    make_pushes_fixture,
    no_records,
    pushes_fixture,
)

CASES = [
    Refusal("CDR: missing required field", "POST", CDRS_URL, changed(cdr, "cdr_location"), "$.cdr_location",
            "missing required field"),
    Refusal("CDR: missing nested field", "POST", CDRS_URL, changed(cdr, "total_cost.excl_vat"),
            "$.total_cost.excl_vat", "missing required field"),
    Refusal("CDR: over-long string", "POST", CDRS_URL, changed(cdr, "id", "X" * 37), "$.id",
            "longer than 36 characters"),
    Refusal("CDR: over-long string (credit)", "POST", CDRS_URL,
            changed(changed(changed(cdr, "id", "X" * 40), "credit", True), "credit_reference_id", "X"),
            "$.id", "longer than 39 characters"),
    # An empty id names no CDR: the Location header would name no URL it can be read at (`.../cdrs/BE/BEC/`), and a
    # second CDR without an id would conflict with the first (CDRs are immutable) and never be billed.
    Refusal("CDR: empty id", "POST", CDRS_URL, changed(cdr, "id", ""), "$.id", "empty"),
    Refusal("CDR: empty id (credit)", "POST", CDRS_URL,
            changed(changed(changed(cdr, "id", ""), "credit", True), "credit_reference_id", "12345"), "$.id", "empty"),
    # An empty owner is no party at all: invalid (the object's identity, as for every push and pull), not hidden.
    Refusal("CDR: empty country_code", "POST", CDRS_URL, changed(cdr, "country_code", ""), "$.country_code", "empty"),
    Refusal("CDR: empty party_id", "POST", CDRS_URL, changed(cdr, "party_id", ""), "$.party_id", "empty"),
    Refusal("CDR: bad enum", "POST", CDRS_URL, changed(cdr, "cdr_token.type", "CARD"), "$.cdr_token.type",
            "not one of"),
    Refusal("CDR: bad DateTime", "POST", CDRS_URL, changed(cdr, "end_date_time", "1970-1-1T00:00:00Z"),
            "$.end_date_time", "invalid DateTime"),
    Refusal("CDR: empty + list", "POST", CDRS_URL, changed(cdr, "charging_periods", []), "$.charging_periods",
            "must not be empty"),
    Refusal("CDR: cross-field rule", "POST", CDRS_URL, changed(cdr, "credit", True), "$.credit_reference_id",
            "required when credit is true"),
    Refusal("CDR: coordinates format", "POST", CDRS_URL, changed(cdr, "cdr_location.coordinates.latitude", "51.04"),
            "$.cdr_location.coordinates.latitude", "not a latitude"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_invalid_cdrs_are_refused_naming_the_field(pushes: Pushes, case: Refusal) -> None:
    check_refusal(pushes, case)


def test_a_cdr_of_another_party_is_hidden(pushes: Pushes) -> None:
    """The POST's 'wrong id in the URL': the owner comes from the body and must be the caller's."""
    body = {**cdr(), "country_code": "NL", "party_id": "ALF"}
    with no_records(pushes):
        answer = assert_envelope(pushes.request("POST", CDRS_URL, body, party=("BE", "BEC")), 2001, http=404)
    assert answer["status_message"].startswith("$.country_code, $.party_id: party NL/ALF is not one")
