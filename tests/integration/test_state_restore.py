"""README "A worker's state starting empty over a populated store": the restore it recommends (export
--source clickhouse, then replay --from-archive --wait) gives the new worker back the state the old one had.

A store is built through the real path (HTTP pushes and published events, the worker), the stack stopped; a new
stack on the same data dir and database but a new Kafka (new topics, new app id: no changelog) warns once, the
state is restored, and then:
- every table read with FINAL is what it was, but what README admits (raw_events rows of the window: REPLAY and the
  new topics' offsets; reconciliation and credit-link versions);
- a CDR sent again with other content is a CONFLICT, a second credit is not linked, an older Session is STALE,
  a CDR of a session stored before matches it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import pytest
from clickhouse_connect.driver.client import Client

from infra.settings import Settings, as_environ, load_settings
from pipeline.stack import Stack
from pipeline.worker import state_gap
from tests.integration.jobs_support import PARTNERS, job_settings, push, run_cli
from tests.integration.pipeline_support import publish, record
from tests.integration.test_replay_fingerprint import (
    Story,
    _check_story,
    _extras,
    describe,
    differences,
    fingerprint,
    settle,
)
from tests.unit.pipeline import builders as b

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

# What README admits the restore changes: the window's raw_events rows say REPLAY.
ADMITTED = {"raw_events": ("source", "kafka_topic", "kafka_partition", "kafka_offset")}
# And, as after a rebuild (README "Rebuild"), the version of a reconciliation or credit-link row: its fact's event
# time, raised by one for each further row of the subject, and the replay hands the facts over in another order.
ADMITTED |= {"reconciliation": ("version",), "credit_links": ("version",)}


@dataclass
class Restored:
    story: Story
    before: dict[str, list[str]]
    after: dict[str, list[str]]
    warning: str | None
    counts: tuple[int, int, int]


# How long before the fixture's start the replay's cut is: long before every deadline of its settings, and after
# the story's extras (received 2 h before it). It was 30 min before the module's import: SG1, ACTIVE since the
# cut + 2 min, went idle (OCPI_PIPELINE_SESSION_IDLE, 30 min) 2 min after the import, which a slow machine's
# fixture outlasts, and its SESSION_IDLE came between the two fingerprints.
CUT_BEFORE = timedelta(minutes=60)


def _parked_then_applied(settings: Settings, cut: datetime) -> list[tuple[str, bytes, bytes]]:
    """A PATCH received before its PUT (parked), the PUT within OCPI_PIPELINE_PARK_TTL (applied): either side of
    `cut`, long before now."""
    return [record(settings, "SessionPatch", {"kwh": Decimal("4"), "last_updated": b.iso(b.ts(10))}, object_id="SG1",
                   received_at=cut - timedelta(minutes=2)),
            record(settings, "Session", b.session("SG1", updated=5, uid="TG1"), received_at=cut + timedelta(minutes=2))]


def _new_kafka(settings: Settings, tag: str) -> Settings:
    """The same data dir and database over a new Kafka: other topics, another app id (no changelog)."""
    env = {"OCPI_TOPIC_LOCATIONS": f"{settings.kafka.topic_locations}-{tag}",
           "OCPI_TOPIC_SESSIONS": f"{settings.kafka.topic_sessions}-{tag}",
           "OCPI_TOPIC_CDRS": f"{settings.kafka.topic_cdrs}-{tag}",
           "OCPI_PIPELINE_APP_ID": f"{settings.pipeline.app_id}-{tag}",
           "OCPI_TOPIC_PARTY_FACTS": f"{settings.pipeline.topic_party_facts}-{tag}",
           "OCPI_TOPIC_RECONCILIATION": f"{settings.pipeline.topic_reconciliation}-{tag}"}
    return _reload(settings, env)


def _reload(settings: Settings, env: dict[str, str]) -> Settings:
    return load_settings({**as_environ(settings), "OCPI_HTTP_PORT": "8080", **env}).with_overrides(http={"port": 0})


def _fingerprint(client: Client) -> dict[str, list[str]]:
    return fingerprint(client, without=ADMITTED)


@pytest.fixture(scope="module")
async def restored(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Restored]:
    settings = job_settings(session_tmp, chdb_dsn, broker, OCPI_PIPELINE_PARK_TTL="600",
                            OCPI_PIPELINE_SESSION_IDLE="1800", OCPI_RECONCILE_SESSION_GRACE="900",
                            OCPI_RECONCILE_CDR_GRACE="1200", OCPI_PIPELINE_SWEEP_INTERVAL="1")
    stack = await Stack(settings).start()
    try:
        for seed, (partner_id, (parties, stories)) in enumerate(PARTNERS.items()):
            await push(stack, partner_id, parties, stories, seed)
        cut_at = datetime.now(UTC) - CUT_BEFORE
        await publish(stack.bootstrap, [*_extras(settings), *_parked_then_applied(settings, cut_at)])
        first = Story(stack, settings, {})
        first.baseline = await settle(first)
        _check_story(first.baseline)
        assert stack.clickhouse is not None
        before = _fingerprint(stack.clickhouse)
        counts = tuple(stack.clickhouse.query(
            "SELECT (SELECT count() FROM cdrs FINAL), (SELECT count() FROM sessions FINAL), "
            "(SELECT count() FROM locations FINAL)").result_rows[0])
    finally:
        await stack.stop()
    again = _new_kafka(settings, "new")
    stack = await Stack(again).start()
    try:
        assert stack.clickhouse is not None
        warning = state_gap(stack.clickhouse)
        archive = session_tmp / f"{again.pipeline.app_id}-archive"
        code, out, err = await run_cli(again, "export", str(archive), "--source", "clickhouse")
        assert code == 0, out + err
        # In two parts, the worker catching up in between (as it does between the batches of one long replay,
        # whenever it reads faster than the replay sends): the PATCH of SG1 in the first, its PUT in the second.
        cut = cut_at.isoformat()
        for part in (("--until", cut), ("--since", cut)):
            code, out, err = await run_cli(again, "replay", "--from-archive", str(archive), *part, "--wait",
                                           "--timeout", "90")
            assert code == 0, out + err
            await asyncio.sleep(3 * again.pipeline.sweep_interval_s + 2)
        story = Story(stack, again, {})
        await settle(story)
        after = _fingerprint(stack.clickhouse)
        yield Restored(story, before, after, warning, counts)  # type: ignore[arg-type]
    finally:
        await stack.stop()


def _sg1_orphan(row: str) -> bool:
    return row.startswith("('ORPHAN_EVENT', 'SESSIONS', 'NL', 'TNM', 'SG1',")


def test_the_restore_changes_no_row_but_the_replayed_sources(restored: Restored) -> None:
    diff = differences(restored.before, restored.after)
    assert not diff, describe(diff)


def test_no_sweep_flags_a_replayed_patch_whose_put_is_still_to_come(restored: Restored) -> None:
    """A deadline sweep between the replay's batches: SG1's PATCH, parked again on its old received_at, waits for
    its PUT, still to be replayed (it was applied before, and is after the restore)."""
    assert not [row for row in restored.after["anomalies"] if _sg1_orphan(row)]


def test_the_warning_counts_the_stored_objects_once(restored: Restored) -> None:
    cdrs, sessions, locations = restored.counts
    assert restored.warning is not None
    assert restored.warning.startswith(f"the store holds {cdrs} CDR, {sessions} session and {locations} location "), \
        (restored.warning, restored.counts)
    log = (restored.story.stack.log_dir / "worker.log").read_text()
    assert log.count("that the worker's state, starting empty, does not know") == 1, log[-3000:]


async def test_the_restored_state_refuses_and_matches_as_before(restored: Restored) -> None:
    story = restored.story
    settings, client = story.settings, story.client
    r = record
    await publish(story.stack.bootstrap, [
        # CD1 again with other content: a conflict, not stored.
        r(settings, "CDR", b.cdr("CD1", session_id="SD-NONE", kwh="9", cost="4.00", uid="TD1")),
        # A third credit of CD1: a duplicate credit, not billed.
        r(settings, "CDR", b.cdr("CD1-C3", session_id="SD-NONE", kwh="7", cost="-3.00", uid="TD1", credit=True,
                                 credit_reference="CD1")),
        # Older updates of a Session and a Location stored before: stale.
        r(settings, "Session", b.session("SE1", kwh="1", updated=10, uid="TE1")),
        r(settings, "Location", b.location("LD1", evses=[b.evse("E1"), b.evse("E2")], updated=1)),
        # A CDR of a session stored before (SI1, open): matched to it.
        r(settings, "CDR", b.cdr("CI1", session_id="SI1", kwh="1", cost="0.50", uid="TI1")),
    ])
    await settle(story)

    def outcome(object_id: str) -> list[str]:  # of the pushes since the restore (those before say REPLAY now)
        rows = client.query("SELECT outcome FROM raw_events FINAL WHERE object_id = %(o)s AND source = 'PUSH'",
                            parameters={"o": object_id}).result_rows
        return [row[0] for row in rows]

    assert outcome("CD1") == ["CONFLICT"]
    assert client.query("SELECT total_energy FROM cdrs FINAL WHERE cdr_id = 'CD1'").result_rows == [(7,)]
    links = client.query("SELECT status FROM credit_links FINAL WHERE credit_cdr_id = 'CD1-C3'").result_rows
    assert links == [("DUPLICATE_CREDIT",)], links
    billed = client.query("SELECT count() FROM billable_lines WHERE cdr_id = 'CD1-C3'").result_rows
    assert billed == [(0,)], billed
    assert outcome("SE1") == ["STALE"]
    assert outcome("LD1") == ["STALE"]
    rec = client.query("SELECT outcome FROM reconciliation FINAL WHERE subject = 'CDR' "
                       "AND subject_id = 'CI1'").result_rows
    assert rec and rec[0][0] in {"MATCHED", "MISMATCH"}, rec
