"""Retention in the stage-1 state: personal data pseudonymised (`session-state`, `location-state`), and billing
data deleted (`session-state`, `cdr-state`), in the worker's partitions and, through compaction, in their changelogs.

`session-state` keeps each Session's current OCPI object (token uid, contract id, authorization reference) for
PATCH merges, and the PATCHes parked for it (Avro records; a PATCH may carry a token). `location-state` keeps
each Location's tree, whose `publish_allowed_to` holds token uids and visual numbers, and the events parked for
it (a Location PATCH may carry `publish_allowed_to`). ClickHouse rows are pseudonymised
OCPI_RETENTION_PSEUDONYMISE_DAYS after they were received (`pipeline.retention`); the state follows the same
rule with the same pseudonyms (`retention.pseudonymise_fields`, which also rewrites the rows' payload JSON):

- due: a Session once the event that made it was received (`applied_at`) before the cutoff, like its ClickHouse
  row; a Location once the event its `publish_allowed_to` came with was received (`personal_at`) before the
  cutoff, like its rows (which carry the same `personal_at`; EVSE updates renew neither); a parked event by
  its own receive time. States from before those fields count from the object's `last_updated` instead;
- idempotent: a value is rewritten only while a personal field is in clear (a pseudonym is `psn:` and 32 hex
  digits, which the Pseudonymizer leaves as it is, as ClickHouse rows do), so a second pass changes nothing;
- merges keep working: a pseudonym has 36 characters and fits every OCPI limit (uid, contract_id and
  authorization_reference are CiString(36), visual_number string(64)), so a late PATCH merged onto the
  pseudonymised object validates like any other, and its rows carry the pseudonyms (which the sweep leaves as
  they are when it marks the rows pseudonymised);
- dedup keeps working: duplicate and stale checks compare the `content_hash` and `last_updated` of the last
  applied event as received, which stay as they are, so a retry of an old event is still a DUPLICATE and no
  new version; a parked event keeps its original `content_hash` too.

A PublishTokenType's `group_id` (a group of tokens) and `issuer` (a company) are not in the personal list and
stay as they are, as in the rows. `cdr-state` holds no personal field (a CDR's content hashes, event id, offset
and receive time) and `party-state` only pseudonyms: neither is rewritten (`retention.PERSONAL_STATE_TABLES`).

Billing retention (`retention.BILLING_STATE_TABLES`): the ClickHouse rows of sessions and CDRs are deleted by TTL
OCPI_RETENTION_BILLING_YEARS after they were received; the same pass deletes the state entries that hold only such
data, and writes a tombstone (value None) to the changelog, so compaction removes the entry there too:

- expired: a Session once its last applied event was received (`applied_at`, the `received_at` of its `sessions`
  row) before the cutoff, and every event parked in it too; a state of parked events alone by the newest of
  them, and a state without a Session by the newest event folded into it (`seen_at`: PATCHes ORPHANED at once by
  PARK_OVERFLOW leave only their ids). A CDR once it was received (`received_at`, that of its `cdrs` row) before
  the cutoff. A value the rule cannot date (no `applied_at` although a Session is stored, or neither a Session nor a
  parked event in a state last written before `seen_at` was kept) is kept;
- never early: the cutoff is `retention.billing_cutoff`, at or after the rows' own TTL;
- idempotent: a deleted entry is not listed again, and a kept one is decided the same way;
- after expiry an event for that object finds no state and is handled as the first of its object: a retry of a
  CDR, or of the Session's last event, is stored again (APPLIED, not DUPLICATE, with new rows that count from
  their own receive time), and an older Session PUT is not STALE. The events that made an expired entry were
  written to Kafka before the cutoff, long before the offsets the worker has committed, so no restart reads them
  again; a partner resending years later does, and so does a replay of archived events that old (their rows,
  which keep the old `received_at`, are past the TTL again). Stage 2 keeps a CDR's record while it is linked to
  one received since (`pipeline.party_retention`): a CDR fact it has seen changes nothing there.

`party-state` (stage 2) leaves in the same pass, by component of linked records (`pipeline.party_retention`, a
`Plan`), with its id lists' entries.

`location-state` is current state (kept while the Location is published) and is not expired, but for the states
of events parked for a Location that never came (EVSE updates for an id whose PUT the receiver refused, a typo):
the deadline sweep makes their rows ORPHANED, and a later event of that id would orphan them in the state, but none
comes, so such a state leaves in the same pass, like a `session-state` of parked events alone, by the newest of
them (`location_state_expired`): one entry per such id would otherwise be kept forever. So does a state left with
neither a Location nor parked events (an INVALID PUT that orphaned them, events ORPHANED at once by PARK_OVERFLOW),
by the newest event folded into it (`seen_at`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Final, cast

import faust
import msgspec
from faust.types import TP, TableT

from infra.codec import AvroCodecError, decode_event, encode_event
from infra.pseudonyms import is_pseudonym
from pipeline.backlog import GroupBacklog
from pipeline.delivery import group_generation
from pipeline.facts import SessionFact, fact_token
from pipeline.party_retention import expire_party_state, survey_referrers
from pipeline.records import utc_now
from pipeline.retention import (
    BILLING_STATE_TABLES,
    LOCATION_PERSONAL_FIELD,
    PERSONAL_STATE_TABLES,
    Pseudonymizer,
    billing_cutoff,
    pseudonymise_fields,
    pseudonymised_json,
)
from pipeline.state import CdrState, Codec, LocationState, Parked, PartitionAnchor, Reader, SessionState
from pipeline.sweeps import RETENTION_EVERY

if TYPE_CHECKING:
    from pipeline.agents import AgentContext, StateTable

log = logging.getLogger(__name__)

_SESSIONS: Final = Codec(SessionState)
_LOCATIONS: Final = Codec(LocationState)
_CDRS: Final = Codec(CdrState)
_CHUNK: Final = 500  # values looked at between two yields to the event loop
_ALLOWED: Final = f'"{LOCATION_PERSONAL_FIELD}"'.encode()  # wire JSON leaves absent fields out


class _Stamped(msgspec.Struct):
    last_updated: datetime


_STAMP: Final = msgspec.json.Decoder(_Stamped)
Rewrite = Callable[[bytes, Pseudonymizer, datetime], bytes | None]
Expiry = Callable[[bytes, datetime], bool]  # whether one entry is past the billing retention on its own


Entries = Sequence[tuple[bytes, bytes]]  # (key, value) of a partition's snapshot
Survey = dict[str, list[str]]  # what a plan gathers from a whole partition before it decides


@dataclass(frozen=True)
class Plan:
    """Expiry of a table whose entries refer to each other: `survey` goes over the whole partition first (adding to
    one Survey, a chunk at a time), then `changes` decides a chunk (entries, reader, cutoff, survey) → the changes
    (None: delete) and the number of records deleted."""

    survey: Callable[[Entries, Reader, Survey], None]
    changes: Callable[[Entries, Reader, datetime, Survey], tuple[dict[str, bytes | None], int]]


def pseudonymise_session_state(value: bytes, pseudonym: Pseudonymizer, cutoff: datetime) -> bytes | None:
    """A `session-state` value with the personal fields of what was received before `cutoff` pseudonymised;
    None when nothing is due or all of it is pseudonymised already."""
    state = _SESSIONS.decode(value)
    received = state.applied_at or state.last_updated  # states written before `applied_at` existed
    return _SESSIONS.encode(state) if _pseudonymise(state, received, pseudonym, cutoff) else None


def pseudonymise_location_state(value: bytes, pseudonym: Pseudonymizer, cutoff: datetime) -> bytes | None:
    """A `location-state` value with `publish_allowed_to` (uid, visual number) and parked events received
    before `cutoff` pseudonymised; None when nothing is due or all of it is pseudonymised already."""
    state = _LOCATIONS.decode(value)
    received = None
    # Most Locations have no `publish_allowed_to` (it needs publish=false): their JSON is not decoded at all.
    if state.object_json is not None and _ALLOWED in state.object_json:
        # states written before `personal_at` existed, and not applied to since: the Location's last_updated
        received = state.personal_at or _STAMP.decode(state.object_json).last_updated
    return _LOCATIONS.encode(state) if _pseudonymise(state, received, pseudonym, cutoff) else None


def _pseudonymise(state: SessionState | LocationState, received: datetime | None, pseudonym: Pseudonymizer,
                  cutoff: datetime) -> bool:
    """Pseudonymise, in place, the state's object when `received` (its personal data's receive time) is before
    `cutoff`, and each parked event received before it; returns whether anything changed."""
    changed = False
    if state.object_json is not None and received is not None and received < cutoff:
        document = pseudonymised_json(state.object_json, pseudonym)
        if document is not None:
            state.object_json = document
            changed = True
    parked = [_pseudonymised_parked(p, pseudonym) if p.received_at < cutoff else None for p in state.parked]
    if any(p is not None for p in parked):
        state.parked = [new or old for new, old in zip(parked, state.parked, strict=True)]
        changed = True
    return changed


def _pseudonymised_parked(parked: Parked, pseudonym: Pseudonymizer) -> Parked | None:
    try:
        event = decode_event(parked.value)
    except AvroCodecError:
        # Parked by a newer worker, with a schema revision this one (rolled back) does not know: left as it is for
        # that version, rather than failing the whole pass, every state with it, at every tick.
        return None
    payload = dict(event.payload)
    kept = _parked_fact_token(payload, pseudonym) or parked.fact_token  # taken before the uid is pseudonymised
    if not pseudonymise_fields(payload, pseudonym):
        return None
    value = encode_event({**event.to_event(), "payload": (event.payload_type, payload)})
    return msgspec.structs.replace(parked, value=value, fact_token=kept)


def _parked_fact_token(payload: Mapping[str, Any], pseudonym: Pseudonymizer) -> str | None:
    """The fact token of the `cdr_token` a parked Session PATCH brings with its uid in clear (a PATCH replaces it as
    a whole, `keep_fact_token`); None for any other event (one whose token lacks a part its merge will refuse)."""
    token = payload.get("cdr_token")
    if not isinstance(token, dict) or not all(isinstance(token.get(name), str)
                                              for name in ("country_code", "party_id", "uid")):
        return None
    return None if is_pseudonym(token["uid"]) else fact_token(token, pseudonym)


def session_state_expired(value: bytes, cutoff: datetime) -> bool:
    """Whether a `session-state` value holds only data received before `cutoff` (its Session, by the receive time
    of the last applied event, and every parked event, by its own; without a Session, by the newest event folded
    into it, `seen_at`, which dates a state of PATCHes ORPHANED at once too)."""
    state = _SESSIONS.decode(value)
    received = [parked.received_at for parked in state.parked]
    if state.object_json is not None:
        if state.applied_at is None:
            return False  # cannot be dated (every applied event sets it): kept rather than deleted early
        received.append(state.applied_at)
    elif state.seen_at is not None:
        received.append(state.seen_at)
    return bool(received) and max(received) < cutoff


def location_state_expired(value: bytes, cutoff: datetime) -> bool:
    """Whether a `location-state` value holds no Location, and the newest event folded into it (`seen_at`, and
    each event parked in it) was received before `cutoff` (as for a `session-state` without a Session): events
    parked for a Location that never came, or refused (an INVALID PUT, events ORPHANED at once). A state with a
    Location is current state."""
    state = _LOCATIONS.decode(value)
    if state.object_json is not None:
        return False
    received = [parked.received_at for parked in state.parked]
    if state.seen_at is not None:
        received.append(state.seen_at)
    return bool(received) and max(received) < cutoff


def cdr_state_expired(value: bytes, cutoff: datetime) -> bool:
    """Whether a `cdr-state` value's CDR was received before `cutoff` (duplicates and conflicts since then write no
    row: the `cdrs` row, and its TTL, are the first CDR's)."""
    return _CDRS.decode(value).received_at < cutoff


def keep_fact_token(previous: SessionFact | None, fact: SessionFact, session: Mapping[str, Any],
                    parked_token: str | None = None) -> SessionFact:
    """The fact of a Session merged onto pseudonymised state, with the token its previous fact had, or the one kept
    with the parked PATCH applied (`parked_token`, `Parked.fact_token`).

    A fact's token is the pseudonym of country, party and uid together, which cannot be derived from the
    uid's own pseudonym: computed from the merged Session it would differ from the token stage 2 matches CDRs
    by. A PATCH replaces `cdr_token` as a whole, so a pseudonymised uid means the token is the one the previous
    fact was made from, unless the PATCH brought it: a parked PATCH whose uid the pass pseudonymised before its PUT
    came, whose token the pass kept beside it (the previous fact, its PUT's, has another token).
    """
    if not is_pseudonym(str(session["cdr_token"]["uid"])):
        return fact
    if parked_token is not None:
        return msgspec.structs.replace(fact, token=parked_token)
    if previous is None:
        return fact
    return msgspec.structs.replace(fact, token=previous.token)


# --- the pass over the worker's local state ---------------------------------------------------------------------


def _local_partitions(table: TableT[Any, Any]) -> Iterator[tuple[int, Iterator[tuple[bytes, bytes]]]]:
    """(partition, its stored items) for every partition of `table` this worker serves as active.

    Faust internals (faust-streaming 0.15, `faust.stores.rocksdb.Store`): Faust iterates a table over all its
    partitions at once, so the per-partition databases are taken from `store._dbs` (partition → rocksdict
    database, opened on assignment) and read with `store._visible_items` (skips Faust's offset key). The raw
    serializer of our tables stores values as they are. A RocksDB iterator reads a snapshot.
    """
    store: Any = table.data
    for partition in list(store._dbs):
        if _is_active(table, partition):
            yield partition, _partition_items(table, partition)


def _partition_items(table: TableT[Any, Any], partition: int) -> Iterator[tuple[bytes, bytes]]:
    """A new snapshot iterator over one partition's stored items (`_local_partitions`)."""
    store: Any = table.data
    return store._visible_items(store._dbs[partition])


def _is_active(table: TableT[Any, Any], partition: int) -> bool:
    """Whether this worker serves `partition` of `table` as its active (not standby) owner."""
    return TP(table.changelog_topic.get_topic_name(), partition) in table.app.assignor.assigned_actives()


@dataclass(frozen=True)
class StateTarget:
    """A state table the pass rewrites (personal data) or deletes from (billing data), or both."""

    name: str
    table: StateTable
    topic: str  # the module topic the table is co-partitioned with (Faust's current-event topic)
    pseudonymise: Rewrite | None = None
    expired: Expiry | Plan | None = None


@dataclass
class PassCounts:
    """What one pass did to a table."""

    pseudonymised: int = 0
    expired: int = 0


class StateRetention:
    """Pseudonymises the due values of the personal state tables, and deletes the entries of the billing state
    tables past the billing retention, in this worker's partitions, at most every RETENTION_EVERY, checked at
    every sweep interval (so a worker restarted often still gets to it)."""

    def __init__(self, context: AgentContext, targets: Sequence[StateTarget], backlog: GroupBacklog) -> None:
        self.context = context
        self.targets = tuple(targets)
        self.backlog = backlog  # `pipeline.backlog.state_backlog`: this worker's partitions read to their end
        self.last_run: datetime | None = None

    async def tick(self) -> None:
        now = utc_now()
        if self.last_run is not None and now - self.last_run < RETENTION_EVERY:
            return
        generation = group_generation(self.context.app)  # the group whose assignment `ready` finds caught up
        try:
            if not await self.ready():
                return
            counts = await self.run(now, generation)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("state retention failed; trying again at the next tick")
            return
        self.last_run = now
        done = [f"pseudonymised {c.pseudonymised} values of {name}" for name, c in counts.items() if c.pseudonymised]
        done += [f"deleted {c.expired} expired entries of {name}" for name, c in counts.items() if c.expired]
        if done:
            log.info("retention: %s", ", ".join(done))

    async def ready(self) -> bool:
        """Not while partitions move or are recovered, nor during a backlog: later events of a due object may
        still be waiting in Kafka. This worker's partitions are enough, unlike for the sweeps (`pipeline.backlog`):
        the pass rewrites only the state of partitions it owns, which only their own topic's events change (a module
        topic's, or the party facts' for `party-state`).
        Read from the group's committed offsets too, so a restarted worker need not see a record on each first."""
        app = self.context.app
        if app.rebalancing or app.in_recovery:
            return False
        assigned = [(tp.topic, tp.partition) for tp in app.consumer.assignment()]
        return await self.backlog.caught_up(assigned, self.context.progress.done)

    async def run(self, now: datetime, generation: int | None) -> dict[str, PassCounts]:
        """One pass at `now`, in consumer group `generation` (`delivery.group_generation` when the pass was decided
        on); returns what it did per table. It writes nothing once the group has moved on from that generation
        (`serves`)."""
        from pipeline.agents import write_to_the_end  # the agents import this module (sessions: keep_fact_token)

        retention = self.context.settings.retention
        cutoff = now - timedelta(days=retention.pseudonymise_days)
        expiry = billing_cutoff(now, retention.billing_years)
        counts = {target.name: PassCounts() for target in self.targets}
        for target in self.targets:
            for partition, items in _local_partitions(target.table.table):
                anchor = PartitionAnchor(target.topic, partition)
                survey = await self.survey(target, partition, anchor, generation)
                if survey is None:
                    continue  # revoked (or rebalancing) meanwhile: decided at a later pass, on a whole survey
                while chunk := list(itertools.islice(items, _CHUNK)):
                    async with target.table.lock:  # no batch of this table runs meanwhile (`StateTable.lock`)
                        if not self.serves(target, partition, generation):
                            break  # revoked meanwhile (or the group moved on): its owner's pass takes over
                        changes, done = self.decide(target, anchor, chunk, cutoff, expiry, survey)
                        if changes:
                            # The agents' write path: the changelog records (tombstones for deletes), acknowledged,
                            # then rocksdb and the partition's changelog offset. Finished under the lock even when
                            # the worker stops meanwhile, rather than end the process mid-produce or let a batch of
                            # the table read the values being replaced.
                            await write_to_the_end(target.table.write_batch(self.context, [(anchor, changes)]),
                                                   f"state pass of {target.name}")
                    counts[target.name].pseudonymised += done.pseudonymised
                    counts[target.name].expired += done.expired
                    await asyncio.sleep(0)  # the agents' batches go on between chunks
        return counts

    async def survey(self, target: StateTarget, partition: int, anchor: PartitionAnchor, generation: int | None,
                     ) -> Survey | None:
        """A plan's survey of one partition (empty for tables whose entries expire on their own). Its own snapshot,
        read a chunk at a time without the lock: it gathers references, which `decide` follows on current values.
        None when a rebalance takes the partition away meanwhile (or is under way): the survey stops there, since
        its iterator holds the partition's database, which Faust drops on revocation without closing it and opens
        again when the partition comes back, stopping the worker if it is still held after 30 s; and a survey cut
        short must not be decided on."""
        survey: Survey = {}
        if isinstance(target.expired, Plan):
            items = _partition_items(target.table.table, partition)
            read = target.table.reader(anchor)
            while chunk := list(itertools.islice(items, _CHUNK)):
                target.expired.survey(chunk, read, survey)
                await asyncio.sleep(0)
                if not self.serves(target, partition, generation):
                    return None
        return survey

    def serves(self, target: StateTarget, partition: int, generation: int | None) -> bool:
        """Whether this worker still serves `partition` as its active owner, in the group generation the pass began
        in. The generation is the agents' fence (`agents.fence`): a member put out of the group (no fetch within
        `broker_max_poll_interval`, a heartbeat refused) has -1 there at once, while it still lists its partitions
        as active and Faust's `rebalancing` is not set until it rejoins; another worker owns them meanwhile, and a
        tombstone or rewritten value from this one's copy would land in the changelog after that owner's values."""
        table = target.table.table
        return (not table.app.rebalancing and _is_active(table, partition) and generation != -1
                and group_generation(cast(Any, table.app)) == generation)

    def decide(self, target: StateTarget, anchor: PartitionAnchor, chunk: list[tuple[bytes, bytes]],
               cutoff: datetime, expiry: datetime, survey: Survey | None = None,
               ) -> tuple[dict[str, bytes | None], PassCounts]:
        """The changes a chunk needs: None (delete) for each entry received before `expiry`, a new value for each
        due for pseudonymisation (received before `cutoff`). The snapshot only picks candidates; each is read
        again under the table's lock, so a batch's newer state is never overwritten or deleted.
        """
        pseudonym = self.context.pseudonym
        read = target.table.reader(anchor)
        counts = PassCounts()
        if isinstance(target.expired, Plan):  # no table is both linked and personal (`retention`)
            planned, counts.expired = target.expired.changes(chunk, read, expiry, survey or {})
            return planned, counts
        changes: dict[str, bytes | None] = {}
        for raw_key, snapshot in chunk:
            # Expiry first: an entry to be deleted need not be pseudonymised before.
            if target.expired is not None and target.expired(snapshot, expiry):
                key = raw_key.decode()
                current = read(key)
                if current is not None and target.expired(current, expiry):
                    changes[key] = None  # deleted, and a tombstone on the changelog
                    counts.expired += 1
                    continue
                if current is None:
                    continue
                snapshot = current  # renewed meanwhile: still looked at for pseudonymisation
            if target.pseudonymise is None or target.pseudonymise(snapshot, pseudonym, cutoff) is None:
                continue
            key = raw_key.decode()
            current = read(key)
            new = None if current is None else target.pseudonymise(current, pseudonym, cutoff)
            if new is not None:
                changes[key] = new
                counts.pseudonymised += 1
        return changes, counts


_REGISTERED: weakref.WeakKeyDictionary[faust.App, StateRetention] = weakref.WeakKeyDictionary()


def register_state_retention(context: AgentContext, tables: Mapping[str, StateTable],
                             backlog: GroupBacklog) -> StateRetention:
    """Run the pass over every table of `retention.PERSONAL_STATE_TABLES` and `retention.BILLING_STATE_TABLES`
    from an app timer at the sweep interval; registering twice for one app adds nothing."""
    if context.app in _REGISTERED:
        return _REGISTERED[context.app]
    kafka = context.settings.kafka
    topics = {"session-state": kafka.topic_sessions, "location-state": kafka.topic_locations,
              "cdr-state": kafka.topic_cdrs, "party-state": context.settings.pipeline.topic_party_facts}
    # A table of either list without its function here fails at start, not silently.
    rewrites = {"session-state": pseudonymise_session_state, "location-state": pseudonymise_location_state}
    expiries: dict[str, Expiry | Plan] = {
        "session-state": session_state_expired, "cdr-state": cdr_state_expired,
        # linked records leave together, with their index entries (`pipeline.party_retention`)
        "party-state": Plan(survey_referrers, functools.partial(expire_party_state, rules=context.party_rules)),
    }
    # Not billing data: only a state without a Location (parked events whose Location never came, or events refused
    # or ORPHANED at once, dated by `seen_at`) leaves (module docstring).
    strays: dict[str, Expiry] = {"location-state": location_state_expired}
    names = dict.fromkeys((*PERSONAL_STATE_TABLES, *BILLING_STATE_TABLES))
    targets = [StateTarget(name, tables[name], topics[name],
                           pseudonymise=rewrites[name] if name in PERSONAL_STATE_TABLES else None,
                           expired=expiries[name] if name in BILLING_STATE_TABLES else strays.get(name))
               for name in names]
    keeper = StateRetention(context, targets, backlog)
    context.app.timer(context.settings.pipeline.sweep_interval_s, name="state-retention")(keeper.tick)
    _REGISTERED[context.app] = keeper
    return keeper
