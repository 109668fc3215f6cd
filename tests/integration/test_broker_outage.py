"""The broker goes away mid-test: every push is answered 3xxx, never 1000. A new broker on the same address
(topics re-created) is used without any restart of ours: a resend succeeds and lands in Kafka; a refused
push appears there at most as a duplicate of its resend."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from infra.kafka.admin import ensure_topics, partition_counts
from infra.kafka.embedded import EmbeddedBroker, free_port
from infra.process import spawn, terminate
from pipeline.stack import Stack
from pipeline.worker import changelog_sources
from tests.conftest import EXAMPLES
from tests.integration.pipeline_support import pipeline_settings, publish, record, wait_for
from tests.integration.receivers_support import Receivers, consume, receivers
from tests.unit.pipeline.builders import location
from tests.unit.receivers.push_support import cdr

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

BASE = "/ocpi/emsp/2.2.1"


def example(name: str) -> Any:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def pushes() -> list[tuple[str, str, Any]]:
    """One push per module and kind."""
    return [
        ("PUT", f"{BASE}/sessions/BE/BEC/101", example("session_example_2_short_finished.json")),
        ("PATCH", f"{BASE}/sessions/BE/BEC/101", example("session_patch_example_total_cost.json")),
        ("POST", f"{BASE}/cdrs", cdr()),
        ("PUT", f"{BASE}/locations/BE/BEC/LOC1", example("location_example.json")),
        ("PATCH", f"{BASE}/locations/BE/BEC/LOC1/3256", example("location_patch_example_status.json")),
    ]


async def push_all(app: Receivers, tag: str) -> list[Any]:
    """Every push (the in-process test client serves them one at a time); their HTTP status and envelope."""
    responses = await asyncio.gather(*(app.push(method, url, body, request_id=f"{tag}-{i}")
                                       for i, (method, url, body) in enumerate(pushes())))
    return [(r.status_code, r.json()) for r in responses]


async def test_3xxx_while_the_broker_is_down_then_a_resend_succeeds(settings_for, chdb_dsn: str) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    first = EmbeddedBroker(port=port).start()
    second: EmbeddedBroker | None = None
    try:
        settings = settings_for(OCPI_KAFKA_BOOTSTRAP=first.bootstrap, OCPI_KAFKA_FLAVOR="tansu",
                                OCPI_KAFKA_SEND_TIMEOUT="1")
        async with receivers(settings, chdb_dsn, [("BE", "BEC")]) as app:
            assert [envelope["status_code"] for _http, envelope in await push_all(app, "before")] == [1000] * 5

            await asyncio.to_thread(first.stop)  # off the loop: the producer's connections must close
            down = await push_all(app, "down")
            assert all(3000 <= envelope["status_code"] < 4000 for _http, envelope in down), down
            assert all(http == 500 and "retry" in envelope["status_message"] for http, envelope in down)

            second = EmbeddedBroker(port=port).start()
            await asyncio.to_thread(ensure_topics, second.bootstrap, settings.kafka.module_topics,
                                    settings.kafka.partitions)
            again = await push_all(app, "again")
            assert [envelope["status_code"] for _http, envelope in again] == [1000] * 5, again

        records = await consume(second.bootstrap, settings.kafka.module_topics, 5)
        resent = {event.request_id: event for _t, _k, event in records if event.request_id.startswith("again")}
        assert sorted(resent) == [f"again-{i}" for i in range(5)]
        # A send that timed out may still have been delivered once the broker was back (the producer had
        # not expired its batch yet): then it is the same content as its resend, a duplicate the pipeline
        # drops. Nothing else may be there.
        for _t, _k, event in records:
            if not event.request_id.startswith("again"):
                index = event.request_id.rsplit("-", 1)[1]
                assert event.request_id == f"down-{index}", event.request_id
                assert event.content_hash == resent[f"again-{index}"].content_hash
    finally:
        first.stop()
        if second is not None:
            second.stop()


async def test_a_broker_that_is_down_at_start_is_used_once_it_is_up(settings_for, chdb_dsn: str) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=f"127.0.0.1:{port}", OCPI_KAFKA_FLAVOR="tansu",
                            OCPI_KAFKA_SEND_TIMEOUT="1")
    broker: EmbeddedBroker | None = None
    try:
        async with receivers(settings, chdb_dsn, [("BE", "BEC")], create_topics=False) as app:
            down = await push_all(app, "down")
            assert all(3000 <= envelope["status_code"] < 4000 for _http, envelope in down), down

            broker = EmbeddedBroker(port=port).start()
            await asyncio.to_thread(ensure_topics, broker.bootstrap, settings.kafka.module_topics,
                                    settings.kafka.partitions)
            answers: list[Any] = []
            for attempt in range(10):  # a CPO resends after a 3xxx; the publisher reconnects within ~1 s
                answers = await push_all(app, f"up{attempt}")
                if all(envelope["status_code"] == 1000 for _http, envelope in answers):
                    break
                await asyncio.sleep(0.5)
            assert [envelope["status_code"] for _http, envelope in answers] == [1000] * 5, answers
        assert attempt <= 3
    finally:
        if broker is not None:
            broker.stop()


async def test_a_worker_runs_again_after_its_broker_restarted_empty(session_tmp: Path, chdb_dsn: str) -> None:
    """An external Tansu (OCPI_KAFKA_FLAVOR=tansu) restarts under a running worker and loses every topic. The
    worker, asking for its topics' metadata, has Tansu create them again with Tansu's partition count, its
    changelogs empty; it then ends (Faust finds its local state ahead of them). Started again (its supervisor),
    it drops that state and re-creates the empty changelogs with their sources' partitions, and processes what
    is pushed after the restart, instead of stopping at every start (PartitionMismatch, or ConsistencyError)."""
    port = free_port()
    first = EmbeddedBroker(port=port).start()
    second: EmbeddedBroker | None = None
    settings = pipeline_settings(session_tmp, chdb_dsn, first.bootstrap)
    stack = await Stack(settings, run_worker=False, run_receivers=False).start()
    assert stack.clickhouse is not None
    env = stack.child_environment()
    log_path = stack.log_dir / "worker.log"
    child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=env, log_path=log_path)
    try:
        await publish(first.bootstrap, [record(settings, "Location", {**location(), "id": f"A{n}"})
                                        for n in range(5)])
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM locations FINAL", lambda r: r[0][0] >= 5, 90)
        assert rows == [(5,)], log_path.read_text()

        await asyncio.to_thread(first.stop)
        await asyncio.sleep(2)
        second = EmbeddedBroker(port=port).start()
        await asyncio.to_thread(ensure_topics, second.bootstrap, settings.kafka.module_topics,
                                settings.kafka.partitions)  # `serve` started again
        deadline = time.monotonic() + 60
        while child.poll() is None and time.monotonic() < deadline:  # it ends, or goes on: either is fine
            await asyncio.sleep(0.5)
        if child.poll() is not None:
            terminate(child, 20)
            log_path = stack.log_dir / "worker-again.log"
            child = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=env,
                          log_path=log_path)

        await publish(second.bootstrap, [record(settings, "Location", {**location(), "id": f"B{n}"})
                                         for n in range(5)])
        rows = await wait_for(stack.clickhouse, "SELECT count() FROM locations FINAL WHERE location_id LIKE 'B%'",
                              lambda r: r[0][0] >= 5, 90)
        assert rows == [(5,)], log_path.read_text()[-5000:]
        assert child.poll() is None, log_path.read_text()[-5000:]
        sources = changelog_sources(settings)
        counts = partition_counts(second.bootstrap, (*sources, *sources.values()))
        assert {changelog: counts[changelog] for changelog in sources} == {
            changelog: counts[source] for changelog, source in sources.items()}
    finally:
        terminate(child, 20)
        await stack.stop()
        first.stop()
        if second is not None:
            second.stop()


async def test_a_hung_broker_is_answered_3000_within_the_send_timeout_and_used_again_once_it_answers(
        settings_for, chdb_dsn: str) -> None:  # type: ignore[no-untyped-def]
    """The broker stops answering with every connection open (SIGSTOP: a hung or partitioned broker, where no
    connection is refused): each push waits at most OCPI_KAFKA_SEND_TIMEOUT and is answered 3000 (HTTP 500), not
    held until the partner's own timeout; once the broker answers again, pushes are acknowledged as before."""
    broker = EmbeddedBroker().start()
    assert broker.pid is not None
    pid = broker.pid
    stopped = False
    try:
        settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker.bootstrap, OCPI_KAFKA_FLAVOR="tansu",
                                OCPI_KAFKA_SEND_TIMEOUT="1")
        async with receivers(settings, chdb_dsn, [("BE", "BEC")]) as app:
            assert [envelope["status_code"] for _http, envelope in await push_all(app, "before")] == [1000] * 5

            os.kill(pid, signal.SIGSTOP)
            stopped = True
            for method, url, body in pushes():
                started = time.monotonic()
                response = await app.push(method, url, body)
                took = time.monotonic() - started
                assert response.status_code == 500 and response.json()["status_code"] == 3000, response.text
                # Less than two send timeouts: one wait, not two in a row nor the partner's own timeout. (The
                # push's own work took up to 0.2 s on a loaded machine: 0.5 s was too little margin.)
                assert took < 2 * 1.0, (url, took)

            os.kill(pid, signal.SIGCONT)
            stopped = False
            answers: list[Any] = []
            for attempt in range(10):
                answers = await push_all(app, f"again{attempt}")
                if all(envelope["status_code"] == 1000 for _http, envelope in answers):
                    break
                await asyncio.sleep(0.5)
            assert [envelope["status_code"] for _http, envelope in answers] == [1000] * 5, answers
    finally:
        if stopped:
            os.kill(pid, signal.SIGCONT)
        broker.stop()
