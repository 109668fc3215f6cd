"""The Kafka publisher's bounds, with a producer that stands in for a slow broker."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from aiokafka.errors import OutOfOrderSequenceNumber

from infra.kafka import publisher as publisher_module
from infra.kafka.admin import delete_topics, ensure_topics, partition_counts
from infra.kafka.publisher import Publisher, PublishError
from infra.settings import load_settings
from tests.conftest import unique
from tests.unit.infra.producer_support import KnownTopics


class SlowBroker:
    """A started producer whose broker acknowledges nothing: every send waits until cancelled."""

    client = KnownTopics()

    def __init__(self) -> None:
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Any:
        self.sent.append(value)
        await asyncio.Event().wait()


async def test_a_push_that_gets_no_slot_in_time_answers_within_its_timeout_and_is_not_sent() -> None:
    """Every slot is held by sends a slow broker has not acknowledged: a push waiting for one answers 3000
    (PublishError) within its send timeout and does not hand its record to the producer (it would be written after
    that answer, a duplicate of the partner's resend, and the bound would not bound what the broker is sent)."""
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_KAFKA_SEND_TIMEOUT": "0.3"}).kafka
    publisher = Publisher(kafka, kafka.bootstrap, max_in_flight=2)
    broker = SlowBroker()
    publisher._producer = broker  # type: ignore[assignment]  # started, connected to the slow broker
    publisher._slots = asyncio.Semaphore(0)  # every slot held by a send still waiting for its ack
    started = time.monotonic()

    async def push(n: int) -> float:
        with pytest.raises(PublishError):
            await publisher.publish("t", b"k", str(n).encode())
        return time.monotonic() - started

    answered = await asyncio.wait_for(asyncio.gather(*(push(n) for n in range(4))), 5)
    assert broker.sent == []
    assert max(answered) < 0.3 + 0.2  # each within its own send timeout


async def test_a_slot_freed_in_time_is_used_for_the_rest_of_the_timeout() -> None:
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_KAFKA_SEND_TIMEOUT": "0.4"}).kafka
    publisher = Publisher(kafka, kafka.bootstrap, max_in_flight=1)
    broker = SlowBroker()
    publisher._producer = broker  # type: ignore[assignment]
    first = asyncio.create_task(publisher.publish("t", b"k", b"first"))
    await asyncio.sleep(0.1)
    second = asyncio.create_task(publisher.publish("t", b"k", b"second"))  # waits for the first's slot
    for task in (first, second):
        with pytest.raises(PublishError):
            await task
    assert broker.sent == [b"first", b"second"]  # the second got the slot 0.1 s before its deadline


class GappedProducer:
    """An idempotent producer as aiokafka leaves it after a batch failed once numbered (refused by the broker, or
    expired while its partition had no leader): aiokafka never renumbers, so the broker refuses every later batch
    of that partition (OutOfOrderSequenceNumber). The producers made after the first acknowledge everything."""

    made: list[GappedProducer] = []
    events: list[str] = []
    client = KnownTopics()

    def __init__(self, **_options: Any) -> None:
        self.number = len(GappedProducer.made)
        self.sent: list[bytes] = []
        GappedProducer.made.append(self)

    async def start(self) -> None:
        GappedProducer.events.append(f"start {self.number}")

    async def stop(self) -> None:
        await asyncio.sleep(0.05)  # flushes what it holds
        GappedProducer.events.append(f"stop {self.number}")

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> Any:
        if self.number == 0:
            raise OutOfOrderSequenceNumber()
        self.sent.append(value)


async def test_a_producer_whose_partition_sequence_broke_is_replaced_not_used_for_ever(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """On Kafka (idempotence), a push refused with OutOfOrderSequenceNumber is answered 3000 and the producer is
    replaced: kept, it would have every later push of that partition refused too, until the receivers restart. The
    new producer starts once the old one has flushed what it held (its records must not land after the new one's)."""
    monkeypatch.setattr(publisher_module, "AIOKafkaProducer", GappedProducer)
    monkeypatch.setattr(GappedProducer, "made", [])
    monkeypatch.setattr(GappedProducer, "events", [])
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_KAFKA_SEND_TIMEOUT": "1"}).kafka
    publisher = Publisher(kafka, kafka.bootstrap)
    await publisher.start()
    with pytest.raises(PublishError, match="OutOfOrderSequenceNumber"):
        await publisher.publish("t", b"k", b"refused")
    await publisher.publish("t", b"k", b"resent")  # the partner's resend
    await publisher.publish("t", b"k", b"next")
    assert [producer.sent for producer in GappedProducer.made] == [[], [b"resent", b"next"]]
    assert GappedProducer.events == ["start 0", "stop 0", "start 1"]
    await publisher.stop()
    assert GappedProducer.events[-1] == "stop 1"


async def test_the_send_timeout_counts_from_the_stamp_given() -> None:
    """`since` (when the event was stamped): a record whose send timeout has passed by the time it would be sent
    is not sent, and one sent later waits only for the rest of it."""
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_KAFKA_SEND_TIMEOUT": "0.4"}).kafka
    publisher = Publisher(kafka, kafka.bootstrap)
    broker = SlowBroker()
    publisher._producer = broker  # type: ignore[assignment]
    loop = asyncio.get_running_loop()
    with pytest.raises(PublishError, match="the send timeout passed before it could be sent"):
        await publisher.publish("t", b"k", b"late", since=loop.time() - 0.5)
    assert broker.sent == []
    started = loop.time()
    with pytest.raises(PublishError):
        await publisher.publish("t", b"k", b"rest", since=started - 0.3)
    assert broker.sent == [b"rest"]
    assert loop.time() - started < 0.3


async def test_a_record_for_a_topic_that_does_not_exist_is_refused_not_sent_to_have_it_created(broker: str) -> None:
    """aiokafka asks the broker for a topic's metadata by name on its first send, and a broker that creates topics on
    first use (Apache Kafka's default, and Tansu) then creates it with the cluster's defaults: one replica, one
    partition, 1 MB records on Kafka. A push to a topic that `serve` could not create (Kafka was down at its start) and
    the worker has not created yet was answered 1000 from such a topic, which keeps them. It is answered 3000 until the
    topic exists, and nothing is created."""
    kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": broker, "OCPI_KAFKA_FLAVOR": "tansu",
                           "OCPI_KAFKA_SEND_TIMEOUT": "5"}).kafka
    topic = unique("missing")
    publisher = Publisher(kafka, broker)
    await publisher.start()
    try:
        with pytest.raises(PublishError, match="does not exist"):
            await publisher.publish(topic, b"k", b"refused")
        assert await asyncio.to_thread(partition_counts, broker, [topic]) == {}
        await asyncio.to_thread(ensure_topics, broker, [topic], 2)  # `serve`, `dev` or the worker made it
        await publisher.publish(topic, b"k", b"resent")
    finally:
        await publisher.stop()
        await asyncio.to_thread(delete_topics, broker, [topic])
