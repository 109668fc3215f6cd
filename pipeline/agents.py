"""The agents: thin loops that move one batch at a time through decode → rules → effects → state.

For every batch, in this order:
1. decode the whole batch (`pipeline.records.decode_all`), undecodable records become dead letters;
2. run the rules per object (stage 1) or per CPO party (stage 2) over an overlay of the state table;
3. write the rows to ClickHouse (`ClickHouseSink.write` returns only once they are in);
4. publish to Kafka (facts, reconciliation results) and wait for the broker's acks;
5. write the new states to the Faust tables (and their changelogs);
6. leave the batch: `take_events` acks it, and Faust commits the offsets after flushing its producer.
A crash between any two steps leaves effects that are repeated identically on reprocessing (every table is
keyed by identity, and the state's offset watermark recognises records already folded in).

Nothing in a batch may raise into Faust: `take_events` acks a batch in `finally`, so an exception would
commit records whose effects were never written. An unexpected error therefore ends the process before any
offset moves (like an unwritten batch in `pipeline.sink`); the restarted worker reads the batch again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic

import faust
import msgspec
from faust.types import EventT, TableT

from infra.settings import Settings
from pipeline import projection
from pipeline.cdrs import process_cdrs
from pipeline.facts import Fact, decode_facts, encode_facts
from pipeline.locations import process_locations
from pipeline.reconcile import (
    CREDIT_LINK_COLUMNS,
    RECONCILIATION_COLUMNS,
    PartyOutput,
    PartyState,
    Rules,
    process_party,
)
from pipeline.records import DeadLetter, RawMessage, Record, decode_all, group_by_object, utc_now
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.sink import Batch, ClickHouseSink
from pipeline.stage import StageOutput, StageRules
from pipeline.state import CdrState, Codec, LocationState, Overlay, S, SessionState, TypedView, in_partition_of
from pipeline.topics import Topics

log = logging.getLogger(__name__)

BATCH_WITHIN_S = 0.3
STOP_GRACE_S = 30.0  # how long a stopping worker finishes the batch in hand
REPORT_EVERY_S = 10.0
EXIT_PIPELINE_ERROR = 70  # EX_SOFTWARE: a bug; nothing of the batch was committed
_JSON = msgspec.json.Encoder(decimal_format="number")


class StateTable:
    """A Faust table of bytes values, read and written in the partition of a given event."""

    def __init__(self, table: TableT[Any, Any]) -> None:
        self.table = table

    def reader(self, anchor: EventT) -> Callable[[str], bytes | None]:
        def read(key: str) -> bytes | None:
            with in_partition_of(anchor):
                value = self.table.get(key.encode())
            return None if value is None else bytes(value)

        return read

    def write(self, anchor: EventT, changes: dict[str, bytes | None]) -> None:
        with in_partition_of(anchor):
            for key, value in changes.items():
                if value is None:
                    self.table.pop(key.encode(), None)
                else:
                    self.table[key.encode()] = value


@dataclass
class Progress:
    """The highest offset finished per partition, for the sweeps' "caught up" check, and counters."""

    done: dict[tuple[str, int], int] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    events: int = 0
    replayed: int = 0

    def mark(self, events: Sequence[EventT]) -> None:
        for event in events:
            tp = (event.message.topic, event.message.partition)
            if event.message.offset > self.done.get(tp, -1):
                self.done[tp] = event.message.offset
        self.events += len(events)

    def describe(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"{self.events} records ({outcomes}), {self.replayed} read again after a restart"

    def caught_up(self, consumer: Any, topics: set[str]) -> bool:
        """Every assigned partition of `topics` is read up to its high watermark (no backlog)."""
        for tp in consumer.assignment():
            if tp.topic not in topics:
                continue
            high = consumer.highwater(tp)
            if high is None:
                return False
            if high > 0 and self.done.get((tp.topic, tp.partition), -1) + 1 < high:
                return False
        return True


@dataclass
class AgentContext:
    app: faust.App
    settings: Settings
    topics: Topics
    sink: ClickHouseSink
    progress: Progress
    stage_rules: StageRules
    party_rules: Rules
    pseudonym: Pseudonymizer

    async def publish(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        """Send and wait for every ack; retried, and the process ends rather than let the batch be acked."""
        if not records:
            return
        backoff = 0.2
        while True:
            try:
                producer = self.app.producer
                futures = [await producer.send(topic, key, value, None, None, None) for key, value in records]
                await asyncio.gather(*futures)
                return
            except asyncio.CancelledError:
                log.critical("worker stopped while publishing to %s; exiting before commit", topic)
                os._exit(EXIT_PIPELINE_ERROR)
            except Exception as exc:
                log.warning("publishing %d records to %s failed (%s); retrying in %.1fs", len(records), topic, exc,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


Process = Callable[[TypedView[Any], str, list[Record], StageRules, StageOutput], None]


class ModuleAgent(Generic[S]):
    """Stage 1: one module topic, rules per object."""

    def __init__(self, context: AgentContext, table: StateTable, codec: Codec[S], process: Process) -> None:
        self.context = context
        self.table = table
        self.codec = codec
        self.process = process

    async def handle(self, events: Sequence[EventT]) -> None:
        ctx = self.context
        anchors = {(e.message.partition, e.message.offset): e for e in events}
        records, dead = decode_all(RawMessage(e.message.topic, e.message.partition, e.message.offset,
                                              e.message.key, e.message.value) for e in events)
        out = StageOutput(ctx.pseudonym)
        out.dead_letters(dead)
        overlays: list[tuple[EventT, Overlay]] = []
        for key, group in group_by_object(records).items():
            anchor = anchors[(group[0].partition, group[0].offset)]
            overlay = Overlay(self.table.reader(anchor))
            self.process(TypedView(overlay, self.codec), key, group, ctx.stage_rules, out)
            overlays.append((anchor, overlay))
        await ctx.sink.write(out.batch)
        await ctx.publish(ctx.settings.pipeline.topic_party_facts,
                          [(party.encode(), encode_facts(facts)) for party, facts in out.facts.items()])
        for anchor, overlay in overlays:
            self.table.write(anchor, overlay.changes)
        ctx.progress.outcomes.update(out.outcomes)
        ctx.progress.replayed += out.replayed
        ctx.progress.mark(events)


class PartyAgent:
    """Stage 2: the party-facts topic, reconciliation and credit links per CPO party."""

    def __init__(self, context: AgentContext, table: StateTable) -> None:
        self.context = context
        self.table = table

    async def handle(self, events: Sequence[EventT]) -> None:
        ctx = self.context
        groups: dict[str, tuple[EventT, list[Fact]]] = {}
        dead: list[DeadLetter] = []
        for event in events:
            message = event.message
            try:
                facts = decode_facts(bytes(message.value or b""))
                party = bytes(message.key or b"").decode()
            except (msgspec.DecodeError, UnicodeDecodeError) as exc:
                dead.append(DeadLetter(message.topic, message.partition, message.offset, message.key or b"",
                                       message.value or b"", f"undecodable fact batch: {exc}"))
                continue
            groups.setdefault(party, (event, []))[1].extend(facts)
        out = PartyOutput()
        overlays: list[tuple[EventT, Overlay]] = []
        for party, (anchor, facts) in groups.items():
            overlay = Overlay(self.table.reader(anchor))
            process_party(PartyState(party, overlay), facts, ctx.party_rules, out)
            overlays.append((anchor, overlay))
        batch = party_batch(out, dead)
        await ctx.sink.write(batch)
        await ctx.publish(ctx.settings.pipeline.topic_reconciliation, reconciliation_records(out.reconciliation))
        for anchor, overlay in overlays:
            self.table.write(anchor, overlay.changes)
        ctx.progress.mark(events)


def party_batch(out: PartyOutput, dead: list[DeadLetter]) -> Batch:
    batch = Batch()
    for row in out.reconciliation:
        batch.put("reconciliation", RECONCILIATION_COLUMNS, reconciliation_key(row), row)
    batch.extend("credit_links", CREDIT_LINK_COLUMNS, out.credit_links)
    for anomaly in out.anomalies:
        batch.add("anomalies", projection.ANOMALY_COLUMNS, projection.anomaly_row(anomaly))
    now = utc_now()
    for letter in dead:
        batch.add("dead_letters", projection.DEAD_LETTER_COLUMNS, projection.dead_letter_row(letter, now))
    return batch


def reconciliation_key(row: list[Any]) -> tuple[Any, ...]:
    """country_code, party_id, subject, subject_id, version: one row per subject state in a batch."""
    return row[0], row[1], row[2], row[3], row[-1]


def reconciliation_records(rows: list[list[Any]]) -> list[tuple[bytes, bytes]]:
    """The reconciliation topic's records: key `CC/PID/SUBJECT/ID`, value the row as a JSON object."""
    return [(f"{row[0]}/{row[1]}/{row[2]}/{row[3]}".encode(),
             _JSON.encode(dict(zip(RECONCILIATION_COLUMNS, row, strict=True)))) for row in rows]


def register_agents(context: AgentContext, tables: dict[str, StateTable]) -> None:
    topics = context.topics
    modules: list[tuple[str, Any, Callable[..., Awaitable[None]]]] = [
        ("locations", topics.locations,
         ModuleAgent(context, tables["location-state"], Codec(LocationState), process_locations).handle),
        ("sessions", topics.sessions,
         ModuleAgent(context, tables["session-state"], Codec(SessionState), process_sessions).handle),
        ("cdrs", topics.cdrs, ModuleAgent(context, tables["cdr-state"], Codec(CdrState), process_cdrs).handle),
        ("party", topics.party_facts, PartyAgent(context, tables["party-state"]).handle),
    ]
    batch_max = context.settings.pipeline.batch_max
    for name, topic, handler in modules:
        context.app.agent(topic, name=f"{name}-agent")(_agent(handler, name, batch_max, context.progress))


def _agent(handler: Callable[[Sequence[EventT]], Awaitable[None]], name: str, batch_max: int,
           progress: Progress | None = None) -> Callable[[faust.StreamT[bytes]], Awaitable[None]]:
    async def agent(stream: faust.StreamT[bytes]) -> None:
        counted, busy, last_report = 0, 0.0, time.monotonic()
        async for events in stream.take_events(batch_max, within=BATCH_WITHIN_S):  # type: ignore[attr-defined]
            started = time.perf_counter()
            await _run_batch(handler, events, name)
            counted += len(events)
            busy += time.perf_counter() - started
            if time.monotonic() - last_report >= REPORT_EVERY_S:
                log.info("%s: %d records in %.2fs of work since the last report%s", name, counted, busy,
                         f"; all agents so far: {progress.describe()}" if progress is not None else "")
                counted, busy, last_report = 0, 0.0, time.monotonic()

    return agent


async def _run_batch(handler: Callable[[Sequence[EventT]], Awaitable[None]], events: Sequence[EventT],
                     name: str) -> None:
    """Run one batch to its end, even when the worker is being stopped: Faust acks the batch as soon as the
    agent leaves it, so a half-done batch (rows written, state not) must never be left behind."""
    task = asyncio.ensure_future(handler(events))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        try:
            await asyncio.wait_for(_finish(task), STOP_GRACE_S)
        except TimeoutError:
            log.critical("%s: a batch did not finish within %ss of stopping; exiting before it is committed",
                         name, STOP_GRACE_S)
            os._exit(EXIT_PIPELINE_ERROR)
        if task.exception() is None:
            raise
    except Exception:  # noqa: S110 - the task's exception is examined (and logged) just below
        pass
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.critical("%s failed on a batch of %d; exiting before it is committed", name, len(events),
                     exc_info=task.exception())
        os._exit(EXIT_PIPELINE_ERROR)


async def _finish(task: asyncio.Future[None]) -> None:
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            continue
