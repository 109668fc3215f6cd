"""The ClickHouse sink: one insert per table per batch, retried until it succeeds.

Offsets advance only after a successful insert: the agents ack a batch's Kafka events only when `write`
returned. The delivery loop (`pipeline.delivery`) acks a batch once its handler is over, so `write` never
raises for a failed insert: it retries with backoff, and if the worker is
stopped while a batch is still unwritten it exits the process at once, before any offset can be committed
(at-least-once: the batch is read again on restart, and every table is idempotent).

A value the validation let through but a column cannot hold (a negative number for an unsigned column, say;
ClickHouse wraps a too-large integer without an error, which the validation's bounds on every integer field
rule out) makes ClickHouse refuse the whole insert, and would make it refuse every retry: the worker would be
stuck on that batch, every partition with it. So an insert refused for its data (`ROW_DATA_ERRORS`) is split
in halves until the rows ClickHouse refuses alone are found; the others are written, and the refused ones go where
`refused_rows` puts them (the worker: an anomaly `ROW_REFUSED` holding the row), however many they are: when
every row of a table is refused (all of a Location's Connectors carry the bad value, or a column changed under
us), stopping every partition would be worse than recording them; the events stay in Kafka and `raw_events` for
a `replay --rebuild` once the cause is fixed (a plain replay writes nothing: the worker's state holds the object
already, and its copy is a duplicate), and each refused row is logged as an error.

Rows are sent as JSONCompactEachRow encoded by msgspec (exact decimals as JSON numbers, datetimes as ISO 8601
with `Z`, JSON documents as the objects they are): building ClickHouse's Native format in Python costs about
ten times more per row, and the parsing then happens in ClickHouse (another core), not in the worker.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

log = logging.getLogger(__name__)

EXIT_UNWRITTEN_BATCH = 75  # EX_TEMPFAIL: restart me, nothing was committed
_ENCODER: Final = msgspec.json.Encoder(decimal_format="number")
_FORMAT: Final = "JSONCompactEachRow"
# Rows carry JSON documents as JSON objects (`projection.json_column`): a String column takes an object's text
# with this setting, ClickHouse's default, which a server profile could have turned off.
# wait_for_async_insert: on a server whose profile turns async_insert on, an insert would otherwise return before
# its rows are stored, and the offsets behind them be committed for rows that may never be written.
INSERT_SETTINGS: Final = {"input_format_json_read_objects_as_strings": 1, "wait_for_async_insert": 1}


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

    def take(self, table: str) -> Batch:
        """Move `table`'s rows out of this batch into a batch of their own (inserted first, on their own)."""
        taken = Batch()
        if table in self.columns:
            taken.columns[table] = self.columns.pop(table)
            if table in self.rows:
                taken.rows[table] = self.rows.pop(table)
            if table in self.keyed:
                taken.keyed[table] = self.keyed.pop(table)
        return taken

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


# ClickHouse error codes that say the values of a row do not fit its columns: the same rows sent again can never
# succeed. CANNOT_PARSE_TEXT, CANNOT_PARSE_ESCAPE_SEQUENCE, CANNOT_PARSE_QUOTED_STRING,
# CANNOT_PARSE_INPUT_ASSERTION_FAILED, ATTEMPT_TO_READ_AFTER_EOF, CANNOT_PARSE_DATE, CANNOT_PARSE_DATETIME,
# TYPE_MISMATCH, ARGUMENT_OUT_OF_BOUND, CANNOT_CONVERT_TYPE, CANNOT_PARSE_NUMBER, INCORRECT_DATA,
# CANNOT_READ_ARRAY_FROM_TEXT, TOO_LARGE_STRING_SIZE, VALUE_IS_OUT_OF_RANGE_OF_DATA_TYPE, DECIMAL_OVERFLOW,
# CANNOT_PARSE_BOOL, UNKNOWN_ELEMENT_OF_ENUM. Every other error (a connection, memory, a missing table) is retried.
ROW_DATA_ERRORS: Final = frozenset({6, 25, 26, 27, 32, 38, 41, 53, 69, 70, 72, 117, 130, 131, 321, 407, 467, 691})
_ERROR_CODE: Final = re.compile(r"\bCode:\s*(\d+)", re.IGNORECASE)


def refused_for_its_data(exc: Exception) -> bool:
    """Whether ClickHouse refused an insert for the values it carries (`ROW_DATA_ERRORS`)."""
    if not isinstance(exc, DatabaseError):
        return False
    code = exc.code  # set from the server's exception header over HTTP; chDB gives the message only
    if code is None and (match := _ERROR_CODE.search(str(exc))):
        code = int(match.group(1))
    return code in ROW_DATA_ERRORS


@dataclass(frozen=True)
class RefusedRow:
    """A row ClickHouse refused on its own, with the first line of its error."""

    table: str
    columns: Sequence[str]
    row: list[Any]
    error: str


_QUOTE_START: Final = " before: '"
_QUOTE_END: Final = "': ("


def refusal_reason(exc: Exception) -> str:
    """The first line of ClickHouse's error, without the input it quotes: a value it cannot parse at all makes it
    quote the bytes where it stopped ("expected ',' before: 'NaN,"WHITELIST","<authorization reference>",
    "<token uid>",…'"), the row's later values in clear and cut anywhere, so pseudonymising the row would not
    reach them. The row goes with the error (pseudonymised, by `refused_rows`), so the quote adds nothing."""
    line = str(exc).strip().split("\n", 1)[0]  # ClickHouse's lines; the quote may hold any other line separator
    head, quoted, rest = line.partition(_QUOTE_START)
    if quoted:
        end = rest.rfind(_QUOTE_END)
        line = f"{head} before: (the row's input, not shown){rest[end + 1:] if end >= 0 else ''}"
    return line[:1000]


# What to insert instead of refused rows: (table, columns, rows).
RefusedRows = Callable[[list[RefusedRow]], tuple[str, Sequence[str], list[list[Any]]]]


def insert_isolating(client: Client, table: str, columns: Sequence[str], rows: list[list[Any]]) -> list[RefusedRow]:
    """Insert `rows`, halving around the rows ClickHouse refuses for their data; returns those refused alone, in
    order (the others are written, in order). Any other error is raised."""
    try:
        insert_rows(client, table, columns, rows)
        return []
    except DatabaseError as exc:
        if not refused_for_its_data(exc):
            raise
        if len(rows) == 1:
            return [RefusedRow(table, columns, rows[0], refusal_reason(exc))]
    half = len(rows) // 2
    return (insert_isolating(client, table, columns, rows[:half])
            + insert_isolating(client, table, columns, rows[half:]))


class ClickHouseSink:
    def __init__(self, client_factory: Callable[[], Client], *, max_backoff_s: float = 10.0,
                 refused_rows: RefusedRows | None = None) -> None:
        self._client_factory = client_factory
        self._client: Client | None = None
        self._max_backoff_s = max_backoff_s
        self._refused_rows = refused_rows  # None: a refused insert is retried like any failure
        # A batch's tables are inserted side by side: each insert is mostly waiting for ClickHouse.
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="sink")
        self.inserted_rows = 0
        self.refused_rows = 0

    def _insert_all(self, tables: dict[str, list[list[Any]]], columns: dict[str, Sequence[str]]) -> None:
        if self._client is None:
            self._client = self._client_factory()
        client = self._client

        def insert(table: str) -> list[RefusedRow]:
            if self._refused_rows is None:
                insert_rows(client, table, columns[table], tables[table])
                return []
            return insert_isolating(client, table, columns[table], tables[table])

        futures = [self._pool.submit(insert, table) for table, rows in tables.items() if rows]
        # Every insert is over before this returns or raises: an insert of a failed attempt still running would
        # land after the retry (after later batches even), and raw_events, which has no version, keeps the row
        # inserted last.
        wait(futures)
        refused = [row for future in futures for row in future.result()]
        if refused and self._refused_rows is not None:
            table, instead_columns, instead = self._refused_rows(refused)
            insert_rows(client, table, instead_columns, instead)
            self.refused_rows += len(refused)
            for row in refused:
                log.error("ClickHouse refused a row of %s (%s); recorded in %s instead", row.table, row.error, table)

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
