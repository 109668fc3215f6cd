"""Refused pushes are recorded (fire-and-forget) on the rejections topic; accepted pushes, GETs and
unauthenticated requests are not, and recording never changes or delays the answer."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest
from litestar.testing import TestClient

from infra.rejections import Rejection, decode_rejection
from receivers.app import create_app
from receivers.rejections import RejectionRecorder
from tests.unit.receivers.app_support import AppEnv, FakeSink, auth, make_env  # noqa: F401
from tests.unit.receivers.push_support import BASE, cdr, session


def rejection(n: int) -> Rejection:
    return Rejection(rejection_id=f"r{n}", partner_id="p", module="cdrs", method="POST", path="/x",
                     ocpi_status=2001, http_status=200, reason="r", field_path="", request_id="q",
                     correlation_id="c", rejected_at=datetime(2024, 1, 1, tzinfo=UTC))


class FailingSink:
    """Kafka down: every publish fails after a while."""

    def __init__(self) -> None:
        self.calls = 0

    async def publish(self, topic: str, key: bytes, value: bytes, *, since: float | None = None) -> None:
        self.calls += 1
        await asyncio.sleep(0.3)
        raise RuntimeError("broker down")


def _client(env: AppEnv, rejection_sink: Any) -> TestClient[Any]:
    app = create_app(env.settings, sink=env.sink, registry_factory=lambda: env.registry,
                     rejection_sink=rejection_sink)
    return TestClient(app)


def _wait(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.02)


@pytest.fixture
def env(make_env: Callable[..., AppEnv]) -> AppEnv:  # noqa: F811 - the imported fixture
    built = make_env(OCPI_TOPIC_REJECTIONS="test.rejections")
    built.provision("cpo-bec", ("BE", "BEC", "CPO"))
    return built


def test_a_refused_push_is_recorded_with_partner_status_and_field_path(env: AppEnv) -> None:
    rejected = FakeSink()
    bad = session()
    del bad["currency"]
    with _client(env, rejected) as client:
        answer = client.put(f"{BASE}/sessions/BE/BEC/101", json=bad,
                            headers={**auth(env.tokens["cpo-bec"]), "X-Request-ID": "req-9",
                                     "X-Correlation-ID": "corr-9"})
        assert answer.status_code == 200 and answer.json()["status_code"] == 2001
        _wait(lambda: len(rejected.records) == 1)
    assert env.sink.records == []  # nothing reached the module topics
    [(topic, key, value)] = rejected.records
    record = decode_rejection(value)
    assert (topic, key) == ("test.rejections", b"cpo-bec")
    assert (record.partner_id, record.module, record.method, record.path, record.ocpi_status,
            record.http_status, record.field_path, record.request_id, record.correlation_id) == (
        "cpo-bec", "sessions", "PUT", f"{BASE}/sessions/BE/BEC/101", 2001, 200, "$.currency", "req-9", "corr-9")
    assert record.reason.startswith("$.currency: missing required field")
    assert record.rejected_at.tzinfo is not None


def test_malformed_json_and_foreign_party_are_recorded_accepted_and_gets_are_not(env: AppEnv) -> None:
    rejected = FakeSink()
    headers = auth(env.tokens["cpo-bec"])
    foreign = cdr() | {"country_code": "NL", "party_id": "TNM"}
    with _client(env, rejected) as client:
        assert client.put(f"{BASE}/sessions/BE/BEC/101", json=session(), headers=headers).json()[
            "status_code"] == 1000
        assert client.post(f"{BASE}/cdrs", content=b"{oops", headers={**headers,
                           "Content-Type": "application/json"}).status_code == 400
        assert client.post(f"{BASE}/cdrs", json=foreign, headers=headers).status_code == 404
        assert client.get(f"{BASE}/sessions/BE/BEC/nope", headers=headers).status_code == 404
        assert client.put(f"{BASE}/sessions/BE/BEC/101", json=session()).status_code == 401  # no token
        _wait(lambda: len(rejected.records) == 2)
        time.sleep(0.2)  # nothing else arrives late
    got = [decode_rejection(value) for _t, _k, value in rejected.records]
    assert [(r.module, r.method, r.ocpi_status, r.http_status) for r in got] == [
        ("cdrs", "POST", 2001, 400), ("cdrs", "POST", 2001, 404)]
    assert got[1].field_path == "$.party_id"  # the owner came from the body: the record names the field
    assert len(env.sink.records) == 1  # the accepted PUT


def test_a_broker_that_is_down_neither_delays_nor_changes_the_answer(env: AppEnv) -> None:
    failing = FailingSink()
    bad = session()
    del bad["currency"]
    with _client(env, failing) as client:
        started = time.monotonic()
        for _ in range(8):
            answer = client.put(f"{BASE}/sessions/BE/BEC/101", json=bad, headers=auth(env.tokens["cpo-bec"]))
            assert answer.status_code == 200 and answer.json()["status_code"] == 2001
        elapsed = time.monotonic() - started
        _wait(lambda: failing.calls >= 2)
    assert elapsed < 8 * 0.3 / 2, elapsed  # waiting for the failing sends would take 2.4 s
    assert failing.calls >= 2  # they were attempted, one after the other, and dropped


async def test_the_queue_is_bounded_and_drops_with_a_count() -> None:
    sink = FakeSink()
    recorder = RejectionRecorder(sink, "t", maxsize=2)
    for n in range(5):
        recorder.note(rejection(n))
    assert recorder.dropped == 3
    recorder.start()
    await recorder.stop()
    assert [decode_rejection(v).rejection_id for _t, _k, v in sink.records] == ["r0", "r1"]
    assert recorder.sent == 2
