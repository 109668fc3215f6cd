"""reports.consumer_lag: where the worker reads each partition from, what retention deleted unread, and how long
the oldest unread record has left (the Kafka reads are faked here; tests/integration/test_consumer_lag.py reads
a broker)."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import TopicPartition

from infra.settings import load_settings
from pipeline import reports
from pipeline.jobs import kafka_io

NOW = datetime(2026, 11, 26, 12, tzinfo=UTC)
A0, A1, B0 = TopicPartition("a", 0), TopicPartition("a", 1), TopicPartition("b", 0)


def lag(monkeypatch: pytest.MonkeyPatch, bounds: dict[TopicPartition, tuple[int, int]],
        committed: dict[TopicPartition, int | None], written: dict[TopicPartition, datetime]) -> list[Any]:
    asked: dict[TopicPartition, int] = {}

    async def partitions(bootstrap: str, topics: Any) -> list[TopicPartition]:
        return list(bounds)

    async def offset_bounds(kafka: Any, bootstrap: str, tps: Any) -> dict[TopicPartition, tuple[int, int]]:
        return bounds

    async def committed_offsets(bootstrap: str, group: str, tps: Any) -> dict[TopicPartition, int | None]:
        return committed

    async def first_record_times(bootstrap: str, positions: Mapping[TopicPartition, int],
                                 ) -> dict[TopicPartition, datetime]:
        asked.update(positions)
        return {tp: written[tp] for tp in positions if tp in written}

    monkeypatch.setattr(kafka_io, "topic_partitions", partitions)
    monkeypatch.setattr(kafka_io, "offset_bounds", offset_bounds)
    monkeypatch.setattr(kafka_io, "committed_offsets", committed_offsets)
    monkeypatch.setattr(kafka_io, "first_record_times", first_record_times)
    columns, rows = asyncio.run(reports.consumer_lag(load_settings({}).kafka, "b:9", "g", ["a", "b"],
                                                     retention_days=30, now=NOW))
    assert columns == list(reports.CONSUMER_LAG_COLUMNS)
    return [asked, [dict(zip(columns, row, strict=True)) for row in rows]]


def test_unread_records_count_from_where_the_worker_reads_and_show_the_retention_left(
        monkeypatch: pytest.MonkeyPatch) -> None:
    asked, rows = lag(monkeypatch,
                      bounds={A0: (0, 100), A1: (40, 50), B0: (0, 7)},
                      committed={A0: 90, A1: None, B0: 7},  # A1: never committed, retention deleted 0-39
                      written={A0: NOW - timedelta(days=2), A1: NOW - timedelta(days=29, hours=12)})
    assert asked == {A0: 90, A1: 40}  # B0 is read to its end
    assert rows == [
        {"topic": "a", "partitions": 2, "committed": 90, "end_offset": 150, "lag": 20,
         "oldest_unread": NOW - timedelta(days=29, hours=12), "retention_left_days": 0.5, "lost": 0},
        {"topic": "b", "partitions": 1, "committed": 7, "end_offset": 7, "lag": 0,
         "oldest_unread": None, "retention_left_days": None, "lost": 0}]


def test_records_retention_deleted_below_the_committed_offset_are_lost(monkeypatch: pytest.MonkeyPatch) -> None:
    asked, rows = lag(monkeypatch, bounds={A0: (70, 100)}, committed={A0: 25},
                      written={A0: NOW - timedelta(days=31)})
    assert asked == {A0: 70}
    assert rows == [{"topic": "a", "partitions": 1, "committed": 25, "end_offset": 100, "lag": 30,
                     "oldest_unread": NOW - timedelta(days=31), "retention_left_days": -1.0, "lost": 45}]
