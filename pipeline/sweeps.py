"""The worker's timer: deadlines that pass without an event, and retention.

Decisions on state are made by events (`pipeline.sessions` etc.) in event time, so reprocessing repeats them.
A deadline that passes while nothing happens (a parked PATCH whose PUT never comes, a session that stops
sending, a completed session without a CDR) needs a clock. The sweep reads ClickHouse — never the Faust tables,
so it cannot race the agents — and writes rows keyed exactly like the ones the event-time rules write for the
same deadline, so whichever comes first, the result is the same row:

- PARKED raw events older than OCPI_PIPELINE_PARK_TTL → ORPHANED (+ ORPHAN_EVENT anomaly); not one parked again
  by a replay while a later event of its object, within the TTL, applied, is still to be replayed (a state restored by a
  replay: `_awaited_by_the_replay`);
- PENDING/ACTIVE sessions without an update for OCPI_PIPELINE_SESSION_IDLE → SESSION_IDLE anomaly (not once
  that anomaly would be past its retention);
- reconciliation AWAITING_CDR / AWAITING_SESSION past `due_at` → MISSING_CDR / NO_SESSION (also published);
- credit links AWAITING_ORIGINAL past `due_at` → UNKNOWN_REFERENCE (+ CREDIT_UNKNOWN_REFERENCE anomaly).

It runs only while the whole consumer group has read every partition of the topics it depends on to its end
(`pipeline.backlog`): during a backlog (a restart, a replay, a slower worker) the awaited event may still be
waiting in Kafka, in this worker's partitions or another's. A margin of the broker send timeout covers events
that were stamped before a deadline but reached Kafka after it: a push, and a pulled event (stamped as the pull
hands it to the producer, `pipeline.jobs.pull`), is acknowledged within it of its stamp. Retention: configured TTLs
are set at the worker's start (`worker.apply_configured_ttls`) and checked again at the first tick, and due rows
are pseudonymised every hour, at a tick whether or not its sweep runs: the group's backlog, or a sweep that fails,
does not hold personal data in clear.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from datetime import datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from clickhouse_connect.driver.client import Client

from ocpi.identity import ci_normalize
from pipeline import projection, retention
from pipeline.reconcile import CREDIT_LINK_COLUMNS, RECONCILIATION_COLUMNS, unknown_reference_detail
from pipeline.records import Anomaly, Outcome, utc_now
from pipeline.sink import Batch, datetime64, string
from pipeline.stage import StageRules, orphan_details

if TYPE_CHECKING:
    from pipeline.agents import AgentContext
    from pipeline.backlog import GroupBacklog

log = logging.getLogger(__name__)

RETENTION_EVERY: Final = timedelta(hours=1)
_OVERDUE: Final = {"AWAITING_CDR": "MISSING_CDR", "AWAITING_SESSION": "NO_SESSION"}
_LIMIT: Final = 10_000
# Objects (CiString(36) ids at most) listed in one statement (`_awaited_by_the_replay`, `superseded`): far below
# 256 KiB.
_AWAITED_PER_STATEMENT: Final = 1_000


def orphan_rows(client: Client, before: datetime, rules: StageRules, batch: Batch) -> int:
    """PARKED events received before `before` become ORPHANED."""
    columns = ", ".join(projection.RAW_EVENT_COLUMNS)
    rows = client.query(f"SELECT {columns} FROM raw_events FINAL WHERE outcome = 'PARKED' "
                        f"AND received_at < {datetime64(before)} LIMIT {_LIMIT}").result_rows
    index = {name: i for i, name in enumerate(projection.RAW_EVENT_COLUMNS)}
    awaited = _awaited_by_the_replay(client, rows, index, rules.park_ttl)  # once: a query per 1,000
    awaited_ids = {row[index["event_id"]] for row in awaited}  # a set: up to 10,000 rows against as many
    rows = [row for row in rows if row[index["event_id"]] not in awaited_ids]
    for row in rows:
        new = list(row)
        new[index["outcome"]] = Outcome.ORPHANED.value
        outcome_detail, anomaly_detail = orphan_details(new[index["module"]], rules.park_ttl)
        new[index["outcome_detail"]] = outcome_detail
        batch.put("raw_events", projection.RAW_EVENT_COLUMNS, new[index["event_id"]], new)
        sub = "/".join(str(new[index[c]]).upper() for c in ("evse_uid", "connector_id") if new[index[c]])
        batch.add("anomalies", projection.ANOMALY_COLUMNS, [
            Anomaly.ORPHAN_EVENT.value, new[index["module"]], str(new[index["country_code"]]).upper(),
            str(new[index["party_id"]]).upper(), str(new[index["object_id"]]).upper(), sub, new[index["event_id"]],
            new[index["partner_id"]], anomaly_detail, new[index["received_at"]]])
    return len(rows)


def _awaited_by_the_replay(client: Client, rows: Sequence[Sequence[Any]], index: dict[str, int], ttl: timedelta,
                           ) -> list[Sequence[Any]]:
    """The replayed PARKED events (source REPLAY) a later event of their object, received within the park TTL
    after them, applied and not replayed yet, may still release: a state restored by a replay (README "A worker's
    state starting empty over a populated store") parks again what it does not know, on its old `received_at`,
    while the events that released it (their rows written by the worker before, source PUSH or PULL) are still to
    be replayed. The backlog guard does not cover them: the replay appends them to the topics after the sweep
    checked the ends, received long before its deadline. Once they are replayed (source REPLAY) the event is
    released by them, or orphaned by a later sweep. Only an APPLIED event releases one, and only its replay
    writes its row again: a DUPLICATE, STALE, REJECTED, INVALID or CONFLICT row keeps its source for good
    (`stage._NOT_RECORDED_FOR_REPLAYS`), and would hold the parked event back for ever."""
    replayed = [row for row in rows if row[index["source"]] == "REPLAY"]
    if not replayed:
        return []
    # The object's identity as the worker's state keys it: raw_events holds the ids as each URL had them, and a
    # CiString compares without (ASCII) case, which ClickHouse's upper() folds as `ci_normalize` does.
    key = ("module", "country_code", "party_id", "object_id")
    columns = ", ".join(f"upper({c})" for c in key)
    later: dict[tuple[str, ...], list[datetime]] = {}
    # Their objects go into the statement as literal tuples: _AWAITED_PER_STATEMENT at a time, as the sweep may
    # hold up to _LIMIT of them and ClickHouse refuses a statement beyond its max_query_size (256 KiB).
    for start in range(0, len(replayed), _AWAITED_PER_STATEMENT):
        part = replayed[start:start + _AWAITED_PER_STATEMENT]
        keys = ", ".join("(" + ", ".join(string(ci_normalize(str(row[index[c]]))) for c in key) + ")"
                         for row in part)
        first = min(row[index["received_at"]] for row in part)
        last = max(row[index["received_at"]] for row in part) + ttl
        for *found, received_at in client.query(
                f"SELECT {columns}, received_at FROM raw_events FINAL WHERE source != 'REPLAY' "
                f"AND outcome = 'APPLIED' AND ({columns}) IN ({keys}) "
                f"AND received_at > {datetime64(first)} AND received_at <= {datetime64(last)}").result_rows:
            later.setdefault(tuple(str(v) for v in found), []).append(received_at)
    return [row for row in replayed
            if any(row[index["received_at"]] < at <= row[index["received_at"]] + ttl
                   for at in later.get(tuple(ci_normalize(str(row[index[c]])) for c in key), ()))]


def idle_rows(client: Client, before: datetime, rules: StageRules, batch: Batch, *, since: datetime) -> int:
    """Open sessions whose last applied event is older than `before` are flagged idle (keyed by that event).

    Not those whose last event is older than `since`: their flag would be past the anomalies' retention, which
    ClickHouse drops as it is inserted, so they would be selected (and their flag written in vain) at every
    sweep, filling its limit and keeping the sessions that just became idle from being flagged."""
    # Sessions flagged for this gap already are left out: the row would be the same.
    rows = client.query("SELECT country_code, party_id, session_id, partner_id, status, event_id, received_at "
                        "FROM sessions FINAL WHERE status IN ('PENDING', 'ACTIVE') "
                        f"AND received_at < {datetime64(before)} AND received_at > {datetime64(since)} "
                        "AND event_id NOT IN "
                        f"(SELECT event_id FROM anomalies WHERE kind = 'SESSION_IDLE') LIMIT {_LIMIT}").result_rows
    from pipeline.sessions import idle_detail

    for cc, pid, sid, partner, status, event_id, received_at in rows:
        batch.add("anomalies", projection.ANOMALY_COLUMNS, [
            Anomaly.SESSION_IDLE.value, "SESSIONS", cc, pid, sid, "", event_id, partner, idle_detail(status, rules),
            received_at + rules.session_idle])
    return len(rows)


def overdue_reconciliation(client: Client, now: datetime, batch: Batch) -> list[list[Any]]:
    """AWAITING_* reconciliation rows past their due time, promoted (version + 1: the next real change wins)."""
    columns = ", ".join(RECONCILIATION_COLUMNS)
    rows = client.query(f"SELECT {columns} FROM reconciliation FINAL WHERE outcome IN "
                        f"('AWAITING_CDR', 'AWAITING_SESSION') AND due_at <= {datetime64(now)} LIMIT {_LIMIT}",
                        ).result_rows
    index = {name: i for i, name in enumerate(RECONCILIATION_COLUMNS)}
    promoted = []
    for row in rows:
        new = list(row)
        new[index["outcome"]] = _OVERDUE[new[index["outcome"]]]
        new[index["version"]] = int(new[index["version"]]) + 1
        batch.add("reconciliation", RECONCILIATION_COLUMNS, new)
        promoted.append(new)
    return promoted


def superseded(client: Client, published: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """The current `reconciliation` rows of the subjects of `published` (rows the sweep published) whose version is
    above the published one: rows stage 2 wrote meanwhile."""
    columns = ", ".join(RECONCILIATION_COLUMNS)
    index = {name: i for i, name in enumerate(RECONCILIATION_COLUMNS)}
    key = ("country_code", "party_id", "subject", "subject_id")
    versions = {tuple(str(row[index[c]]) for c in key): int(row[index["version"]]) for row in published}
    subjects = list(versions)
    newer: list[list[Any]] = []
    for start in range(0, len(subjects), _AWAITED_PER_STATEMENT):
        listed = ", ".join("(" + ", ".join(map(string, subject)) + ")"
                           for subject in subjects[start:start + _AWAITED_PER_STATEMENT])
        for row in client.query(f"SELECT {columns} FROM reconciliation FINAL "
                                f"WHERE ({', '.join(key)}) IN ({listed})").result_rows:
            subject = tuple(str(row[index[c]]) for c in key)
            if int(row[index["version"]]) > versions.get(subject, 0):
                newer.append(list(row))
    return newer


def overdue_credits(client: Client, now: datetime, batch: Batch) -> int:
    columns = ", ".join(CREDIT_LINK_COLUMNS)
    rows = client.query(f"SELECT {columns} FROM credit_links FINAL WHERE status = 'AWAITING_ORIGINAL' "
                        f"AND due_at <= {datetime64(now)} LIMIT {_LIMIT}").result_rows
    index = {name: i for i, name in enumerate(CREDIT_LINK_COLUMNS)}
    for row in rows:
        new = list(row)
        new[index["status"]] = "UNKNOWN_REFERENCE"
        new[index["version"]] = int(new[index["version"]]) + 1
        batch.add("credit_links", CREDIT_LINK_COLUMNS, new)
        credit_id, ref = new[index["credit_cdr_id"]], new[index["credited_cdr_id"]]
        batch.add("anomalies", projection.ANOMALY_COLUMNS, [
            Anomaly.CREDIT_UNKNOWN_REFERENCE.value, "CDRS", new[index["country_code"]], new[index["party_id"]],
            credit_id, "", credit_id, new[index["partner_id"]],
            unknown_reference_detail(ref, new[index["due_at"]] - new[index["received_at"]]), new[index["due_at"]]])
    return len(rows)


def collect(client: Client, now: datetime, rules: StageRules, *,
            anomalies_kept: timedelta) -> tuple[Batch, list[list[Any]]]:
    """Everything due at `now`: the rows to write and the reconciliation rows to publish. A deadline is due once
    `rules.arrival_margin` past it: an event stamped just before it reaches Kafka within the send timeout.
    `anomalies_kept`: the anomalies' retention (OCPI_RETENTION_HISTORY_DAYS; their TTL counts from `observed_at`)."""
    batch = Batch()
    margin = rules.arrival_margin
    orphan_rows(client, now - rules.park_ttl - margin, rules, batch)
    idle_rows(client, now - rules.session_idle - margin, rules, batch,
              since=now - anomalies_kept - rules.session_idle)
    promoted = overdue_reconciliation(client, now - margin, batch)
    overdue_credits(client, now - margin, batch)
    return batch, promoted


class Sweeper:
    def __init__(self, context: AgentContext, backlog: GroupBacklog) -> None:
        self.context = context
        self.backlog = backlog
        settings = context.settings
        self.anomalies_kept = timedelta(days=settings.retention.history_days)
        self.ttls_applied = False
        self.last_retention: datetime | None = None

    async def tick(self) -> None:
        now = utc_now()
        try:
            await self.run(now)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("deadline sweep failed; trying again at the next tick")
        # Not part of the sweep: what skips or fails a sweep (the group's backlog, a refused publish) must not keep
        # due personal data in clear. The pass needs no caught-up group: rows the worker writes meanwhile outrank
        # its rewrites (`projection.next_version`), and each row's own age says what is due.
        try:
            await self.retention(now)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("retention pass failed; trying again at the next tick")

    async def run(self, now: datetime) -> bool:
        """One sweep at `now`; returns False when skipped because the group is (or may be) behind."""
        ctx = self.context
        assigned = [(tp.topic, tp.partition) for tp in ctx.app.consumer.assignment()]
        if not await self.backlog.caught_up(assigned, ctx.progress.done):
            return False
        batch, promoted = await asyncio.to_thread(ctx.sink.run_sync,
                                                  lambda c: collect(c, now, ctx.stage_rules,
                                                                    anomalies_kept=self.anomalies_kept))
        from pipeline.agents import reconciliation_records

        # Published before the rows are written: a sweep has no Kafka offset to resume from, and the next one
        # selects only what is still AWAITING in ClickHouse, so a kill between the two must leave the rows
        # unwritten (the next sweep promotes and publishes them again, the same rows and versions), never the
        # records unpublished for good.
        await ctx.publish(ctx.settings.pipeline.topic_reconciliation, reconciliation_records(promoted))
        # The anomalies before the rows that end a wait: a batch's tables are inserted side by side, and an ORPHANED
        # raw event or UNKNOWN_REFERENCE credit link written without its anomaly (a kill between the inserts) is
        # never selected again, so its anomaly would never be written.
        await ctx.sink.write(batch.take("anomalies"))
        await ctx.sink.write(batch)
        # Stage 2 (this worker's or another's) may have written and published a newer row of a promoted subject
        # between the select and the publish above: the sweep's older record would then be the last of its key,
        # which the topic's readers take for the current outcome. Stage 2 writes its rows before it publishes them,
        # so such a row is found here and published again after the sweep's record; one written after this read
        # is published after it. Again until nothing newer is found.
        while promoted:
            promoted = await asyncio.to_thread(ctx.sink.run_sync, partial(superseded, published=promoted))
            await ctx.publish(ctx.settings.pipeline.topic_reconciliation, reconciliation_records(promoted))
        return True

    async def retention(self, now: datetime) -> None:
        ctx = self.context
        database = ctx.settings.clickhouse.database
        if not self.ttls_applied:
            changed = await asyncio.to_thread(
                ctx.sink.run_sync, lambda c: retention.apply_ttls(c, database, ctx.settings))
            if changed:
                log.info("retention: TTL set on %s", ", ".join(changed))
            self.ttls_applied = True
        if self.last_retention is None or now - self.last_retention >= RETENTION_EVERY:
            done = await asyncio.to_thread(
                ctx.sink.run_sync, lambda c: retention.pseudonymise_due(c, ctx.settings, ctx.pseudonym, now))
            if any(done.values()):
                log.info("retention: pseudonymised %s", done)
            self.last_retention = now
