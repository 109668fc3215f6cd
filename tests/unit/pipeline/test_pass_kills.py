"""The retention passes have no Kafka offset to resume from: killed after any of their writes, the next run must end
where an uninterrupted run ends (the deadline sweep's kills: test_store)."""

from __future__ import annotations

from typing import Any

import pytest
from clickhouse_connect.driver.client import Client

from pipeline import retention
from pipeline.cdrs import process_cdrs
from pipeline.locations import process_locations
from pipeline.sessions import process_sessions
from pipeline.sink import Batch, ClickHouseSink
from pipeline.state import CdrState, LocationState, SessionState

from .builders import Harness, cdr, event, iso, location, session, ts

pytestmark = pytest.mark.clickhouse

DAY = 24 * 60
TABLES = ("sessions", "cdrs", "locations", "billing_lines")


class Killed(BaseException):
    pass


def write(client: Client, batch: Batch) -> None:
    import asyncio

    asyncio.run(ClickHouseSink(lambda: client).write(batch))


def rows(client: Client) -> dict[str, list[tuple[Any, ...]]]:
    return {table: sorted(map(tuple, client.query(f"SELECT * FROM {table}").result_rows), key=repr)
            for table in TABLES}


def final_rows(client: Client) -> dict[str, list[tuple[Any, ...]]]:
    return {table: sorted(map(tuple, client.query(f"SELECT * FROM {table} FINAL").result_rows), key=repr)
            for table in TABLES}


class Killing:
    """A client killed as it starts its `at`-th write (an insert, or a command: the DELETE of replaced rows)."""

    def __init__(self, client: Client, at: int) -> None:
        self.client = client
        self.at = at
        self.writes = 0

    def _count(self) -> None:
        self.writes += 1
        if self.writes == self.at:
            raise Killed

    def raw_insert(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self.client.raw_insert(*args, **kwargs)

    def command(self, *args: Any, **kwargs: Any) -> Any:
        self._count()
        return self.client.command(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)


def load(client: Client) -> None:
    sessions, cdrs, locations = (Harness(process_sessions, SessionState), Harness(process_cdrs, CdrState),
                                 Harness(process_locations, LocationState))
    write(client, sessions.run(event("Session", session(authref="AUTH-1", updated=-40 * DAY), received=-40 * DAY),
                               event("Session", session("S2", uid="TOK2", authref="AUTH-2"), received=0),
                               event("Session", session("S3", uid="TOK3", updated=-45 * DAY), received=-45 * DAY)
                               ).batch)
    write(client, sessions.run(event("Session", session(authref="AUTH-1", status="COMPLETED", end=-39 * DAY,
                                                        updated=-39 * DAY), received=-39 * DAY)).batch)
    write(client, cdrs.run(event("CDR", cdr(authref="AUTH-1", start=-40 * DAY, end=-39 * DAY), received=-39 * DAY),
                           event("CDR", cdr("C2", session_id="S3", uid="TOK3"), received=-44 * DAY)).batch)
    allowed = [{"uid": "TOK9", "type": "RFID"}, {"visual_number": "Card-0042", "issuer": "MoveMove"}]
    write(client, locations.run(
        event("Location", location("LOC-OLD", publish=False, publish_allowed_to=allowed), received=-40 * DAY),
        event("Location", location("LOC-NEW", publish=False, publish_allowed_to=allowed), received=0)).batch)
    write(client, locations.run(event("EVSEPatch", {"status": "CHARGING", "last_updated": iso(ts(0))},
                                      object_id="LOC-OLD", evse_uid="E1", received=0)).batch)


def restore(client: Client, saved: dict[str, list[tuple[Any, ...]]]) -> None:
    for table in TABLES:
        client.command(f"TRUNCATE TABLE {table}")
    for table in ("sessions", "cdrs", "locations"):  # billing_lines: fed by the view on cdrs
        columns = list(client.query(f"SELECT * FROM {table} LIMIT 0").column_names)
        for row in saved[table]:  # one by one: an insert collapses the rows of a key it holds (optimize_on_insert)
            client.insert(table, [list(row)], column_names=columns)


def test_a_pseudonymisation_pass_killed_after_any_of_its_writes_ends_as_an_uninterrupted_one(client: Client) -> None:
    from infra.settings import load_settings

    settings = load_settings({"OCPI_PSEUDONYM_KEY": "x" * 32, "OCPI_RETENTION_PSEUDONYMISE_DAYS": "30"})
    pseudonym = retention.Pseudonymizer(b"x" * 32)
    load(client)
    saved = rows(client)
    retention.pseudonymise_due(client, settings, pseudonym, ts(DAY), batch=1)
    expected, expected_final = rows(client), final_rows(client)
    assert not [row for row in expected_final["sessions"] if "TOK1" in repr(row)]  # the pass did rewrite
    writes = 1
    while True:
        restore(client, saved)
        assert rows(client) == saved
        killing = Killing(client, writes)
        try:
            retention.pseudonymise_due(killing, settings, pseudonym, ts(DAY), batch=1)  # type: ignore[arg-type]
        except Killed:
            pass
        else:
            break
        retention.pseudonymise_due(client, settings, pseudonym, ts(DAY), batch=1)
        assert final_rows(client) == expected_final, writes
        assert rows(client) == expected, writes
        writes += 1
    assert writes > 5

