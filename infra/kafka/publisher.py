"""The durable publisher: a push is acknowledged only after the broker acknowledged its record (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, UnknownError

from infra.kafka import compat
from infra.settings import KafkaSettings

log = logging.getLogger(__name__)

_ATTEMPTS = 3  # sends of one record within its timeout

# How long the producer waits for the broker's answer to a request before it gives up on the connection (aiokafka's
# `request_timeout_ms`, also how long a batch may wait for a broker that is away): well beyond the send timeout, so
# that a request still in the broker's hands when its push was answered 3000 keeps the connection, and the next
# records of its partition go out on it after that request (see `Publisher`).
REQUEST_TIMEOUT_MIN_S = 30.0
_REQUEST_TIMEOUT_MAX_MS = 2**31 - 1  # an int32 on the wire (a produce request's timeout)


class PublishError(RuntimeError):
    """The broker did not acknowledge a record in time; the caller must not claim success."""


class Publisher:
    """One aiokafka producer, started and stopped with the app's lifespan, reconnecting by itself.

    - In-flight sends are bounded and each waits at most `send_timeout_s`, so a slow or stopped broker turns
      into quick 3xxx answers, not a pile of requests that wait for minutes (research note §6). The wait for a
      slot counts in that timeout, and a push that got none in time is answered without being sent: sent after
      its deadline it would be written after its 3000, and an overloaded broker would be sent every push anyway.
    - A broker that goes away and comes back (even a new one on the same address, topics re-created) needs
      nothing from us: the producer reconnects and refreshes its metadata on its own (see `publish` for the
      one refusal that needs a nudge). A record answered with PublishError is the partner's to resend. It may
      still be written later: on Tansu (no idempotence) its batch expires after `request_timeout_ms` unless the
      broker acknowledges it before; on Kafka the idempotent producer never expires a batch and writes it once
      the broker is back. Either way the resend is then a duplicate, which the pipeline tolerates (dedup,
      idempotent sinks); what must never happen is the other way round, a 1000 for a record the broker did not
      acknowledge.
    - Order per partition: the producer has one request in flight per broker and appends a partition's records
      in turn, and a broker handles a connection's requests in turn. A record the broker writes after its push
      was answered 3000 must not land after the next push of its object, which an equal `last_updated` would then
      let it undo (`pipeline.ordering`: the later arrival wins). On Tansu, without idempotence, only the
      connection keeps that order: the producer's request timeout is not the send timeout but at least
      `REQUEST_TIMEOUT_MIN_S` (3 × the send timeout when larger), for aiokafka drops a connection whose request
      timed out and sends what follows on a new one, which the broker may serve before the old request.
    - A broker that is down when we start: the producer is created on a later send, by one caller at a time
      (a lock), within the send timeout, and not within `retry_start_s` of the last attempt's end; meanwhile sends
      fail at once, and those that waited for an attempt that failed fail with it.
    """

    def __init__(self, kafka: KafkaSettings, bootstrap: str, *, max_in_flight: int = 512,
                 retry_start_s: float = 1.0) -> None:
        self._kafka = kafka
        self._bootstrap = bootstrap
        self._timeout = kafka.send_timeout_s
        self._slots = asyncio.Semaphore(max_in_flight)
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()
        self._retry_start_s = retry_start_s
        self._last_start_attempt = float("-inf")

    async def start(self) -> None:
        async with self._starting:
            await self._start()

    async def _start(self) -> None:
        if self._producer is not None:
            return
        request_timeout_ms = min(int(max(3 * self._timeout, REQUEST_TIMEOUT_MIN_S) * 1000), _REQUEST_TIMEOUT_MAX_MS)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            linger_ms=1,
            request_timeout_ms=request_timeout_ms,
            **compat.producer_options(self._kafka),
        )
        try:
            # Within the send timeout (a broker that accepts connections but does not answer would otherwise hold
            # the pushes waiting for this start for the request timeout).
            await asyncio.wait_for(producer.start(), self._timeout)
        except Exception:
            # A broker that is down at start must not keep the receivers from serving 3xxx answers.
            await producer.stop()
            log.warning("Kafka at %s not reachable; pushes answer 3000 until it is", self._bootstrap)
            return
        finally:
            # From the attempt's end: the sends that waited for it fail with it, rather than each making its own
            # attempt in turn (an attempt on a broker that does not answer lasts the send timeout).
            self._last_start_attempt = time.monotonic()
        self._producer = producer

    async def stop(self) -> None:
        async with self._starting:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is in flight

    async def _ensure_started(self) -> AIOKafkaProducer:
        producer = self._producer
        if producer is None:
            async with self._starting:
                if self._producer is None and time.monotonic() - self._last_start_attempt >= self._retry_start_s:
                    await self._start()
                producer = self._producer
            if producer is None:
                raise PublishError(f"Kafka at {self._bootstrap} is not reachable")
        return producer

    async def publish(self, topic: str, key: bytes, value: bytes) -> None:
        """Send one record and wait for the broker's acknowledgement, or raise PublishError.

        Within the send timeout, a send refused with a retriable error (or Tansu's UnknownError, which it
        answers to the first produce after a restart while our metadata is stale) is sent again after a
        metadata refresh: the record was not acknowledged, so a second send is safe (at worst a duplicate).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        try:
            # A slot only within the send timeout: a record sent after it would be written after its 3000 answer.
            await asyncio.wait_for(self._slots.acquire(), self._timeout)
        except TimeoutError:
            raise PublishError(f"Kafka did not acknowledge the record on {topic}: no send slot free "
                               "within the send timeout") from None
        try:
            producer = await self._ensure_started()
            if loop.time() >= deadline:
                raise PublishError(f"Kafka did not acknowledge the record on {topic}: no send slot free "
                                   "within the send timeout")
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    await asyncio.wait_for(producer.send_and_wait(topic, value=value, key=key),
                                           max(deadline - loop.time(), 0.001))
                    return
                except KafkaError as exc:
                    retry = getattr(exc, "retriable", False) or isinstance(exc, UnknownError)
                    if not retry or attempt == _ATTEMPTS or loop.time() >= deadline:
                        raise PublishError(f"Kafka did not acknowledge the record on {topic}: "
                                           f"{type(exc).__name__}") from exc
                    log.info("send to %s refused (%s), retrying after a metadata refresh", topic,
                             type(exc).__name__)
                    with contextlib.suppress(KafkaError, TimeoutError):
                        await asyncio.wait_for(producer.client.force_metadata_update(),
                                               max(deadline - loop.time(), 0.001))
                except (TimeoutError, OSError) as exc:
                    raise PublishError(f"Kafka did not acknowledge the record on {topic}: "
                                       f"{type(exc).__name__}") from exc
        finally:
            self._slots.release()
