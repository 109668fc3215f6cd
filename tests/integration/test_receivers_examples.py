"""Every Location, Session and CDR example of the spec through HTTP into the real (embedded) Kafka, and back:
consumed from the module topics, decoded (infra.codec), equal to what was sent, under the right key."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ocpi.model import CDR, EVSEPatch, Location, LocationPatch, Session, SessionPatch
from tests.conftest import EXAMPLES
from tests.integration.receivers_support import consume, receivers
from tests.unit.receivers.push_support import cdr, payload_as, sent_as

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

BASE = "/ocpi/emsp/2.2.1"
AVRO_CDR = Path(__file__).resolve().parents[1] / "unit" / "avro" / "fixtures" / "cdr_example.json"


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def location_url(body: dict[str, Any]) -> str:
    return f"{BASE}/locations/{body['country_code']}/{body['party_id']}/{body['id']}"


def pushes() -> list[tuple[str, str, Any, type, bytes]]:
    """(method, url, body, model, Kafka key) of every example push that must be accepted."""
    result = []
    for name in ("location_example.json", "location_example_uc2_destination_charger.json",
                 "location_example_uc3_destination_charger_not_published.json",
                 "location_example_uc5_home_charge_point.json"):
        body = example(name)
        key = f"{body['country_code']}/{body['party_id']}/{body['id']}".upper().encode()
        result.append(("PUT", location_url(body), body, Location, key))
    # The fragment examples (Hours, EnergyMix) inside the Location they belong to.
    for name, field in (("location_hours_247_open_exception_closing.json", "opening_times"),
                        ("location_hours_opening_hours_with_exceptional_closing.json", "opening_times"),
                        ("location_regularhours_example.json", None),
                        ("location_energymix_example_simple.json", None),
                        ("location_energymix_example_energy_provider.json", None),
                        ("location_energymix_example_complete.json", None)):
        fragment = example(name) if field is None else {field: example(name)}
        body = {**example("location_example.json"), **fragment}
        result.append(("PUT", location_url(body), body, Location, b"BE/BEC/LOC1"))
    result += [
        ("PATCH", f"{BASE}/locations/NL/TNM/1012", example("location_patch_example_location.json"), LocationPatch,
         b"NL/TNM/1012"),
        ("PATCH", f"{BASE}/locations/NL/TNM/1012/3255", example("location_patch_example_status.json"), EVSEPatch,
         b"NL/TNM/1012"),
        ("PUT", f"{BASE}/sessions/BE/BEC/101", example("session_example_2_short_finished.json"), Session,
         b"BE/BEC/101"),
        ("PATCH", f"{BASE}/sessions/NL/TNM/101", example("session_patch_example_total_cost.json"), SessionPatch,
         b"NL/TNM/101"),
        ("POST", f"{BASE}/cdrs", cdr(), CDR, b"BE/BEC/12345"),
        ("POST", f"{BASE}/cdrs", json.loads(AVRO_CDR.read_text()), CDR, b"NL/CPX/CDR-2024-000123"),
    ]
    return result


PARTIES = [("BE", "BEC"), ("NL", "TNM"), ("NL", "ALF"), ("DE", "ALL"), ("NL", "CPX")]


async def test_every_example_goes_through_kafka_unchanged(settings_for, chdb_dsn: str, broker: str) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    sent: dict[str, tuple[str, Any, type, bytes]] = {}
    async with receivers(settings, chdb_dsn, PARTIES) as app:
        for i, (method, url, body, model, key) in enumerate(pushes()):
            response = await app.push(method, url, body, request_id=f"example-{i}")
            assert response.json()["status_code"] == 1000, (url, response.text)
            sent[f"example-{i}"] = (method, body, model, key)
        broken = await app.push("PUT", f"{BASE}/locations/NL/TNM/1012/3256",
                                example("location_put_example_add_evse.json"), request_id="broken")
        assert broken.status_code == 200 and broken.json()["status_code"] == 2001, broken.text

    records = await consume(broker, settings.kafka.module_topics, len(sent))
    assert sorted(event.request_id for _t, _k, event in records) == sorted(sent)  # and not "broken"
    for topic, key, event in records:
        method, body, model, expected_key = sent[event.request_id]
        assert topic == settings.kafka.topic_for(event.module.lower())
        assert key == expected_key and event.operation == method and event.payload_type == model.__name__
        assert payload_as(event, model) == sent_as(body, model), event.request_id
        assert event.relaxations == [] and event.source == "PUSH"


async def test_relaxations_travel_on_the_kafka_event(settings_for, chdb_dsn: str, broker: str) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    body = {**example("session_example_2_short_finished.json"), "kwh": "41.12",
            "start_date_time": "2015-06-29T23:39:09+01:00"}
    async with receivers(settings, chdb_dsn, [("BE", "BEC")],
                         compat=("STRING_AS_NUMBER", "DATETIME_OFFSET")) as app:
        response = await app.push("PUT", f"{BASE}/sessions/BE/BEC/101", body)
        assert response.json()["status_code"] == 1000, response.text
    [(_topic, _key, event)] = await consume(broker, settings.kafka.module_topics, 1)
    assert sorted(event.relaxations) == ["DATETIME_OFFSET:$.start_date_time", "STRING_AS_NUMBER:$.kwh"]
    assert payload_as(event, Session) == sent_as(example("session_example_2_short_finished.json"), Session)


async def test_a_location_whose_event_outgrows_a_megabyte_is_acknowledged(settings_for, chdb_dsn: str,  # type: ignore[no-untyped-def]
                                                                          broker: str) -> None:
    # A hub of 2,500 EVSEs with directions: 2 MB of JSON, within the receivers' 4 MB, and an Avro event above
    # aiokafka's default max_request_size (1 MB), which refused it before the broker saw it: 3000 forever.
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu")
    body = example("location_example.json")
    body["id"] = "HUB"
    template = body["evses"][0]
    body["evses"] = [{**template, "uid": f"E{n:05d}", "evse_id": f"BE*BEC*E{n:05d}",
                      "directions": [{"language": "en", "text": f"{n:05d} " + "x" * 500}]} for n in range(2500)]
    assert 1 << 20 < len(json.dumps(body)) < 4 << 20
    async with receivers(settings, chdb_dsn, [("BE", "BEC")]) as app:
        response = await app.push("PUT", location_url(body), body)
        assert response.json()["status_code"] == 1000, response.json()
    [(_topic, key, event)] = await consume(broker, (settings.kafka.topic_locations,), 1)
    assert key == b"BE/BEC/HUB" and len(event.payload["evses"]) == 2500
