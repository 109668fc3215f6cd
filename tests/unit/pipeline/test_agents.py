"""Agent plumbing that needs no broker: progress per partition, the reconciliation and party-facts topic records."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import msgspec
import pytest

from infra.codec import decode_event
from pipeline.agents import ModuleAgent, Progress, reconciliation_records
from pipeline.cdrs import process_cdrs
from pipeline.facts import decode_facts
from pipeline.reconcile import RECONCILIATION_COLUMNS
from pipeline.records import RawMessage
from pipeline.retention import Pseudonymizer
from pipeline.state import CdrState, Codec

from .builders import DictStore, cdr, event_bytes, stage_rules


def events(topic: str, partition: int, *offsets: int) -> list[Any]:
    return [SimpleNamespace(topic=topic, partition=partition, offset=o) for o in offsets]


def test_progress_marks_the_last_offset_finished_per_partition() -> None:
    progress = Progress()
    progress.mark(events("s", 0, 0, 1))
    progress.mark(events("s", 0, 2) + events("s", 1, 5))
    assert progress.done == {("s", 0): 2, ("s", 1): 5} and progress.events == 4


def test_reconciliation_records_are_keyed_by_subject_and_carry_the_row() -> None:
    row = [None] * len(RECONCILIATION_COLUMNS)
    row[:7] = ["NL", "TNM", "CDR", "C1", "p1", "EUR", "MATCHED"]
    [(key, value)] = reconciliation_records([row])
    assert key == b"NL/TNM/CDR/C1"
    assert msgspec.json.decode(value)["outcome"] == "MATCHED"
    # every column, in column order, as the row's JSON object
    assert list(msgspec.json.decode(value).items()) == list(zip(RECONCILIATION_COLUMNS, row, strict=True))


def test_a_reconciliation_key_tells_apart_parties_whose_codes_hold_a_slash() -> None:
    """CiString allows `/`: owners `N/` + `L` and `N` + `/L` had one key; the parts are escaped as in the module
    topics' keys (`ocpi.identity.owner_key_part`), the id, the last part, as it is."""
    rows = []
    for cc, pid in (("N/", "L"), ("N", "/L"), ("N%", "T")):
        row = [None] * len(RECONCILIATION_COLUMNS)
        row[:7] = [cc, pid, "CDR", "C/1", "p1", "EUR", "MATCHED"]
        rows.append(row)
    assert [key for key, _value in reconciliation_records(rows)] == [b"N%2F/L/CDR/C/1", b"N/%2FL/CDR/C/1",
                                                                     b"N%25/T/CDR/C/1"]


# Kafka's default limit on a record batch (broker `message.max.bytes`): a larger one is refused for good
# (MESSAGE_TOO_LARGE), which the agents' publish retries forever.
KAFKA_DEFAULT_MAX_MESSAGE_BYTES = 1048588


async def test_a_partys_facts_go_out_in_records_kafka_accepts_in_order() -> None:
    """A batch with thousands of one party's CDRs (a catch-up after a restart) makes more facts than one record
    may carry on a Kafka with default limits: they go out in several records of that party, in order."""
    published: list[tuple[str, list[tuple[bytes, bytes]]]] = []

    async def publish(topic: str, records: list[tuple[bytes, bytes]]) -> None:
        published.append((topic, records))

    async def nothing(*_args: Any) -> None:
        pass

    context = SimpleNamespace(app=None, pseudonym=Pseudonymizer(b"k" * 32), sink=SimpleNamespace(write=nothing),
                              publish=publish, stage_rules=stage_rules(),
                              progress=SimpleNamespace(outcomes=Counter(), replayed=0),
                              settings=SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts="facts")))
    table = SimpleNamespace(reader=lambda _anchor: DictStore().data.get, write_batch=nothing, lock=asyncio.Lock())
    agent = ModuleAgent(context, table, Codec(CdrState), process_cdrs, "CDRS")  # type: ignore[arg-type]
    body = cdr("C0")
    messages = []
    for i in range(3000):
        body["id"] = f"CDR-{i:05d}-{'X' * 20}"
        messages.append(RawMessage("cdrs", 0, i, f"NL/TNM/{body['id']}".upper().encode(), event_bytes("CDR", body)))
    await agent.handle(messages)

    [(topic, records)] = published
    assert sum(len(value) for _key, value in records) > KAFKA_DEFAULT_MAX_MESSAGE_BYTES  # one would not do
    assert topic == "facts" and len(records) > 1
    assert {key for key, _value in records} == {b"NL/TNM"}
    assert all(len(key) + len(value) < KAFKA_DEFAULT_MAX_MESSAGE_BYTES // 2 for key, value in records)
    facts = [fact for _key, value in records for fact in decode_facts(value)]
    assert [fact.cdr_id for fact in facts] == [m.key.decode().split("/")[-1] for m in messages]  # type: ignore[attr-defined]


class _Exited(Exception):  # not SystemExit: the event loop would let that one through the test
    pass


def _group_app(generation: int) -> Any:
    """A Faust app whose consumer's group coordinator is at `generation` (aiokafka: -1 once put out)."""
    coordinator = SimpleNamespace(generation=generation)
    return SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(
        _consumer=SimpleNamespace(_coordinator=coordinator))))


def _recording_cdr_agent(monkeypatch: pytest.MonkeyPatch, app: Any, store: DictStore,
                         ) -> tuple[ModuleAgent[CdrState], list[str], list[int]]:
    """A CDR ModuleAgent on `app` and `store` that records the steps of a batch it takes (rows, facts, state) and
    the exit codes it would end the process with (`_Exited` raised instead)."""
    import pipeline.agents as agents

    exits: list[int] = []
    steps: list[str] = []

    def exit_(code: int) -> None:
        exits.append(code)
        raise _Exited

    async def write(_batch: Any) -> None:
        steps.append("rows")

    async def publish(_topic: str, _records: Any) -> None:
        steps.append("facts")

    async def write_batch(*_args: Any) -> None:
        steps.append("state")

    monkeypatch.setattr(agents.os, "_exit", exit_)
    context = SimpleNamespace(app=app, pseudonym=Pseudonymizer(b"k" * 32),
                              sink=SimpleNamespace(write=write), publish=publish, stage_rules=stage_rules(),
                              progress=SimpleNamespace(outcomes=Counter(), replayed=0),
                              settings=SimpleNamespace(pipeline=SimpleNamespace(topic_party_facts="facts")))
    table = SimpleNamespace(reader=lambda _anchor: store.data.get, write_batch=write_batch, lock=asyncio.Lock())
    return ModuleAgent(context, table, Codec(CdrState), process_cdrs, "CDRS"), steps, exits  # type: ignore[arg-type]


@pytest.mark.parametrize("now", [7, -1, 8])
async def test_a_batch_the_group_moved_on_from_writes_no_state_and_is_not_acked(monkeypatch: pytest.MonkeyPatch,
                                                                                 now: int) -> None:
    """A batch fetched in generation 7: if the consumer group is still there when its state is to be written, the
    state is written; put out of the group (-1) or past a rebalance (8), its partitions may be another worker's:
    the process ends (EXIT_UNWRITTEN_BATCH) after the idempotent rows and facts, before the state, so that the
    batch is read again by the partitions' owner and no older state lands after the owner's."""
    import pipeline.agents as agents

    agent, steps, exits = _recording_cdr_agent(monkeypatch, _group_app(now), DictStore())
    message = SimpleNamespace(topic="cdrs", partition=0, offset=0, key=b"C1", value=event_bytes("CDR", cdr("C1")),
                              generation_id=7)  # Faust tags what it fetched with the generation
    if now == 7:
        await agent.handle([message])  # type: ignore[list-item]
        assert steps == ["rows", "facts", "state"] and exits == []
    else:
        with pytest.raises(_Exited):
            await agent.handle([message])  # type: ignore[list-item]
        assert steps == ["rows", "facts"] and exits == [agents.EXIT_UNWRITTEN_BATCH]


@pytest.mark.parametrize("highwater", [60, 3])
async def test_a_record_below_its_states_offset_in_a_partition_that_ends_before_it_stops_the_worker(
        monkeypatch: pytest.MonkeyPatch, highwater: int) -> None:
    """A record at or below the offset its object's state has folded in is one read again after a crash: skipped,
    its rows are in ClickHouse. But a partition that ends (its high watermark) at or before that offset is not the
    log the state was folded from: the topic was deleted and created again under the same name, or lost records.
    Its records are new events, and skipped as read before they were lost without a trace. The worker stops before
    anything of the batch is written or acked (EXIT_TOPIC_REWOUND), naming the partition."""
    from faust.types import TP

    import pipeline.agents as agents

    store = DictStore()
    codec = Codec(CdrState)
    folded = decode_event(event_bytes("CDR", cdr("C1")))
    store.data["NL/TNM/C1"] = codec.encode(CdrState(content_hash=folded.content_hash, event_id=folded.event_id,
                                                    offset=50, received_at=folded.received_at))
    ends = {TP("cdrs", 0): highwater}
    app = SimpleNamespace(consumer=SimpleNamespace(highwater=ends.get, topic_partitions=lambda _topic: None))
    agent, steps, exits = _recording_cdr_agent(monkeypatch, app, store)
    message = RawMessage("cdrs", 0, 1, b"NL/TNM/C2", event_bytes("CDR", cdr("C2")))
    again = RawMessage("cdrs", 0, 2, b"NL/TNM/C1", event_bytes("CDR", cdr("C1", kwh="11")))
    if highwater > 50:  # read again after a crash: skipped, the batch goes on
        await agent.handle([message, again])
        assert steps == ["rows", "facts", "state"] and exits == []
    else:
        with pytest.raises(_Exited):
            await agent.handle([message, again])
        assert steps == [] and exits == [agents.EXIT_TOPIC_REWOUND]
