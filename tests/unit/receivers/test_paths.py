"""Ids in URLs (receivers.paths): an OCPI id is a CiString, so it may hold `/` (sent as %2F), `%`, spaces and
dots; every receiver URL must address exactly the object whose id the client encoded, at its level."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from receivers.paths import path_segment, routing_path
from tests.unit.receivers.app_support import make_env  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    BASE,
    CDRS_URL,
    PATCHED,
    Pushes,
    assert_envelope,
    cdr,
    connector,
    evse,
    location,
    make_pushes_fixture,
    pushes_fixture,
    session,
)

# Recent, not a fixed date: the session and CDR rows stored here give no received_at, which defaults to
# last_updated, and the billing TTL (7 years) counts from it: rows dated 2026-01-01 are deleted from 2033 on.
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)
# A slash inside, leading, trailing, doubled, alone; dot segments; `%` alone and as a would-be escape; spaces.
IDS = ["2024/05", "/abc", "abc/", "a//b", "/", "a/./b", "a/../b", ".", "..", "50%", "%2F", "a%25b", "two words",
       " padded ", "?#&=+;"]


def url(*parts: str) -> str:
    """A receiver URL with each part encoded as one segment, as a client must send an id."""
    return "/".join([BASE, *(path_segment(part) for part in parts)])


def data(response: Any) -> Any:
    return assert_envelope(response, 1000, http=200)["data"]


@pytest.mark.parametrize("object_id", IDS)
def test_a_session_id_reaches_put_patch_and_get_whole(pushes: Pushes, object_id: str) -> None:
    body = {**session(), "id": object_id}
    at = url("sessions", "BE", "BEC", object_id)
    assert_envelope(pushes.request("PUT", at, body), 1000, http=200)
    assert_envelope(pushes.request("PATCH", at, {"kwh": 1, "last_updated": PATCHED}), 1000, http=200)
    put, patched = pushes.events()
    for event in (put, patched):
        assert (event.level, event.country_code, event.party_id, event.object_id) == \
            ("SESSION", "BE", "BEC", object_id)
    assert pushes.keys() == [f"BE/BEC/{object_id.upper()}".encode()] * 2

    pushes.store("sessions", [{"country_code": "BE", "party_id": "BEC", "session_id": object_id.upper(),
                               "partner_id": "cpo-be-bec", "status": "COMPLETED", "start_date_time": NOW,
                               "kwh": 41.12, "last_updated": NOW, "payload_json": json.dumps(body), "version": 1}])
    assert data(pushes.request("GET", at)) == body


@pytest.mark.parametrize("object_id", IDS)
def test_location_evse_and_connector_ids_keep_their_level(pushes: Pushes, object_id: str) -> None:
    """A Location `A/B` is not EVSE `B` of Location `A`: each id is one segment, at every level."""
    stored = {**location(), "id": object_id}
    stored["evses"][0]["uid"] = object_id
    stored["evses"][0]["connectors"][0]["id"] = object_id
    at = url("locations", "BE", "BEC", object_id)
    at_evse = url("locations", "BE", "BEC", object_id, object_id)
    at_connector = url("locations", "BE", "BEC", object_id, object_id, object_id)
    changed = {"last_updated": PATCHED}
    for target, body in ((at, stored), (at_evse, {**evse(), "uid": object_id}),
                         (at_connector, {**connector(), "id": object_id})):
        assert_envelope(pushes.request("PUT", target, body), 1000, http=200)
        assert_envelope(pushes.request("PATCH", target, changed), 1000, http=200)
    levels = [(event.operation, event.level, event.object_id, event.evse_uid, event.connector_id)
              for event in pushes.events()]
    assert levels == [(operation, level, object_id, *sub)
                      for level, sub in (("LOCATION", (None, None)), ("EVSE", (object_id, None)),
                                         ("CONNECTOR", (object_id, object_id)))
                      for operation in ("PUT", "PATCH")]
    assert set(pushes.keys()) == {f"BE/BEC/{object_id.upper()}".encode()}

    pushes.store("locations", [{"country_code": "BE", "party_id": "BEC", "location_id": object_id.upper(),
                                "partner_id": "cpo-be-bec", "city": stored["city"], "country": stored["country"],
                                "publish": True, "last_updated": NOW, "payload_json": json.dumps(stored),
                                "version": 1}])
    assert data(pushes.request("GET", at)) == stored
    assert data(pushes.request("GET", at_evse)) == stored["evses"][0]
    assert data(pushes.request("GET", at_connector)) == stored["evses"][0]["connectors"][0]


def test_a_location_patch_for_a_slashed_id_is_not_an_evse_patch(pushes: Pushes) -> None:
    """The reviewer's case: Location `A/B` PATCHed; routed on the decoded path it became EVSE `B` of `A`."""
    patch = {"coordinates": {"latitude": "51.047599", "longitude": "3.729944"}, "last_updated": PATCHED}
    assert_envelope(pushes.request("PATCH", f"{BASE}/locations/BE/BEC/A%2FB", patch), 1000, http=200)
    [event] = pushes.events()
    assert (event.level, event.object_id, event.evse_uid) == ("LOCATION", "A/B", None)
    assert pushes.keys() == [b"BE/BEC/A/B"]


@pytest.mark.parametrize(("segments", "name", "reason"), [
    (("sessions", "BE", "BEC", "S" * 37), "{session_id}", "longer than 36"),
    (("sessions", "BE", "BEC", "caf\u00e9"), "{session_id}", "printable ASCII"),
    (("sessions", "BE", "BEC", "a\nb"), "{session_id}", "printable ASCII"),
    (("locations", "BE", "BEC", "L" * 37), "{location_id}", "longer than 36"),
    (("locations", "BE", "BEC", "LOC1", "E" * 37), "{evse_uid}", "longer than 36"),
    (("locations", "BE", "BEC", "LOC1", "3256", "\u00e9"), "{connector_id}", "printable ASCII"),
])
def test_an_id_in_a_push_url_must_be_a_cistring_36(pushes: Pushes, segments: tuple[str, ...], name: str,
                                                     reason: str) -> None:
    """A PATCH need not repeat its ids in the body: an id no object can have is refused from the URL (2001),
    not acknowledged and published."""
    at = url(*segments)
    for method, body in (("PATCH", {"last_updated": PATCHED}), ("PUT", {"last_updated": PATCHED})):
        answer = assert_envelope(pushes.request(method, at, body, party=("BE", "BEC")), 2001, http=200, path=name)
        assert reason in answer["status_message"]
    assert pushes.env.sink.records == []


@pytest.mark.parametrize("cdr_id", [*IDS, "12345"])
def test_a_cdr_is_found_at_the_location_its_post_answered(pushes: Pushes, cdr_id: str) -> None:
    body = {**cdr(), "id": cdr_id}
    posted = pushes.request("POST", CDRS_URL, body)
    assert_envelope(posted, 1000, http=201)
    [event] = pushes.events()
    assert (event.country_code, event.party_id, event.object_id) == ("BE", "BEC", cdr_id)
    pushes.store("cdrs", [{"country_code": "BE", "party_id": "BEC", "cdr_id": cdr_id.upper(),
                           "partner_id": "cpo-be-bec", "start_date_time": NOW, "end_date_time": NOW,
                           "total_energy": 15.342, "total_time": 1.973, "total_cost_excl_vat": 4,
                           "last_updated": NOW, "payload_json": json.dumps(body), "version": 1}])
    location_url = posted.headers["location"]
    assert location_url == pushes.env.settings.http.base_url + url("cdrs", "BE", "BEC", cdr_id)
    assert data(pushes.request("GET", location_url.removeprefix(pushes.env.settings.http.base_url))) == body


def test_cdr_urls_change_only_for_an_id_that_is_a_dot_segment() -> None:
    """Every other id keeps the URL it had; a client resolved `.` and `..` away instead of sending them."""
    assert path_segment("12345") == "12345"
    assert path_segment("2024/05 #1?") == "2024%2F05%20%231%3F"
    assert path_segment("a.b") == "a.b" and path_segment("...") == "..."
    assert (path_segment("."), path_segment("..")) == ("%2E", "%2E%2E")


@pytest.mark.parametrize(("path", "message"), [
    (f"{BASE}/sessions/BE/BEC/a%2Fb/extra", f"no OCPI endpoint at {BASE}/sessions/BE/BEC/a%2Fb/extra"),
    (f"{BASE}/sessions%2FBE/BEC/101", f"no OCPI endpoint at {BASE}/sessions%2FBE/BEC/101"),
    (f"{BASE}/sessions/BE%2FBEC/101", f"no OCPI endpoint at {BASE}/sessions/BE%2FBEC/101"),
    (f"{BASE}/sessions/BE/BEC/101%2F", "Session BE/BEC/101/ is not known here"),
])
def test_an_encoded_slash_never_makes_a_path_match_another_route(pushes: Pushes, path: str, message: str) -> None:
    """Unknown paths still get an envelope; it names the path as routed, `%2F` kept, so it says what was sent."""
    answer = assert_envelope(pushes.request("GET", path, party=("BE", "BEC")), 2000, http=404)
    assert answer["status_message"] == message
    assert pushes.env.sink.records == []


@pytest.mark.parametrize(("raw_path", "path", "routed"), [
    (b"/s/BE/BEC/2024%2F05", "/s/BE/BEC/2024/05", "/s/BE/BEC/2024%2F05"),
    (b"/s/BE/BEC/%2fabc%2F", "/s/BE/BEC//abc/", "/s/BE/BEC/%2Fabc%2F"),
    (b"/s/BE/BEC/50%25%2525", "/s/BE/BEC/50%%25", "/s/BE/BEC/50%25%2525"),
    (b"/s/BE/BEC/two%20words", "/s/BE/BEC/two words", "/s/BE/BEC/two words"),
    (b"/s/BE/BEC/101?offset=1%2F", "/s/BE/BEC/101", "/s/BE/BEC/101"),  # httpx keeps the query on raw_path
    (b"/s/%C3%A9/%80", "/s/\u00e9/\ufffd", "/s/\u00e9/\ufffd"),  # decoded the way servers decode `path`
    (None, "/s/BE/BEC/50%", "/s/BE/BEC/50%25"),  # no raw_path: the decoded path, `%` still escaped
    # An empty id stays a segment (a lone `%`); an empty segment before the ids names none and goes, as it always did.
    (b"/ocpi/emsp/2.2.1/locations/BE/BEC/L1//1/", "/ocpi/emsp/2.2.1/locations/BE/BEC/L1//1/",
     "/ocpi/emsp/2.2.1/locations/BE/BEC/L1/%/1/"),
    (b"/ocpi//emsp/2.2.1//sessions/BE/BEC/S1", "/ocpi//emsp/2.2.1//sessions/BE/BEC/S1",
     "/ocpi/emsp/2.2.1/sessions/BE/BEC/S1"),
])
def test_the_routing_path_keeps_each_segment_whole(raw_path: bytes | None, path: str, routed: str) -> None:
    scope: Any = {"type": "http", "path": path, **({"raw_path": raw_path} if raw_path is not None else {})}
    assert routing_path(scope) == routed


@pytest.mark.parametrize(("path", "name"), [
    (f"{BASE}/locations/BE/BEC/LOC1//1", "{evse_uid}"),  # was EVSE `1` of LOC1
    (f"{BASE}/locations/BE/BEC//3256", "{location_id}"),  # was Location `3256`
    (f"{BASE}/locations/BE/BEC//3256/1", "{location_id}"),  # was EVSE `1` of Location `3256`
    (f"{BASE}/sessions/BE/BEC//", "{session_id}"),
])
def test_an_empty_id_segment_is_refused_not_dropped(pushes: Pushes, path: str, name: str) -> None:
    """An empty segment is an empty id, not no segment: dropped, it shifted the ids one level up and the push was
    acknowledged for another object (a Connector PATCH at LOC1//1 became a PATCH of EVSE `1`)."""
    for method in ("PATCH", "PUT"):
        assert_envelope(pushes.request(method, path, {"last_updated": PATCHED}, party=("BE", "BEC")), 2001,
                        http=200, path=name)
    assert pushes.env.sink.records == []


@pytest.mark.parametrize("path", [f"{BASE}//sessions/BE/BEC/S1",
                                  BASE.replace("/emsp/", "//emsp/") + "/sessions/BE/BEC/S1"])
def test_a_double_slash_before_the_ids_still_reaches_the_object(pushes: Pushes, path: str) -> None:
    """A partner joining our base URL and a path that both carry the `/` (`2.2.1//sessions`): Litestar always
    dropped that empty segment, and the push reached the Session; it must not become a 404 naming a `%`."""
    body = {**session(), "id": "S1"}
    assert_envelope(pushes.request("PUT", path, body, party=("BE", "BEC")), 1000, http=200)
    [event] = pushes.events()
    assert (event.level, event.country_code, event.party_id, event.object_id) == ("SESSION", "BE", "BEC", "S1")


def test_every_module_path_has_the_fixed_segments_the_routing_counts() -> None:
    from receivers import cdrs, locations, paths, sessions

    for module in (locations, sessions, cdrs):
        assert len([part for part in module.PATH.split("/") if part]) == paths.FIXED_SEGMENTS, module.PATH


def test_a_get_with_an_empty_id_segment_finds_nothing(pushes: Pushes) -> None:
    """Not the object one level up: `.../LOC1//1` is Connector 1 of EVSE '', not EVSE 1."""
    stored = location()
    stored["evses"][0]["uid"] = "1"
    pushes.store("locations", [{"country_code": "BE", "party_id": "BEC", "location_id": "LOC1",
                                "partner_id": "cpo-be-bec", "city": stored["city"], "country": stored["country"],
                                "publish": True, "last_updated": NOW, "payload_json": json.dumps(stored),
                                "version": 1}])
    assert data(pushes.request("GET", f"{BASE}/locations/BE/BEC/LOC1/1")) == stored["evses"][0]
    assert_envelope(pushes.request("GET", f"{BASE}/locations/BE/BEC/LOC1//1"), 2003, http=404)


@pytest.mark.parametrize("path", [url("sessions", "BE", "BEC", "S" * 37), f"{BASE}/locations/BE/BEC/LOC1//1",
                                  url("locations", "BE", "BEC", "LOC1", "3256", "\u00e9")])
@pytest.mark.parametrize("raw", [b"{not json", b'{"last_updated": "\xff"}', b""], ids=["syntax", "not UTF-8", "empty"])
def test_a_body_that_is_no_json_is_a_400_before_the_url_is_judged(pushes: Pushes, path: str, raw: bytes) -> None:
    """A body that is not JSON MUST be HTTP 400 (05 §2): the transport layer ends once the body is parsed (05 §1), so
    an id in the URL no object can have (a 2001 of the OCPI layer, HTTP 200) is judged only after that."""
    for method in ("PATCH", "PUT"):
        answer = assert_envelope(pushes.request(method, path, raw=raw, party=("BE", "BEC")), 2001, http=400)
        assert "not valid JSON" in answer["status_message"], answer
    assert pushes.env.sink.records == []
