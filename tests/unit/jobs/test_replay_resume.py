"""Resuming a replay (`pipeline/jobs/replay.py`): after its topics were recreated, after a crash between its log
of sent ids and its checkpoint, and with a log whose last line was cut."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiokafka
import pytest
from kafka.admin import KafkaAdminClient

from infra.codec import decode_event
from infra.kafka.admin import ensure_topics
from infra.settings import Settings
from pipeline.jobs import kafka_io
from pipeline.jobs.common import Checkpoint, jobs_dir
from pipeline.jobs.kafka_io import offset_bounds, topic_partitions
from pipeline.jobs.replay import ReplayReport, Selection, _Run, replay_kafka, wait_for_replayed
from tests.integration.jobs_support import publish
from tests.unit.jobs.fake_sender import hours_ago, session


class _Stop(Exception):
    pass


async def _seed(settings_for: Any, broker: str, count: int) -> Settings:
    """`count` Sessions pushed to a Sessions topic of one partition on the embedded broker."""
    settings: Settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu",
                                      OCPI_TOPIC_PARTITIONS="1")
    await asyncio.to_thread(ensure_topics, broker, [settings.kafka.topic_sessions], 1)
    await publish(settings, broker, "cpo-x", [("sessions", session(i, hours_ago(3))) for i in range(1, count + 1)])
    return settings


async def _ends(settings: Settings, broker: str) -> dict[Any, int]:
    tps = await topic_partitions(broker, [settings.kafka.topic_sessions])
    return {tp: end for tp, (_b, end) in (await offset_bounds(settings.kafka, broker, tps, exact=True)).items()}


async def _recreate(settings: Settings, broker: str) -> None:
    """What a restart of the embedded broker does to a topic: it comes back empty."""
    admin = KafkaAdminClient(bootstrap_servers=broker)
    try:
        admin.delete_topics([settings.kafka.topic_sessions])
    finally:
        admin.close()
    await asyncio.sleep(0.5)
    await asyncio.to_thread(ensure_topics, broker, [settings.kafka.topic_sessions], 1)


async def test_a_replay_resumed_after_its_topic_was_recreated_is_planned_again_not_stuck(
        settings_for: Any, broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted, then `dev` restarted (the embedded broker's topics come back empty, then hold fewer records),
    then the same command: the checkpoint's position was past the new end, the reader never got to the planned
    stop, and every rerun failed with "run the same command again" until the checkpoint was removed by hand."""
    settings = await _seed(settings_for, broker, 6)
    read = kafka_io.read_ranges
    monkeypatch.setattr("pipeline.jobs.replay.read_ranges", lambda *a, **kw: read(*a, **{**kw, "idle_timeout": 2.0}))
    selection = Selection(modules=("sessions",))

    def interrupt(_report: ReplayReport) -> None:
        raise _Stop

    with pytest.raises(_Stop):  # after the first batch of 2 of the 6 records
        await replay_kafka(settings, broker, selection, job="restart", batch=2, on_batch=interrupt)
    await _recreate(settings, broker)
    await publish(settings, broker, "cpo-x", [("sessions", session(7, hours_ago(1)))])

    report = await replay_kafka(settings, broker, selection, job="restart", batch=2)

    assert report.status == "resumed-done" and report.sent == 2 + 1  # the topic's one record now, replayed
    assert sum((await _ends(settings, broker)).values()) == 1 + 1
    assert report.lines[0].where.endswith("offsets 0-0")
    state = Checkpoint(jobs_dir(settings, "replay") / "restart.json").load()
    assert state is not None and state["status"] == "done"


async def test_replay_wait_after_the_topics_were_recreated_waits_for_what_they_hold(
        settings_for: Any, broker: str) -> None:
    """`replay --wait` of a job resumed (or run again once done) after its topics were recreated: the offsets it
    wrote before were past the new topics' ends, which the worker's group never commits, so the wait lasted the
    whole --timeout (an hour by default) and failed although the worker had consumed everything."""
    settings = await _seed(settings_for, broker, 6)
    report = await replay_kafka(settings, broker, Selection(modules=("sessions",)), job="waited")
    assert sum(report.written.values()) == 12
    await _recreate(settings, broker)
    await publish(settings, broker, "cpo-x", [("sessions", session(7, hours_ago(1)))])
    consumed = await _ends(settings, broker)
    worker = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker, group_id=settings.pipeline.app_id,
                                       enable_auto_commit=False)
    await worker.start()
    try:  # the worker has consumed the recreated topic to its end
        worker.assign(list(consumed))
        await worker.commit(dict(consumed))
    finally:
        await worker.stop()

    again = await replay_kafka(settings, broker, Selection(modules=("sessions",)), job="waited")
    assert again.status == "already-done" and again.written == report.written
    await wait_for_replayed(settings, broker, again.written, timeout=5)


async def test_a_replay_resumed_after_its_topic_was_recreated_as_long_is_planned_again(
        settings_for: Any, broker: str) -> None:
    """The same, but the recreated topic holds as many records as before (new pushes, an archive replayed into
    it): the rerun read the new records from the old position to the old stop, never those before it, and was
    done; the records there now are other ones."""
    settings = await _seed(settings_for, broker, 6)
    selection = Selection(modules=("sessions",))

    def interrupt(_report: ReplayReport) -> None:
        raise _Stop

    with pytest.raises(_Stop):
        await replay_kafka(settings, broker, selection, job="regrown", batch=2, on_batch=interrupt)
    await _recreate(settings, broker)
    await publish(settings, broker, "cpo-x", [("sessions", session(i, hours_ago(1))) for i in range(11, 17)])

    report = await replay_kafka(settings, broker, selection, job="regrown", batch=2)

    assert report.status == "resumed-done" and report.sent == 2 + 6  # every record the topic holds now
    assert sum((await _ends(settings, broker)).values()) == 6 + 6


async def test_wait_targets_cover_a_batch_logged_as_sent_before_a_crash_lost_its_checkpoint(
        settings_for: Any, broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A crash after a batch's ids reached the `.sent` log and before the checkpoint: the rerun read the batch
    again and took it for repeated ids, and `report.written` (what `--wait` waits for) lacked its offsets, so
    `replay --wait` returned before the worker had consumed them (or did not wait at all)."""
    settings = await _seed(settings_for, broker, 6)
    selection = Selection(modules=("sessions",))
    record_sent = _Run.record_sent
    calls = 0

    def crash_after_second_log(self: _Run) -> None:
        nonlocal calls
        record_sent(self)
        calls += 1
        if calls == 2:  # the last batch's ids are logged; the process dies before its checkpoint
            raise _Stop

    monkeypatch.setattr(_Run, "record_sent", crash_after_second_log)
    with pytest.raises(_Stop):
        await replay_kafka(settings, broker, selection, job="crash", batch=3)
    monkeypatch.setattr(_Run, "record_sent", record_sent)

    report = await replay_kafka(settings, broker, selection, job="crash", batch=3)

    ends = await _ends(settings, broker)
    assert sum(ends.values()) == 12  # 6 pushed, 6 replayed: nothing sent twice
    assert report.status == "resumed-done"
    assert report.written == ends  # --wait waits for every record this job wrote
    assert (report.sent, report.duplicates) == (6, 0)  # the batch of the crash was sent, not repeated


def test_a_sent_log_whose_last_line_was_cut_does_not_merge_it_with_the_next_id(
        settings_for: Any, tmp_path: Path) -> None:
    """Power lost (or the disk full) while a batch's ids were appended to `<job>.sent`: the rerun appended the next
    ids right after the cut one, merging the first of them with it, so that event was no longer known as sent
    (its copies later in the topics were sent again)."""
    settings = settings_for()
    log = tmp_path / "job.sent"
    log.write_text("id-1\nid-2\nid-3-cut-mid")
    run = _Run(settings, Selection(modules=("sessions",)), ReplayReport(job="j", status="resumed-done"))
    run.attach(log, resume=True, record=True)
    assert run.seen == {"id-1", "id-2"}  # the cut line is no id: its batch was never checkpointed, it goes again
    run._batch_ids.append("id-4")
    run.record_sent()

    assert log.read_text() == "id-1\nid-2\nid-4\n"
    again = _Run(settings, Selection(modules=("sessions",)), ReplayReport(job="j", status="resumed-done"))
    again.attach(log, resume=True, record=True)
    assert again.seen == {"id-1", "id-2", "id-4"}


async def test_a_record_read_with_another_key_than_its_objects_is_replayed_keyed_by_its_object(
        settings_for: Any, broker: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker dead-letters an event not keyed by its object (`records.misfit_key`: it would be applied on a
    partition that does not hold its object's state). Replayed with the key it was read with, its copy was another
    dead letter at every replay; it is keyed by its object, and applied."""
    settings = await _seed(settings_for, broker, 1)
    [(tp, end)] = (await _ends(settings, broker)).items()
    consumer = aiokafka.AIOKafkaConsumer(bootstrap_servers=broker, enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([tp])
        consumer.seek(tp, 0)
        [pushed] = (await consumer.getmany(tp, timeout_ms=10_000))[tp]
        producer = aiokafka.AIOKafkaProducer(bootstrap_servers=broker, enable_idempotence=False)
        await producer.start()
        try:
            await producer.send_and_wait(tp.topic, pushed.value, key=b"wrong key", partition=tp.partition)
        finally:
            await producer.stop()
        read = kafka_io.read_ranges
        monkeypatch.setattr("pipeline.jobs.replay.read_ranges",
                            lambda *a, **kw: read(*a, **{**kw, "idle_timeout": 2.0}))
        selection = Selection(modules=("sessions",), partition=tp.partition, from_offset=end)
        report = await replay_kafka(settings, broker, selection, job="rekey")
        assert report.sent == 1
        consumer.seek(tp, end + 1)
        [replayed] = (await consumer.getmany(tp, timeout_ms=10_000))[tp]
        assert replayed.key == pushed.key == session_key(pushed.value)
    finally:
        await consumer.stop()


def session_key(value: bytes) -> bytes:
    event = decode_event(value)
    return f"{event.country_code}/{event.party_id}/{event.object_id}".upper().encode()
