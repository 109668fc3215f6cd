"""Agent plumbing that needs no broker: progress per partition, the reconciliation and party-facts topic records."""

from __future__ import annotations

import asyncio
from collections import Counter
from types import SimpleNamespace
from typing import Any

import msgspec

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
        messages.append(RawMessage("cdrs", 0, i, body["id"].encode(), event_bytes("CDR", body)))
    await agent.handle(messages)

    [(topic, records)] = published
    assert sum(len(value) for _key, value in records) > KAFKA_DEFAULT_MAX_MESSAGE_BYTES  # one would not do
    assert topic == "facts" and len(records) > 1
    assert {key for key, _value in records} == {b"NL/TNM"}
    assert all(len(key) + len(value) < KAFKA_DEFAULT_MAX_MESSAGE_BYTES // 2 for key, value in records)
    facts = [fact for _key, value in records for fact in decode_facts(value)]
    assert [fact.cdr_id for fact in facts] == [m.key.decode().upper() for m in messages]  # type: ignore[attr-defined]
