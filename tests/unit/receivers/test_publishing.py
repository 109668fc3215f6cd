"""The receivers' publish path (receivers.publishing): a push is answered 1000 only for a record the broker
acknowledged within OCPI_KAFKA_SEND_TIMEOUT of the push's stamp (`received_at`), the deadline sweeps' margin."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from litestar.testing import TestClient

from infra.kafka.publisher import Publisher
from infra.settings import load_settings
from receivers import publishing
from receivers.app import create_app
from tests.unit.infra.producer_support import KnownTopics
from tests.unit.receivers.app_support import AppEnv, app_env, auth, make_env  # noqa: F401
from tests.unit.receivers.push_support import CDRS_URL, assert_envelope, cdr

pytestmark = pytest.mark.clickhouse


class LateBroker:
    """A started producer whose broker acknowledges each record `delay_s` after it was handed over."""

    client = KnownTopics()

    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Any:
        self.sent.append(value)
        await asyncio.sleep(self.delay_s)


def test_a_push_acknowledged_later_than_the_send_timeout_after_its_stamp_is_answered_3000(
        app_env: AppEnv, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    """The stamp is taken before the event is hashed and Avro-encoded (a 4 MB Location takes about a second of
    that); the send timeout counts from the stamp, not from the send, so an ack that comes later than the timeout
    after the stamp (which a deadline sweep, deciding a deadline the send timeout after it, may have passed) is
    not answered 1000."""
    env = app_env
    token = env.provision("cpo-be-bec", ("BE", "BEC", "CPO"))
    encode = publishing.encode_event

    def slow_encode(event: dict[str, Any]) -> bytes:
        time.sleep(0.3)  # a large object's encoding, after the stamp
        return encode(event)

    monkeypatch.setattr(publishing, "encode_event", slow_encode)
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_KAFKA_SEND_TIMEOUT": "1"}).kafka
    publisher = Publisher(kafka, kafka.bootstrap)
    broker = LateBroker(0.8)  # within the send timeout of the send, not of the stamp
    publisher._producer = broker  # type: ignore[assignment]  # started, connected to the late broker
    app = create_app(env.settings, sink=publisher, registry_factory=lambda: env.registry)
    with TestClient(app, raise_server_exceptions=False) as client:
        response = client.post(CDRS_URL, json=cdr(), headers=auth(token))
    assert broker.sent, "the record was not handed to the producer"
    assert_envelope(response, 3000, http=500)
