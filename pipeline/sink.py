"""The ClickHouse sink: one insert per table per batch, retried until it succeeds.

Offsets advance only after a successful insert: the agents ack a batch's Kafka events only when `write`
returned. The delivery loop (`pipeline.delivery`) acks a batch once its handler is over, so `write` never
raises for a failed insert: it retries with backoff, and if the worker is
stopped while a batch is still unwritten it exits the process at once, before any offset can be committed
(at-least-once: the batch is read again on restart, and every table is idempotent).

Rows are sent as JSONCompactEachRow encoded by msgspec (exact decimals as JSON numbers, datetimes as ISO 8601
with `Z`, JSON documents as the objects they are): building ClickHouse's Native format in Python costs about
ten times more per row, and the parsing then happens in ClickHouse (another core), not in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from clickhouse_connect.driver.client import Client

log = logging.getLogger(__name__)

EXIT_UNWRITTEN_BATCH = 75  # EX_TEMPFAIL: restart me, nothing was committed
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")
_FORMAT: Final = "JSONCompactEachRow"
# Rows carry JSON documents as JSON objects (`projection.json_column`): a String column takes an object's text
# with this setting, ClickHouse's default, which a server profile could have turned off.
INSERT_SETTINGS: Final = {"input_format_json_read_objects_as_strings": 1}


@dataclass
class Batch:
    """Rows per table, in insertion order; keyed rows replace an earlier row with the same key."""

    columns: dict[str, Sequence[str]] = field(default_factory=dict)
    rows: dict[str, list[list[Any]]] = field(default_factory=dict)
    keyed: dict[str, dict[Any, list[Any]]] = field(default_factory=dict)

    def add(self, table: str, columns: Sequence[str], row: list[Any]) -> None:
        self.columns.setdefault(table, columns)
        self.rows.setdefault(table, []).append(row)

    def put(self, table: str, columns: Sequence[str], key: Any, row: list[Any]) -> None:
        """Add `row`, replacing a row added with the same key in this batch (the last decision wins)."""
        self.columns.setdefault(table, columns)
        self.keyed.setdefault(table, {})[key] = row

    def extend(self, table: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
        if rows:
            self.columns.setdefault(table, columns)
            self.rows.setdefault(table, []).extend(rows)

    def tables(self) -> dict[str, list[list[Any]]]:
        merged = {table: list(rows) for table, rows in self.rows.items()}
        for table, rows in self.keyed.items():
            merged.setdefault(table, []).extend(rows.values())
        return merged

    def __len__(self) -> int:
        return sum(len(r) for r in self.rows.values()) + sum(len(r) for r in self.keyed.values())


def datetime64(moment: datetime) -> str:
    """A DateTime64(6, 'UTC') SQL literal. Queries are formatted client-side: the embedded store's HTTP shim
    does not bind server-side query parameters."""
    return f"toDateTime64('{moment.astimezone(UTC):%Y-%m-%d %H:%M:%S.%f}', 6, 'UTC')"


def string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def encode_rows(rows: list[list[Any]]) -> bytes:
    """JSONCompactEachRow body: one JSON array per line."""
    return b"\n".join(map(_ENCODER.encode, rows))


def insert_rows(client: Client, table: str, columns: Sequence[str], rows: list[list[Any]]) -> None:
    """One insert of `rows` into `table`: the sink's format and settings."""
    client.raw_insert(table, list(columns), insert_block=encode_rows(rows), fmt=_FORMAT, settings=INSERT_SETTINGS)


class ClickHouseSink:
    def __init__(self, client_factory: Callable[[], Client], *, max_backoff_s: float = 10.0) -> None:
        self._client_factory = client_factory
        self._client: Client | None = None
        self._max_backoff_s = max_backoff_s
        # A batch's tables are inserted side by side: each insert is mostly waiting for ClickHouse.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sink")
        self.inserted_rows = 0

    def _insert_all(self, tables: dict[str, list[list[Any]]], columns: dict[str, Sequence[str]]) -> None:
        if self._client is None:
            self._client = self._client_factory()
        client = self._client

        def insert(table: str) -> None:
            insert_rows(client, table, columns[table], tables[table])

        for future in [self._pool.submit(insert, table) for table, rows in tables.items() if rows]:
            future.result()  # every insert finishes (or raises) before the batch counts as written

    def run_sync(self, work: Callable[[Client], Any]) -> Any:
        """Run `work` with this sink's client (reads for sweeps and reports); for use from a thread."""
        if self._client is None:
            self._client = self._client_factory()
        return work(self._client)

    async def write(self, batch: Batch) -> None:
        """Insert the batch; returns only when it is in ClickHouse."""
        if not len(batch):
            return
        tables = batch.tables()
        backoff = 0.2
        while True:
            attempt = asyncio.ensure_future(asyncio.to_thread(self._insert_all, tables, batch.columns))
            try:
                await asyncio.shield(attempt)
                self.inserted_rows += len(batch)
                return
            except asyncio.CancelledError:
                if await _finished_ok(attempt):
                    raise  # written: acking it is right
                log.critical("worker stopped with an unwritten batch of %d rows; exiting before commit", len(batch))
                os._exit(EXIT_UNWRITTEN_BATCH)
            except Exception as exc:
                log.warning("ClickHouse insert failed (%s); retrying in %.1fs", exc, backoff)
                self._client = None  # reconnect: the shim or server may have restarted
                try:
                    await asyncio.sleep(backoff)
                except asyncio.CancelledError:
                    log.critical("worker stopped with an unwritten batch; exiting before commit")
                    os._exit(EXIT_UNWRITTEN_BATCH)
                backoff = min(backoff * 2, self._max_backoff_s)


async def _finished_ok(attempt: asyncio.Future[None]) -> bool:
    """Wait for an insert that was cancelled from outside (its thread runs on) and say if it succeeded."""
    while not attempt.done():
        try:
            await asyncio.wait([attempt])
        except asyncio.CancelledError:
            continue
    return attempt.exception() is None
