"""StateTable.write_batch: the changelog holds a batch before the local store does, so no crash leaves the local
state ahead of the changelog (a later owner of the partition recovers from the changelog alone)."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rocksdict import Options, Rdict

from infra.kafka.bulk import Acked
from pipeline.agents import WHOLE_STATE_BYTES, PartyAgent, StateTable, write_to_the_end
from pipeline.facts import encode_facts
from pipeline.records import RawMessage
from pipeline.sink import EXIT_UNWRITTEN_BATCH

from .builders import cdr
from .test_reconcile import RULES, c_fact, completed, s_fact

CHANGELOG = "app-party-state-changelog"


class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, nothing is acked or committed."""


class FakeStore:
    """The parts of Faust's rocksdb store that StateTable uses."""

    def __init__(self, path: Path) -> None:
        self.db = Rdict(str(path), Options(raw_mode=True))
        self._key_index: dict[bytes, int] = {}

    def _db_for_partition(self, partition: int) -> Any:
        return self.db

    def set_persisted_offset(self, tp: Any, offset: int) -> None:
        self.db.put(b"__offset__", str(offset).encode())

    def keys(self) -> list[bytes]:
        keys: list[bytes] = [key for key in self.db.keys() if isinstance(key, bytes)]  # noqa: SIM118 - Rdict
        return sorted(key for key in keys if not key.startswith(b"__"))


class Context:
    def __init__(self) -> None:
        self.changelog: list[tuple[bytes, bytes | None]] = []
        self.batch_bytes: list[int | None] = []  # what each changelog produce asked for
        self.kill_on_changelog = False
        self.settings = SimpleNamespace(pipeline=SimpleNamespace(topic_reconciliation="reconciliation"))
        self.coordinator = SimpleNamespace(generation=7)  # aiokafka's group coordinator, as Faust's consumer holds it
        self.app = SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(
            _consumer=SimpleNamespace(_coordinator=self.coordinator))))
        self.party_rules = RULES

        async def write(batch: Any) -> None:
            pass

        self.sink = SimpleNamespace(write=write)

    async def publish(self, topic: str, records: list[tuple[bytes, bytes]]) -> None:
        await self.produce(topic, [(key, value, None) for key, value in records])

    async def produce(self, topic: str, records: list[Any], *, batch_bytes: int | None = None) -> list[Acked]:
        if topic != CHANGELOG or not records:
            return []
        self.batch_bytes.append(batch_bytes)
        if self.kill_on_changelog:
            raise Killed
        first = len(self.changelog)
        self.changelog.extend((key, value) for key, value, _partition in records)
        return [Acked(0, first, len(self.changelog) - 1)]


def state_table(path: Path, *, whole_batches: bool = True) -> StateTable:
    table = SimpleNamespace(data=FakeStore(path), changelog_topic=SimpleNamespace(get_topic_name=lambda: CHANGELOG))
    return StateTable(table, whole_batches=whole_batches)  # type: ignore[arg-type]


def written_to(context: Context) -> list[Any]:
    """The batches the agent hands `context`'s sink from now on (which writes nothing)."""
    written: list[Any] = []

    async def write(batch: Any) -> None:
        written.append(batch)

    context.sink = SimpleNamespace(write=write)
    return written


def message(offset: int, facts: list[Any]) -> Any:  # a RawMessage, as the agents read it
    return RawMessage(topic="facts", partition=0, offset=offset, key=b"NL/TNM", value=encode_facts(facts))


async def test_a_kill_before_the_changelog_ack_leaves_the_local_state_as_it_was(tmp_path: Path) -> None:
    context = Context()
    table = state_table(tmp_path / "owner")
    agent = PartyAgent(context, table)  # type: ignore[arg-type]
    await agent.handle([message(0, [s_fact(completed(), received=61, final=61)])])
    before = table.table.data.keys()
    second = [message(1, [c_fact(cdr("C1"), received=62),
                          c_fact(cdr("K1", session_id=None, cost="-2.50", credit=True, credit_reference="C1"),
                                 received=63)])]
    context.kill_on_changelog = True
    with pytest.raises(Killed):
        await agent.handle(second)
    assert table.table.data.keys() == before  # the changelog did not take the batch: nor did the local store

    context.kill_on_changelog = False
    await agent.handle(second)  # the restarted worker reads the batch again
    recovered: dict[bytes, bytes | None] = {}
    for key, value in context.changelog:  # what a new owner of the partition would recover
        recovered[key] = value
    assert sorted(k for k, v in recovered.items() if v is not None) == table.table.data.keys()
    assert {b"C/NL/TNM/C1", b"L/NL/TNM/K1"} <= set(recovered)


@pytest.mark.parametrize("whole_batches", [True, False])
async def test_a_whole_batch_table_sends_its_changelog_records_as_one_record_batch(tmp_path: Path,
                                                                                    whole_batches: bool) -> None:
    # Stage 2's state of a batch spans keys (a session, its CDRs, the indexes that find them): a crash that let
    # the broker keep only some of them made a CDR count under two sessions after the batch was read again.
    # One record batch per partition is appended, replicated and recovered whole or not at all.
    context = Context()
    agent = PartyAgent(context, state_table(tmp_path / "db", whole_batches=whole_batches))  # type: ignore[arg-type]
    await agent.handle([message(0, [s_fact(completed(), received=61, final=61), c_fact(cdr("C1"), received=62)])])
    assert context.batch_bytes == [WHOLE_STATE_BYTES if whole_batches else None]



@dataclass(frozen=True)
class FetchedMessage:  # a Faust Message: the group generation it was fetched in
    topic: str
    partition: int
    offset: int
    key: bytes
    value: bytes
    generation_id: int


async def handle_one_batch_leaving_the_group(context: Context, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             left_group: bool) -> list[int]:
    """Stage 2 handles one batch whose insert succeeds once an outage is over, after the group moved on when
    `left_group`; returns the exit codes the agent asked for (`os._exit`)."""
    async def write(batch: Any) -> None:
        if left_group:
            context.coordinator.generation = -1

    context.sink = SimpleNamespace(write=write)
    exits: list[int] = []

    def exit_now(code: int) -> None:
        exits.append(code)
        raise Killed

    monkeypatch.setattr(os, "_exit", exit_now)
    agent = PartyAgent(context, state_table(tmp_path / "db"))  # type: ignore[arg-type]
    fetched = FetchedMessage("facts", 0, 0, b"NL/TNM", encode_facts([s_fact(completed(), received=61, final=61)]), 7)
    if left_group:
        with pytest.raises(Killed):
            await agent.handle([fetched])
    else:
        await agent.handle([fetched])
    return exits


@pytest.mark.parametrize("left_group", [False, True])
async def test_a_batch_whose_group_moved_on_publishes_no_reconciliation_record(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left_group: bool) -> None:
    """A member put out of the group while its insert retried through an outage: its partitions' new owner read
    the batch again, and may have published newer results of the same subjects since (the outage over, the old
    member waits out its backoff). The old member's results, published after them, would be the last record of
    their keys on the reconciliation topic, which its readers take for the current outcome. So it leaves before
    publishing them (the rows it wrote are versioned: the owner's newer rows still win)."""
    context = Context()
    published: list[str] = []
    produce = context.produce

    async def recording(topic: str, records: list[Any], *, batch_bytes: int | None = None) -> list[Acked]:
        if records:
            published.append(topic)
        return await produce(topic, records, batch_bytes=batch_bytes)

    context.produce = recording  # type: ignore[method-assign]
    exits = await handle_one_batch_leaving_the_group(context, tmp_path, monkeypatch, left_group)
    assert exits == ([EXIT_UNWRITTEN_BATCH] if left_group else [])
    assert published == ([] if left_group else ["reconciliation", CHANGELOG])


@pytest.mark.parametrize("left_group", [False, True])
async def test_a_batch_whose_group_moved_on_exits_before_its_state_is_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, left_group: bool) -> None:
    # A member put out of the group (no fetch for broker_max_poll_interval while its batch retried a ClickHouse
    # insert) still held its batch: its state, written after the partitions' new owner wrote theirs, would be the
    # older state last in the changelog.
    context = Context()
    exits = await handle_one_batch_leaving_the_group(context, tmp_path, monkeypatch, left_group)
    assert exits == ([EXIT_UNWRITTEN_BATCH] if left_group else [])
    assert bool(context.changelog) is not left_group


async def test_a_state_write_cancelled_under_a_lock_ends_before_the_lock_is_released() -> None:
    # The state pass writes under the table's lock; a stopping worker cancels it. Released at once, the lock
    # would let a batch of the table read the values the unfinished write replaces and write them back over it.
    lock = asyncio.Lock()
    written = asyncio.Event()
    order: list[str] = []

    async def slow_write() -> None:
        await asyncio.sleep(0.2)
        order.append("written")
        written.set()

    async def state_pass() -> None:
        async with lock:
            await write_to_the_end(slow_write(), "test")

    async def batch() -> None:
        async with lock:
            order.append("batch")

    running = asyncio.ensure_future(state_pass())
    await asyncio.sleep(0.05)
    running.cancel()
    waiting = asyncio.ensure_future(batch())
    with pytest.raises(asyncio.CancelledError):
        await running
    await waiting
    assert order == ["written", "batch"]


@pytest.mark.parametrize("runner", ["write_to_the_end", "run_batch"])
async def test_a_write_that_never_ends_after_a_stop_ends_the_process_after_the_grace(
        runner: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # The grace is the only bound on a stopping worker (a write stuck on a broker that went away): past it the
    # process exits. `_finish` swallowed the timeout's own cancellation, so wait_for waited for the write for ever.
    from pipeline import agents

    stuck = asyncio.Event()
    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        stuck.set()  # the process would be gone: let the test's task end

    async def never_ending(*_args: Any) -> None:
        await stuck.wait()

    monkeypatch.setattr(agents, "STOP_GRACE_S", 0.2)
    monkeypatch.setattr(agents.os, "_exit", exit_)
    if runner == "write_to_the_end":
        running = asyncio.ensure_future(agents.write_to_the_end(never_ending(), "test"))
    else:
        running = asyncio.ensure_future(agents.run_batch(never_ending, [], "test"))
    await asyncio.sleep(0.05)
    running.cancel()
    await asyncio.wait([running], timeout=3)
    assert exits == [agents.EXIT_PIPELINE_ERROR]


@pytest.mark.parametrize("key", [None, b"", b"NLTNM"])
async def test_a_party_facts_record_without_a_party_key_is_a_dead_letter(tmp_path: Path, key: bytes | None) -> None:
    # Facts are keyed `CC/PID`; a record keyed otherwise (none at all: a tool or a foreign producer on the topic)
    # made stage 2 raise on every restart, and the worker exited before the batch was committed, for ever.
    context = Context()
    written = written_to(context)
    agent = PartyAgent(context, state_table(tmp_path / "db"))  # type: ignore[arg-type]
    facts = encode_facts([s_fact(completed(), received=61, final=61)])
    await agent.handle([RawMessage("facts", 0, 0, key, facts), message(1, [c_fact(cdr("C1"), received=62)])])
    rows = [row for batch in written for row in batch.rows.get("dead_letters", [])]
    assert [(row[2], "party key" in row[5]) for row in rows] == [(0, True)]
    assert b"C/NL/TNM/C1" in {k for k, _v in context.changelog}  # the other record of the batch was applied


async def test_a_party_facts_record_nested_deeper_than_the_parser_goes_is_a_dead_letter(tmp_path: Path) -> None:
    # msgspec raises RecursionError, not a DecodeError, for JSON nested that deep: it escaped the batch, and the
    # worker exited before the commit on every restart, every partition with it, for one record of a foreign
    # producer on the topic.
    context = Context()
    written = written_to(context)
    agent = PartyAgent(context, state_table(tmp_path / "db"))  # type: ignore[arg-type]
    await agent.handle([RawMessage("facts", 0, 0, b"NL/TNM", b'{"x":' * 100_000),
                        message(1, [c_fact(cdr("C1"), received=62)])])
    rows = [row for batch in written for row in batch.rows.get("dead_letters", [])]
    assert [(row[2], row[3], "undecodable" in row[5]) for row in rows] == [(0, b"NL/TNM".hex(), True)]
    assert b"C/NL/TNM/C1" in {k for k, _v in context.changelog}  # the other record of the batch was applied


async def test_a_party_facts_record_in_another_partition_than_its_keys_is_a_dead_letter(tmp_path: Path) -> None:
    # Facts are placed by their party key's murmur2 (stage 1's producer); a tool on librdkafka's default partitioner
    # puts them elsewhere, where stage 2 kept a second state of the party: its CDRs reconciled without its sessions.
    context = Context()
    context.app.consumer.topic_partitions = lambda topic: 4 if topic == "facts" else None  # NL/TNM: partition 0
    written = written_to(context)
    agent = PartyAgent(context, state_table(tmp_path / "db"))  # type: ignore[arg-type]
    misplaced = encode_facts([c_fact(cdr("C2"), received=61)])
    await agent.handle([RawMessage("facts", 3, 5, b"NL/TNM", misplaced), message(1, [c_fact(cdr("C1"), received=62)])])
    rows = [row for batch in written for row in batch.rows.get("dead_letters", [])]
    assert [(row[1], row[2], row[3], "partition 0" in row[5]) for row in rows] == [(3, 5, b"NL/TNM".hex(), True)]
    keys = {k for k, _v in context.changelog}
    assert b"C/NL/TNM/C1" in keys and b"C/NL/TNM/C2" not in keys


async def test_a_party_facts_record_the_reconciliation_rules_fail_on_is_a_dead_letter(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 2 had no fallback of its own: an exception of its rules on one record (a bug hit by one CPO's data)
    stopped the worker, stage 1 and every party with it, on every restart. As stage 1 does, the party's records
    are applied again one at a time and only the one the rules fail on becomes a dead letter."""
    from pipeline import agents

    real = agents.process_party

    def failing_on_c2(state: Any, facts: list[Any], rules: Any, out: Any) -> None:
        if any(getattr(fact, "cdr_id", "") == "C2" for fact in facts):
            raise ValueError("a bug the rules hit on C2")
        real(state, facts, rules, out)

    monkeypatch.setattr(agents, "process_party", failing_on_c2)
    context = Context()
    written = written_to(context)
    agent = PartyAgent(context, state_table(tmp_path / "db"))  # type: ignore[arg-type]
    await agent.handle([message(0, [c_fact(cdr("C1"), received=61)]), message(1, [c_fact(cdr("C2"), received=62)]),
                        message(2, [c_fact(cdr("C3"), received=63)])])
    rows = [row for batch in written for row in batch.rows.get("dead_letters", [])]
    assert [(row[2], "a bug the rules hit on C2" in row[5]) for row in rows] == [(1, True)]
    keys = {k for k, _v in context.changelog}
    assert {b"C/NL/TNM/C1", b"C/NL/TNM/C3"} <= keys and b"C/NL/TNM/C2" not in keys
    reconciled = [row for batch in written for row in batch.tables().get("reconciliation", [])]
    assert sorted({row[3] for row in reconciled}) == ["C1", "C3"]  # nothing of C2 kept


async def test_a_batch_whose_handler_was_cancelled_ends_the_process_before_it_is_acked(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # The delivery loop acks a batch once run_batch is over. A handler cancelled on its own (the stopping loop
    # cancels every task, one retrying a publish to a broker that is down among them) made run_batch raise the
    # cancellation as if the batch had been done, and the batch was acked with its rows or state unwritten.
    from pipeline import agents

    class Exited(Exception):
        pass

    exits: list[int] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise Exited

    async def cancelled(*_args: Any) -> None:
        await asyncio.sleep(0)
        raise asyncio.CancelledError

    monkeypatch.setattr(agents.os, "_exit", exit_)
    with pytest.raises(Exited):
        await agents.run_batch(cancelled, [], "test")
    assert exits == [agents.EXIT_PIPELINE_ERROR]
