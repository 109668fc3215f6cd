"""Personal data in the worker's stage-1 state on Tansu and chDB: a session received longer ago than
OCPI_RETENTION_PSEUDONYMISE_DAYS loses its clear token, and a Location whose `publish_allowed_to` came that long
ago loses its clear uid and visual number (even though an EVSE update arrived since), in its ClickHouse row, in the
Faust tables and in their changelogs (which the worker creates with the compaction configs); recent ones keep
them."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from rocksdict import AccessType, Rdict

from infra.kafka.admin import topic_configs
from infra.process import spawn, terminate
from pipeline.retention import Pseudonymizer, changelog_topic, load_key
from pipeline.stack import Stack
from pipeline.state import Codec, LocationState, SessionState
from pipeline.worker import drop_state_without_changelog, prepare_topics, state_dir
from tests.conftest import unique
from tests.unit.pipeline.builders import iso, location, session, ts

from .pipeline_support import pipeline_settings, publish, record, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

PID = "RET"
OLD, RECENT = f"NL/{PID}/S-OLD".encode(), f"NL/{PID}/S-NEW".encode()
LOC_OLD, LOC_RECENT = f"NL/{PID}/L-OLD".encode(), f"NL/{PID}/L-NEW".encode()
SESSIONS, LOCATIONS = Codec(SessionState), Codec(LocationState)
State = SessionState | LocationState
Values = dict[bytes, State]


@pytest.fixture(scope="module")
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker, OCPI_PIPELINE_SWEEP_INTERVAL="1",
                                 OCPI_RETENTION_PSEUDONYMISE_DAYS="30")
    running = await Stack(settings, run_worker=False, run_receivers=False).start()
    yield running
    await running.stop()


async def latest_changelog_values(bootstrap: str, topic: str, codec: Codec[SessionState] | Codec[LocationState],
                                  keys: set[bytes], done: Callable[[Values], bool], timeout: float) -> Values:
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
                        values[message.key] = codec.decode(message.value)
    finally:
        await consumer.stop()
    return values


async def pseudonymised_in_changelog(bootstrap: str, topic: str,
                                     codec: Codec[SessionState] | Codec[LocationState], old: bytes,
                                     recent: bytes) -> bytes:
    """Wait until the changelog's newest value of `old` has no clear uid, check that `recent`'s still has;
    returns the old value's object JSON."""
    values = await latest_changelog_values(bootstrap, topic, codec, {old, recent},
                                           lambda found: len(found) == 2 and not clear_uid(found.get(old)),
                                           timeout=60)
    assert not clear_uid(values[old]) and clear_uid(values[recent])
    return values[old].object_json or b""


def clear_uid(state: State | None) -> bool:
    """Whether the state's object holds a token uid in clear (every clear uid of this module starts `TOK-`)."""
    return state is not None and state.object_json is not None and b'"uid":"TOK-' in state.object_json


def stored_values(stack: Stack, table: str, codec: Codec[Any],
                  keys: tuple[bytes, ...]) -> Values:
    """The values of `keys` in the worker's own RocksDB partitions of `table`."""
    stored: Values = {}
    for path in state_dir(stack.settings, stack.settings.pipeline.app_id).rglob(f"{table}-*.db"):
        db = Rdict(str(path), access_type=AccessType.read_only())
        try:
            for key in keys:
                if (value := db.get(key)) is not None:
                    stored[key] = codec.decode(value)
        finally:
            db.close()
    return stored


async def assert_compaction_configs(bootstrap: str, changelog: str) -> None:
    """Created by the worker before Faust would create it, with the compaction configs."""
    configs = (await asyncio.to_thread(topic_configs, bootstrap, [changelog]))[changelog]
    assert (configs["cleanup.policy"], configs["max.compaction.lag.ms"]) == ("compact", str(86_400_000))


async def test_old_sessions_and_locations_lose_their_clear_tokens_in_state_and_changelog(stack: Stack) -> None:
    settings = stack.settings
    old_body = {**session("S-OLD", status="COMPLETED", end=60, updated=60, uid="TOK-OLD", authref="auth-old"),
                "party_id": PID}
    new_body = {**session("S-NEW", status="COMPLETED", end=60, updated=60, uid="TOK-NEW"), "party_id": PID}
    allowed = [{"uid": "TOK-LOC-OLD", "type": "RFID"}, {"visual_number": "Card-Old", "issuer": "MoveMove"}]
    old_location = {**location("L-OLD", publish=False, publish_allowed_to=allowed), "party_id": PID}
    new_location = {**location("L-NEW", publish=False, publish_allowed_to=[{"uid": "TOK-LOC-NEW", "type": "RFID"}]),
                    "party_id": PID}
    # An EVSE update received now must not postpone the old Location's `publish_allowed_to`.
    status = {"status": "CHARGING", "last_updated": iso(ts(10))}
    long_ago = datetime.now(UTC) - timedelta(days=40)
    await publish(stack.bootstrap, [record(settings, "Session", old_body, pid=PID, received_at=long_ago),
                                    record(settings, "Session", new_body, pid=PID),
                                    record(settings, "Location", old_location, pid=PID, received_at=long_ago),
                                    record(settings, "EVSEPatch", status, object_id="L-OLD", pid=PID, evse_uid="E1"),
                                    record(settings, "Location", new_location, pid=PID)])
    changelog = changelog_topic(settings.pipeline.app_id, "session-state")
    location_changelog = changelog_topic(settings.pipeline.app_id, "location-state")
    worker = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=stack.child_environment(),
                   log_path=stack.log_dir / "worker-state-retention.log")
    try:
        assert stack.clickhouse is not None
        rows = await wait_for(stack.clickhouse, f"SELECT session_id, token_uid FROM sessions FINAL WHERE party_id = "
                              f"'{PID}' AND pseudonymised ORDER BY session_id", lambda r: len(r) == 1, timeout=90)
        pseudonym = Pseudonymizer(load_key(settings))
        assert rows == [("S-OLD", pseudonym("TOK-OLD"))]  # the sweep's; the state must carry the same
        # L-OLD's current row was written by the recent EVSE update; the sweep dates it by the old PUT.
        location_rows = await wait_for(
            stack.clickhouse, f"SELECT location_id, pseudonymised, payload_json FROM locations FINAL WHERE party_id = "
            f"'{PID}' ORDER BY location_id", lambda r: len(r) == 2 and r[1][1], timeout=30)
        assert [(lid, done) for lid, done, _ in location_rows] == [("L-NEW", False), ("L-OLD", True)]
        assert '"status":"CHARGING"' in location_rows[1][2] and "TOK-LOC-OLD" not in location_rows[1][2]
        assert pseudonym("TOK-LOC-OLD") in location_rows[1][2] and "TOK-LOC-NEW" in location_rows[0][2]

        old_json = await pseudonymised_in_changelog(stack.bootstrap, changelog, SESSIONS, OLD, RECENT)
        assert pseudonym("TOK-OLD").encode() in old_json and b"auth-old" not in old_json

        old_location_json = await pseudonymised_in_changelog(stack.bootstrap, location_changelog, LOCATIONS,
                                                             LOC_OLD, LOC_RECENT)
        assert pseudonym("TOK-LOC-OLD").encode() in old_location_json and b"Card-Old" not in old_location_json
        assert b'"status":"CHARGING"' in old_location_json  # the EVSE update was applied before the pass

        await assert_compaction_configs(stack.bootstrap, changelog)
        await assert_compaction_configs(stack.bootstrap, location_changelog)
    finally:
        terminate(worker, 20)

    # The worker's own RocksDB partitions hold the pseudonymised values too.
    stored = stored_values(stack, "session-state", SESSIONS, (OLD, RECENT))
    assert set(stored) == {OLD, RECENT}
    assert not clear_uid(stored[OLD]) and clear_uid(stored[RECENT])
    stored = stored_values(stack, "location-state", LOCATIONS, (LOC_OLD, LOC_RECENT))
    assert set(stored) == {LOC_OLD, LOC_RECENT}
    assert not clear_uid(stored[LOC_OLD]) and clear_uid(stored[LOC_RECENT])


async def test_the_worker_creates_the_changelog_only_after_dropping_state_of_another_broker(settings_for,
                                                                                             broker: str) -> None:
    settings = settings_for(OCPI_KAFKA_BOOTSTRAP=broker, OCPI_KAFKA_FLAVOR="tansu",
                            OCPI_PIPELINE_APP_ID=unique("state"))
    local = state_dir(settings, settings.pipeline.app_id)
    local.mkdir(parents=True)
    # State left by a broker that is gone: no changelog of this app id exists here.
    assert drop_state_without_changelog(settings, broker, settings.pipeline.app_id)
    assert not local.exists()
    prepare_topics(settings, broker)
    local.mkdir(parents=True)
    # A changelog without a record holds no state (a broker restarted empty creates one on first use).
    assert drop_state_without_changelog(settings, broker, settings.pipeline.app_id)
    local.mkdir(parents=True)
    await publish(broker, [(changelog_topic(settings.pipeline.app_id, "cdr-state"), b"k", b"v")])
    assert not drop_state_without_changelog(settings, broker, settings.pipeline.app_id)  # the changelog is there
    assert local.exists()
