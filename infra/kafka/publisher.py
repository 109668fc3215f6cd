"""The durable publisher: a push is acknowledged only after the broker acknowledged its record (acks=all)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, OutOfOrderSequenceNumber, UnknownError, UnknownProducerId

from infra.kafka import compat
from infra.settings import KafkaSettings

log = logging.getLogger(__name__)

_ATTEMPTS = 3  # sends of one record within its timeout


# Refusals after which an idempotent producer (Kafka) sends nothing to the partition again: aiokafka numbers a
# partition's batches once and never renumbers, so a batch that failed after it was numbered (refused by the broker,
# or expired while its partition had no leader) leaves a gap for which the broker refuses every later batch of the
# partition. Only a new producer (a new producer id, numbering from 0) is heard there again.
_PRODUCER_BROKEN = (OutOfOrderSequenceNumber, UnknownProducerId)


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
      broker acknowledges it before; on Kafka the idempotent producer retries a batch until the broker is back
      and writes it then (unless its partition had no leader for the request timeout: then it fails it, and the
      producer is replaced, see below). Either way the resend is then a duplicate, which the pipeline tolerates
      (dedup, idempotent sinks); what must never happen is the other way round, a 1000 for a record the broker did
      not acknowledge.
    - Order per partition: the producer has one request in flight per broker and appends a partition's records
      in turn, and a broker handles a connection's requests in turn. A record the broker writes after its push
      was answered 3000 must not land after the next push of its object, which an equal `last_updated` would then
      let it undo (`pipeline.ordering`: the later arrival wins). On Tansu, without idempotence, only the
      connection keeps that order: the producer's request timeout is not the send timeout but at least
      `compat.REQUEST_TIMEOUT_MIN_S` (3 × the send timeout when larger), for aiokafka drops a connection whose request
      timed out and sends what follows on a new one, which the broker may serve before the old request.
    - A broker that is down when we start: the producer is created on a later send, by one caller at a time
      (a lock), within the send timeout, and not within `retry_start_s` of the last attempt's end; meanwhile sends
      fail at once, and those that waited for an attempt that failed fail with it.
    - A topic that does not exist is answered 3000 (`_require_topic`), never sent to: the send would have a broker
      that creates topics on first use create it with the cluster's defaults rather than ours.
    - A producer the broker no longer hears on a partition (`_PRODUCER_BROKEN`, Kafka's idempotence) is replaced:
      the push is answered 3000 and the next send starts a new producer, once the old one has flushed what it
      held (its records must not land after the new one's), within that send's timeout.
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
        self._retiring: asyncio.Task[None] | None = None  # the stop of a replaced producer (flushing)

    async def start(self) -> None:
        async with self._starting:
            await self._start()

    async def _start(self) -> None:
        if self._producer is not None:
            return
        deadline = time.monotonic() + self._timeout  # the whole attempt, a replaced producer's flush included
        if self._retiring is not None:
            # A replaced producer flushes first: a record it still holds must not land after the new one's.
            try:
                await asyncio.wait_for(asyncio.shield(self._retiring), self._timeout)
            except TimeoutError:
                self._last_start_attempt = time.monotonic()
                log.warning("the replaced Kafka producer is still flushing; pushes answer 3000 until it is done")
                return
            except Exception:
                log.exception("the replaced Kafka producer did not stop cleanly")  # it is gone all the same
            self._retiring = None
        request_timeout_ms = compat.request_timeout_ms(self._kafka)
        producer = AIOKafkaProducer(
            bootstrap_servers=self._bootstrap,
            linger_ms=1,
            request_timeout_ms=request_timeout_ms,
            **compat.producer_options(self._kafka),
        )
        try:
            # Within the send timeout (a broker that accepts connections but does not answer would otherwise hold
            # the pushes waiting for this start for the request timeout).
            await asyncio.wait_for(producer.start(), max(deadline - time.monotonic(), 0.001))
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
            retiring, self._retiring = self._retiring, None
        if retiring is not None:
            with contextlib.suppress(Exception):
                await retiring
        if producer is not None:
            await producer.stop()  # flushes what is in flight

    def _replace(self, broken: AIOKafkaProducer) -> None:
        """Retire `broken` (its stop flushes in the background); the next send starts a new producer."""
        current, self._producer = self._producer, None
        if current is not broken:
            self._producer = current  # replaced already, by a send that was refused before this one
            return
        self._last_start_attempt = float("-inf")  # not a failed start: the next send starts one at once
        self._retiring = asyncio.create_task(self._stop(broken), name="kafka-producer-retire")
        log.warning("Kafka no longer accepts this producer's records on a partition; replacing the producer")

    @staticmethod
    async def _stop(producer: AIOKafkaProducer) -> None:
        await producer.stop()  # flushes what it holds

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

    async def _require_topic(self, producer: AIOKafkaProducer, topic: str, deadline: float) -> None:
        """Raise PublishError unless `topic` exists, asking the broker without naming it. aiokafka asks for a topic it
        does not know by name on its first send, and a broker that creates topics on first use (Apache Kafka's
        default, and Tansu) creates it then with the cluster's defaults (on Kafka one replica, one partition, 1 MB
        records), which the topic keeps: `serve`, `dev` and the worker create ours with our own."""
        if topic in producer.client.cluster.topics():  # this producer has sent to it: it exists (or did a moment ago)
            return
        loop = asyncio.get_running_loop()
        try:
            cluster = await asyncio.wait_for(producer.client.fetch_all_metadata(), max(deadline - loop.time(), 0.001))
        except (KafkaError, TimeoutError, OSError) as exc:
            raise PublishError(f"Kafka did not acknowledge the record on {topic}: its topics could not be listed "
                               f"({type(exc).__name__})") from exc
        if topic not in cluster.topics():
            # Partner-facing (the 3000's message): `serve`, `dev` or the worker create it (README).
            raise PublishError(f"Kafka did not take the record: topic {topic} does not exist yet")

    async def publish(self, topic: str, key: bytes, value: bytes, *, since: float | None = None) -> None:
        """Send one record and wait for the broker's acknowledgement, or raise PublishError.

        The send timeout counts from `since` (the event loop's `time()` when the record's event was stamped, its
        `received_at`), else from now: the deadline sweeps' margin is the send timeout after that stamp, and the
        encoding between stamp and send (about a second for a 4 MB Location) must count in it.

        Within the send timeout, a send refused with a retriable error (or Tansu's UnknownError, which it
        answers to the first produce after a restart while our metadata is stale) is sent again after a
        metadata refresh: the record was not acknowledged, so a second send is safe (at worst a duplicate).
        """
        loop = asyncio.get_running_loop()
        deadline = (loop.time() if since is None else min(since, loop.time())) + self._timeout
        try:
            # A slot only within the send timeout: a record sent after it would be written after its 3000 answer.
            # (asyncio.timeout_at rather than wait_for, here and below: wait_for runs its awaitable as a task of
            # its own, two tasks a push.)
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise PublishError(f"Kafka did not acknowledge the record on {topic}: no send slot free "
                               "within the send timeout") from None
        try:
            producer = await self._ensure_started()
            if loop.time() >= deadline:  # the producer's start, or the event's encoding, took it
                raise PublishError(f"Kafka did not acknowledge the record on {topic}: the send timeout passed "
                                   "before it could be sent")
            await self._require_topic(producer, topic, deadline)
            for attempt in range(1, _ATTEMPTS + 1):
                try:
                    async with asyncio.timeout_at(deadline):
                        await producer.send_and_wait(topic, value=value, key=key)
                    return
                except KafkaError as exc:
                    if isinstance(exc, _PRODUCER_BROKEN):
                        self._replace(producer)
                        raise PublishError(f"Kafka did not acknowledge the record on {topic}: "
                                           f"{type(exc).__name__}") from exc
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
