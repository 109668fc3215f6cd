"""Helpers for the receiver push/GET tests: valid bodies per object, one partner per party, a client that
picks the party's token, and the events the fake sink received, decoded.

Import the fixtures into a test module (they build on app_support's `make_env`, which must be imported too):
`from tests.unit.receivers.push_support import make_pushes_fixture, pushes_fixture`; tests then ask for
`pushes` / `make_pushes` (the fixtures' names differ from the functions' so parameters shadow nothing).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

import httpx
import pytest
from clickhouse_connect.driver.client import Client
from litestar.testing import TestClient

from infra.clickhouse.client import connect
from infra.codec import DecodedEvent, decode_event
from ocpi.canonical import to_ocpi_json
from ocpi.decode import decode
from receivers.app import create_app
from receivers.state import StateReader
from tests.conftest import EXAMPLES
from tests.unit.receivers.app_support import AppEnv, auth

T = TypeVar("T")
BASE = "/ocpi/emsp/2.2.1"
# Every party of the spec's examples, each its own single-role CPO partner (no routing headers needed).
PARTIES = (("BE", "BEC"), ("NL", "TNM"), ("NL", "ALF"), ("DE", "ALL"))


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def location() -> dict[str, Any]:
    """location_example.json: BE/BEC/LOC1 with EVSEs 3256 (connectors 1, 2) and 3257 (connector 1)."""
    return example("location_example.json")  # type: ignore[no-any-return]


def evse() -> dict[str, Any]:
    return copy.deepcopy(location()["evses"][0])  # type: ignore[no-any-return]


def connector() -> dict[str, Any]:
    return copy.deepcopy(location()["evses"][0]["connectors"][0])  # type: ignore[no-any-return]


def session() -> dict[str, Any]:
    """session_example_2_short_finished.json: BE/BEC/101."""
    return example("session_example_2_short_finished.json")  # type: ignore[no-any-return]


def cdr() -> dict[str, Any]:
    """A complete CDR BE/BEC/12345 (the spec's CDR example, with d2's CdrToken country/party)."""
    return {
        "country_code": "BE", "party_id": "BEC", "id": "12345",
        "start_date_time": "2015-06-29T21:39:09Z", "end_date_time": "2015-06-29T23:37:32Z",
        "session_id": "101",
        "cdr_token": {"country_code": "DE", "party_id": "TNM", "uid": "012345678", "type": "RFID",
                      "contract_id": "DE8ACC12E46L89"},
        "auth_method": "WHITELIST",
        "cdr_location": {"id": "LOC1", "name": "Gent Zuid", "address": "F.Rooseveltlaan 3A", "city": "Gent",
                         "postal_code": "9000", "country": "BEL",
                         "coordinates": {"latitude": "3.729944", "longitude": "51.047599"},
                         "evse_uid": "3256", "evse_id": "BE*BEC*E041503003", "connector_id": "1",
                         "connector_standard": "IEC_62196_T2", "connector_format": "SOCKET",
                         "connector_power_type": "AC_1_PHASE"},
        "currency": "EUR",
        "charging_periods": [{"start_date_time": "2015-06-29T21:39:09Z",
                              "dimensions": [{"type": "TIME", "volume": 1.973}], "tariff_id": "12"}],
        "total_cost": {"excl_vat": 4.00, "incl_vat": 4.40},
        "total_energy": 15.342, "total_time": 1.973, "total_time_cost": {"excl_vat": 4.00, "incl_vat": 4.40},
        "last_updated": "2015-06-29T23:37:32Z",
    }


LOCATION_URL = f"{BASE}/locations/BE/BEC/LOC1"
EVSE_URL = f"{LOCATION_URL}/3256"
CONNECTOR_URL = f"{EVSE_URL}/1"
SESSION_URL = f"{BASE}/sessions/BE/BEC/101"
CDRS_URL = f"{BASE}/cdrs"
PATCHED = "2019-06-24T12:39:09Z"


@dataclass
class Pushes:
    """A running receivers app (fake Kafka sink, chDB registry) with one partner per party of PARTIES."""

    env: AppEnv
    client: TestClient[Any]
    tokens: dict[tuple[str, str], str]

    def request(self, method: str, url: str, body: Any = None, *, party: tuple[str, str] | None = None,
                raw: bytes | None = None, headers: dict[str, str] | None = None) -> httpx.Response:
        """`url` relative to the server; the token is the one of `party`, else of the URL's owner."""
        owner = party or _owner(url)
        content = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        all_headers = {**auth(self.tokens[owner]), "Content-Type": "application/json", **(headers or {})}
        return self.client.request(method, url, content=content, headers=all_headers)

    def events(self) -> list[DecodedEvent]:
        return [decode_event(value) for _topic, _key, value in self.env.sink.records]

    def keys(self) -> list[bytes]:
        return [key for _topic, key, _value in self.env.sink.records]

    def topics(self) -> list[str]:
        return [topic for topic, _key, _value in self.env.sink.records]

    def with_store_down(self) -> TestClient[Any]:
        """A client of this app whose reads of the store fail to connect (ClickHouse down): `with p.with_store_down()
        as client:`."""

        def broken() -> Client:
            raise ConnectionRefusedError("ClickHouse is down")

        app = create_app(self.env.settings, sink=self.env.sink, registry_factory=lambda: self.env.registry,
                         state_reader=StateReader(broken))
        return TestClient(app, raise_server_exceptions=False)

    def store(self, table: str, rows: list[dict[str, Any]]) -> None:
        """Write current-state rows the way the pipeline does (upper-cased key, payload_json)."""
        client = connect(self.env.settings.clickhouse_dsn, database=self.env.settings.clickhouse.database)
        try:
            columns = list(rows[0])
            client.insert(table, [[row[c] for c in columns] for row in rows], column_names=columns)
        finally:
            client.close()


def sent_as(body: Any, model: type[T]) -> T:
    """What the receiver must have understood from `body` (a JSON value) as the OCPI Struct `model`."""
    return decode(json.dumps(body).encode(), model).value


def payload_as(event: DecodedEvent, model: type[T]) -> T:
    """An event's payload (Avro builtins: Decimal, datetime) back into the OCPI Struct `model`."""
    return decode(to_ocpi_json(event.payload), model).value


def _owner(url: str) -> tuple[str, str]:
    parts = url.removeprefix(BASE).split("/")
    if len(parts) >= 4:
        return parts[2].upper(), parts[3].upper()
    return "BE", "BEC"  # POST /cdrs has no owner in the URL; the tests' CDRs are BE/BEC's


def assert_envelope(response: httpx.Response, status: int, *, http: int | None = None,
                    path: str | None = None) -> dict[str, Any]:
    """The response is an OCPI envelope with `status` (and HTTP status, and a message naming `path`)."""
    body = response.json()
    assert body["status_code"] == status, response.text
    assert isinstance(body["timestamp"], str)
    if http is not None:
        assert response.status_code == http, response.text
    if path is not None:
        assert body["status_message"].startswith(f"{path}: "), body["status_message"]
    return body  # type: ignore[no-any-return]


@pytest.fixture(name="make_pushes")
def make_pushes_fixture(make_env: Callable[..., AppEnv]) -> Iterator[Callable[..., Pushes]]:
    """Build a Pushes; `compat` gives every partner that compatibility profile, `compat_for` one party's."""
    opened: list[TestClient[Any]] = []

    def build(*, compat: tuple[str, ...] = (), compat_for: dict[tuple[str, str], tuple[str, ...]] | None = None,
              **env: str) -> Pushes:
        app_env = make_env(**env)
        profiles = compat_for or {}
        tokens = {(cc, pid): app_env.provision(f"cpo-{cc}-{pid}".lower(), (cc, pid, "CPO"),
                                               compat=profiles.get((cc, pid), compat))
                  for cc, pid in PARTIES}
        client = TestClient(app_env.app, raise_server_exceptions=False)
        client.__enter__()
        opened.append(client)
        return Pushes(app_env, client, tokens)

    yield build
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture(name="pushes")
def pushes_fixture(make_pushes: Callable[..., Pushes]) -> Pushes:
    return make_pushes()


@contextmanager
def no_records(p: Pushes) -> Iterator[None]:
    """Nothing may reach the sink inside the block (a refused push publishes nothing)."""
    before = len(p.env.sink.records)
    yield
    assert len(p.env.sink.records) == before, "a refused push was published"


# --- table-driven refusals ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    """One invalid push: what is sent, and the status, field path and reason it must be refused with."""

    name: str  # "<object>: <constraint kind>", the test id
    method: str
    url: str
    body: Callable[[], Any]
    path: str
    reason: str  # a part of the reason the message must give
    status: int = 2001
    http: int = 200


def changed(body: Callable[[], dict[str, Any]], path: str, value: Any = ...) -> Callable[[], dict[str, Any]]:
    """`body` with the field at `path` (dotted, list indices as numbers) set to `value`, or removed."""

    def build() -> dict[str, Any]:
        result = body()
        *parents, last = path.split(".")
        node: Any = result
        for part in parents:
            node = node[int(part)] if part.isdigit() else node[part]
        if value is ...:
            del node[last]
        else:
            node[int(last) if last.isdigit() else last] = value
        return result

    return build


def check_refusal(p: Pushes, case: Refusal) -> None:
    with no_records(p):
        answer = assert_envelope(p.request(case.method, case.url, case.body()), case.status, http=case.http,
                                 path=case.path)
    assert case.reason in answer["status_message"], answer["status_message"]
    assert answer["data"] == {"path": case.path, "reason": answer["status_message"].split(": ", 1)[1]}
