"""Agent plumbing that needs no broker: the sweeps' caught-up check, the reconciliation topic records."""

from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import msgspec

from pipeline.agents import Progress, reconciliation_records
from pipeline.reconcile import RECONCILIATION_COLUMNS


@dataclass(frozen=True)
class TP:
    topic: str
    partition: int


class FakeConsumer:
    def __init__(self, highwaters: dict[TP, int | None]) -> None:
        self.highwaters = highwaters

    def assignment(self) -> set[TP]:
        return set(self.highwaters)

    def highwater(self, tp: TP) -> int | None:
        return self.highwaters[tp]


def events(topic: str, partition: int, *offsets: int) -> list[Any]:
    return [SimpleNamespace(topic=topic, partition=partition, offset=o) for o in offsets]


def test_caught_up_means_every_assigned_partition_of_our_topics_is_read_to_its_end() -> None:
    progress = Progress()
    consumer = FakeConsumer({TP("s", 0): 3, TP("s", 1): 0, TP("changelog", 0): 99})
    assert not progress.caught_up(consumer, {"s"})
    progress.mark(events("s", 0, 0, 1))
    assert not progress.caught_up(consumer, {"s"})
    progress.mark(events("s", 0, 2))
    assert progress.caught_up(consumer, {"s"})  # partition 1 is empty; the changelog is not ours to read
    assert not progress.caught_up(FakeConsumer({TP("s", 0): None}), {"s"})  # nothing fetched yet: unknown
    assert progress.events == 3


def test_reconciliation_records_are_keyed_by_subject_and_carry_the_row() -> None:
    row = [None] * len(RECONCILIATION_COLUMNS)
    row[:6] = ["NL", "TNM", "CDR", "C1", "p1", "MATCHED"]
    [(key, value)] = reconciliation_records([row])
    assert key == b"NL/TNM/CDR/C1"
    assert msgspec.json.decode(value)["outcome"] == "MATCHED"
    # every column, in column order, as the row's JSON object
    assert list(msgspec.json.decode(value).items()) == list(zip(RECONCILIATION_COLUMNS, row, strict=True))
