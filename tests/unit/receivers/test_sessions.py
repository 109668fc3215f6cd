"""Sessions receiver: PUT and PATCH (09 §3.3-3.4) as events, identity and PATCH rules."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import pytest

from ocpi.model import Session, SessionPatch
from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    BASE,
    PATCHED,
    SESSION_URL,
    Pushes,
    assert_envelope,
    example,
    make_pushes_fixture,
    no_records,
    payload_as,
    pushes_fixture,
    sent_as,
    session,
)


def test_the_spec_examples_are_published_as_they_were_sent(pushes: Pushes) -> None:
    sent = session()
    assert_envelope(pushes.request("PUT", SESSION_URL, sent), 1000, http=200)
    patch = example("session_patch_example_total_cost.json")
    assert_envelope(pushes.request("PATCH", f"{BASE}/sessions/NL/TNM/101", patch), 1000, http=200)

    put_event, patch_event = pushes.events()
    assert (put_event.module, put_event.operation, put_event.level, put_event.payload_type) == \
        ("SESSIONS", "PUT", "SESSION", "Session")
    assert (patch_event.operation, patch_event.payload_type) == ("PATCH", "SessionPatch")
    assert (patch_event.country_code, patch_event.party_id, patch_event.object_id) == ("NL", "TNM", "101")
    assert pushes.keys() == [b"BE/BEC/101", b"NL/TNM/101"]
    assert set(pushes.topics()) == {pushes.env.settings.kafka.topic_for("sessions")}
    assert payload_as(put_event, Session) == sent_as(sent, Session)
    assert payload_as(patch_event, SessionPatch) == sent_as(patch, SessionPatch)
    assert patch_event.payload == {"total_cost": {"excl_vat": Decimal("0.60"), "incl_vat": Decimal("0.66")},
                                   "last_updated": datetime(2019, 6, 23, 8, 11, tzinfo=UTC)}


PATCHES = [
    # A PATCH carries only what changed: no identity fields at all is the normal case.
    {"kwh": 12.5, "last_updated": PATCHED},
    {"status": "COMPLETED", "end_date_time": PATCHED, "last_updated": PATCHED},
    {"charging_periods": [{"start_date_time": "2019-06-24T12:00:00Z",
                           "dimensions": [{"type": "ENERGY", "volume": 1.2}, {"type": "POWER", "volume": 11}]}],
     "last_updated": PATCHED},
    # Identity may be repeated; it is compared as CiString.
    {"country_code": "be", "party_id": "Bec", "id": "101", "kwh": 1, "last_updated": PATCHED},
    # null means unchanged (project policy), so it is not a change and not an error.
    {"meter_id": None, "kwh": 2, "last_updated": PATCHED},
    # #NA is legal in evse_uid/connector_id (a reservation's Session).
    {"evse_uid": "#NA", "connector_id": "#NA", "last_updated": PATCHED},
]


@pytest.mark.parametrize("body", PATCHES)
def test_partial_patches_are_accepted(pushes: Pushes, body: dict[str, Any]) -> None:
    assert_envelope(pushes.request("PATCH", SESSION_URL, body), 1000)
    [event] = pushes.events()
    assert event.payload_type == "SessionPatch"
    sent = {key: value for key, value in body.items() if value is not None}
    assert set(event.payload) == set(sent)  # nothing invented, nothing lost


def test_a_patch_must_carry_last_updated_and_keep_the_identity(pushes: Pushes) -> None:
    with no_records(pushes):
        assert_envelope(pushes.request("PATCH", SESSION_URL, {"kwh": 3}), 2001, path="$.last_updated")
        answer = assert_envelope(pushes.request("PATCH", SESSION_URL, {"id": "102", "last_updated": PATCHED}),
                                 2001, path="$.id")
        assert "'102' differs from '101' in the URL" in answer["status_message"]
        assert_envelope(pushes.request("PATCH", SESSION_URL, {"country_code": "NL", "last_updated": PATCHED}),
                        2001, path="$.country_code")


def test_the_enum_value_is_reservation_not_the_spec_texts_reserved(pushes: Pushes) -> None:
    assert_envelope(pushes.request("PUT", SESSION_URL, {**session(), "status": "RESERVATION"}), 1000)
    with no_records(pushes):
        answer = assert_envelope(pushes.request("PUT", SESSION_URL, {**session(), "status": "RESERVED"}), 2001,
                                 path="$.status")
    assert "RESERVATION" in answer["status_message"]


def test_a_session_may_name_a_location_we_never_received(pushes: Pushes) -> None:
    body = {**session(), "location_id": "NEVER-PUSHED", "evse_uid": "#NA", "connector_id": "#NA"}
    assert_envelope(pushes.request("PUT", SESSION_URL, body), 1000)


def test_only_the_owner_may_push_and_the_body_decides_nothing_about_the_owner(pushes: Pushes) -> None:
    with no_records(pushes):
        assert_envelope(pushes.request("PUT", SESSION_URL, session(), party=("NL", "TNM")), 2001, http=404)
        # The URL names the caller's party but the body another one: identity mismatch, not a foreign push.
        assert_envelope(pushes.request("PUT", f"{BASE}/sessions/NL/TNM/101", session()), 2001, http=200,
                        path="$.country_code")
