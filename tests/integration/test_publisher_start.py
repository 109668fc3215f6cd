"""The receivers' publisher when the broker does not answer as the receivers start: every push is answered 3000
within the send timeout, however many wait for the producer's start, and the broker is used once it answers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from infra.kafka.admin import ensure_topics
from infra.kafka.embedded import EmbeddedBroker
from infra.kafka.publisher import Publisher, PublishError
from infra.settings import load_settings

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.slow]


def _stopped(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


async def test_pushes_waiting_for_the_start_on_a_hung_broker_are_each_answered_within_the_send_timeout() -> None:
    # A broker that accepts connections and answers nothing (SIGSTOP: hung, or its host gone without a reset):
    # each start attempt lasts the whole send timeout. Pushes that queued for the start must not each make their
    # own attempt in turn, the last answered after as many timeouts as pushes were waiting.
    broker = EmbeddedBroker().start()
    assert broker.pid is not None
    pid = broker.pid
    stopped = False
    try:
        kafka = load_settings({"OCPI_KAFKA_BOOTSTRAP": broker.bootstrap, "OCPI_KAFKA_FLAVOR": "tansu",
                               "OCPI_KAFKA_SEND_TIMEOUT": "1"}).kafka
        os.kill(pid, signal.SIGSTOP)
        stopped = True
        while not _stopped(pid):
            await asyncio.sleep(0.01)
        publisher = Publisher(kafka, broker.bootstrap)
        await publisher.start()  # the receivers' lifespan: gives up within the send timeout, serves 3000

        async def push(n: int) -> float:
            started = time.monotonic()
            with pytest.raises(PublishError):
                await publisher.publish("t", b"K", b"%d" % n)
            return time.monotonic() - started

        for _round in range(2):  # the first pushes, and more once a start may be tried again
            took = await asyncio.gather(*(push(n) for n in range(6)))
            assert max(took) < 1.0 + 0.5, took
            await asyncio.sleep(1.1)

        os.kill(pid, signal.SIGCONT)
        stopped = False
        await asyncio.to_thread(ensure_topics, broker.bootstrap, ["t"], 1)  # as `serve` or the worker would
        for _attempt in range(20):
            try:
                await publisher.publish("t", b"K", b"up")
                break
            except PublishError:
                await asyncio.sleep(0.5)
        else:
            pytest.fail("the broker was not used once it answered")
        await publisher.stop()
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        broker.stop()
