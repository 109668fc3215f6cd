"""Reprocessing never changes what billing (or anyone) reads: a fingerprint of EVERY table the pipeline writes,
read with FINAL, before and after `replay` from offset 0, `replay --from-archive` of an export, and
`replay --rebuild`.

The traffic is the simulator's (HTTP pushes: Locations, EVSE status PATCHes, Session lifecycles by PATCH, retries,
stale PUTs, credits and corrected CDRs, old EVSE status PATCHes sent last) plus, published as the receivers would,
what the simulator does not send: a PATCH before its PUT, a PATCH whose PUT never comes (orphaned), an idle
session, a CDR conflict, a session leaving its final state, an invalid merge, a Location PUT that drops an EVSE,
two pushes with one `last_updated`, a push from a clock ahead, a duplicate credit, a credit of an unknown CDR, a
CDR without its session, a completed session without its CDR, and a record that does not decode.

Columns left out of the fingerprint (they differ by design, not by content):
- `raw_events.inserted_at`, `rejections.inserted_at`: set by the server when the row is written (the health
  report's ingestion lag counts "from its last write", README "Reports").
- `dead_letters.recorded_at`: when the worker recorded the letter (no receive time exists for it).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from infra.codec import encode_event
from infra.events import unlist_event
from infra.settings import Settings
from ocpi.identity import ObjectKey
from pipeline.jobs.archive import export_from_kafka
from pipeline.jobs.common import MODULES
from pipeline.jobs.kafka_io import offset_bounds, topic_partitions, wait_for_group
from pipeline.jobs.rebuild import rebuild
from pipeline.jobs.replay import Selection, replay_archive, replay_kafka
from pipeline.stack import Stack
from tests.integration.jobs_support import PARTNERS, job_settings, push
from tests.integration.pipeline_support import publish, record
from tests.unit.pipeline import builders as b

pytestmark = [pytest.mark.integration, pytest.mark.kafka, pytest.mark.clickhouse, pytest.mark.slow]

EXCLUDED: dict[str, tuple[str, ...]] = {
    "raw_events": ("inserted_at",), "rejections": ("inserted_at",), "dead_letters": ("recorded_at",)}
NOT_WRITTEN_BY_THE_PIPELINE = {"partners", "credential_claims", "schema_migrations", "pseudonym_key"}


def fingerprint(client: Client, database: str | None = None, *, without: dict[str, tuple[str, ...]] | None = None,
                ) -> dict[str, list[str]]:
    """Every row of every table the pipeline writes, read with FINAL, sorted; views included (what billing
    reads). `without`: more columns to leave out, per table."""
    database = database or client.database
    tables = client.query("SELECT name, engine FROM system.tables WHERE database = %(db)s "
                          "AND engine NOT IN ('MaterializedView') ORDER BY name",
                          parameters={"db": database}).result_rows
    found: dict[str, list[str]] = {}
    for name, engine in tables:
        if name in NOT_WRITTEN_BY_THE_PIPELINE:
            continue
        excluded = EXCLUDED.get(name, ()) + (without or {}).get(name, ())
        columns = "* EXCEPT (" + ", ".join(excluded) + ")" if excluded else "*"
        final = "" if engine == "View" else " FINAL"
        rows = client.query(f"SELECT {columns} FROM `{database}`.`{name}`{final}").result_rows
        found[name] = sorted(_frozen(row) for row in rows)
    return found


def describe(diff: dict[str, dict[str, list[str]]]) -> str:
    """The rows a reprocessing changed, per table (each row as it was and as it is, up to 5 of each)."""
    lines = []
    for table, change in diff.items():
        lines.append(f"{table}: {len(change['gone'])} rows replaced by {len(change['new'])}")
        lines += [f"  - {row[:400]}" for row in change["gone"][:5]] + [f"  + {row[:400]}" for row in change["new"][:5]]
    return "\n".join(lines)


def _frozen(row: Any) -> Any:
    """A row as a sortable, hashable value (arrays as tuples, every value by its repr)."""
    return repr(tuple(tuple(v) if isinstance(v, list) else v for v in row))


def differences(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, dict[str, list[str]]]:
    diff = {}
    for table in sorted(set(before) | set(after)):
        old, new = set(before.get(table, [])), set(after.get(table, []))
        if old != new:
            diff[table] = {"gone": sorted(old - new), "new": sorted(new - old)}
    return diff


@dataclass
class Story:
    stack: Stack
    settings: Settings
    baseline: dict[str, list[str]]

    @property
    def client(self) -> Client:
        assert self.stack.clickhouse is not None
        return self.stack.clickhouse


def _extras(settings: Settings) -> list[tuple[str, bytes, bytes]]:
    """What the simulator does not send (party NL/TNM, partner p1), in the order of arrival."""
    now = datetime.now(UTC)
    old = now - timedelta(hours=2)  # received long before every deadline of the test's settings
    r = record

    def at(minutes: float) -> datetime:
        return old + timedelta(minutes=minutes)

    out = [
        # PATCH before its PUT: parked, then applied when the PUT comes; then completed, with its CDR.
        r(settings, "SessionPatch", {"kwh": Decimal("4"), "last_updated": b.iso(b.ts(10))}, object_id="SP1",
          received_at=at(0)),
        r(settings, "Session", b.session("SP1", updated=5, uid="TP1"), received_at=at(1)),
        r(settings, "Session", b.session("SP1", status="COMPLETED", kwh="8", updated=60, end=60, cost="2.00",
                                         uid="TP1"), received_at=at(2)),
        r(settings, "CDR", b.cdr("CP1", session_id="SP1", kwh="8", cost="2.00", uid="TP1"), received_at=at(3)),
        # A PATCH whose PUT never comes: orphaned (by the sweep).
        r(settings, "SessionPatch", {"kwh": Decimal("1"), "last_updated": b.iso(b.ts(10))}, object_id="SO1",
          received_at=at(0)),
        # An idle session (ACTIVE, no update for longer than OCPI_PIPELINE_SESSION_IDLE).
        r(settings, "Session", b.session("SI1", updated=0, uid="TI1"), received_at=at(0)),
        # A CDR conflict: the same id with other content.
        r(settings, "CDR", b.cdr("CX1", session_id="SX-NONE", kwh="5", cost="1.00", uid="TX1"), received_at=at(4)),
        r(settings, "CDR", b.cdr("CX1", session_id="SX-NONE", kwh="6", cost="1.50", uid="TX1"), received_at=at(5)),
        # A session leaving its final state: REJECTED; and a completed session without a CDR: MISSING_CDR.
        r(settings, "Session", b.session("SR1", status="COMPLETED", kwh="3", updated=30, end=30, cost="1.00",
                                         uid="TR1"), received_at=at(6)),
        r(settings, "Session", b.session("SR1", status="ACTIVE", kwh="3", updated=40, uid="TR1"), received_at=at(7)),
        # Two PUTs with one last_updated and different content: the later arrival wins.
        r(settings, "Session", b.session("SE1", kwh="1", updated=20, uid="TE1"), received_at=at(8)),
        r(settings, "Session", b.session("SE1", kwh="2", updated=20, uid="TE1"), received_at=at(9)),
        # A push from a clock a day ahead: applied and flagged.
        r(settings, "Session", {**b.session("SF1", uid="TF1"), "last_updated": b.iso(now + timedelta(days=1))},
          received_at=at(10)),
        # An invalid merge: publish true while publish_allowed_to is set.
        r(settings, "Location", b.location("LX1", publish=False, publish_allowed_to=[{"uid": "V1", "type": "RFID"}]),
          received_at=at(11)),
        r(settings, "LocationPatch", {"publish": True, "last_updated": b.iso(b.ts(5))}, object_id="LX1",
          received_at=at(12)),
        # A Location PUT that drops an EVSE, then EVSE status PATCHes of the kept one with one last_updated.
        r(settings, "Location", b.location("LD1", evses=[b.evse("E1"), b.evse("E2")]), received_at=at(13)),
        r(settings, "Location", b.location("LD1", evses=[b.evse("E1", updated=3)], updated=3), received_at=at(14)),
        r(settings, "EVSEPatch", {"status": "CHARGING", "last_updated": b.iso(b.ts(6))}, object_id="LD1",
          evse_uid="E1", received_at=at(15)),
        r(settings, "EVSEPatch", {"status": "BLOCKED", "last_updated": b.iso(b.ts(6))}, object_id="LD1",
          evse_uid="E1", received_at=at(16)),
        # A CDR, two credits of it (the second DUPLICATE_CREDIT), a credit of an unknown CDR, a CDR without
        # its session (NO_SESSION).
        r(settings, "CDR", b.cdr("CD1", session_id="SD-NONE", kwh="7", cost="3.00", uid="TD1"), received_at=at(17)),
        r(settings, "CDR", b.cdr("CD1-C1", session_id="SD-NONE", kwh="7", cost="-3.00", uid="TD1", credit=True,
                                 credit_reference="CD1"), received_at=at(18)),
        r(settings, "CDR", b.cdr("CD1-C2", session_id="SD-NONE", kwh="7", cost="-3.00", uid="TD1", credit=True,
                                 credit_reference="CD1"), received_at=at(19)),
        r(settings, "CDR", b.cdr("CU1-C", session_id="SU-NONE", kwh="2", cost="-1.00", uid="TU1", credit=True,
                                 credit_reference="CU-NONE"), received_at=at(20)),
        # A session that becomes INVALID after its CDR came.
        r(settings, "Session", b.session("SV1", kwh="5", updated=30, uid="TV1"), received_at=at(21)),
        r(settings, "CDR", b.cdr("CV1", session_id="SV1", kwh="5", cost="1.25", end=30, uid="TV1"),
          received_at=at(22)),
        r(settings, "Session", b.session("SV1", status="INVALID", kwh="5", updated=35, end=30, cost="1.25",
                                         uid="TV1"), received_at=at(23)),
    ]
    # Full sync: a Location a complete pulled list no longer held (UNLIST); another one unlisted, then a PUT older
    # than that list (STALE) and one newer (listed again).
    for name in ("LU1", "LU2"):
        out.append(r(settings, "Location", b.location(name, evses=[b.evse("E1")], updated=2), received_at=at(25)))
        out.append((settings.kafka.topic_locations, f"NL/TNM/{name}".encode(), encode_event(unlist_event(
            partner_id="p1", key=ObjectKey("NL", "TNM", name), listed_until=b.ts(20), correlation_id="full-sync",
            received_at=at(26)))))
    out.append(r(settings, "Location", b.location("LU2", evses=[b.evse("E1")], updated=10), received_at=at(27)))
    out.append(r(settings, "Location", b.location("LU2", evses=[b.evse("E1", status="CHARGING")], updated=30),
                 received_at=at(28)))
    out.append((settings.kafka.topic_cdrs, b"NL/TNM/GARBAGE", b"\xc3\x01not an avro record"))  # a dead letter
    # A well-formed event that does not fit its topic (an EVSE push without evse_uid): a dead letter too.
    out.append(r(settings, "EVSEPatch", {"status": "CHARGING", "last_updated": b.iso(b.ts(7))}, object_id="LD1",
                 received_at=at(24)))
    return out


async def _ends(settings: Settings, bootstrap: str, topics: list[str]) -> dict[Any, int]:
    tps = await topic_partitions(bootstrap, topics)
    return {tp: end for tp, (_b, end) in (await offset_bounds(settings.kafka, bootstrap, tps)).items() if end}


async def settle(story: Story, *, quiet: float = 4.0, timeout: float = 120.0) -> dict[str, list[str]]:
    """Until the worker consumed the module and party-facts topics to their ends and the fingerprint stayed the
    same over `quiet` seconds (sweeps included)."""
    settings, bootstrap = story.settings, story.stack.bootstrap
    topics = [*settings.kafka.module_topics, settings.pipeline.topic_party_facts]
    await wait_for_group(bootstrap, settings.pipeline.app_id, await _ends(settings, bootstrap, topics),
                         timeout=timeout)
    deadline = asyncio.get_running_loop().time() + timeout
    last = await asyncio.to_thread(fingerprint, story.client)
    while asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(quiet)
        await wait_for_group(bootstrap, settings.pipeline.app_id, await _ends(settings, bootstrap, topics),
                             timeout=timeout)
        now = await asyncio.to_thread(fingerprint, story.client)
        if now == last:
            return now
        last = now
    raise AssertionError("the tables did not settle")


@pytest.fixture(scope="module")
async def story(session_tmp: Path, chdb_dsn: str, broker: str) -> AsyncIterator[Story]:
    settings = job_settings(session_tmp, chdb_dsn, broker, OCPI_PIPELINE_PARK_TTL="600",
                            OCPI_PIPELINE_SESSION_IDLE="1800", OCPI_RECONCILE_SESSION_GRACE="900",
                            OCPI_RECONCILE_CDR_GRACE="1200", OCPI_PIPELINE_SWEEP_INTERVAL="1")
    stack = await Stack(settings).start()
    try:
        for seed, (partner_id, (parties, stories)) in enumerate(PARTNERS.items()):
            await push(stack, partner_id, parties, stories * 2, seed)
        await publish(stack.bootstrap, _extras(settings))
        s = Story(stack, settings, {})
        s.baseline = await settle(s)
        yield s
    finally:
        await stack.stop()


def _check_story(print_: dict[str, list[str]]) -> None:
    """The traffic made every case it is meant to make (else the comparison proves less than it says)."""
    outcomes = {row.split("'")[1] for row in print_["anomalies"]}
    assert {"ORPHAN_EVENT", "SESSION_IDLE", "CDR_CONFLICT", "ILLEGAL_TRANSITION", "INVALID_MERGE",
            "EVSE_MISSING_FROM_PUT", "FUTURE_LAST_UPDATED", "DUPLICATE_CREDIT", "CREDIT_UNKNOWN_REFERENCE",
            "STALE_UPDATE", "CDR_FOR_INVALID_SESSION"} <= outcomes, outcomes
    assert print_["dead_letters"], "no dead letter"
    assert sum(row.endswith(", True)") for row in print_["locations"]) == 1, "not one unlisted Location"


async def test_replay_from_offset_zero_changes_no_row(story: Story) -> None:
    _check_story(story.baseline)
    before = await settle(story)
    report = await replay_kafka(story.settings, story.stack.bootstrap, Selection(modules=MODULES), job="all")
    assert report.status == "done" and report.sent > 0
    after = await settle(story)
    diff = differences(before, after)
    assert not diff, describe(diff)


async def test_replay_from_an_archive_changes_no_row(story: Story, tmp_path: Path) -> None:
    before = await settle(story)
    await export_from_kafka(story.settings, story.stack.bootstrap, tmp_path / "archive", MODULES)
    report = await replay_archive(story.settings, story.stack.bootstrap, tmp_path / "archive",
                                  Selection(modules=MODULES), job="archive")
    assert report.sent > 0
    after = await settle(story)
    diff = differences(before, after)
    assert not diff, describe(diff)


# What a rebuild may write otherwise (README, "Rebuild"): a reconciliation or credit-link row's version is its
# fact's event time, raised by one for each further row of the subject at that time, and the rebuild worker saw the
# party's facts in other batches.
REBUILD_MAY_DIFFER: dict[str, tuple[str, ...]] = {"reconciliation": ("version",), "credit_links": ("version",)}


async def test_rebuild_changes_no_row(story: Story) -> None:
    await settle(story)
    before = await asyncio.to_thread(fingerprint, story.client, without=REBUILD_MAY_DIFFER)
    report = await rebuild(story.settings, story.stack.bootstrap, timeout=240)
    assert report.swapped
    await settle(story)
    after = await asyncio.to_thread(fingerprint, story.client, without=REBUILD_MAY_DIFFER)
    diff = differences(before, after)
    assert not diff, describe(diff)
