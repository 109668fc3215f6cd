"""CDRs receiver: POST (10 §3.1) as events, the Location header, credit CDRs, the body's owner."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import msgspec

from infra.settings import BASE_URL_MAX_LENGTH
from ocpi.model import CDR, Endpoint
from tests.unit.receivers.app_support import auth, make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    CDRS_URL,
    Pushes,
    assert_envelope,
    cdr,
    make_pushes_fixture,
    no_records,
    payload_as,
    pushes_fixture,
    sent_as,
)


def test_a_cdr_is_published_and_answered_with_where_to_get_it(pushes: Pushes) -> None:
    sent = cdr()
    response = pushes.request("POST", CDRS_URL, sent)
    answer = assert_envelope(response, 1000, http=201)
    assert "data" not in answer
    base = pushes.env.settings.http.base_url
    assert response.headers["location"] == f"{base}/ocpi/emsp/2.2.1/cdrs/BE/BEC/12345"

    [event] = pushes.events()
    assert (event.module, event.operation, event.level, event.payload_type) == ("CDRS", "POST", "CDR", "CDR")
    assert (event.country_code, event.party_id, event.object_id) == ("BE", "BEC", "12345")
    assert (event.evse_uid, event.connector_id) == (None, None)
    assert pushes.keys() == [b"BE/BEC/12345"]
    assert pushes.topics() == [pushes.env.settings.kafka.topic_for("cdrs")]
    assert payload_as(event, CDR) == sent_as(sent, CDR)


def test_the_location_url_escapes_what_an_id_may_hold(pushes: Pushes) -> None:
    response = pushes.request("POST", CDRS_URL, {**cdr(), "id": "2024/05 #1?"})
    assert_envelope(response, 1000, http=201)
    assert response.headers["location"].endswith("/cdrs/BE/BEC/2024%2F05%20%231%3F")


def test_the_location_url_fits_ocpi_s_url_type_on_every_base_url_accepted(make_pushes: Any) -> None:
    """The Location header is an OCPI URL (10 §3.1), at most 255 characters (02 §9). The settings let the base URL
    take all but the endpoints' paths (229 characters), so on such a base every CDR's URL was longer than 255, and
    on a shorter one a 39-character credit id of escaped characters (each 3) still made it so: a partner that checks
    the type, or stores it as such, could not keep it. The base URL now leaves room for the longest CDR URL."""
    base = "https://ocpi.example.com/"
    p = make_pushes(OCPI_PUBLIC_URL=base + "p" * (BASE_URL_MAX_LENGTH - len(base)))
    assert len(p.env.settings.http.base_url) == BASE_URL_MAX_LENGTH
    owner = ("#/", "?%#")  # the widest owner a credentials role may name: every character escaped
    token = p.env.provision("cpo-escaped", (*owner, "CPO"))
    credit = {**cdr(), "country_code": owner[0], "party_id": owner[1], "id": "#" * 39, "credit": True,
              "credit_reference_id": "12345", "total_cost": {"excl_vat": -4.00, "incl_vat": -4.40}}
    response = p.client.post(CDRS_URL, json=credit, headers=auth(token))
    assert_envelope(response, 1000, http=201)
    location = response.headers["location"]
    assert location.endswith("/cdrs/%23%2F/%3F%25%23/" + "%23" * 39)
    assert len(location) <= 255
    msgspec.convert({"identifier": "cdrs", "role": "RECEIVER", "url": location}, Endpoint)  # an OCPI URL field


def test_credit_cdrs_may_have_39_character_ids_others_36(pushes: Pushes) -> None:
    original = {**cdr(), "id": "C" * 36}
    credit = {**original, "id": "C" * 36 + "-CR", "credit": True, "credit_reference_id": "C" * 36,
              "total_cost": {"excl_vat": -4.00, "incl_vat": -4.40}}
    assert_envelope(pushes.request("POST", CDRS_URL, original), 1000, http=201)
    assert_envelope(pushes.request("POST", CDRS_URL, credit), 1000, http=201)
    credit_event = pushes.events()[1]
    assert credit_event.payload["credit"] is True and credit_event.payload["credit_reference_id"] == "C" * 36
    assert credit_event.payload["total_cost"]["excl_vat"] == Decimal("-4")
    with no_records(pushes):
        too_long = assert_envelope(pushes.request("POST", CDRS_URL, {**cdr(), "id": "C" * 37}), 2001, http=200,
                                   path="$.id")
        assert "only credit CDR ids may have 39" in too_long["status_message"]
        no_reference = {**credit, "credit_reference_id": None}
        assert_envelope(pushes.request("POST", CDRS_URL, no_reference), 2001, path="$.credit_reference_id")
        # A typo year would be billed on a wrong day (a ClickHouse Date wraps outside 1970-2149): refused.
        far_future = {**cdr(), "end_date_time": "2400-01-01T00:00:00Z"}
        assert_envelope(pushes.request("POST", CDRS_URL, far_future), 2001, path="$.end_date_time")


def test_the_owner_is_the_bodys_and_must_be_the_callers(pushes: Pushes) -> None:
    with no_records(pushes):
        foreign = pushes.request("POST", CDRS_URL, cdr(), party=("NL", "TNM"))
        assert_envelope(foreign, 2001, http=404)
        assert "BE/BEC" in foreign.json()["status_message"]


def test_a_cdr_may_concern_a_location_never_published_and_a_resend_is_acknowledged(pushes: Pushes) -> None:
    """CDRs for unpublished (home) locations are legal; duplicates are the pipeline's policy (immutable)."""
    body = {**cdr(), "cdr_location": {**cdr()["cdr_location"], "id": "HOME-1", "evse_uid": "#NA",
                                      "evse_id": "#NA", "connector_id": "#NA"}}
    assert_envelope(pushes.request("POST", CDRS_URL, body), 1000, http=201)
    assert_envelope(pushes.request("POST", CDRS_URL, body), 1000, http=201)
    first, second = pushes.events()
    assert first.content_hash == second.content_hash and first.event_id != second.event_id


def test_session_only_dimensions_are_refused_in_a_cdr(pushes: Pushes) -> None:
    body = cdr()
    body["charging_periods"][0]["dimensions"].append({"type": "STATE_OF_CHARGE", "volume": 80})
    with no_records(pushes):
        assert_envelope(pushes.request("POST", CDRS_URL, body), 2001,
                        path="$.charging_periods[0].dimensions[1].type")


def test_a_cdr_cannot_be_replaced_or_updated(pushes: Pushes) -> None:
    with no_records(pushes):
        for method in ("PUT", "PATCH", "DELETE"):
            assert_envelope(pushes.request(method, f"{CDRS_URL}/BE/BEC/12345", cdr()), 2000, http=405)
