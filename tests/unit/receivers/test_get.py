"""Receiver GETs (08 §3.2, 09 §3.2, 10 §3.2): the stored current state, 404 for what we do not hold, only for
the owner. Rows are written the way the pipeline writes them (upper-cased key, OCPI JSON payload, version)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from litestar.testing import TestClient

from infra.clickhouse.client import connect
from pipeline.retention import Pseudonymizer, pseudonymise_due
from receivers import state
from receivers.app import create_app
from receivers.state import StateReader
from tests.unit.receivers.app_support import (
    auth,
    concurrent_client,
    make_env,  # noqa: F401
)
from tests.unit.receivers.push_support import (  # noqa: F401
    BASE,
    CDRS_URL,
    LOCATION_URL,
    SESSION_URL,
    Pushes,
    assert_envelope,
    cdr,
    location,
    make_pushes_fixture,
    pushes_fixture,
    session,
)

# Recent, not a fixed date: the session and CDR rows stored here give no received_at, which defaults to
# last_updated, and the billing TTL (7 years) counts from it: rows dated 2026-01-01 are deleted from 2033 on.
NOW = (datetime.now(UTC) - timedelta(days=1)).replace(microsecond=0)


@contextlib.contextmanager
def silent_store() -> Iterator[str]:
    """The DSN of a ClickHouse server that accepts connections and never answers (stuck, overloaded)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(64)  # connections complete in the backlog; nothing is ever read or answered
        yield f"http://127.0.0.1:{silent.getsockname()[1]}"


def store_location(p: Pushes, body: dict[str, Any], version: int = 1, *, unlisted: bool = False) -> None:
    p.store("locations", [{"country_code": body["country_code"].upper(), "party_id": body["party_id"].upper(),
                           "location_id": body["id"].upper(), "partner_id": "cpo-be-bec", "city": body["city"],
                           "country": body["country"], "publish": body["publish"], "last_updated": NOW,
                           "payload_json": json.dumps(body), "version": version, "unlisted": unlisted}])


def data(response: Any) -> Any:
    return assert_envelope(response, 1000, http=200)["data"]


def test_a_location_its_evses_and_connectors_as_stored(pushes: Pushes) -> None:
    stored = location()
    stored["evses"][1]["uid"] = "Evse-B"  # CiString: found whatever the URL's case
    store_location(pushes, stored)
    assert data(pushes.request("GET", LOCATION_URL)) == stored
    assert data(pushes.request("GET", f"{BASE}/locations/be/bec/loc1")) == stored
    assert data(pushes.request("GET", f"{LOCATION_URL}/3256")) == stored["evses"][0]
    assert data(pushes.request("GET", f"{LOCATION_URL}/EVSE-b")) == stored["evses"][1]
    assert data(pushes.request("GET", f"{LOCATION_URL}/3256/2")) == stored["evses"][0]["connectors"][1]
    assert data(pushes.request("GET", f"{LOCATION_URL}/evse-B/1")) == stored["evses"][1]["connectors"][0]
    assert pushes.env.sink.records == []  # a GET publishes nothing


def test_the_newest_version_is_answered(pushes: Pushes) -> None:
    store_location(pushes, {**location(), "name": "old"}, version=1)
    store_location(pushes, {**location(), "name": "new"}, version=2)
    store_location(pushes, {**location(), "name": "older"}, version=0)
    assert data(pushes.request("GET", LOCATION_URL))["name"] == "new"


@pytest.mark.parametrize(("url", "what"), [
    (f"{BASE}/locations/BE/BEC/NOPE", "Location BE/BEC/NOPE is not known"),
    (f"{LOCATION_URL}/9999", "has no EVSE '9999'"),
    (f"{LOCATION_URL}/3256/7", "has no Connector '7'"),
])
def test_what_we_do_not_hold_is_404_unknown_location(pushes: Pushes, url: str, what: str) -> None:
    store_location(pushes, location())
    answer = assert_envelope(pushes.request("GET", url), 2003, http=404)
    assert what in answer["status_message"] and "data" not in answer


def test_a_location_a_complete_list_no_longer_held_is_unknown_until_listed_again(pushes: Pushes) -> None:
    """Full sync (08 §2.1): a Location a complete pulled list no longer held is no longer valid (its newest row says
    `unlisted`, migration 0030): 2003, at every depth, as one we never held; a newer push lists it again."""
    store_location(pushes, location(), version=1)
    store_location(pushes, location(), version=3, unlisted=True)
    for url in (LOCATION_URL, f"{LOCATION_URL}/3256", f"{LOCATION_URL}/3256/2"):
        answer = assert_envelope(pushes.request("GET", url), 2003, http=404)
        assert "Location BE/BEC/LOC1 is not known" in answer["status_message"]
    store_location(pushes, {**location(), "name": "back"}, version=5)
    assert data(pushes.request("GET", LOCATION_URL))["name"] == "back"


def test_a_location_without_evses(pushes: Pushes) -> None:
    bare = {key: value for key, value in location().items() if key != "evses"}
    store_location(pushes, bare)
    assert data(pushes.request("GET", LOCATION_URL)) == bare
    assert_envelope(pushes.request("GET", f"{LOCATION_URL}/3256"), 2003, http=404)


def test_a_session_as_stored(pushes: Pushes) -> None:
    stored = session()
    pushes.store("sessions", [{"country_code": "BE", "party_id": "BEC", "session_id": "101",
                               "partner_id": "cpo-be-bec", "status": "COMPLETED", "start_date_time": NOW,
                               "kwh": 41.12, "last_updated": NOW, "payload_json": json.dumps(stored),
                               "version": 1}])
    assert data(pushes.request("GET", SESSION_URL)) == stored
    unknown = assert_envelope(pushes.request("GET", f"{BASE}/sessions/BE/BEC/999"), 2000, http=404)
    assert "Session BE/BEC/999 is not known" in unknown["status_message"]


@pytest.mark.parametrize("cdr_id", ["12345", "2024/05 #1?"])
def test_a_cdr_at_the_url_its_post_answered(pushes: Pushes, cdr_id: str) -> None:
    body = {**cdr(), "id": cdr_id}
    posted = pushes.request("POST", CDRS_URL, body)
    assert_envelope(posted, 1000, http=201)
    pushes.store("cdrs", [{"country_code": "BE", "party_id": "BEC", "cdr_id": cdr_id.upper(),
                           "partner_id": "cpo-be-bec", "start_date_time": NOW, "end_date_time": NOW,
                           "total_energy": 15.342, "total_time": 1.973, "total_cost_excl_vat": 4,
                           "last_updated": NOW, "payload_json": json.dumps(body), "version": 1}])
    url = posted.headers["location"].removeprefix(pushes.env.settings.http.base_url)
    assert data(pushes.request("GET", url)) == body
    unknown = assert_envelope(pushes.request("GET", f"{CDRS_URL}/BE/BEC/other"), 2000, http=404)
    assert "CDR BE/BEC/other is not known" in unknown["status_message"]


def test_after_the_clear_period_the_owner_reads_its_personal_identifiers_as_pseudonyms(pushes: Pushes) -> None:
    """What the retention pass leaves is what a GET answers (README, Retention): once OCPI_RETENTION_PSEUDONYMISE_DAYS
    have passed, a Session's and a CDR's token uid, contract id and authorization reference are their pseudonyms, the
    clear values being gone; everything else is as stored. Not an error and not a 404: the object is still held."""
    received = NOW - timedelta(days=pushes.env.settings.retention.pseudonymise_days + 1)
    sent_session = {**session(), "authorization_reference": "AUTH-1"}
    pushes.store("sessions", [{"country_code": "BE", "party_id": "BEC", "session_id": "101",
                               "partner_id": "cpo-be-bec", "status": "COMPLETED", "start_date_time": received,
                               "kwh": 41.12, "token_uid": sent_session["cdr_token"]["uid"],
                               "contract_id": sent_session["cdr_token"]["contract_id"],
                               "authorization_reference": "AUTH-1", "last_updated": received,
                               "payload_json": json.dumps(sent_session), "version": 1, "received_at": received}])
    sent_cdr = cdr()
    pushes.store("cdrs", [{"country_code": "BE", "party_id": "BEC", "cdr_id": "12345", "partner_id": "cpo-be-bec",
                           "start_date_time": received, "end_date_time": received, "total_energy": 15.342,
                           "total_time": 1.973, "total_cost_excl_vat": 4, "token_uid": sent_cdr["cdr_token"]["uid"],
                           "contract_id": sent_cdr["cdr_token"]["contract_id"], "last_updated": received,
                           "payload_json": json.dumps(sent_cdr), "version": 1, "received_at": received}])
    settings = pushes.env.settings
    pseudonym = Pseudonymizer(b"a key of the pseudonymisation")
    store = connect(settings.clickhouse_dsn, database=settings.clickhouse.database)
    try:
        assert pseudonymise_due(store, settings, pseudonym, datetime.now(UTC)) == {"sessions": 1, "cdrs": 1,
                                                                                 "locations": 0}
    finally:
        store.close()

    def as_pseudonymised(sent: dict[str, Any]) -> dict[str, Any]:
        token = sent["cdr_token"]
        expected = {**sent, "cdr_token": {**token, "uid": pseudonym(token["uid"]),
                                          "contract_id": pseudonym(token["contract_id"])}}
        if "authorization_reference" in sent:
            expected["authorization_reference"] = pseudonym(sent["authorization_reference"])
        return expected

    read_session = data(pushes.request("GET", SESSION_URL))
    assert read_session == as_pseudonymised(sent_session)
    assert read_session["cdr_token"]["uid"].startswith("psn:") and read_session["authorization_reference"] != "AUTH-1"
    assert data(pushes.request("GET", f"{CDRS_URL}/BE/BEC/12345")) == as_pseudonymised(sent_cdr)


@pytest.mark.parametrize("url", [LOCATION_URL, f"{LOCATION_URL}/3256", f"{LOCATION_URL}/3256/1", SESSION_URL,
                                 f"{CDRS_URL}/BE/BEC/12345"])
def test_only_the_owner_may_read(pushes: Pushes, url: str) -> None:
    """Another partner gets the same 404 as for an unknown object: nothing tells it the object exists."""
    store_location(pushes, location())
    answer = assert_envelope(pushes.request("GET", url, party=("NL", "TNM")), 2001, http=404)
    assert "BE/BEC" in answer["status_message"]


def test_a_store_that_cannot_be_read_is_3000_never_404(pushes: Pushes) -> None:
    with pushes.with_store_down() as client:
        response = client.get(SESSION_URL, headers=auth(pushes.tokens[("BE", "BEC")]))
        answer = assert_envelope(response, 3000, http=500)
        assert "please retry" in answer["status_message"]
        # Pushes do not depend on the store.
        push = client.put(SESSION_URL, json=session(), headers=auth(pushes.tokens[("BE", "BEC")]))
        assert_envelope(push, 1000)


def test_a_store_that_does_not_answer_is_3000_within_the_read_timeout(make_pushes: Any,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A ClickHouse server that accepts the connection and never answers (stuck, overloaded): the GET is answered
    3000 once `READ_TIMEOUT_S` has passed, not after the client library's 300 s, long after the partner gave up (and
    every such GET held one of the few threads the app's other blocking calls share)."""
    monkeypatch.setattr(state, "READ_TIMEOUT_S", 1.0)
    with silent_store() as dsn:
        p = make_pushes(OCPI_CLICKHOUSE_DSN=dsn)
        started = time.monotonic()
        response = p.request("GET", SESSION_URL)
        elapsed = time.monotonic() - started
    answer = assert_envelope(response, 3000, http=500)
    assert "please retry" in answer["status_message"]
    assert elapsed < 10, elapsed


async def test_gets_waiting_on_a_store_that_does_not_answer_hold_up_no_push(make_pushes: Any,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Many GETs at once while ClickHouse does not answer: each is answered 3000 within `READ_TIMEOUT_S`, not one after
    the other (they queued for the one connection attempt, and for the few threads of the pool), and a push meanwhile
    is answered at once: pushes do not depend on the store, and must not wait for a thread that GETs hold."""
    monkeypatch.setattr(state, "READ_TIMEOUT_S", 2.0)
    with silent_store() as dsn:
        p = make_pushes(OCPI_CLICKHOUSE_DSN=dsn)
        headers = auth(p.tokens[("BE", "BEC")])
        async with concurrent_client(p.env.app) as client:
            assert_envelope(await client.put(SESSION_URL, json=session(), headers=headers), 1000)  # warmed up
            started = time.monotonic()

            async def read(index: int) -> tuple[float, int]:
                answer = await client.get(f"{SESSION_URL}-{index}", headers=headers)
                return time.monotonic() - started, answer.json()["status_code"]

            async def push() -> tuple[float, int]:
                await asyncio.sleep(0.3)  # once the GETs wait
                answer = await client.put(SESSION_URL, json=session(), headers=headers)
                return time.monotonic() - started - 0.3, answer.json()["status_code"]

            *reads, pushed = await asyncio.gather(*(read(index) for index in range(16)), push())
    assert {code for _, code in reads} == {3000}
    assert max(elapsed for elapsed, _ in reads) < 5, sorted(reads)  # one after the other: 32 s
    assert pushed[1] == 1000
    assert pushed[0] < 1, pushed  # it waited for a thread the GETs held: 10 s


async def test_a_push_needs_no_thread_of_the_pool(make_pushes: Any) -> None:
    """Every thread of the pool the app's blocking calls share is held (GETs, registry reads, credentials waiting on a
    store that does not answer): a push is answered all the same, as it reads nothing (it waited for a thread, to run
    a guard)."""
    p = make_pushes()
    held = threading.Event()
    async with concurrent_client(p.env.app) as client:
        loop = asyncio.get_running_loop()
        holders = [loop.run_in_executor(None, held.wait) for _ in range(64)]  # more than the pool has (at most 32)
        try:
            pushed = await asyncio.wait_for(client.put(SESSION_URL, json=session(),
                                                       headers=auth(p.tokens[("BE", "BEC")])), 5)
        finally:
            held.set()
            await asyncio.gather(*holders)
    assert_envelope(pushed, 1000)


def test_the_read_timeout_is_below_a_partners_patience() -> None:
    assert 1 <= state.READ_TIMEOUT_S <= 15


@pytest.mark.parametrize(("url", "code"), [
    (f"{BASE}/sessions/BE/BEC/{'S' * 37}", 2000),
    (f"{BASE}/locations/BE/BEC/{'L' * 37}", 2003),
    (f"{BASE}/locations/BE/BEC/{'L' * 6000}/3256", 2003),
    (f"{CDRS_URL}/BE/BEC/{'C' * 40}", 2000),
])
def test_an_id_no_object_can_have_is_unknown_without_a_read(make_pushes: Any, url: str, code: int) -> None:
    """Longer than its CiString (36, a credit CDR's 39): nothing stored has it, so it is a 404 like any unknown
    object, and the store is not asked. Asked, the id went into the query's URL, and the embedded store's shim (as in
    `dev`) refuses a URL of 8 kB: a GET for such an id was answered 3000, "please retry", for ever."""
    p = make_pushes()
    reads: list[str] = []

    def counted() -> Client:
        reads.append("connect")
        raise ConnectionRefusedError("ClickHouse is down")

    app = create_app(p.env.settings, sink=p.env.sink, registry_factory=lambda: p.env.registry,
                     state_reader=StateReader(counted))
    with TestClient(app, raise_server_exceptions=False) as client:
        assert_envelope(client.get(url, headers=auth(p.tokens[("BE", "BEC")])), code, http=404)
    assert reads == []
