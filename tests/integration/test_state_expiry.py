"""Billing retention in the worker's stage-1 state on Tansu and chDB: with OCPI_RETENTION_BILLING_YEARS=1, a
Session and a CDR received longer ago, and a PATCH parked that long for a Session that never came, are deleted from
the worker's RocksDB partitions with a tombstone on their changelogs, stage 2's records of that Session and CDR too;
a Session and a CDR received within the year stay, in both stages.

Its own stack (app id, topics): the worker started here reads every record of its partitions, so it is caught up
and runs the pass (a worker restarted on partitions it has read nothing of is not caught up until they get a new
record: `Progress.caught_up`)."""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer

from infra.process import spawn, terminate
from pipeline.reconcile import CdrRec, SessionRec
from pipeline.retention import changelog_topic
from pipeline.stack import Stack
from pipeline.state import CdrState, Codec, SessionState
from pipeline.worker import prepare_topics
from tests.unit.pipeline.builders import cdr, iso, session, ts

from .pipeline_support import pipeline_settings, publish, record
from .test_state_retention import stored_values

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse]

SESSIONS, CDRS = Codec(SessionState), Codec(CdrState)


@pytest.fixture(scope="module")
async def stack(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Stack]:
    settings = pipeline_settings(session_tmp, chdb_dsn, broker, OCPI_PIPELINE_SWEEP_INTERVAL="1",
                                 OCPI_RETENTION_BILLING_YEARS="1")
    running = await Stack(settings, run_worker=False, run_receivers=False).start()
    yield running
    await running.stop()


async def latest_changelog_records(bootstrap: str, topic: str, keys: set[bytes],
                                   done: Callable[[dict[bytes, bytes | None]], bool], timeout: float,
                                   ) -> dict[bytes, bytes | None]:
    """The newest changelog record of each of `keys`, tombstones (None) included, read until `done` or the
    timeout."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    found: dict[bytes, bytes | None] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and not done(found):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for message in records:
                    if message.key in keys:
                        found[message.key] = message.value
    finally:
        await consumer.stop()
    return found


EPID = "EXP"
S_EXP, S_PARK, S_KEEP = (f"NL/{EPID}/{sid}".encode() for sid in ("S-EXP", "S-PARK", "S-KEEP"))
C_EXP, C_KEEP = (f"NL/{EPID}/{cid}".encode() for cid in ("C-EXP", "C-KEEP"))
# Stage 2's records of the same sessions and CDRs (`pipeline.reconcile.PartyState` keys).
PARTY_EXP = {b"S/" + S_EXP, b"C/" + C_EXP}
PARTY_KEEP = {b"S/" + S_KEEP, b"C/" + C_KEEP}


def expired_and_kept(expired: set[bytes], kept: set[bytes]) -> Callable[[dict[bytes, bytes | None]], bool]:
    def done(found: dict[bytes, bytes | None]) -> bool:
        return (all(key in found and found[key] is None for key in expired)
                and all(found.get(key) is not None for key in kept))
    return done


async def test_sessions_and_cdrs_past_the_billing_retention_leave_state_and_changelog(stack: Stack) -> None:
    settings = stack.settings
    long_ago = datetime.now(UTC) - timedelta(days=400)  # OCPI_RETENTION_BILLING_YEARS=1
    just_inside = datetime.now(UTC) - timedelta(days=330)
    completed = {"status": "COMPLETED", "end": 60, "updated": 60}
    patch = {"kwh": Decimal(3), "last_updated": iso(ts(30))}
    await publish(stack.bootstrap, [
        record(settings, "Session", {**session("S-EXP", **completed), "party_id": EPID}, pid=EPID,
               received_at=long_ago),
        # A PATCH for a Session that never came, parked in its state since then.
        record(settings, "SessionPatch", patch, object_id="S-PARK", pid=EPID, received_at=long_ago),
        record(settings, "Session", {**session("S-KEEP", **completed), "party_id": EPID}, pid=EPID,
               received_at=just_inside),
        record(settings, "CDR", {**cdr("C-EXP", session_id="S-EXP"), "party_id": EPID}, pid=EPID,
               received_at=long_ago),
        record(settings, "CDR", {**cdr("C-KEEP", session_id="S-KEEP"), "party_id": EPID}, pid=EPID),
    ])
    session_changelog = changelog_topic(settings.pipeline.app_id, "session-state")
    cdr_changelog = changelog_topic(settings.pipeline.app_id, "cdr-state")
    # The changelogs exist before the reads below ask for them: Tansu creates a topic a consumer asks for, with its
    # own partition count, which the worker then refuses as not its source topic's.
    prepare_topics(settings, stack.bootstrap)
    worker = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=stack.child_environment(),
                   log_path=stack.log_dir / "worker-state-expiry.log")
    try:
        sessions = await latest_changelog_records(stack.bootstrap, session_changelog, {S_EXP, S_PARK, S_KEEP},
                                                  expired_and_kept({S_EXP, S_PARK}, {S_KEEP}), timeout=90)
        assert {key: value is None for key, value in sessions.items()} == {S_EXP: True, S_PARK: True, S_KEEP: False}
        cdrs = await latest_changelog_records(stack.bootstrap, cdr_changelog, {C_EXP, C_KEEP},
                                              expired_and_kept({C_EXP}, {C_KEEP}), timeout=30)
        assert {key: value is None for key, value in cdrs.items()} == {C_EXP: True, C_KEEP: False}
        kept = cdrs[C_KEEP]
        assert kept is not None and CDRS.decode(kept).received_at > long_ago
        party_changelog = changelog_topic(settings.pipeline.app_id, "party-state")
        party = await latest_changelog_records(stack.bootstrap, party_changelog, PARTY_EXP | PARTY_KEEP,
                                               expired_and_kept(PARTY_EXP, PARTY_KEEP), timeout=30)
        assert {key: value is None for key, value in party.items()} == (
            dict.fromkeys(PARTY_EXP, True) | dict.fromkeys(PARTY_KEEP, False))
    finally:
        terminate(worker, 20)

    # Deleted from the worker's own RocksDB partitions too; the recent entries stay.
    assert set(stored_values(stack, "session-state", SESSIONS, (S_EXP, S_PARK, S_KEEP))) == {S_KEEP}
    assert set(stored_values(stack, "cdr-state", CDRS, (C_EXP, C_KEEP))) == {C_KEEP}
    stage2 = stored_values(stack, "party-state", Codec(SessionRec), (b"S/" + S_EXP, b"S/" + S_KEEP))
    stage2 |= stored_values(stack, "party-state", Codec(CdrRec), (b"C/" + C_EXP, b"C/" + C_KEEP))
    assert set(stage2) == PARTY_KEEP


