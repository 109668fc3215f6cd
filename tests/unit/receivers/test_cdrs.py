"""CDRs receiver: POST (10 §3.1) as events, the Location header, credit CDRs, the body's owner."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from infra.settings import BASE_URL_MAX_LENGTH
from ocpi.identity import ObjectKey
from ocpi.model import CDR, Endpoint
from pipeline.retention import Pseudonymizer
from receivers import state
from receivers.state import StateReader
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


def test_no_cdr_is_of_our_own_party_even_from_a_partner_registered_with_it(pushes: Pushes) -> None:
    """The handshake does not refuse a partner listing our party (OCPI_PARTY_*) as its CPO role; the CDR it POSTs in
    our party's name is refused all the same, as a push whose URL names our party is (`auth.require_owner`)."""
    ours = (pushes.env.settings.party.country_code, pushes.env.settings.party.party_id)
    token = pushes.env.provision("claims-ours", (*ours, "CPO"))
    with no_records(pushes):
        answer = pushes.client.post(CDRS_URL, json={**cdr(), "country_code": ours[0], "party_id": ours[1].lower()},
                                    headers={**auth(token), "Content-Type": "application/json"})
        assert_envelope(answer, 2001, http=404)
        assert "the party this platform hosts" in answer.json()["status_message"]


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


# --- a second POST of a held CDR id (05-status-codes.md §5: 1000 if identical, an error otherwise) -----------------

HELD_AT = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)  # recent: the billing TTL counts from it


def hold(pushes: Pushes, payload_json: str) -> None:
    """The CDR BE/BEC/12345 as the pipeline stores it (upper-cased key, OCPI JSON payload)."""
    pushes.store("cdrs", [{"country_code": "BE", "party_id": "BEC", "cdr_id": "12345", "partner_id": "cpo-be-bec",
                           "start_date_time": HELD_AT, "end_date_time": HELD_AT, "total_energy": 15.342,
                           "total_time": 1.973, "total_cost_excl_vat": 4, "last_updated": HELD_AT,
                           "payload_json": payload_json, "version": 1, "received_at": HELD_AT}])


def as_stored(body: dict[str, Any]) -> str:
    """`body` as the pipeline writes it: amounts with the Avro decimal(18,4)'s four digits (`15.342` as `15.3420`)."""
    return json.dumps(body).replace('"total_energy": 15.342', '"total_energy": 15.3420')


def test_the_same_cdr_posted_again_is_answered_1000_and_published(pushes: Pushes) -> None:
    """A retry whose first answer was lost: 1000 (HTTP 200: not new), the held CDR's URL; the pipeline counts the
    DUPLICATE. The same as OCPI compares CDRs: CiStrings in another case, `credit: false` for an absent one."""
    hold(pushes, as_stored(cdr()))
    assert '"total_energy": 15.3420' in as_stored(cdr())
    again = {**cdr(), "id": "12345", "party_id": "bec", "credit": False, "last_updated": "2015-06-30T00:00:00Z"}
    response = pushes.request("POST", CDRS_URL, again, party=("BE", "BEC"))
    assert_envelope(response, 1000, http=200)
    assert response.headers["location"].endswith("/ocpi/emsp/2.2.1/cdrs/BE/bec/12345")  # as posted (CiStrings)
    [event] = pushes.events()
    assert payload_as(event, CDR) == sent_as(again, CDR)


def test_another_cdr_under_a_held_id_is_refused_and_still_published(pushes: Pushes) -> None:
    """The CPO learns its correction was not taken (it owes a credit CDR); the pipeline records the CONFLICT with the
    body, as for one that came before the first was stored."""
    hold(pushes, as_stored(cdr()))
    changed = {**cdr(), "total_cost": {"excl_vat": 5.0, "incl_vat": 6.05}}
    response = pushes.request("POST", CDRS_URL, changed)
    answer = assert_envelope(response, 2001, http=200, path="$.id")
    assert "credit CDR" in answer["status_message"]
    assert response.headers["location"].endswith("/ocpi/emsp/2.2.1/cdrs/BE/BEC/12345")
    [event] = pushes.events()
    assert payload_as(event, CDR) == sent_as(changed, CDR)


def test_a_cdr_not_held_yet_is_new_whatever_was_posted_before(pushes: Pushes) -> None:
    """The store lags Kafka: a second POST before the first is stored is answered as new; the pipeline judges it."""
    hold(pushes, as_stored(cdr()))
    assert_envelope(pushes.request("POST", CDRS_URL, {**cdr(), "id": "12346"}), 1000, http=201)


def pseudonymised(body: dict[str, Any]) -> dict[str, Any]:
    """`body` after the retention pass: its token uid, contract id and authorization reference as pseudonyms."""
    pseudonym = Pseudonymizer(b"a key of the pseudonymisation")
    token = body["cdr_token"]
    return {**body, "authorization_reference": pseudonym("AUTH-1"),
            "cdr_token": {**token, "uid": pseudonym(token["uid"]), "contract_id": pseudonym(token["contract_id"])}}


def test_a_held_cdr_with_pseudonyms_is_compared_on_the_rest(pushes: Pushes) -> None:
    """Its personal identifiers cannot be compared without the key: the same CDR but for them is answered 1000 (the
    pipeline compares the content hashes kept from the first POST); one that differs elsewhere is refused."""
    sent = {**cdr(), "authorization_reference": "AUTH-1"}
    hold(pushes, as_stored(pseudonymised(sent)))
    assert_envelope(pushes.request("POST", CDRS_URL, sent), 1000, http=200)
    other_token = {**sent, "cdr_token": {**sent["cdr_token"], "uid": "OTHER-UID"}}
    assert_envelope(pushes.request("POST", CDRS_URL, other_token), 1000, http=200)
    assert_envelope(pushes.request("POST", CDRS_URL, {**sent, "total_energy": 16}), 2001, path="$.id")
    assert len(pushes.events()) == 3


def test_a_store_that_cannot_be_read_leaves_a_cdr_post_as_it_was(pushes: Pushes) -> None:
    with pushes.with_store_down() as client:
        response = client.post(CDRS_URL, json=cdr(), headers=auth(pushes.tokens[("BE", "BEC")]))
        assert_envelope(response, 1000, http=201)
    assert len(pushes.env.sink.records) == 1


def test_a_store_that_does_not_answer_delays_a_cdr_post_by_the_push_read_timeout_only(
        make_pushes: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(state, "PUSH_READ_TIMEOUT_S", 0.5)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)  # connections complete in the backlog; nothing is ever read or answered
        p = make_pushes(OCPI_CLICKHOUSE_DSN=f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        response = p.request("POST", CDRS_URL, cdr())
        elapsed = time.monotonic() - started
    assert_envelope(response, 1000, http=201)
    assert elapsed < state.READ_TIMEOUT_S, elapsed


async def test_at_most_push_reads_reads_wait_on_the_store_at_once() -> None:
    """Reads given up on keep their threads (shared with the GETs) until the client's own timeout: more are not
    started meanwhile, and a slot is free again once its thread ended."""
    release = threading.Event()
    started: list[str] = []

    def stuck(table: str, key: ObjectKey) -> bytes | None:
        started.append(key.object_id)
        release.wait(10)
        raise ConnectionResetError("gave up")

    reader = StateReader(lambda: pytest.fail("not connected: the read is replaced"))
    reader._payload = stuck  # type: ignore[method-assign]
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(state, "PUSH_READ_TIMEOUT_S", 0.2)
            keys = [ObjectKey("BE", "BEC", f"C{n}") for n in range(state.PUSH_READS + 2)]
            assert await asyncio.gather(*(reader.cdr_for_push(key) for key in keys)) == [None] * len(keys)
            assert len(started) == state.PUSH_READS
            release.set()
            for _ in range(100):
                if reader._push_reads == 0:
                    break
                await asyncio.sleep(0.05)
            await reader.cdr_for_push(ObjectKey("BE", "BEC", "again"))
            assert started[-1] == "again"
    finally:
        release.set()
