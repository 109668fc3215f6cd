"""The agents: thin loops that move one batch at a time through decode → rules → effects → state.

Batches come from `pipeline.delivery` (a fetch at a time, around Faust's per-message path). For every batch,
in this order:
1. decode the whole batch (`pipeline.records.decode_all`), undecodable records become dead letters;
2. run the rules per object (stage 1) or per CPO party (stage 2) over an overlay of the state table;
3. write the rows to ClickHouse (`ClickHouseSink.write` returns only once they are in);
4. publish to Kafka (facts, reconciliation results) and wait for the broker's acks;
5. write the new states to the Faust tables (and their changelogs);
6. leave the batch: the delivery loop acks it, and Faust commits the offsets after flushing its producer.
A crash between any two steps leaves effects that are repeated identically on reprocessing (every table is
keyed by identity, and the state's offset watermark recognises records already folded in).

Nothing in a batch may raise into the delivery loop: it acks a batch once the handler is over, so an exception
would commit records whose effects were never written. An unexpected error therefore ends the process before
any offset moves (like an unwritten batch in `pipeline.sink`); the restarted worker reads the batch again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic

import faust
import msgspec
from faust.types import TP, Message, TableT
from rocksdict import WriteBatch

from infra.codec import AvroCodecError
from infra.kafka.bulk import Acked, OutgoingRecord, send_all
from infra.settings import Settings
from ocpi.decode import UNPARSABLE, unparsable_reason
from ocpi.errors import OcpiError
from ocpi.identity import owner_key_part
from pipeline import projection
from pipeline.cdrs import process_cdrs
from pipeline.delivery import BatchDelivery, Handler, group_generation, highwater, topic_partitions
from pipeline.facts import Fact, decode_facts, fact_records
from pipeline.locations import process_locations
from pipeline.reconcile import (
    CREDIT_LINK_COLUMNS,
    RECONCILIATION_COLUMNS,
    PartyOutput,
    PartyState,
    Rules,
    process_party,
)
from pipeline.records import DeadLetter, Record, decode_all, group_by_object, misfit_partition, sort_out, utc_now
from pipeline.retention import Pseudonymizer
from pipeline.sessions import process_sessions
from pipeline.sink import EXIT_UNWRITTEN_BATCH, Batch, ClickHouseSink
from pipeline.stage import StageOutput, StageRules
from pipeline.state import (
    CdrState,
    Codec,
    LocationState,
    Overlay,
    PartitionAnchor,
    Reader,
    S,
    SessionState,
    TypedView,
    in_partition_of,
)
from pipeline.topics import Topics

log = logging.getLogger(__name__)

BATCH_WITHIN_S = 0.3  # how long a batch waits to fill up to OCPI_PIPELINE_BATCH records
# A whole-batch state write (StateTable) up to this size per partition is one Kafka record batch; a larger one is
# split. Below RECORD_MAX_BYTES so that a produce request carrying several partitions' batches stays well within a
# broker's request limit (socket.request.max.bytes, 100 MB by default).
WHOLE_STATE_BYTES: Final = 4 * 1024 * 1024
STOP_GRACE_S = 30.0  # how long a stopping worker finishes the batch in hand
EXIT_PIPELINE_ERROR = 70  # EX_SOFTWARE: a bug; nothing of the batch was committed
EXIT_TOPIC_REWOUND = 78  # EX_CONFIG: a topic created again under its name (`check_not_rewound`); nothing committed
_JSON = msgspec.json.Encoder(decimal_format="number")


class StateTable:
    """A Faust table of bytes values, read and written in the partition of a given event."""

    def __init__(self, table: TableT[Any, Any], *, whole_batches: bool = False) -> None:
        self.table = table
        # Whether a batch's changelog records go out as one record batch per partition, written whole or not at
        # all (up to WHOLE_STATE_BYTES): stage 2's state of a batch spans many keys (a session, the CDRs it
        # holds, the indexes that find them) that must not be restored in part after a crash. Stage 1's state of
        # an object is one key, so its tables keep the producer's batch size.
        self.batch_bytes = WHOLE_STATE_BYTES if whole_batches else None
        # Held by the table's agent for a whole batch (state read, effects, state written) and by the state
        # retention pass for a chunk: the pass never decides on a value a batch has read and not written back yet,
        # and their changelog records for a key never cross (a stale tombstone after a newer value).
        self.lock = asyncio.Lock()

    @property
    def _direct(self) -> bool:
        """Whether the store is Faust's rocksdb store (faust-streaming 0.15), whose partition databases are used
        directly: Faust's table path (key serializer, current-event partition, key index, a changelog record
        buffered per key) costs many times the database access, and our keys and values are raw bytes."""
        return hasattr(self.table.data, "_db_for_partition")

    def _partition_db(self, partition: int) -> Any:
        store: Any = self.table.data
        return store._db_for_partition(partition)

    def reader(self, anchor: PartitionAnchor) -> Reader:
        if self._direct:
            db = self._partition_db(anchor.message.partition)

            def read_db(key: str) -> bytes | None:
                value = db.get(key.encode())
                return None if value is None else bytes(value)

            return read_db

        def read(key: str) -> bytes | None:
            with in_partition_of(anchor):
                value = self.table.get(key.encode())
            return None if value is None else bytes(value)

        return read

    async def write_batch(self, context: AgentContext, changes: list[tuple[PartitionAnchor, dict[str, bytes | None]]],
                          ) -> None:
        """Write a batch's state changes and their changelog records, as Faust's table would, in bulk.

        Faust writes a table key through its serializers, a changelog record buffered per key, and a producer
        flush that waits for that buffer one record at a time (a fifth of the worker's CPU; README, Benchmarks).
        Here the changelog records are produced together and acknowledged, then the rocksdb partition databases are
        written directly (a write batch each), and each partition's persisted changelog offset is then set, which is
        what Faust's own changelog callback does (table recovery reads the changelog from that offset on).
        """
        store: Any = self.table.data
        if not self._direct:
            for anchor, overlay_changes in changes:
                self.write(anchor, overlay_changes)
            return
        topic = self.table.changelog_topic.get_topic_name()
        records: list[OutgoingRecord] = []
        writes: dict[int, WriteBatch] = {}
        key_index = store._key_index
        for anchor, overlay_changes in changes:
            partition = anchor.message.partition
            write = writes.get(partition)
            if write is None:
                write = writes[partition] = WriteBatch(raw_mode=True)
            for key, value in overlay_changes.items():
                raw_key = key.encode()
                if value is None:
                    write.delete(raw_key)
                    key_index.pop(raw_key, None)
                else:
                    # Faust's key index is a cache of where its own table API found a key (it searches every
                    # partition database otherwise); a key never moves partition, so puts need not feed it.
                    write.put(raw_key, value)
                records.append((raw_key, value, partition))
        # The changelog first: once it holds the batch, a crash before the local write loses nothing (recovery
        # reads the changelog from the persisted offset into the local store). The other order left a window
        # where the local store had the batch and the changelog never would: a replayed batch whose facts stage 2
        # has seen writes nothing, so a later owner of the partition would recover a state without them.
        acked: dict[int, int] = {}
        for ack in await context.produce(topic, records, batch_bytes=self.batch_bytes):
            acked[ack.partition] = max(ack.last_offset, acked.get(ack.partition, -1))
        for partition, write in writes.items():  # one write per partition database, not one per key
            self._partition_db(partition).write(write)
        for partition, offset in acked.items():
            store.set_persisted_offset(TP(topic, partition), offset)

    def write(self, anchor: PartitionAnchor, changes: dict[str, bytes | None]) -> None:
        """Faust's own table path, for a store other than rocksdb (`write_batch`)."""
        with in_partition_of(anchor):
            for key, value in changes.items():
                if value is None:
                    self.table.pop(key.encode(), None)
                else:
                    self.table[key.encode()] = value


@dataclass
class Progress:
    """The highest offset finished per partition (for the "caught up" checks of the sweeps, `pipeline.backlog`,
    and of the state retention pass), and counters."""

    done: dict[tuple[str, int], int] = field(default_factory=dict)
    outcomes: Counter[str] = field(default_factory=Counter)
    events: int = 0
    replayed: int = 0

    def mark(self, messages: Sequence[Message]) -> None:
        for message in messages:
            tp = (message.topic, message.partition)
            if message.offset > self.done.get(tp, -1):
                self.done[tp] = message.offset
        self.events += len(messages)

    def describe(self) -> str:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return f"{self.events} records ({outcomes}), {self.replayed} read again after a restart"


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
        await self.produce(topic, [(key, value, None) for key, value in records])

    async def produce(self, topic: str, records: Sequence[OutgoingRecord], *, batch_bytes: int | None = None,
                      ) -> list[Acked]:
        """Send (key, value, partition or None) records and return the acks of their batches once every record
        is acknowledged; retried, and the process ends rather than let the batch be acked without them.
        `batch_bytes`: see `infra.kafka.bulk.send_all`."""
        if not records:
            return []
        backoff = 0.2
        while True:
            try:
                # Faust's producer wraps an aiokafka producer; its batch API saves the per-record send path.
                return await send_all(self.app.producer._ensure_producer(), topic, records,  # type: ignore[attr-defined]
                                      batch_bytes=batch_bytes)
            except asyncio.CancelledError:
                log.critical("worker stopped while publishing to %s; exiting before commit", topic)
                os._exit(EXIT_PIPELINE_ERROR)
            except Exception as exc:
                log.warning("publishing %d records to %s failed (%s); retrying in %.1fs", len(records), topic, exc,
                            backoff)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 10.0)


Process = Callable[[TypedView[Any], str, list[Record], StageRules, StageOutput], None]


def fold(records: Sequence[Record], reader: Callable[[PartitionAnchor], Reader],
         codec: Codec[S], process: Process, rules: StageRules, out: StageOutput,
         ) -> list[tuple[PartitionAnchor, Overlay]]:
    """Run stage 1's rules over a decoded batch, object by object, on overlays of the state table (no I/O:
    `reader` reads a partition's stored states); returns the overlays, whose changes are the new states."""
    overlays: list[tuple[PartitionAnchor, Overlay]] = []
    for key, group in group_by_object(records).items():
        anchor = anchor_of(group[0].topic, group[0].partition)
        overlay = Overlay(reader(anchor))
        process(TypedView(overlay, codec), key, group, rules, out)
        overlays.append((anchor, overlay))
    return overlays


# What the rules raise on an event they were not written for (a foreign producer, an edited archive): that
# record becomes a dead letter. Anything else (I/O, memory) still stops the worker, and the batch is read again.
# OcpiError: a stored object read back that today's rules refuse (`wire.stored`: one an earlier version stored
# with a DateTime outside 1970..2149, or a foreign producer's PUT, which stage 1 stores as the receivers checked it).
# AvroCodecError: a parked event decoded again (`stage.parked_record`) of a schema revision this worker does not
# know (one rolled back below the revision a newer worker parked it with).
RULE_ERRORS: Final = (LookupError, AssertionError, TypeError, ValueError, AttributeError, ArithmeticError,
                      msgspec.MsgspecError, OcpiError, AvroCodecError)


def fold_isolated(records: Sequence[Record], reader: Callable[[PartitionAnchor], Reader],
                  codec: Codec[S], process: Process, rules: StageRules, out: StageOutput,
                  ) -> tuple[list[tuple[PartitionAnchor, Overlay]], list[DeadLetter]]:
    """`fold`, one record at a time, for a batch on which it raised: a record whose rules raise RULE_ERRORS
    becomes a dead letter with nothing of it kept (rows, facts, state), and the others are applied as `fold`
    would (each on the state the previous one left), so one bad record no longer stops every partition."""
    overlays: list[tuple[PartitionAnchor, Overlay]] = []
    dead: list[DeadLetter] = []
    for key, group in group_by_object(records).items():
        anchor = anchor_of(group[0].topic, group[0].partition)
        overlay = Overlay(reader(anchor))
        for record in group:
            trial, own = Overlay(overlay.get), StageOutput(out.pseudonym)
            try:
                process(TypedView(trial, codec), key, [record], rules, own)
            except RULE_ERRORS as exc:
                log.error("the rules failed on %s at %s/%d@%d: %r; it goes to dead letters", key, record.topic,
                          record.partition, record.offset, exc)
                dead.append(record.dead_letter(f"the rules failed on it: {exc!r}"))
                continue
            for state_key, value in trial.changes.items():
                overlay.set(state_key, value)
            out.merge(own)
        overlays.append((anchor, overlay))
    return overlays, dead


def fence(app: faust.App, messages: Sequence[Message], name: str) -> None:
    """End the process before a batch's state is written (and, in stage 2, before its results are published) when
    the consumer group has moved on since the batch was fetched.

    Faust holds a rebalance until the batch in hand is done, but a member that fetched nothing for
    `broker_max_poll_interval` (its batch retrying a ClickHouse insert through an outage) or outlasted the
    rebalance timeout is put out of the group, and its partitions go to another worker while the batch still
    runs. Written now, the batch's state would land in the changelog after the new owner's, an older state last
    for its keys, and its acks could be committed under a later generation. Rows and facts are idempotent, so
    nothing is lost by leaving: the partitions' owner reads the batch again from the committed offset.
    """
    generation = group_generation(app)
    if generation is None:
        return
    fetched_in = {int(getattr(message, "generation_id", generation)) for message in messages}
    if fetched_in <= {generation}:
        return
    log.critical("%s: the consumer group moved on (generation %s, the batch was fetched in %s) while a batch of %d "
                 "ran; exiting before its state is written, the partitions' owner reads it again",
                 name, generation, sorted(fetched_in), len(messages))
    os._exit(EXIT_UNWRITTEN_BATCH)


def check_not_rewound(app: faust.App, skipped_under: dict[tuple[str, int], int], name: str) -> None:
    """End the process, before anything of the batch is written or acked, when a record was skipped as folded in
    before (`StageOutput.read_before`) in a partition whose log ends at or before the offset its state holds.

    A stage-1 state holds the highest offset folded into it, so that a record read again after a crash is not
    applied twice. Every record of the log it was folded from is below that log's end; a partition ending at or
    before it is another log: the topic deleted and created again under its name (Kafka then forgets the group's
    offsets of it too), or records lost by the broker. Its records are new events, and skipped they would be lost
    without a trace, up to the old offsets. The state belongs to the old log: start over under a new
    OCPI_PIPELINE_APP_ID and restore the state (docs/operations.md, "Partitions and scaling out"). A log that has
    already grown past the state's offset when the worker reads it cannot be told apart this way."""
    for (topic, partition), offset in skipped_under.items():
        end = highwater(app, topic, partition)
        if end is not None and offset >= end:
            log.critical("%s: partition %s/%d ends at offset %d, but the state of an object of it holds offset %d: "
                         "the topic was created again under its name (or lost records), and its events would be "
                         "skipped as read before. Nothing of the batch was written; start over under a new "
                         "OCPI_PIPELINE_APP_ID and restore the state from an export (README, \"Partitions and "
                         "scaling out\")", name, topic, partition, end, offset)
            os._exit(EXIT_TOPIC_REWOUND)


class ModuleAgent(Generic[S]):
    """Stage 1: one module topic, rules per object."""

    def __init__(self, context: AgentContext, table: StateTable, codec: Codec[S], process: Process,
                 module: str) -> None:
        self.context = context
        self.table = table
        self.codec = codec
        self.process = process
        self.module = module  # the OCPI module its topic carries (DecodedEvent.module)

    async def handle(self, messages: Sequence[Message]) -> None:
        async with self.table.lock:
            await self._handle(messages)

    async def _handle(self, messages: Sequence[Message]) -> None:
        ctx = self.context
        records, dead = decode_all(messages)
        partitions = topic_partitions(ctx.app, messages[0].topic) if messages else None  # a batch is of one topic
        records, misfits = sort_out(records, self.module, partitions)
        out = StageOutput(ctx.pseudonym)
        try:
            overlays = fold(records, self.table.reader, self.codec, self.process, ctx.stage_rules, out)
        except RULE_ERRORS:  # the rare batch with a record the rules cannot take: again, one record at a time
            log.exception("the rules failed on a batch of %s; applying it one record at a time", self.module)
            out = StageOutput(ctx.pseudonym)
            overlays, failed = fold_isolated(records, self.table.reader, self.codec, self.process,
                                             ctx.stage_rules, out)
            misfits.extend(failed)
        check_not_rewound(ctx.app, out.skipped_under, self.module)
        out.dead_letters(dead + misfits)
        await ctx.sink.write(out.batch)
        await ctx.publish(ctx.settings.pipeline.topic_party_facts,
                          [(party.encode(), value) for party, facts in out.facts.items()
                           for value in fact_records(facts)])
        fence(ctx.app, messages, self.module)
        await self.table.write_batch(ctx, [(anchor, overlay.changes) for anchor, overlay in overlays])
        ctx.progress.outcomes.update(out.outcomes)
        ctx.progress.replayed += out.replayed


class PartyAgent:
    """Stage 2: the party-facts topic, reconciliation and credit links per CPO party."""

    def __init__(self, context: AgentContext, table: StateTable) -> None:
        self.context = context
        self.table = table

    async def handle(self, messages: Sequence[Message]) -> None:
        async with self.table.lock:
            await self._handle(messages)

    async def _handle(self, messages: Sequence[Message]) -> None:
        ctx = self.context
        groups: dict[str, tuple[PartitionAnchor, list[tuple[Message, list[Fact]]]]] = {}
        dead: list[DeadLetter] = []
        partitions = topic_partitions(ctx.app, messages[0].topic) if messages else None  # a batch is of one topic
        placed: dict[bytes, int] = {}
        for message in messages:
            try:
                facts = decode_facts(bytes(message.value or b""))
                party = bytes(message.key or b"").decode()
            except UNPARSABLE as exc:  # RecursionError too: JSON nested deeper than the parser goes
                dead.append(DeadLetter(message.topic, message.partition, message.offset, message.key or b"",
                                       message.value or b"", f"undecodable fact batch: {unparsable_reason(exc)}"))
                continue
            if "/" not in party:  # stage 1 keys facts `CC/PID` (`facts.party_key`); `PartyState` splits it
                dead.append(DeadLetter(message.topic, message.partition, message.offset, message.key or b"",
                                       message.value or b"", f"fact batch keyed {party!r}, not by a party key"))
                continue
            if reason := misfit_partition(message.key, message.partition, partitions, placed):
                dead.append(DeadLetter(message.topic, message.partition, message.offset, message.key or b"",
                                       message.value or b"", f"fact batch {reason}"))
                continue
            groups.setdefault(party, (anchor_of(message.topic, message.partition), []))[1].append((message, facts))
        out = PartyOutput()
        overlays: list[tuple[PartitionAnchor, Overlay]] = []
        for party, (anchor, batches) in groups.items():
            overlays.append((anchor, fold_party(party, batches, self.table.reader(anchor), ctx.party_rules, out,
                                                dead)))
        batch = party_batch(out, dead)
        await ctx.sink.write(batch)
        # Before the results are published, unlike stage 1's facts (which stage 2 takes in any order): the
        # partitions' new owner may have published newer results of the same subjects meanwhile, and these would
        # then be the last record of their keys, which the topic's readers take for the current outcome.
        fence(ctx.app, messages, "party facts")
        await ctx.publish(ctx.settings.pipeline.topic_reconciliation, reconciliation_records(out.reconciliation))
        fence(ctx.app, messages, "party facts")
        await self.table.write_batch(ctx, [(anchor, overlay.changes) for anchor, overlay in overlays])


def fold_party(party: str, batches: list[tuple[Message, list[Fact]]], read: Reader, rules: Rules, out: PartyOutput,
               dead: list[DeadLetter]) -> Overlay:
    """Stage 2's rules over one party's fact batches of a Kafka batch; returns the overlay of its new state.

    Should the rules raise (RULE_ERRORS) on them, they are applied again one fact batch (Kafka record) at a time,
    as stage 1 does (`fold_isolated`): the record they fail on becomes a dead letter with nothing of it kept, the
    others are applied, and every other party and partition goes on, where the worker stopped on every restart."""
    overlay, own = Overlay(read), PartyOutput()
    try:
        process_party(PartyState(party, overlay), [fact for _message, facts in batches for fact in facts], rules, own)
    except RULE_ERRORS:
        log.exception("the reconciliation rules failed on a batch of party %s; applying it one record at a time",
                      party)
        overlay, own = Overlay(read), PartyOutput()
        for message, facts in batches:
            trial, mine = Overlay(overlay.get), PartyOutput()
            try:
                process_party(PartyState(party, trial), facts, rules, mine)
            except RULE_ERRORS as exc:
                log.error("the reconciliation rules failed on party %s at %s/%d@%d: %r; it goes to dead letters",
                          party, message.topic, message.partition, message.offset, exc)
                dead.append(DeadLetter(message.topic, message.partition, message.offset, message.key or b"",
                                       message.value or b"", f"the reconciliation rules failed on it: {exc!r}"))
                continue
            for key, value in trial.changes.items():
                overlay.set(key, value)
            own.merge(mine)
    out.merge(own)
    return overlay


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


# The row as a JSON object keyed by column, in column order: a Struct encodes it as a dict would, faster.
_ReconciliationRecord = msgspec.defstruct("ReconciliationRecord", list(RECONCILIATION_COLUMNS))


def reconciliation_records(rows: list[list[Any]]) -> list[tuple[bytes, bytes]]:
    """The reconciliation topic's records: key `CC/PID/SUBJECT/ID` (a `/` or `%` in CC or PID escaped as in the
    module topics' keys: `owner_key_part`), value the row as a JSON object."""
    return [(f"{owner_key_part(row[0])}/{owner_key_part(row[1])}/{row[2]}/{row[3]}".encode(),
             _JSON.encode(_ReconciliationRecord(*row))) for row in rows]


def register_agents(context: AgentContext, tables: dict[str, StateTable], delivery: BatchDelivery) -> None:
    topics = context.topics
    modules: list[tuple[str, Any, Handler]] = [
        ("locations", topics.locations,
         ModuleAgent(context, tables["location-state"], Codec(LocationState), process_locations,
                     "LOCATIONS").handle),
        ("sessions", topics.sessions,
         ModuleAgent(context, tables["session-state"], Codec(SessionState), process_sessions, "SESSIONS").handle),
        ("cdrs", topics.cdrs,
         ModuleAgent(context, tables["cdr-state"], Codec(CdrState), process_cdrs, "CDRS").handle),
        ("party", topics.party_facts, PartyAgent(context, tables["party-state"]).handle),
    ]
    for name, topic, handler in modules:
        delivery.agent(topic, name, handler, run_batch, on_done=context.progress.mark)


@functools.cache
def anchor_of(topic: str, partition: int) -> PartitionAnchor:
    return PartitionAnchor(topic, partition)


async def run_batch(handler: Handler, messages: Sequence[Message], name: str) -> None:
    """Run one batch to its end, even when the worker is being stopped: the delivery loop acks the batch as
    soon as this returns, so a half-done batch (rows written, state not) must never be left behind."""
    task = asyncio.ensure_future(handler(messages))
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not await _finish(task, STOP_GRACE_S):
            log.critical("%s: a batch did not finish within %ss of stopping; exiting before it is committed",
                         name, STOP_GRACE_S)
            os._exit(EXIT_PIPELINE_ERROR)
        if not task.cancelled() and task.exception() is None:
            raise
    except Exception:  # noqa: S110 - the task's exception is examined (and logged) just below
        pass
    # A handler cancelled on its own (the stopping loop cancels every task) did not finish its batch either.
    if task.done() and (task.cancelled() or task.exception() is not None):
        log.critical("%s %s on a batch of %d; exiting before it is committed", name,
                     "was cancelled" if task.cancelled() else "failed", len(messages),
                     exc_info=None if task.cancelled() else task.exception())
        os._exit(EXIT_PIPELINE_ERROR)


async def write_to_the_end(write: Awaitable[None], name: str) -> None:
    """Await a state write to its end even when cancelled (a stopping worker), then raise the cancellation.

    The caller holds a table's lock around it: leaving the lock while the write still runs would let a batch of
    that table read the values being replaced and write them back over the change.
    """
    task = asyncio.ensure_future(write)
    try:
        await asyncio.shield(task)
    except asyncio.CancelledError:
        if not await _finish(task, STOP_GRACE_S):
            log.critical("%s: a state write did not finish within %ss of stopping; exiting", name, STOP_GRACE_S)
            os._exit(EXIT_PIPELINE_ERROR)
        raise


async def _finish(task: asyncio.Future[None], within: float) -> bool:
    """Wait up to `within` seconds for `task`, through further cancellations; whether it finished. (Not under
    wait_for: swallowing cancellations, this would swallow the timeout's own, and wait for ever.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not task.done() and (left := deadline - loop.time()) > 0:
        try:
            await asyncio.wait([task], timeout=left)
        except asyncio.CancelledError:
            continue
    return task.done()
