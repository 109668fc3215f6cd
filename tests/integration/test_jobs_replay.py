"""Replay end to end on the embedded engines: pushes over HTTP → Kafka → worker → ClickHouse, then replays.

One stack per module (worker and receivers as child processes); every test measures what it adds, so they
share it. Totals are compared exactly before and after each replay.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import aiokafka
import pytest

from infra.settings import Settings
from pipeline.jobs import kafka_io
from pipeline.jobs.common import MODULES, Checkpoint, JobError, jobs_dir
from pipeline.jobs.kafka_io import topic_partitions
from pipeline.jobs.rebuild import rebuild
from pipeline.jobs.replay import ReplayReport, Selection, replay_kafka
from pipeline.stack import Stack
from tests.integration.jobs_support import (
    LATE_PARTNER,
    PARTNERS,
    census,
    job_settings,
    publish,
    push,
    run_cli,
    totals,
    utcnow,
    wait_pipeline,
)

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


@dataclass
class Seeded:
    stack: Stack
    settings: Settings
    events: dict[str, int]  # partner -> events pushed (records in Kafka)
    pushed: Counter[tuple[str, str, str]]  # (module, partner, source) of the records pushed
    boundary: datetime  # after the first round, before the late partner's pushes
    before: dict[str, Any]  # totals once everything was processed

    @property
    def bootstrap(self) -> str:
        return self.stack.bootstrap

    @property
    def total(self) -> int:
        return sum(self.events.values())


@pytest.fixture(scope="module")
async def seeded(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Seeded]:
    settings = job_settings(session_tmp, chdb_dsn, broker)
    stack = await Stack(settings).start()
    try:
        events, cdrs = {}, 0
        for seed, (partner_id, (parties, stories)) in enumerate(PARTNERS.items()):
            expected = await push(stack, partner_id, parties, stories, seed)
            events[partner_id] = expected.events
            cdrs += len(expected.cdrs)
        await asyncio.sleep(0.5)
        boundary = utcnow()
        await asyncio.sleep(0.5)
        late_id, late_parties, late_stories = LATE_PARTNER
        late = await push(stack, late_id, late_parties, late_stories, 99)
        events[late_id], cdrs = late.events, cdrs + len(late.cdrs)
        found = await census(settings, stack.bootstrap)
        assert sum(found.values()) == sum(events.values())
        await wait_pipeline(settings, stack.bootstrap, await _ends(settings, stack.bootstrap))
        assert stack.clickhouse is not None
        before = totals(stack.clickhouse)
        stories = sum(n for _p, n in PARTNERS.values()) + late_stories
        assert before["sessions"][0] == stories and before["cdrs"][0] == cdrs
        assert before["raw_events"][0] == sum(events.values())
        yield Seeded(stack, settings, events, found, boundary, before)
    finally:
        children = list(stack.children.values())
        await stack.stop()
        assert all(child.poll() is not None for child in children)


async def _ends(settings: Settings, bootstrap: str) -> dict[Any, int]:
    from pipeline.jobs.kafka_io import offset_bounds, topic_partitions

    tps = await topic_partitions(bootstrap, settings.kafka.module_topics)
    return {tp: end for tp, (_b, end) in (await offset_bounds(settings.kafka, bootstrap, tps)).items() if end}


def _module_total(seeded: Seeded, module: str) -> int:
    return sum(n for (m, _p, _s), n in seeded.pushed.items() if m == module)


async def _replayed(seeded: Seeded) -> int:
    return sum(n for (_m, _p, source), n in (await census(seeded.settings, seeded.bootstrap)).items()
               if source == "REPLAY")


async def test_dry_run_counts_every_partition_and_sends_nothing(seeded: Seeded) -> None:
    replayed = await _replayed(seeded)
    report = await replay_kafka(seeded.settings, seeded.bootstrap, Selection(modules=MODULES), job="dry",
                                dry_run=True)
    assert report.status == "dry-run"
    assert sorted(line.partition for line in report.lines) == sorted(
        (seeded.settings.kafka.topic_for(m), p) for m in MODULES for p in (0, 1))
    assert sum(line.records for line in report.lines) == replayed + seeded.total
    assert sum(line.matching or 0 for line in report.lines) == seeded.total  # one per event id
    assert await _replayed(seeded) == replayed
    assert not (jobs_dir(seeded.settings, "replay") / "dry.json").exists()

    partner = await replay_kafka(seeded.settings, seeded.bootstrap,
                                 Selection(modules=MODULES, partner="cpo-b"), dry_run=True)
    assert sum(line.matching or 0 for line in partner.lines) == seeded.events["cpo-b"]


async def test_time_range_finds_offsets_by_record_timestamp(seeded: Seeded) -> None:
    late = LATE_PARTNER[0]
    selection = Selection(modules=MODULES, since=seeded.boundary)
    plan = await replay_kafka(seeded.settings, seeded.bootstrap, selection, dry_run=True)
    # The ranges start where the late pushes start (Tansu's own ListOffsets-by-time would say offset 0):
    assert sum(line.records for line in plan.lines) == seeded.events[late]
    assert sum(line.matching or 0 for line in plan.lines) == seeded.events[late]

    before = await census(seeded.settings, seeded.bootstrap)
    report = await replay_kafka(seeded.settings, seeded.bootstrap, selection)
    assert report.sent == seeded.events[late] and report.filtered == 0
    after = await census(seeded.settings, seeded.bootstrap)
    added = {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)}
    assert added == {(module, partner, "REPLAY"): n for (module, partner, _s), n in seeded.pushed.items()
                     if partner == late}

    early = await replay_kafka(seeded.settings, seeded.bootstrap,
                               Selection(modules=("cdrs",), until=seeded.boundary), dry_run=True)
    first_round = sum(n for (m, p, _s), n in seeded.pushed.items() if m == "CDRS" and p in PARTNERS)
    assert sum(line.matching or 0 for line in early.lines) == first_round
    await wait_pipeline(seeded.settings, seeded.bootstrap, report.written)
    assert seeded.stack.clickhouse is not None
    assert totals(seeded.stack.clickhouse) == seeded.before


async def test_replaying_twice_changes_no_total(seeded: Seeded) -> None:
    assert seeded.stack.clickhouse is not None
    selection = Selection(modules=MODULES)
    replayed = await _replayed(seeded)
    first = await replay_kafka(seeded.settings, seeded.bootstrap, selection, job="twice")
    assert first.status == "done" and first.sent == seeded.total and first.undecodable == 0
    assert first.duplicates == replayed  # earlier replays' copies: each event id is sent once per run
    await wait_pipeline(seeded.settings, seeded.bootstrap, first.written)
    assert totals(seeded.stack.clickhouse) == seeded.before

    repeat = await replay_kafka(seeded.settings, seeded.bootstrap, selection, job="twice")
    assert repeat.status == "already-done" and await _replayed(seeded) == replayed + seeded.total

    second = await replay_kafka(seeded.settings, seeded.bootstrap, selection, job="twice", again=True)
    assert second.sent == seeded.total
    await wait_pipeline(seeded.settings, seeded.bootstrap, second.written)
    assert totals(seeded.stack.clickhouse) == seeded.before
    assert await _replayed(seeded) == replayed + 2 * seeded.total


async def test_interrupted_replay_resumes_and_sends_each_event_once(seeded: Seeded) -> None:
    selection = Selection(modules=("sessions",), partner="cpo-a")
    wanted = seeded.pushed[("SESSIONS", "cpo-a", "PUSH")]
    replayed = await _replayed(seeded)
    task: asyncio.Task[ReplayReport] | None = None

    def interrupt(report: ReplayReport) -> None:
        assert task is not None
        task.cancel()  # what asyncio.run does on Ctrl-C: the job is cancelled at its next await

    task = asyncio.ensure_future(replay_kafka(seeded.settings, seeded.bootstrap, selection, job="cut",
                                              on_batch=interrupt, batch=1))
    with pytest.raises(asyncio.CancelledError):
        await task
    state = Checkpoint(jobs_dir(seeded.settings, "replay") / "cut.json").load()
    assert state is not None and state["status"] == "running"
    sent_before = state["stats"]["sent"]
    assert sent_before == 1  # the batch in flight when Ctrl-C came was finished and recorded, nothing more
    assert await _replayed(seeded) == replayed + sent_before

    resumed = await replay_kafka(seeded.settings, seeded.bootstrap, selection, job="cut")
    assert resumed.status == "resumed-done" and resumed.sent == wanted
    assert await _replayed(seeded) == replayed + wanted  # exactly once over both runs
    await wait_pipeline(seeded.settings, seeded.bootstrap, resumed.written)
    assert seeded.stack.clickhouse is not None
    assert totals(seeded.stack.clickhouse) == seeded.before


async def test_cli_replay_dry_run_and_partner_with_wait(seeded: Seeded) -> None:
    code, out, err = await run_cli(seeded.settings, "replay", "--module", "cdrs", "--dry-run")
    assert code == 0, err
    assert "dry run: nothing sent" in out and f"would send {_module_total(seeded, 'CDRS')} events" in out
    assert f"{seeded.settings.kafka.topic_cdrs}/0 offsets 0-" in out

    code, out, err = await run_cli(seeded.settings, "replay", "--partner", "cpo-b", "--job", "cli-b", "--wait",
                                   "--timeout", "90")
    assert code == 0, err
    assert f"sent {seeded.events['cpo-b']} events" in out and "the pipeline has consumed them" in out
    assert seeded.stack.clickhouse is not None
    assert totals(seeded.stack.clickhouse) == seeded.before

    code, _out, err = await run_cli(seeded.settings, "replay", "--from-archive", str(seeded.settings.storage.path),
                                    "--partition", "1")
    assert code == 2 and "do not apply to an archive" in err


async def test_rebuild_recomputes_every_table_and_swaps_it_in(seeded: Seeded) -> None:
    client = seeded.stack.clickhouse
    assert client is not None
    database = seeded.settings.clickhouse.database

    def tables(db: str) -> dict[str, tuple[str, str]]:
        rows = client.query("SELECT name, engine, toString(uuid) FROM system.tables WHERE database = %(db)s",
                            parameters={"db": db}).result_rows
        return {name: (engine, uuid) for name, engine, uuid in rows}

    before = tables(database)
    data = {t for t, (engine, _u) in before.items() if not engine.endswith("View")}
    phases: list[str] = []
    report = await rebuild(seeded.settings, seeded.bootstrap, timeout=120, on_phase=phases.append)
    assert phases == ["building", "swapping", "tail"]
    kept = {"partners", "credential_claims", "pseudonym_key", "schema_migrations"}
    assert sorted(report.swapped) == sorted(data - kept)
    after, old = tables(database), tables(report.old_database)
    for table in report.swapped:
        assert after[table][1] != before[table][1]  # a new table ...
        assert old[table][1] == before[table][1]  # ... and the previous one kept in the rebuild database
    for table in kept | (set(before) - data):
        assert after[table][1] == before[table][1]  # not derived, or a view: left in place
    for db, other in ((database, report.old_database), (report.old_database, database)):
        views = client.query("SELECT name, create_table_query FROM system.tables WHERE database = %(db)s "
                             "AND engine = 'MaterializedView'", parameters={"db": db}).result_rows
        assert all(f"{other}." not in query for _name, query in views)  # each feeds its own database
    assert report.events == sum((await _ends(seeded.settings, seeded.bootstrap)).values())
    assert totals(client) == seeded.before
    state = Checkpoint(jobs_dir(seeded.settings, "rebuild") / "current.json").load()
    assert state is not None and state["status"] == "done"
    remaining = await topic_partitions(seeded.bootstrap, [f"{seeded.settings.pipeline.topic_party_facts}."
                                                          f"{state['group']}"])
    assert remaining == []  # the rebuild worker's own topics are gone


async def test_a_broker_that_stops_answering_fails_the_replay_instead_of_finishing_it(
        session_tmp: Path, chdb_dsn: str, broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.kafka.admin import ensure_topics
    from tests.unit.jobs.fake_sender import hours_ago, session

    settings = job_settings(session_tmp, chdb_dsn, broker, OCPI_TOPIC_PARTITIONS="1")
    await asyncio.to_thread(ensure_topics, broker, [settings.kafka.topic_sessions], 1)
    await publish(settings, broker, "cpo-x", [("sessions", session(i, hours_ago(3))) for i in range(1, 21)])
    fetch = aiokafka.AIOKafkaConsumer.getmany

    async def stalled(self: Any, *tps: Any, timeout_ms: int = 0, max_records: int | None = None) -> Any:
        await asyncio.sleep(timeout_ms / 1000)  # aiokafka logs the fetch errors of an unreachable broker: nothing
        return {}

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", stalled)
    read = kafka_io.read_ranges
    monkeypatch.setattr("pipeline.jobs.replay.read_ranges", lambda *a, **kw: read(*a, **{**kw, "idle_timeout": 1.0}))
    with pytest.raises(JobError, match="run the same command again to resume"):
        await replay_kafka(settings, broker, Selection(modules=("sessions",)), batch=5)

    monkeypatch.setattr(aiokafka.AIOKafkaConsumer, "getmany", fetch)  # the broker answers again
    report = await replay_kafka(settings, broker, Selection(modules=("sessions",)), batch=5)
    assert (report.status, report.sent) == ("resumed-done", 20)  # not "already-done" with nothing sent
