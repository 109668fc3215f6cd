"""Export and restore end to end: events in Kafka → worker → ClickHouse; `export` from Kafka (incremental,
interruptible) and from ClickHouse; a fresh stack restored with `replay --from-archive` holds the same totals;
a recreated topic is archived as a new epoch."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from kafka import KafkaAdminClient

from infra.kafka.admin import ensure_topics
from pipeline.jobs.archive import archive_files, count_records, event_of, export_from_kafka, read_archive_file
from pipeline.jobs.common import MODULES, NoProgress
from pipeline.stack import Stack
from tests.integration.jobs_support import job_settings, publish, run_cli, totals, wait_pipeline, wait_rows
from tests.unit.jobs.fake_sender import cdr, hours_ago, session

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]


def archived(root: Path) -> dict[str, list[str]]:
    """module -> event ids in archive order."""
    found: dict[str, list[str]] = {}
    for path in archive_files(root):
        found.setdefault(path.relative_to(root).parts[0], []).extend(
            str(r["event_id"]) for r in read_archive_file(path))
    return found


class CancelAfter(NoProgress):
    """Cancels the export's task after `n` progress steps (what Ctrl-C does under asyncio.run)."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.task: asyncio.Task[Any] | None = None

    def advance(self, amount: int = 1) -> None:
        self.n -= 1
        if self.n == 0 and self.task is not None:
            self.task.cancel()


async def test_export_restore_and_epochs(session_tmp: Path, chdb_dsn: str, broker: str, tmp_path: Path) -> None:
    settings = job_settings(session_tmp, chdb_dsn, broker)
    stack = await Stack(settings, run_receivers=False).start()
    try:
        assert stack.clickhouse is not None
        objects = [("sessions", session(i, hours_ago(5 - i), kwh=10 + i)) for i in range(1, 5)]
        objects += [("cdrs", cdr(i, hours_ago(3 - i), energy=f"{5 + i}.5")) for i in range(1, 3)]
        events, written = await publish(settings, broker, "cpo-be", objects)
        await wait_pipeline(settings, broker, written)
        root = tmp_path / "kafka"

        # Interrupted after the first archive file: only complete files remain, the rerun finishes the work.
        cancel = CancelAfter(1)
        cancel.task = asyncio.ensure_future(export_from_kafka(settings, broker, root, MODULES, max_records=1,
                                                              progress=cancel))
        with pytest.raises(asyncio.CancelledError):
            await cancel.task
        assert not list(root.glob("*/*/.part-*")) and 0 < len(archive_files(root)) < 6
        partial = len(archive_files(root))
        result = await export_from_kafka(settings, broker, root, MODULES, max_records=1)
        assert len(result.files) == 6 - partial and len(archive_files(root)) == 6
        ids = archived(root)
        assert sorted(ids["sessions"]) == sorted(e.event_id for e in events[:4])
        assert sorted(ids["cdrs"]) == sorted(e.event_id for e in events[4:])
        assert all(count_records(p) == 1 for p in archive_files(root))

        again = await export_from_kafka(settings, broker, root, MODULES)
        assert again.files == [] and again.total == 0
        more, written = await publish(settings, broker, "cpo-be", [("sessions", session(9, hours_ago(0.5)))])
        await wait_pipeline(settings, broker, written)
        code, out, err = await run_cli(settings, "export", str(root))
        assert code == 0, err
        assert "1 new files" in out
        assert sorted(archived(root)["sessions"]) == sorted([e.event_id for e in events[:4]] + [more[0].event_id])

        assert await wait_rows(stack.clickhouse, "SELECT count() FROM raw_events FINAL", [(7,)]) == [(7,)]
        code, out, err = await run_cli(settings, "export", str(tmp_path / "ch"), "--source", "clickhouse")
        assert code == 0, err
        assert "0 undecodable" in out, out + err
        from_ch = {event_of(r).event_id: event_of(r) for p in archive_files(tmp_path / "ch")
                   for r in read_archive_file(p)}
        from_kafka = {event_of(r).event_id: event_of(r) for p in archive_files(root) for r in read_archive_file(p)}
        assert set(from_ch) == set(from_kafka)
        assert {i: (e.content_hash, e.payload) for i, e in from_ch.items()} == {
            i: (e.content_hash, e.payload) for i, e in from_kafka.items()}
        before = totals(stack.clickhouse)
    finally:
        await stack.stop()

    restored_settings = job_settings(session_tmp, chdb_dsn, broker)
    restored = await Stack(restored_settings, run_receivers=False).start()
    try:
        assert restored.clickhouse is not None
        code, out, err = await run_cli(restored_settings, "replay", "--from-archive", str(root), "--wait",
                                       "--timeout", "90")
        assert code == 0, err
        assert "sent 7 events" in out
        assert await wait_rows(restored.clickhouse, "SELECT count() FROM raw_events FINAL", [(7,)]) == [(7,)]
        assert totals(restored.clickhouse) == before
    finally:
        await restored.stop()

    # The embedded broker loses its topics on restart: a recreated topic's offsets start over, as a new epoch.
    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        admin.delete_topics([settings.kafka.topic_sessions])
    finally:
        admin.close()
    await asyncio.sleep(0.5)
    ensure_topics(broker, [settings.kafka.topic_sessions], 2)
    newer, _written = await publish(settings, broker, "cpo-be", [("sessions", session(20, hours_ago(0.2)))])
    result = await export_from_kafka(settings, broker, root, ("sessions",))
    assert result.new_epochs and result.records == {"sessions": 1}
    assert [p.name.split("-e")[-1][:3] for p in result.files] == ["001"]
    assert newer[0].event_id in archived(root)["sessions"]
