"""Personal data in the worker's session state on Tansu and chDB: a session received longer ago than
OCPI_RETENTION_PSEUDONYMISE_DAYS loses its clear token in the Faust table and gets a pseudonymised record in
the changelog (which the worker creates with the compaction configs); a recent one keeps it."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from rocksdict import AccessType, Rdict

from infra.kafka.admin import topic_configs
from infra.process import spawn, terminate
from pipeline.retention import Pseudonymizer, changelog_topic, load_key
from pipeline.stack import Stack
from pipeline.state import Codec, SessionState
from pipeline.worker import drop_state_without_changelog, prepare_topics, state_dir
from tests.conftest import unique
from tests.unit.pipeline.builders import session

from .pipeline_support import pipeline_settings, publish, record, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

PID = "RET"
OLD, RECENT = f"NL/{PID}/S-OLD".encode(), f"NL/{PID}/S-NEW".encode()
STATES = Codec(SessionState)
Values = dict[bytes, SessionState]


@pytest.fixture(scope="module")
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker, OCPI_PIPELINE_SWEEP_INTERVAL="1",
                                 OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    running = await Stack(settings, run_worker=False, run_receivers=False).start()
    yield running
    await running.stop()


async def latest_changelog_values(bootstrap: str, topic: str, keys: set[bytes], done: Callable[[Values], bool],
                                  timeout: float) -> Values:
    """The newest changelog value of each of `keys`, read until `done(values)` or the timeout."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    values: Values = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(values):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for message in records:
                    if message.key in keys and message.value is not None:
                        values[message.key] = STATES.decode(message.value)
    finally:
        await consumer.stop()
    return values


def clear_uid(state: SessionState | None) -> bool:
    return state is not None and state.object_json is not None and b'"uid":"TOK-' in state.object_json


async def test_an_old_session_loses_its_clear_token_in_state_and_changelog(stack: Stack) -> None:
    settings = stack.settings
    old_body = {**session("S-OLD", status="COMPLETED", end=60, updated=60, uid="TOK-OLD", authref="auth-old"),
                "party_id": PID}
    new_body = {**session("S-NEW", status="COMPLETED", end=60, updated=60, uid="TOK-NEW"), "party_id": PID}
    long_ago = datetime.now(UTC) - timedelta(days=40)
    await publish(stack.bootstrap, [record(settings, "Session", old_body, pid=PID, received_at=long_ago),
                                    record(settings, "Session", new_body, pid=PID)])
    changelog = changelog_topic(settings.pipeline.app_id, "session-state")
    worker = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=stack.child_environment(),
                   log_path=stack.log_dir / "worker-state-retention.log")
    try:
        assert stack.clickhouse is not None
        rows = await wait_for(stack.clickhouse, f"SELECT session_id, token_uid FROM sessions FINAL WHERE party_id = "
                              f"'{PID}' AND pseudonymised ORDER BY session_id", lambda r: len(r) == 1, timeout=90)
        pseudonym = Pseudonymizer(load_key(settings))
        assert rows == [("S-OLD", pseudonym("TOK-OLD"))]  # the sweep's; the state must carry the same

        values = await latest_changelog_values(
            stack.bootstrap, changelog, {OLD, RECENT},
            lambda found: len(found) == 2 and not clear_uid(found.get(OLD)), timeout=60)
        assert not clear_uid(values[OLD]) and clear_uid(values[RECENT])
        old_json = values[OLD].object_json or b""
        assert pseudonym("TOK-OLD").encode() in old_json and b"auth-old" not in old_json

        # Created by the worker before Faust would create it, with the compaction configs.
        configs = (await asyncio.to_thread(topic_configs, stack.bootstrap, [changelog]))[changelog]
        assert (configs["cleanup.policy"], configs["max.compaction.lag.ms"]) == ("compact", str(86_400_000))
    finally:
        terminate(worker, 20)

    # The worker's own RocksDB partitions hold the pseudonymised value too.
    stored: dict[bytes, SessionState] = {}
    for path in (settings.storage.path / "faust" / settings.pipeline.app_id).rglob("session-state-*.db"):
        db = Rdict(str(path), access_type=AccessType.read_only())
        try:
            for key in (OLD, RECENT):
                if (value := db.get(key)) is not None:
                    stored[key] = STATES.decode(value)
        finally:
            db.close()
    assert set(stored) == {OLD, RECENT}
    assert not clear_uid(stored[OLD]) and clear_uid(stored[RECENT])


def test_the_worker_creates_the_changelog_only_after_dropping_state_of_another_broker(settings_for, broker: str,
                                                                                       ) -> None:
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu",
                            OCPI_PIPELINE_APP_ID=unique("state"))
    local = state_dir(settings, settings.pipeline.app_id)
    local.mkdir(parents=True)
    # State left by a broker that is gone: no changelog of this app id exists here.
    assert drop_state_without_changelog(settings, broker, settings.pipeline.app_id)
    assert not local.exists()
    prepare_topics(settings, broker)
    local.mkdir(parents=True)
    assert not drop_state_without_changelog(settings, broker, settings.pipeline.app_id)  # the changelog is there
