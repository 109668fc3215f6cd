"""Reading back what the pipeline stored, for the receiver GETs (08 §3.2, 09 §3.2, 10 §3.2).

Contract with the pipeline (it owns the tables; we only read them): `locations`, `sessions` and `cdrs` are
ReplacingMergeTree(version) tables of current state, keyed by (country_code, party_id, <object>_id) in
upper case (CiString identity), and `payload_json` holds the current full object as OCPI JSON (a Location
with its EVSEs and Connectors). Reads use FINAL, so the newest version is answered even before a merge. A
Location row marked `unlisted` (full sync: a complete pulled list no longer held it) is no current object.

Answers are the stored bytes, unchanged (`msgspec.Raw`): no re-encoding, so a GET shows exactly what the
pipeline holds. An EVSE or Connector is cut out of its Location's JSON the same way.

The client is opened on first use, read-only: pushes never depend on ClickHouse, and a store that is down
turns into 3000 answers on GET only. A ClickHouse server that does not answer (stuck, overloaded, packets
dropped) does so within READ_TIMEOUT_S, connecting included, however many GETs wait: at most GET_READS of them
read at a time, each in a thread of the pool the app's other blocking calls share (registry, credentials), and a
GET's READ_TIMEOUT_S counts from its arrival, its wait for a turn included. Without that bound the GETs queued for
the one connection attempt and for the pool's few threads (six on two cores), and were answered one after the other.

One push reads too: a CDR POST looks up the CDR held under its id, to answer a second POST (`receivers.cdrs`).
It never waits on the store: at most PUSH_READS such reads run at a time (their threads are the pool the GETs and
the registry share) and each is given up after PUSH_READ_TIMEOUT_S; a read not made, given up or failed says
nothing is known, and the push is answered as it was before the read existed.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Final, TypeAlias

import msgspec
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.httpclient import HttpClient
from litestar.di import NamedDependency

from infra.clickhouse.client import connect_for
from infra.settings import Settings
from ocpi.identity import ObjectKey, ci_equal
from ocpi.model import CDR, Location, Session, max_length
from receivers.transport import ServerError

# How long a GET waits for a ClickHouse server, to connect and for its answer: the client library's default is
# 300 s, long after a partner's own timeout, and each waiting GET holds a thread of the pool the app's other blocking
# calls share (registry reads). Then 3000: the partner retries.
READ_TIMEOUT_S: float = 10.0
# How many GETs read at a time (module docstring). With PUSH_READS, a thread of the pool is left for the registry and
# credentials when the store holds every read for READ_TIMEOUT_S; a read answered in milliseconds needs no more.
GET_READS: Final = 3
# A push's read (module docstring): how long a CDR POST waits for it, and how many run at once.
PUSH_READ_TIMEOUT_S: float = 2.0
PUSH_READS: Final = 2

# table → name of its id column (the other key columns are country_code and party_id everywhere).
_ID_COLUMNS: Final = {"locations": "location_id", "sessions": "session_id", "cdrs": "cdr_id"}
# Whether a row is no current object: a Location a complete pulled list no longer held (full sync, 08 §2.1: no
# longer valid, migration 0030) is answered as unknown. Read beside the payload, not filtered in WHERE: a condition
# on a column outside the key could be applied before FINAL picks the newest row (`optimize_move_to_prewhere_if_final`).
_GONE: Final = {"locations": "unlisted"}
# table → the longest id it can hold, and the owner's longest country code and party id, as the model holds them.
# A longer one is nobody's, and is not sent to ClickHouse: it went into the query's URL, which the embedded store's
# shim refuses from 8 kB on, so such a GET was answered 3000 ("please retry") for an object that cannot exist.
_ID_MAX: Final = {"locations": max_length(Location, "id"), "sessions": max_length(Session, "id"),
                  "cdrs": max_length(CDR, "id")}
_COUNTRY_CODE_MAX: Final = max_length(Location, "country_code")
_PARTY_ID_MAX: Final = max_length(Location, "party_id")


class _Evse(msgspec.Struct):
    uid: str
    connectors: list[msgspec.Raw] = []


class _Connector(msgspec.Struct):
    id: str


class _Location(msgspec.Struct):
    evses: list[msgspec.Raw] | None = None


_location_decoder: Final = msgspec.json.Decoder(_Location)
_evse_decoder: Final = msgspec.json.Decoder(_Evse)
_connector_decoder: Final = msgspec.json.Decoder(_Connector)


class StateReader:
    """The current stored Location, Session or CDR of an owner's object, as OCPI JSON; None if unknown."""

    def __init__(self, connect: Callable[[], Client]) -> None:
        self._connect = connect
        self._client: Client | None = None
        self._opening = threading.Lock()
        # chDB clients are not thread-safe: serialise their queries. HTTP clients (no session) run concurrently.
        self._serial: contextlib.AbstractContextManager[object] = contextlib.nullcontext()
        self._push_reads = 0  # reads of pushes under way, their threads included (event loop only)
        self._get_reads = asyncio.Semaphore(GET_READS)  # a slot is given back when its read's thread ends

    @classmethod
    def for_settings(cls, settings: Settings) -> StateReader:
        return cls(lambda: connect_for(settings, readonly=True, timeout_s=READ_TIMEOUT_S))

    def _client_for_query(self) -> Client:
        with self._opening:
            if self._client is None:
                client = self._connect()
                if not isinstance(client, HttpClient):
                    self._serial = threading.Lock()
                self._client = client
            return self._client

    def _payload(self, table: str, key: ObjectKey) -> bytes | None:
        client = self._client_for_query()
        country_code, party_id, object_id = key.normalized
        sql = (f"SELECT payload_json, {_GONE.get(table, 'false')} FROM {table} FINAL "
               f"WHERE country_code = {{cc:String}} AND party_id = {{pid:String}} "
               f"AND {_ID_COLUMNS[table]} = {{id:String}} LIMIT 1")
        with self._serial:
            rows = client.query(sql, parameters={"cc": country_code, "pid": party_id, "id": object_id}).result_rows
        return rows[0][0].encode("utf-8") if rows and not rows[0][1] else None

    async def _read(self, table: str, key: ObjectKey) -> msgspec.Raw | None:
        if len(key.object_id) > _ID_MAX[table] or len(key.country_code) > _COUNTRY_CODE_MAX or \
                len(key.party_id) > _PARTY_ID_MAX:
            return None
        try:
            payload = await asyncio.to_thread(self._payload, table, key)
        except Exception as exc:  # the store is down or refused: the caller may retry, never a 404
            raise ServerError(f"could not read the stored {table} state, please retry: {type(exc).__name__}") from exc
        return msgspec.Raw(payload) if payload is not None else None

    async def _get(self, table: str, key: ObjectKey) -> msgspec.Raw | None:
        """A GET's read: within READ_TIMEOUT_S from now, its wait for one of GET_READS turns included."""
        try:
            return await asyncio.wait_for(self._read_in_turn(table, key), READ_TIMEOUT_S)
        except TimeoutError:
            raise ServerError(f"could not read the stored {table} state within {READ_TIMEOUT_S:g} s, please "
                              "retry") from None

    async def _read_in_turn(self, table: str, key: ObjectKey) -> msgspec.Raw | None:
        await self._get_reads.acquire()
        return await self._held_read(table, key, self._get_reads.release)

    def _held_read(self, table: str, key: ObjectKey, ended: Callable[[], None]) -> asyncio.Future[msgspec.Raw | None]:
        """The read of `key`, started now and shielded: a read given up on keeps its thread until the client's own
        timeout, and the slot it holds with it; `ended` gives the slot back when the thread ends."""
        reading = asyncio.ensure_future(self._read(table, key))

        def done(read: asyncio.Future[msgspec.Raw | None]) -> None:
            ended()
            if not read.cancelled():
                read.exception()  # retrieved: a read given up on may still fail, and nobody awaits it any more

        reading.add_done_callback(done)
        return asyncio.shield(reading)

    async def location(self, key: ObjectKey) -> msgspec.Raw | None:
        return await self._get("locations", key)

    async def session(self, key: ObjectKey) -> msgspec.Raw | None:
        return await self._get("sessions", key)

    async def cdr(self, key: ObjectKey) -> msgspec.Raw | None:
        return await self._get("cdrs", key)

    async def cdr_for_push(self, key: ObjectKey) -> msgspec.Raw | None:
        """The stored CDR of `key` for a CDR POST, within PUSH_READ_TIMEOUT_S and PUSH_READS (module docstring); None
        when none is held or the store was not read in time."""
        if self._push_reads >= PUSH_READS:
            return None
        self._push_reads += 1
        try:
            return await asyncio.wait_for(self._held_read("cdrs", key, self._push_read_ended), PUSH_READ_TIMEOUT_S)
        except (TimeoutError, ServerError):
            return None

    def _push_read_ended(self) -> None:
        self._push_reads -= 1

    def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()


# Handler parameter type: the app's StateReader (app.py provides it as `stored`).
Stored: TypeAlias = NamedDependency[StateReader]


def evse_of(location: msgspec.Raw, evse_uid: str) -> msgspec.Raw | None:
    """The JSON of the Location's EVSE with this uid (CiString: case-insensitive), or None."""
    for raw in _location_decoder.decode(location).evses or ():
        if ci_equal(_evse_decoder.decode(raw).uid, evse_uid):
            return raw
    return None


def connector_of(evse: msgspec.Raw, connector_id: str) -> msgspec.Raw | None:
    """The JSON of the EVSE's Connector with this id (case-insensitive), or None."""
    for raw in _evse_decoder.decode(evse).connectors:
        if ci_equal(_connector_decoder.decode(raw).id, connector_id):
            return raw
    return None
