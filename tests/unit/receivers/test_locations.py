"""Locations receiver: PUT and PATCH at Location, EVSE and Connector level (08 §3.3-3.4), as events."""

from __future__ import annotations

from typing import Any

import pytest

from ocpi.datetime import parse_datetime
from ocpi.model import EVSE, Connector, ConnectorPatch, EVSEPatch, Location, LocationPatch
from tests.unit.receivers.app_support import make_env, routing  # noqa: F401
from tests.unit.receivers.push_support import (  # noqa: F401
    BASE,
    CONNECTOR_URL,
    EVSE_URL,
    LOCATION_URL,
    PATCHED,
    Pushes,
    assert_envelope,
    connector,
    evse,
    example,
    location,
    make_pushes_fixture,
    no_records,
    payload_as,
    pushes_fixture,
    sent_as,
)

LEVELS = [
    # (method, url, body factory, model, level, payload type, evse_uid, connector_id)
    ("PUT", LOCATION_URL, location, Location, "LOCATION", None, None),
    ("PUT", EVSE_URL, evse, EVSE, "EVSE", "3256", None),
    ("PUT", CONNECTOR_URL, connector, Connector, "CONNECTOR", "3256", "1"),
    ("PATCH", LOCATION_URL, lambda: {"name": "Gent Zuid P1", "last_updated": PATCHED}, LocationPatch, "LOCATION",
     None, None),
    ("PATCH", EVSE_URL, lambda: {"status": "CHARGING", "last_updated": PATCHED}, EVSEPatch, "EVSE", "3256", None),
    ("PATCH", CONNECTOR_URL, lambda: {"tariff_ids": ["12"], "last_updated": PATCHED}, ConnectorPatch,
     "CONNECTOR", "3256", "1"),
]


@pytest.mark.parametrize(("method", "url", "body", "model", "level", "evse_uid", "connector_id"), LEVELS)
def test_each_level_is_published_under_the_locations_key(pushes: Pushes, method: str, url: str, body: Any,
                                                         model: type, level: str, evse_uid: str | None,
                                                         connector_id: str | None) -> None:
    sent = body()
    response = pushes.request(method, url, sent, headers={"X-Request-ID": "r-1", "X-Correlation-ID": "c-1"})
    answer = assert_envelope(response, 1000, http=200)
    assert "data" not in answer  # push answers leave data out (d2)

    [event] = pushes.events()
    assert (event.module, event.operation, event.level) == ("LOCATIONS", method, level)
    assert (event.country_code, event.party_id, event.object_id) == ("BE", "BEC", "LOC1")
    assert (event.evse_uid, event.connector_id) == (evse_uid, connector_id)
    assert event.payload_type == model.__name__
    assert (event.request_id, event.correlation_id) == ("r-1", "c-1")
    assert event.partner_id == "cpo-be-bec" and event.source == "PUSH" and event.relaxations == []
    assert pushes.keys() == [b"BE/BEC/LOC1"]  # every level: the Location's identity, so one partition
    assert pushes.topics() == [pushes.env.settings.kafka.topic_for("locations")]
    assert payload_as(event, model) == sent_as(sent, model)


def test_every_example_location_is_accepted_and_the_broken_evse_example_refused(pushes: Pushes) -> None:
    for name in ("location_example.json", "location_example_uc2_destination_charger.json",
                 "location_example_uc3_destination_charger_not_published.json",
                 "location_example_uc5_home_charge_point.json"):
        body = example(name)
        url = f"{BASE}/locations/{body['country_code']}/{body['party_id']}/{body['id']}"
        assert_envelope(pushes.request("PUT", url, body), 1000)
    # Fragments of a Location (Hours, EnergyMix) travel inside one.
    fragments = [{"opening_times": example("location_hours_247_open_exception_closing.json")},
                 {"opening_times": example("location_hours_opening_hours_with_exceptional_closing.json")},
                 example("location_regularhours_example.json"),
                 {"energy_mix": example("location_energymix_example_simple.json")["energy_mix"]},
                 {"energy_mix": example("location_energymix_example_energy_provider.json")["energy_mix"]},
                 {"energy_mix": example("location_energymix_example_complete.json")["energy_mix"]}]
    for fragment in fragments:
        assert_envelope(pushes.request("PUT", LOCATION_URL, {**location(), **fragment}), 1000)
    assert_envelope(pushes.request("PATCH", f"{BASE}/locations/NL/TNM/1012",
                                   example("location_patch_example_location.json")), 1000)
    assert_envelope(pushes.request("PATCH", f"{BASE}/locations/NL/TNM/1012/3255",
                                   example("location_patch_example_status.json")), 1000)
    with no_records(pushes):
        refused = pushes.request("PUT", f"{BASE}/locations/NL/TNM/1012/3256",
                                 example("location_put_example_add_evse.json"))
        assert_envelope(refused, 2001, http=200)
    assert len(pushes.events()) == 4 + len(fragments) + 2


def test_case_of_cistrings_is_preserved_and_identity_compared_case_insensitively(pushes: Pushes) -> None:
    body = {**location(), "country_code": "be", "party_id": "bec", "id": "Loc1"}
    assert_envelope(pushes.request("PUT", f"{BASE}/locations/BE/Bec/LOC1", body, party=("BE", "BEC")), 1000)
    patch = {"uid": "3256", "status": "AVAILABLE", "last_updated": PATCHED}
    assert_envelope(pushes.request("PATCH", f"{BASE}/locations/be/bec/loc1/3256", patch, party=("BE", "BEC")),
                    1000)
    put_event, patch_event = pushes.events()
    assert (put_event.country_code, put_event.party_id, put_event.object_id) == ("BE", "Bec", "LOC1")  # URL's
    assert (put_event.payload["country_code"], put_event.payload["party_id"], put_event.payload["id"]) == \
        ("be", "bec", "Loc1")  # the body as sent
    assert (patch_event.object_id, patch_event.evse_uid) == ("loc1", "3256")
    assert pushes.keys() == [b"BE/BEC/LOC1", b"BE/BEC/LOC1"]


MISMATCHES = [
    ("PUT", f"{BASE}/locations/BE/BEC/LOC2", location, "$.id"),
    ("PUT", f"{BASE}/locations/NL/TNM/LOC1", location, "$.country_code"),
    ("PUT", f"{BASE}/locations/BE/BEX/LOC1", lambda: {**location(), "party_id": "BEC"}, "$.party_id"),
    ("PUT", f"{LOCATION_URL}/3257", evse, "$.uid"),
    ("PUT", f"{EVSE_URL}/2", connector, "$.id"),
    ("PATCH", LOCATION_URL, lambda: {"id": "LOC2", "name": "x", "last_updated": PATCHED}, "$.id"),
    ("PATCH", LOCATION_URL, lambda: {"party_id": "XXX", "last_updated": PATCHED}, "$.party_id"),
    ("PATCH", EVSE_URL, lambda: {"uid": "3257", "status": "AVAILABLE", "last_updated": PATCHED}, "$.uid"),
    ("PATCH", CONNECTOR_URL, lambda: {"id": "2", "max_voltage": 230, "last_updated": PATCHED}, "$.id"),
]


@pytest.mark.parametrize(("method", "url", "body", "path"), MISMATCHES)
def test_url_and_body_identity_must_agree(make_pushes: Any, method: str, url: str, body: Any, path: str) -> None:
    p = make_pushes()
    if "/BEX/" in url:  # the body's owner is BE/BEC; a partner owning BE/BEX pushes it to its own URL
        p.tokens[("BE", "BEX")] = p.env.provision("cpo-be-bex", ("BE", "BEX", "CPO"))
    with no_records(p):
        answer = assert_envelope(p.request(method, url, body()), 2001, http=200, path=path)
    assert "differs from" in answer["status_message"] and "in the URL" in answer["status_message"]
    assert answer["data"]["path"] == path


LEVEL_MIXUPS = [
    # (method, url, body, path of the first field of another level, its level)
    ("PUT", LOCATION_URL, evse, "$.uid", "EVSE"),
    ("PUT", EVSE_URL, location, "$.country_code", "Location"),
    ("PUT", EVSE_URL, connector, "$.id", "Location and Connector"),
    ("PUT", CONNECTOR_URL, evse, "$.uid", "EVSE"),
    ("PUT", CONNECTOR_URL, location, "$.country_code", "Location"),
    # The classic: an EVSE status PATCH sent to the Location URL would otherwise be an empty Location PATCH.
    ("PATCH", LOCATION_URL, lambda: {"status": "CHARGING", "last_updated": PATCHED}, "$.status", "EVSE"),
    ("PATCH", EVSE_URL, lambda: {"tariff_ids": ["12"], "last_updated": PATCHED}, "$.tariff_ids", "Connector"),
    ("PATCH", CONNECTOR_URL, lambda: {"status": "CHARGING", "last_updated": PATCHED}, "$.status", "EVSE"),
    ("PATCH", EVSE_URL, lambda: {"name": "x", "last_updated": PATCHED}, "$.name", "Location"),
]


@pytest.mark.parametrize(("method", "url", "body", "path", "other"), LEVEL_MIXUPS)
def test_the_object_must_match_the_urls_level(pushes: Pushes, method: str, url: str, body: Any, path: str,
                                              other: str) -> None:
    with no_records(pushes):
        answer = assert_envelope(pushes.request(method, url, body()), 2001, http=200, path=path)
    assert f"a field of {other}, not of" in answer["status_message"]


def test_null_in_a_field_of_another_level_carries_nothing_and_unknown_fields_are_ignored(pushes: Pushes) -> None:
    assert_envelope(pushes.request("PATCH", EVSE_URL, {"status": "AVAILABLE", "name": None,
                                                       "last_updated": PATCHED}), 1000)
    assert_envelope(pushes.request("PUT", LOCATION_URL, {**location(), "x_vendor_note": {"a": 1}}), 1000)
    assert len(pushes.events()) == 2


@pytest.mark.parametrize("url", [LOCATION_URL, EVSE_URL, CONNECTOR_URL])
def test_a_patch_without_last_updated_is_refused(pushes: Pushes, url: str) -> None:
    body = {"LOCATION": {"name": "x"}, "EVSE": {"status": "AVAILABLE"}, "CONNECTOR": {"max_voltage": 230}}
    level = "CONNECTOR" if url == CONNECTOR_URL else "EVSE" if url == EVSE_URL else "LOCATION"
    with no_records(pushes):
        answer = assert_envelope(pushes.request("PATCH", url, body[level]), 2001, http=200,
                                 path="$.last_updated")
    assert "missing required field" in answer["status_message"]


VALID_DATETIMES = ["2015-06-29T20:39:09Z", "2015-06-29T20:39:09", "2016-12-29T17:45:09.2Z",
                   "2016-12-29T17:45:09.2", "2018-01-01T01:08:01.123Z", "2018-01-01T01:08:01.123",
                   "2018-01-01T01:08:01.1234Z", "2018-01-01T01:08:01.12345"]
INVALID_DATETIMES = ["2015-06-29T20:39:09+00:00", "2015-06-29T20:39:09+01:00", "2015-06-29 20:39:09Z",
                     "2015-06-29t20:39:09z", "2018-01-01T01:08:01.12345Z", "2015-02-30T00:00:00Z", "1435610349"]


@pytest.mark.parametrize("value", VALID_DATETIMES)
def test_every_datetime_form_of_the_spec_is_accepted(pushes: Pushes, value: str) -> None:
    assert_envelope(pushes.request("PATCH", EVSE_URL, {"status": "AVAILABLE", "last_updated": value}), 1000)
    [event] = pushes.events()
    assert event.payload["last_updated"] == parse_datetime(value)  # UTC, aware, whichever form was sent


@pytest.mark.parametrize("value", INVALID_DATETIMES)
def test_other_datetime_forms_are_refused(pushes: Pushes, value: str) -> None:
    with no_records(pushes):
        assert_envelope(pushes.request("PATCH", EVSE_URL, {"status": "AVAILABLE", "last_updated": value}), 2001,
                        path="$.last_updated")


def test_a_sub_object_of_a_location_we_do_not_hold_is_acknowledged_for_the_pipeline(pushes: Pushes) -> None:
    """Documented choice (receivers.pushes): the receiver does not read state; the pipeline parks it."""
    url = f"{BASE}/locations/BE/BEC/NEVER-SEEN/E1"
    assert_envelope(pushes.request("PUT", url, {**evse(), "uid": "E1"}), 1000)
    assert_envelope(pushes.request("PATCH", f"{url}/1", {"max_voltage": 400, "last_updated": PATCHED}), 1000)
    assert [(e.object_id, e.evse_uid, e.connector_id) for e in pushes.events()] == [
        ("NEVER-SEEN", "E1", None), ("NEVER-SEEN", "E1", "1")]


def test_only_the_owner_may_push_and_no_method_beyond_the_spec(pushes: Pushes) -> None:
    with no_records(pushes):
        foreign = pushes.request("PUT", LOCATION_URL, location(), party=("NL", "TNM"))
        assert_envelope(foreign, 2001, http=404)
        for method in ("POST", "DELETE"):
            response = pushes.request(method, LOCATION_URL, location())
            assert_envelope(response, 2000, http=405)


@pytest.mark.parametrize(("owner", "path", "reason"), [
    ("NLX/TNM", "{country_code}", "longer than 2 characters"),
    ("NL/TNMX", "{party_id}", "longer than 3 characters"),
    ("/TNM", "{country_code}", "is empty"),
    ("NL/", "{party_id}", "is empty"),
    ("N%0A/TNM", "{country_code}", "printable ASCII"),
])
def test_a_broadcast_push_must_name_an_owner_a_location_can_have(pushes: Pushes, owner: str, path: str,
                                                                 reason: str) -> None:
    # A Hub's broadcast may name any owner (04 §9), so the URL's country_code/party_id are not a party of the
    # caller's: they must be what a Location's can be, CiString(2)/CiString(3) (08 §3.1), or the push (a PATCH or
    # sub-object push, which need not repeat them in the body) is acknowledged for an owner no Location has.
    pushes.tokens[("DE", "HUB")] = pushes.env.provision("hub", ("DE", "HUB", "HUB"))
    broadcast = routing(("DE", "HUB"), ("NL", "OPP"))
    with no_records(pushes):
        for url, body in ((f"{BASE}/locations/{owner}/LOC1", {"name": "x", "last_updated": PATCHED}),
                          (f"{BASE}/locations/{owner}/LOC1/3256", {"status": "AVAILABLE", "last_updated": PATCHED}),
                          (f"{BASE}/locations/{owner}/LOC1/3256", evse())):
            method = "PUT" if "uid" in body else "PATCH"
            answer = assert_envelope(pushes.request(method, url, body, party=("DE", "HUB"), headers=broadcast), 2001,
                                     http=200, path=path)
            assert reason in answer["status_message"]
    assert_envelope(pushes.request("PATCH", f"{BASE}/locations/N1/A-B/LOC1", {"name": "x", "last_updated": PATCHED},
                                   party=("DE", "HUB"), headers=broadcast), 1000)  # any printable ASCII of that length


def test_a_hubs_broadcast_is_its_owners_location_but_never_one_of_the_hubs_own_party(pushes: Pushes) -> None:
    # 04 §9: the Hub forwards the owner's push with itself in OCPI-from-*, the owner kept in the URL; we answer the
    # Hub (to-* the Hub, from-* us). The event is the owner's Location, from the Hub's connection. The Hub's own
    # party is registered as HUB: like any party of a role other than CPO it owns no Location (404, 2001).
    pushes.tokens[("DE", "HUB")] = pushes.env.provision("hub", ("DE", "HUB", "HUB"))
    broadcast = routing(("DE", "HUB"), ("NL", "OPP"))
    patch = {"name": "x", "last_updated": PATCHED}
    response = pushes.request("PATCH", f"{BASE}/locations/FR/ZZZ/LOC1", patch, party=("DE", "HUB"),
                              headers=broadcast)
    assert_envelope(response, 1000, http=200)
    assert [response.headers[f"ocpi-{side}"] for side in ("from-country-code", "from-party-id", "to-country-code",
                                                          "to-party-id")] == ["NL", "OPP", "DE", "HUB"]
    [event] = pushes.events()
    assert (event.partner_id, event.country_code, event.party_id, event.object_id) == ("hub", "FR", "ZZZ", "LOC1")
    assert (event.from_country_code, event.from_party_id) == ("DE", "HUB") and pushes.keys() == [b"FR/ZZZ/LOC1"]
    with no_records(pushes):
        for method, url, body in (("PATCH", f"{BASE}/locations/de/hub/LOC1", patch),
                                  ("PUT", f"{BASE}/locations/DE/HUB/LOC1/3256", evse())):
            answer = assert_envelope(pushes.request(method, url, body, party=("DE", "HUB"), headers=broadcast), 2001,
                                     http=404)
            assert "as HUB, not as CPO" in answer["status_message"]
