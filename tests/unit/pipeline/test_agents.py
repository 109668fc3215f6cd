"""Agent plumbing that needs no broker: progress per partition, the reconciliation topic records."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import msgspec

from pipeline.agents import Progress, reconciliation_records
from pipeline.reconcile import RECONCILIATION_COLUMNS


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
