"""The demo's summary, read back from a store that holds rows written more than once (at-least-once)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from clickhouse_connect.driver.client import Client

from pipeline.demo import read_summary
from pipeline.projection import DEAD_LETTER_COLUMNS, dead_letter_row
from pipeline.records import DeadLetter
from pipeline.simulator import Expected

pytestmark = pytest.mark.clickhouse


def test_a_dead_letter_written_twice_counts_once(client: Client) -> None:
    """A batch applied again after a crash writes its dead letter again (same key): the summary read the
    ReplacingMergeTree without FINAL and showed it twice."""
    row = dead_letter_row(DeadLetter("t.cdrs", 0, 7, b"NL/TNM/C1", b"\x00", "bad"), datetime.now(UTC))
    for _ in range(2):
        client.insert("dead_letters", [row], column_names=list(DEAD_LETTER_COLUMNS))
    assert read_summary(client, Expected(), 0.0).dead_letters == 1
