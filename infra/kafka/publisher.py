"""The durable publisher: a push is acknowledged only after the broker acknowledged its record (acks=all)."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.kafka import compat
from infra.settings import KafkaSettings

log = logging.getLogger(__name__)


class PublishError(RuntimeError):
    """The broker did not acknowledge a record in time; the caller must not claim success."""


class Publisher:
    """One aiokafka producer, started and stopped with the app's lifespan.

    In-flight sends are bounded so that a slow broker turns into quick 3xxx answers, not a pile of
    requests that each wait for minutes (research note §6: a stuck ack must not hold a request).
    """

    def __init__(self, kafka: KafkaSettings, bootstrap: str, *, max_in_flight: int = 512) -> None:
        self._kafka = kafka
        self._bootstrap = bootstrap
        self._timeout = kafka.send_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._producer: AIOKafkaProducer | None = None

    async def start(self) -> None:
        timeout_ms = int(self._timeout * 1000)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            linger_ms=1,
            request_timeout_ms=timeout_ms,
            **compat.producer_options(self._kafka),
        )
        try:
            await producer.start()
        except Exception:
            # A broker that is down at start must not keep the receivers from serving 3xxx answers.
            await producer.stop()
            log.warning("Kafka at %s not reachable at start; pushes answer 3000 until it is", self._bootstrap)
            self._producer = None
            return
        self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is in flight

    async def _ensure_started(self) -> AIOKafkaProducer:
        if self._producer is None:
            await self.start()
            if self._producer is None:
                raise PublishError(f"Kafka at {self._bootstrap} is not reachable")
        return self._producer

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record and wait for the broker's acknowledgement, or raise PublishError."""
        async with self._slots:
            producer = await self._ensure_started()
            try:
                await asyncio.wait_for(producer.send_and_wait(topic, value=value, key=key), self._timeout)
            except (KafkaError, TimeoutError, OSError) as exc:
                raise PublishError(f"Kafka did not acknowledge the record on {topic}: {type(exc).__name__}") from exc
