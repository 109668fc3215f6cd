"""Rebuild while the live worker keeps working: nothing it handled around the swap is missing afterwards.

Each test has its own stack (the live worker as a child process) on the session's engines, and CDRs
published as the receivers would.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

import pipeline.jobs.rebuild as rb
from infra.settings import Settings
from pipeline.jobs.common import Checkpoint, jobs_dir
from pipeline.jobs.kafka_io import offset_bounds, topic_partitions
from pipeline.stack import Stack
from pipeline.worker import state_dir
from tests.integration.jobs_support import job_settings, publish, wait_pipeline
from tests.unit.jobs.fake_sender import cdr, session

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


@pytest.fixture
async def live(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[tuple[Stack, Settings]]:
    settings = job_settings(session_tmp, chdb_dsn, broker)
    stack = await Stack(settings, run_receivers=False).start()
    try:
        yield stack, settings
    finally:
        await stack.stop()


def cdr_ids(client: Client, database: str) -> list[str]:
    return [row[0] for row in client.query(f"SELECT cdr_id FROM `{database}`.cdrs FINAL ORDER BY cdr_id").result_rows]


async def settle(settings: Settings, bootstrap: str) -> None:
    """Until the live worker committed the module topics' ends (its inserts are then done)."""
    tps = await topic_partitions(bootstrap, settings.kafka.module_topics)
    ends = {tp: e for tp, (_b, e) in (await offset_bounds(settings.kafka, bootstrap, tps)).items() if e}
    await wait_pipeline(settings, bootstrap, ends)


async def three_cdrs_handled(stack: Stack, settings: Settings) -> tuple[Client, datetime]:
    """C0001-C0003 pushed an hour ago and handled by the live worker; the store's client and now."""
    client = stack.clickhouse
    assert client is not None
    now = datetime.now(UTC).replace(microsecond=0)
    _e, written = await publish(settings, stack.bootstrap, "cpo-a",
                                [("cdrs", cdr(i, now - timedelta(hours=1))) for i in range(1, 4)])
    await wait_pipeline(settings, stack.bootstrap, written)
    return client, now


async def test_what_the_live_worker_handled_before_the_swap_is_kept(live: tuple[Stack, Settings],
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    stack, settings = live
    client, now = await three_cdrs_handled(stack, settings)
    real_start, real_swap = rb._start_worker, rb._swap
    workers: list[Any] = []

    def start_worker(*args: Any) -> Any:
        workers.append(real_start(*args))
        return workers[-1]

    def swap(client_: Client, state: dict[str, Any]) -> list[str]:
        # The rebuild worker has stopped at its targets (what it wrote after the swap would go into the previous
        # tables): a CDR the live worker handles now went into the tables about to be swapped out.
        assert [w.poll() is not None for w in workers] == [True]
        async def arrive() -> None:
            _ev, w = await publish(settings, stack.bootstrap, "cpo-a", [("cdrs", cdr(99, now))])
            await wait_pipeline(settings, stack.bootstrap, w)

        asyncio.run(arrive())
        assert "C0099" in cdr_ids(client_, state["database"])
        return real_swap(client_, state)

    monkeypatch.setattr(rb, "_start_worker", start_worker)
    monkeypatch.setattr(rb, "_swap", swap)
    phases: list[str] = []
    report = await rb.rebuild(settings, stack.bootstrap, timeout=180, on_phase=phases.append)
    assert phases == ["building", "swapping", "tail"]
    assert report.events == 3 and report.tail == 1 and len(workers) == 2  # once more after the swap
    assert all(w.poll() is not None for w in workers)
    await settle(settings, stack.bootstrap)
    assert cdr_ids(client, settings.clickhouse.database) == ["C0001", "C0002", "C0003", "C0099"]
    assert cdr_ids(client, report.old_database) == ["C0001", "C0002", "C0003", "C0099"]  # the previous tables
    outcomes = client.query("SELECT source, outcome, count() FROM raw_events FINAL GROUP BY 1, 2").result_rows
    assert outcomes == [("PUSH", "APPLIED", 4)]


async def test_a_rebuild_finishes_while_partners_keep_pushing(live: tuple[Stack, Settings]) -> None:
    stack, settings = live
    client, now = await three_cdrs_handled(stack, settings)
    pushed = [f"C{i:04d}" for i in range(1, 4)]

    stop = asyncio.Event()

    async def traffic() -> None:  # a CDR every 0.3 s, the internal topics' ends never stand still for long
        n = 100
        while not stop.is_set():
            # Stopped by the event, not cancelled: a cancel could land after Kafka took the CDR but before it was
            # listed, and the comparison below would see one CDR too many in ClickHouse.
            await publish(settings, stack.bootstrap, "cpo-a", [("cdrs", cdr(n, now))])
            pushed.append(f"C{n:04d}")
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.3)

    pusher = asyncio.create_task(traffic())
    try:
        # As long as the other rebuilds here get: a worker started on a slow, loaded machine, catching up with a
        # topic that keeps growing, needs more than 90 s there (the rebuild ends as soon as it caught up).
        report = await rb.rebuild(settings, stack.bootstrap, timeout=180)
    finally:
        stop.set()
        await pusher
    assert report.events >= 3
    await settle(settings, stack.bootstrap)
    assert cdr_ids(client, settings.clickhouse.database) == sorted(pushed)


async def test_the_rebuild_workers_local_state_is_removed_with_its_topics(live: tuple[Stack, Settings]) -> None:
    # The rebuild worker's Faust state (its own app id) holds every Session it replayed, token uid and contract id
    # in clear. No worker of that app id runs again, so no retention pass would ever pseudonymise it: left on
    # disk, it kept personal data in clear for ever (the policy: OCPI_RETENTION_PSEUDONYMISE_DAYS).
    stack, settings = live
    now = datetime.now(UTC).replace(microsecond=0)
    _e, written = await publish(settings, stack.bootstrap, "cpo-a",
                                [("sessions", session(1, now - timedelta(hours=1), party=("BE", "BEC"))),
                                 ("cdrs", cdr(1, now - timedelta(hours=1)))])
    await wait_pipeline(settings, stack.bootstrap, written)
    await rb.rebuild(settings, stack.bootstrap, timeout=180)
    state = Checkpoint(jobs_dir(settings, "rebuild") / "current.json").load()
    assert state is not None and state["status"] == "done"
    assert not state_dir(settings, state["group"]).exists()
    assert state_dir(settings, settings.pipeline.app_id).exists()  # the live worker's own, untouched
