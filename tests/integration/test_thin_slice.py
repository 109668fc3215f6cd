"""The foundation's thin slice, end to end on real engines: HTTP push → Kafka (Avro) → Faust → ClickHouse."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import httpx
import pytest

from infra.kafka.embedded import EmbeddedBroker
from pipeline import reports
from pipeline.stack import Stack
from receivers.registry import PartnerRegistry, PartyRole
from tests.conftest import EXAMPLES
from tests.unit.receivers.push_support import cdr

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]


def auth(token: str) -> dict[str, str]:
    return {"Authorization": "Token " + base64.b64encode(token.encode()).decode()}


def example(name: str) -> dict:
    return json.loads((EXAMPLES / name).read_text())


async def wait_for(client, sql: str, want, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    got = None
    while time.monotonic() < deadline:
        got = await asyncio.to_thread(lambda: client.query(sql).result_rows)
        if got == want:
            return got
        await asyncio.sleep(0.3)
    return got


@pytest.fixture
async def stack(settings_for, broker):  # type: ignore[no-untyped-def]
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu").with_overrides(http={"port": 0})
    running = await Stack(settings).start()
    yield running
    await running.stop()
    assert all(p.poll() is not None for p in running.children.values())


@pytest.fixture
async def token(stack: Stack) -> str:
    registry = PartnerRegistry(stack.clickhouse)  # type: ignore[arg-type]
    roles = [PartyRole(country_code="BE", party_id="BEC", role="CPO", business_name="BEC")]
    return (await asyncio.to_thread(registry.register_direct, "bec", "Belgian CPO", roles))[1]


async def test_session_put_and_cdr_post_land_in_clickhouse_exactly(stack: Stack, token: str) -> None:
    session = example("session_example_2_short_finished.json")
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
        put = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", json=session,
                             headers={"X-Request-ID": "req-1", "X-Correlation-ID": "corr-1"})
        assert put.json()["status_code"] == 1000, put.text
        assert "data" not in put.json()
        assert put.headers["x-request-id"] == "req-1" and put.headers["x-correlation-id"] == "corr-1"
        post = await http.post("/ocpi/emsp/2.2.1/cdrs", json=cdr())
        assert post.status_code == 201 and post.json()["status_code"] == 1000, post.text
        assert post.headers["location"] == f"{stack.base_url}/ocpi/emsp/2.2.1/cdrs/BE/BEC/12345"

    client = stack.clickhouse
    sessions = await wait_for(client, "SELECT country_code, party_id, session_id, partner_id, status, kwh, "
                              "token_uid, location_id, evse_uid, connector_id, currency, total_cost_excl_vat, "
                              "total_cost_incl_vat, start_date_time, end_date_time FROM sessions FINAL",
                              want=[("BE", "BEC", "101", "bec", "COMPLETED", Decimal("41.1200"), "123abc",
                                     "LOC1", "3256", "1", "EUR", Decimal("8.5000"), Decimal("9.3500"),
                                     datetime(2015, 6, 29, 22, 39, 9, tzinfo=UTC),
                                     datetime(2015, 6, 29, 23, 50, 16, tzinfo=UTC))])
    assert sessions == [("BE", "BEC", "101", "bec", "COMPLETED", Decimal("41.1200"), "123abc", "LOC1", "3256", "1",
                         "EUR", Decimal("8.5000"), Decimal("9.3500"), datetime(2015, 6, 29, 22, 39, 9, tzinfo=UTC),
                         datetime(2015, 6, 29, 23, 50, 16, tzinfo=UTC))]
    cdrs = await wait_for(client, "SELECT country_code, party_id, cdr_id, session_id, total_energy, total_time, "
                          "total_cost_excl_vat, total_cost_incl_vat, credit, token_uid FROM cdrs FINAL",
                          want=[("BE", "BEC", "12345", "101", Decimal("15.3420"), Decimal("1.9730"),
                                 Decimal("4.0000"), Decimal("4.4000"), False, "012345678")])
    assert cdrs == [("BE", "BEC", "12345", "101", Decimal("15.3420"), Decimal("1.9730"), Decimal("4.0000"),
                     Decimal("4.4000"), False, "012345678")]
    # A batch's tables are inserted side by side: the sessions row can be visible before its raw_events row.
    await wait_for(client, "SELECT module FROM raw_events FINAL ORDER BY module", want=[("CDRS",), ("SESSIONS",)])
    raw = client.query("SELECT module, operation, level, object_id, request_id, correlation_id, source "
                       "FROM raw_events FINAL ORDER BY module").result_rows
    assert raw == [("CDRS", "POST", "CDR", "12345", raw[0][4], raw[0][5], "PUSH"),
                   ("SESSIONS", "PUT", "SESSION", "101", "req-1", "corr-1", "PUSH")]


async def test_an_encoded_slash_stays_inside_its_id_under_granian(stack: Stack, token: str) -> None:
    """granian hands the app a decoded `path` and the undecoded `raw_path`; ids are routed from the latter
    (receivers.paths), so Session `2024/05` is that Session and a PATCH of Location `A/B` is not EVSE `B`'s."""
    session = {**example("session_example_2_short_finished.json"), "id": "2024/05"}
    changed = "2019-06-24T12:39:09Z"
    moved = {"coordinates": {"latitude": "51.047599", "longitude": "3.729944"}, "last_updated": changed}
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
        at = "/ocpi/emsp/2.2.1/sessions/BE/BEC/2024%2F05"
        for method, url, body in (("PUT", at, session), ("PATCH", at, {"kwh": 1, "last_updated": changed}),
                                  ("PATCH", "/ocpi/emsp/2.2.1/locations/BE/BEC/A%2FB", moved)):
            answer = await http.request(method, url, json=body)
            assert answer.status_code == 200 and answer.json()["status_code"] == 1000, answer.text
        post = await http.post("/ocpi/emsp/2.2.1/cdrs", json={**cdr(), "id": "/2024//05/"})
        assert post.headers["location"] == f"{stack.base_url}/ocpi/emsp/2.2.1/cdrs/BE/BEC/%2F2024%2F%2F05%2F"
        unencoded = await http.get("/ocpi/emsp/2.2.1/sessions/BE/BEC/2024/05")  # four segments: no such endpoint
        assert unencoded.status_code == 404 and unencoded.json()["status_code"] == 2000, unencoded.text

    want = [("CDRS", "POST", "CDR", "/2024//05/", None), ("LOCATIONS", "PATCH", "LOCATION", "A/B", None),
            ("SESSIONS", "PATCH", "SESSION", "2024/05", None), ("SESSIONS", "PUT", "SESSION", "2024/05", None)]
    got = await wait_for(stack.clickhouse, "SELECT module, operation, level, object_id, evse_uid FROM raw_events "
                         "FINAL ORDER BY module, operation", want=want)
    assert got == want
    # And back out: the GETs read the stored objects (through the chDB shim here) at the same URLs.
    await wait_for(stack.clickhouse, "SELECT count() FROM sessions FINAL WHERE kwh = 1", want=[(1,)])
    await wait_for(stack.clickhouse, "SELECT count() FROM cdrs FINAL", want=[(1,)])
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
        stored = (await http.get(at)).json()
        assert stored["status_code"] == 1000 and stored["data"]["id"] == "2024/05" and stored["data"]["kwh"] == 1
        billed = (await http.get(post.headers["location"])).json()
        assert billed["status_code"] == 1000 and billed["data"]["id"] == "/2024//05/", billed


async def test_a_cdr_posted_again_is_answered_by_what_it_is_to_the_held_one(stack: Stack, token: str) -> None:
    """Once the first is stored: the same CDR again is 1000 (HTTP 200), another under its id is refused (2001 on
    `$.id`); both reach the pipeline, which counts the DUPLICATE and records the CONFLICT, and the held one stands."""
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
        first = await http.post("/ocpi/emsp/2.2.1/cdrs", json=cdr())
        assert first.status_code == 201 and first.json()["status_code"] == 1000, first.text
        await wait_for(stack.clickhouse, "SELECT count() FROM cdrs FINAL", want=[(1,)])
        again = await http.post("/ocpi/emsp/2.2.1/cdrs", json=cdr())
        assert again.status_code == 200 and again.json()["status_code"] == 1000, again.text
        other = await http.post("/ocpi/emsp/2.2.1/cdrs", json={**cdr(), "total_energy": 16})
        assert other.json()["status_code"] == 2001 and other.json()["status_message"].startswith("$.id: "), other.text
        assert other.headers["location"] == first.headers["location"]

    want = [("APPLIED",), ("DUPLICATE",), ("CONFLICT",)]
    assert await wait_for(stack.clickhouse, "SELECT outcome FROM raw_events FINAL ORDER BY received_at",
                          want=want) == want
    assert await wait_for(stack.clickhouse, "SELECT kind FROM anomalies FINAL", want=[("CDR_CONFLICT",)]
                          ) == [("CDR_CONFLICT",)]
    assert stack.clickhouse.query("SELECT total_energy FROM cdrs FINAL").result_rows == [(Decimal("15.3420"),)]
    # The refusal is recorded too; partner health counts that POST once, refused: two pushes, one reject.
    await wait_for(stack.clickhouse, "SELECT ocpi_status, field_path FROM rejections FINAL", want=[(2001, "$.id")])
    assert stack.clickhouse is not None
    _columns, rows = reports.run(stack.clickhouse, reports.health(reports.Period(), raw_days=30))
    assert [tuple(row[1:5]) for row in rows] == [("CDRS", 2, 1, 0.3333)]


async def test_bad_input_gets_an_ocpi_envelope_never_a_traceback(stack: Stack, token: str) -> None:
    async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
        malformed = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", content=b"{not json",
                                   headers={"Content-Type": "application/json"})
        assert malformed.status_code == 400
        assert malformed.json()["status_code"] == 2001 and "timestamp" in malformed.json()

        session = example("session_example_2_short_finished.json")
        del session["currency"]
        missing = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", json=session)
        assert missing.json()["status_code"] == 2001
        assert "$.currency" in missing.json()["status_message"]

        unknown = await http.get("/ocpi/emsp/2.2.1/nothing-here")
        assert unknown.status_code == 404 and unknown.json()["status_code"] == 2000
        assert "Traceback" not in unknown.text

        no_token = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", json=session, headers={"Authorization": ""})
        assert no_token.status_code == 401 and no_token.json()["status_code"] == 2000


async def test_stopped_broker_answers_3xxx_never_1000(settings_for, tmp_path: Path) -> None:
    with EmbeddedBroker() as own_broker:
        settings = settings_for(OCPI_KAFKA_BOOTSTRAP=own_broker.bootstrap, OCPI_KAFKA_FLAVOR="tansu",
                                OCPI_KAFKA_SEND_TIMEOUT="2").with_overrides(http={"port": 0})
        stack = await Stack(settings, run_worker=False).start()
        try:
            registry = PartnerRegistry(stack.clickhouse)  # type: ignore[arg-type]
            roles = [PartyRole(country_code="BE", party_id="BEC", role="CPO")]
            _, token = await asyncio.to_thread(registry.register_direct, "bec", "BEC", roles)
            session = example("session_example_2_short_finished.json")
            async with httpx.AsyncClient(base_url=stack.base_url, headers=auth(token), timeout=30) as http:
                ok = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", json=session)
                assert ok.json()["status_code"] == 1000
                own_broker.stop()
                down = await http.put("/ocpi/emsp/2.2.1/sessions/BE/BEC/101", json=session)
                assert 3000 <= down.json()["status_code"] < 4000, down.text
                assert down.status_code >= 500
        finally:
            await stack.stop()
