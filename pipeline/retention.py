"""Retention as policy: what each class of data is, how long it is kept, and how that is enforced.

OCPI leaves retention to contracts and law (02 §7); these are our defaults, each configurable
(README, "Retention"):

- raw (raw_events, dead_letters; the module, party-facts, reconciliation and rejections topics):
  OCPI_RETENTION_RAW_DAYS, by ClickHouse TTL and the topics' `retention.ms`;
- history (session and EVSE status histories, anomalies, rejections): OCPI_RETENTION_HISTORY_DAYS, by TTL;
- personal (token uid, contract id, authorization reference, visual number in sessions, cdrs, locations): in
  clear for OCPI_RETENTION_PSEUDONYMISE_DAYS after it was received (a locations row: `personal_at`, when its
  `publish_allowed_to` came, since EVSE updates write new rows with it), then a keyed hash, by the worker's sweep
  or `retention apply`; in the worker's session and location state by `pipeline.state_retention`, and in their
  changelogs by compaction;
- billing (cdrs with periods and tariffs, billing lines, credit links, reconciliation, sessions):
  OCPI_RETENTION_BILLING_YEARS, by TTL; the worker's session, CDR and stage-2 party state (and, by tombstones and
  compaction, their changelogs) by `pipeline.state_retention`;
- current state (locations, evses, connectors): kept while the CPO publishes them, no TTL.

Pseudonymisation replaces a value by `psn:` + the first 32 hex digits of HMAC-SHA256(key, value) — 36
characters, so it still fits the CiString(36) columns, and equal values (CiStrings compared case-insensitively)
give equal pseudonyms, so joins between sessions and CDRs keep working. The rows are written again with a
higher version and `pseudonymised = true`, and the due clear-text versions they or any newer version replace are
deleted (a lightweight DELETE, `delete_superseded_clear_rows`): ReplacingMergeTree alone drops them only at a merge
nothing schedules.

Tansu (the embedded broker) stores topic configs but enforces neither `retention.ms` nor compaction
(research note §2): embedded Kafka data lives only as long as the broker process. On Apache Kafka the
configs apply as set.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import msgspec
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import insert_first
from infra.kafka.admin import RECORD_MAX_BYTES
from infra.pseudonyms import DIGITS, PREFIX, PSEUDONYM_LENGTH, is_pseudonym
from infra.settings import MIN_PSEUDONYM_KEY_BYTES, Settings
from ocpi.identity import ci_normalize
from pipeline.records import utc_now
from pipeline.sink import datetime64, insert_rows, string

log = logging.getLogger(__name__)


def pseudonym_growth(value: object) -> int:
    """How many characters pseudonymising `value`, a personal identifier, adds to it at most: a pseudonym has
    PSEUDONYM_LENGTH of them, more than a short uid or visual number (`{"uid": "1"}` grows fourfold)."""
    return max(0, PSEUDONYM_LENGTH - len(value)) if isinstance(value, str) and value else 0


def pseudonymised_growth(data: dict[str, Any]) -> int:
    """How many characters `pseudonymise_fields` adds to `data` (a Session/Location or a PATCH of one, as decoded)
    at most: the growth of each personal identifier it holds."""
    return sum(pseudonym_growth(holder[name] if isinstance(holder, list) else holder.get(name))
               for holder, name, _case_insensitive in _personal_fields(data))


_DAY_MS: Final = 86_400_000


class Pseudonymizer:
    """The keyed hash of personal identifiers (deterministic per key).

    A token, contract id or authorization reference comes back with every event of its session and CDR, so the
    latest pseudonyms are remembered (up to `CACHE_SIZE`, then forgotten all at once), and the HMAC starts from
    a copy of its keyed state instead of keying SHA-256 again per value."""

    CACHE_SIZE: Final = 65_536

    def __init__(self, key: bytes) -> None:
        if len(key) < MIN_PSEUDONYM_KEY_BYTES:
            raise ValueError(f"the pseudonymisation key needs at least {MIN_PSEUDONYM_KEY_BYTES} bytes")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)
        self._cache: dict[tuple[str, bool], str] = {}

    def __call__(self, value: str, *, case_insensitive: bool = True) -> str:
        known = self._cache.get((value, case_insensitive))
        if known is not None:
            return known
        if is_pseudonym(value):
            return value  # already pseudonymised: applying it twice must not change it
        text = ci_normalize(value) if case_insensitive else value
        digest = self._keyed.copy()
        digest.update(text.encode())
        pseudonym = PREFIX + digest.hexdigest()[:DIGITS]
        if len(self._cache) >= self.CACHE_SIZE:
            self._cache.clear()
        self._cache[(value, case_insensitive)] = pseudonym
        return pseudonym


def load_key(settings: Settings) -> bytes:
    """The configured key, or one generated once (mode 0600) under the data directory.

    The generated key is written to a temporary file and linked to its name only when whole, so a process that
    starts meanwhile never reads a partial key (whose fingerprint `check_key` would record as the store's); of
    two processes generating at once, the first link wins and both use its key."""
    if settings.retention.pseudonym_key:
        return settings.retention.pseudonym_key.encode()
    path = settings.storage.path / "secrets" / "pseudonym.key"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        temporary = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32))
                fh.flush()
                os.fsync(fh.fileno())
            with contextlib.suppress(FileExistsError):  # another process created it first
                os.link(temporary, path)
        finally:
            temporary.unlink()
    key = path.read_text().strip().encode()
    if len(key) < MIN_PSEUDONYM_KEY_BYTES:
        raise PseudonymKeyError(f"the pseudonymisation key file {path} holds {len(key)} bytes, expected at least "
                                f"{MIN_PSEUDONYM_KEY_BYTES}: restore it from a backup (or, if nothing was "
                                "pseudonymised with it yet, delete it to have one generated)")
    return key


class PseudonymKeyError(RuntimeError):
    """The pseudonymisation key cannot be used."""


class PseudonymKeyMismatch(PseudonymKeyError):
    """This process's pseudonymisation key is not the one the data was pseudonymised with."""


_KEY_CHECK_TEXT: Final = b"ocpi-pipeline pseudonymisation key check"
_FIRST_KEY_INSERT: Final = "ocpi-pipeline pseudonymisation key: the first"  # one for every first insert (0023)


def key_fingerprint(key: bytes) -> str:
    """Tells keys apart without revealing them (an HMAC of a fixed text)."""
    return hmac.new(key, _KEY_CHECK_TEXT, hashlib.sha256).hexdigest()[:32]


def check_key(client: Client, key: bytes, *, recorded_by: str) -> None:
    """Pseudonyms are join keys, so every process that writes them must use the same key: a worker on another
    machine, or `retention apply` run with another OCPI_DATA_DIR, would otherwise generate its own and silently
    break the joins. The first process records its key's fingerprint (table `pseudonym_key`); every later one,
    with another key, stops with PseudonymKeyMismatch.

    Two first processes at once both find the table empty: each inserts its fingerprint with the same
    deduplication token (migration 0023, `infra.clickhouse.client.insert_first`), so the table takes the first
    insert that lands and drops the others, and each reads back the one key in force. A table with two rows (from
    before 0023): the earlier row is in force."""
    fingerprint = key_fingerprint(key)
    first = _key_in_force(client)
    if first is None:
        first = insert_first(client, "pseudonym_key (fingerprint, recorded_at, recorded_by)",
                             f"%(fingerprint)s, {datetime64(utc_now())}, %(recorded_by)s", token=_FIRST_KEY_INSERT,
                             in_force=_KEY_IN_FORCE,
                             parameters={"fingerprint": fingerprint, "recorded_by": recorded_by})
        if first is None:  # the insert was taken for a repeat of one whose row was deleted since
            raise PseudonymKeyError(
                "the pseudonym_key table is empty but takes no new key: its row was deleted with DELETE, and "
                "ClickHouse still drops the first key's insert as a repeat; empty it with TRUNCATE TABLE "
                "pseudonym_key instead")
    if first != fingerprint:
        raise PseudonymKeyMismatch(
            "the pseudonymisation key differs from the one this store's data was pseudonymised with (fingerprint "
            f"{fingerprint}, in force {first}): set OCPI_PSEUDONYM_KEY, or OCPI_DATA_DIR, as for the other "
            "processes (the generated key is OCPI_DATA_DIR/secrets/pseudonym.key)")


def _key_in_force(client: Client) -> str | None:
    rows = client.query(_KEY_IN_FORCE).result_rows
    return str(rows[0][0]) if rows else None


_KEY_IN_FORCE: Final = "SELECT fingerprint FROM pseudonym_key ORDER BY recorded_at, fingerprint LIMIT 1"


# --- the policy -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableTtl:
    table: str
    column: str  # a DateTime64 column: when we received the data
    unit: str  # Day or Year
    amount: int

    @property
    def expression(self) -> str:
        """The TTL as ClickHouse shows it in system.tables (so a configured value is re-applied only on change).

        Computed on the DateTime64 column itself (a DateTime64 TTL needs ClickHouse 25.7 or later): through
        `toDateTime`, which is 32-bit, an expiry past 2106-02-07 wraps to the 1970s and every row is deleted
        at once. Migrations 0013 and 0014 set the defaults in that form (harmless at those ages); the first
        `apply_ttls` rewrites them with the configured ages. A migration to the new form would have to name
        ages, and would shorten a longer configured retention, deleting what it kept, until the next apply."""
        return f"{self.column} + toInterval{self.unit}({self.amount})"


@dataclass(frozen=True)
class DataClass:
    name: str
    what: str
    keep: str
    ttls: tuple[TableTtl, ...]
    topics: tuple[str, ...] = ()


def policy(settings: Settings) -> list[DataClass]:
    r = settings.retention
    raw = (TableTtl("raw_events", "received_at", "Day", r.raw_days),
           TableTtl("dead_letters", "recorded_at", "Day", r.raw_days))
    history = (TableTtl("session_status_history", "received_at", "Day", r.history_days),
               TableTtl("evse_status_history", "received_at", "Day", r.history_days),
               TableTtl("anomalies", "observed_at", "Day", r.history_days),
               # Refused pushes, kept for debugging with the partner like the anomalies of what was accepted.
               TableTtl("rejections", "rejected_at", "Day", r.history_days))
    billing = (*(TableTtl(table, "received_at", "Year", r.billing_years)
                 for table in ("cdrs", "cdr_charging_periods", "cdr_tariffs", "credit_links", "billing_lines",
                               "sessions")),
               TableTtl("reconciliation", "event_time", "Year", r.billing_years))
    # Every topic is a transport the worker has written to ClickHouse within seconds: kept like raw events.
    topics = (*settings.kafka.module_topics, settings.pipeline.topic_party_facts,
              settings.pipeline.topic_reconciliation, settings.kafka.topic_rejections)
    return [
        DataClass("raw", "raw events and undecodable records, as received", f"{r.raw_days} days", raw, topics),
        DataClass("history", "status histories, anomalies and refused pushes (rejections)", f"{r.history_days} days",
                  history),
        DataClass("personal", "token uid, contract id, authorization reference, visual number; in ClickHouse "
                  "rows, and in the worker's session and location state and their changelogs",
                  f"in clear for {r.pseudonymise_days} days, then pseudonymised (keyed hash)", ()),
        DataClass("billing", "CDRs, billing lines, credit links, reconciliation, sessions; in ClickHouse rows, "
                  "and in the worker's session, CDR and stage-2 (party) state and their changelogs",
                  f"{r.billing_years} years", billing),
        DataClass("current state", "locations, EVSEs, connectors", "while published (no TTL)", ()),
    ]


# Part of every topic's configs, as they are set as a whole (`infra.kafka.admin.RECORD_MAX_BYTES` says why).
_RECORD_SIZE: Final = {"max.message.bytes": str(RECORD_MAX_BYTES)}
_SEGMENT_MS: Final = str(_DAY_MS)  # a raw record is deleted at most a day after its retention ended


def topic_configs(settings: Settings) -> dict[str, dict[str, str]]:
    """Kafka configs of the topics we own or feed: retention of the raw class, compaction of the state
    changelogs that hold personal data."""
    retention_ms = str(settings.retention.raw_days * _DAY_MS)
    # Kafka deletes whole segments once their newest record is past retention.ms, and rolls a segment only at
    # segment.ms (default 7 days) or 1 GB: raw personal data would outlive OCPI_RETENTION_RAW_DAYS by up to a week.
    configs = {topic: {"retention.ms": retention_ms, "segment.ms": _SEGMENT_MS, "cleanup.policy": "delete",
                       **_RECORD_SIZE}
               for data_class in policy(settings) for topic in data_class.topics}
    return configs | changelog_configs(settings)


# The member of a Location that holds personal data (token uids and visual numbers); absent in most Locations,
# as it is only allowed with publish=false.
LOCATION_PERSONAL_FIELD: Final = "publish_allowed_to"

# Stage-1 state tables whose values hold personal data, rewritten by `pipeline.state_retention`: session-state
# (the current Session and parked PATCHes) and location-state (`publish_allowed_to` of the current Location and
# parked events). cdr-state holds a CDR's content hash, event id, offset and receive time only; party-state holds
# pseudonyms from the start.
PERSONAL_STATE_TABLES: Final = ("session-state", "location-state")
# State tables whose entries are billing data, deleted (with a changelog tombstone) by `pipeline.state_retention`
# once what they hold was received more than OCPI_RETENTION_BILLING_YEARS ago, like the rows: stage 1's session
# and CDR state, and stage 2's party-state (by linked records: `pipeline.party_retention`). location-state is
# current state (kept while published).
BILLING_STATE_TABLES: Final = ("session-state", "cdr-state", "party-state")


def billing_cutoff(now: datetime, years: int) -> datetime:
    """`now` moved back by `years` calendar years: data received before it is past the billing retention.

    Data received at R expires in ClickHouse once `R + INTERVAL years YEAR` <= now, where 29 February plus a year
    is 28 February. Every R before this cutoff satisfies that (from 29 February the cutoff is 28 February, a day
    on the safe side), so the state never loses an entry whose rows are still kept."""
    try:
        return now.replace(year=now.year - years)
    except ValueError:  # 29 February, into a year without one
        return now.replace(year=now.year - years, day=28)


# A changelog record becomes compactable at most this long after it was written, so the clear value a
# pseudonymised one supersedes is gone about two lags later (see `changelog_configs`).
COMPACTION_LAG: Final = timedelta(days=1)


def changelog_topic(app_id: str, table: str) -> str:
    """Faust's name for a table's changelog topic."""
    return f"{app_id}-{table}-changelog"


def changelog_configs(settings: Settings, tables: tuple[str, ...] = PERSONAL_STATE_TABLES) -> dict[str, dict[str, str]]:
    """Configs of the changelogs of state tables (of this worker's app id), by default the personal ones.

    Compaction never touches the active segment, and it keeps a key's newest record of the cleanable part.
    `max.compaction.lag.ms` bounds both: the active segment is rolled on the first write after the lag, and a
    log with records older than the lag is cleaned whatever its dirty ratio. So once the worker has written
    the pseudonymised value, the clear one is gone within about two lags on a partition that sees writes.
    `cleanup.policy` is repeated because a topic's configs are set as a whole.
    """
    lag_ms = str(int(COMPACTION_LAG.total_seconds() * 1000))
    return {changelog_topic(settings.pipeline.app_id, table): {"cleanup.policy": "compact", **_RECORD_SIZE,
                                                                **({"max.compaction.lag.ms": lag_ms}
                                                                   if table in PERSONAL_STATE_TABLES else {})}
            for table in tables}


_TTL_CLAUSE: Final = re.compile(r"\bTTL (.+?)(?: SETTINGS |$)")


def current_ttls(client: Client, database: str) -> dict[str, str]:
    """Table → its TTL expression as ClickHouse reports it ('' when none)."""
    rows = client.query(f"SELECT name, engine_full FROM system.tables WHERE database = {string(database)}").result_rows
    found = {}
    for name, engine in rows:
        match = _TTL_CLAUSE.search(engine or "")
        found[name] = match.group(1).strip() if match else ""
    return found


def apply_ttls(client: Client, database: str, settings: Settings) -> list[str]:
    """Set every table's TTL to the configured one; returns the tables that changed."""
    current = current_ttls(client, database)
    changed = []
    for data_class in policy(settings):
        for ttl in data_class.ttls:
            if current.get(ttl.table) != ttl.expression:
                client.command(f"ALTER TABLE `{database}`.`{ttl.table}` MODIFY TTL {ttl.expression}")
                changed.append(ttl.table)
    return changed


# --- pseudonymisation -----------------------------------------------------------------------------------------

_JSON_IN: Final = msgspec.json.Decoder(float_hook=Decimal)  # numbers stay exact
_JSON_OUT: Final = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True)
class PersonalTable:
    table: str
    key: tuple[str, ...]
    moment: str  # the column whose age decides: when the row's personal data was received
    columns: tuple[str, ...]  # personal CiString columns
    version_column: str = "version"
    only: str = ""  # a condition rows without personal data fail, so they are never rewritten

    def due(self, before: datetime) -> str:
        """The WHERE condition of rows whose personal data is due and still in clear (with FINAL: of its current
        rows)."""
        only = f" AND {self.only}" if self.only else ""
        return f"NOT pseudonymised AND {self.moment} < {datetime64(before)}{only}"


PERSONAL_TABLES: Final = (
    PersonalTable("sessions", ("country_code", "party_id", "session_id"), "received_at",
                  ("token_uid", "contract_id", "authorization_reference")),
    PersonalTable("cdrs", ("country_code", "party_id", "cdr_id"), "received_at",
                  ("token_uid", "contract_id", "authorization_reference")),
    # Every EVSE or Connector update writes a new row with the Location's `publish_allowed_to` in it: the row's
    # own received_at would postpone it, so the row carries when that data came (`LocationState.personal_at`).
    PersonalTable("locations", ("country_code", "party_id", "location_id"), "personal_at", (),
                  only=f"position(payload_json, '{LOCATION_PERSONAL_FIELD}') > 0"),
)


def pseudonymise_document(document: str, pseudonym: Pseudonymizer) -> str:
    """A Session/CDR/Location's OCPI JSON with its personal identifiers replaced."""
    data = _JSON_IN.decode(document)
    pseudonymise_fields(data, pseudonym)
    return _JSON_OUT.encode(data).decode()


def pseudonymised_json(document: bytes, pseudonym: Pseudonymizer) -> bytes | None:
    """OCPI JSON with its personal identifiers replaced (numbers exactly as written); None when none was in
    clear (or the JSON is no object)."""
    data = _JSON_IN.decode(document)
    return _JSON_OUT.encode(data) if isinstance(data, dict) and pseudonymise_fields(data, pseudonym) else None


def pseudonymised_element(document: bytes, pseudonym: Pseudonymizer) -> bytes:
    """A list element a partner sent in place of a Session/CDR/Location (`jobs.pull` records the refused ones) with
    the personal identifiers of every object in it replaced, at any depth: an object wrapped in another, or in a
    list, holds them as much as one at the top. An element that is a bare string or number may be an identifier
    itself: written as its pseudonym. Bytes that are no UTF-8 (why such an element is refused) are read as U+FFFD:
    they can only sit in strings of an element split from a parsed list, and the identifiers around them are
    pseudonymised all the same."""
    try:
        data = _JSON_IN.decode(document)
    except UnicodeDecodeError:
        data = _JSON_IN.decode(document.decode("utf-8", "replace"))
    if isinstance(data, str | int | Decimal) and not isinstance(data, bool):
        return _JSON_OUT.encode(pseudonym(data if isinstance(data, str) else _JSON_OUT.encode(data).decode()))
    pending = [data]
    while pending:  # without recursion: a partner's nesting may be deep
        value = pending.pop()
        if isinstance(value, dict):
            pseudonymise_fields(value, pseudonym)
            pending.extend(value.values())
        elif isinstance(value, list):
            pending.extend(value)
    return _JSON_OUT.encode(data)


def _personal_fields(data: dict[str, Any]) -> Iterator[tuple[Any, Any, bool]]:
    """(holder, key or index, compared case-insensitively) of every personal identifier of a Session/CDR/Location
    (or a PATCH of one), as decoded from OCPI JSON, whatever shape a refused object gives it."""
    token = data.get("cdr_token")
    if isinstance(token, dict):
        yield token, "uid", True
        yield token, "contract_id", True
    else:
        yield data, "cdr_token", True  # not an object: whatever it holds, as its text
    yield data, "authorization_reference", True
    allowed_list = data.get(LOCATION_PERSONAL_FIELD)
    if allowed_list is not None and not isinstance(allowed_list, list):
        yield data, LOCATION_PERSONAL_FIELD, False
    for index, allowed in enumerate(allowed_list if isinstance(allowed_list, list) else ()):
        if isinstance(allowed, dict):
            yield allowed, "uid", True
            yield allowed, "visual_number", False
        else:
            yield allowed_list, index, False


def pseudonymise_fields(data: dict[str, Any], pseudonym: Pseudonymizer) -> bool:
    """Replace the personal identifiers of a Session/CDR/Location (or a PATCH of one), as decoded from OCPI JSON,
    in place; returns whether any was still in clear."""
    changed = False
    for holder, name, case_insensitive in _personal_fields(data):  # a dict's key, a list's index
        value = holder.get(name) if isinstance(holder, dict) else holder[name]
        if value is None or value == "":
            continue
        # Any other shape is an object refused for it (`jobs.pull` records those): an identifier sent as a number,
        # a list or an object is personal data all the same, pseudonymised as its text.
        text = value if isinstance(value, str) else msgspec.json.encode(value).decode()
        holder[name] = pseudonym(text, case_insensitive=case_insensitive)
        changed = changed or holder[name] != value
    return changed


def due_for_pseudonymisation(client: Client, spec: PersonalTable, before: datetime, limit: int,
                             ) -> tuple[list[str], list[list[Any]]]:
    """Current rows of `spec.table` whose personal data was received before `before` and is not pseudonymised
    yet (all columns)."""
    result = client.query(f"SELECT * FROM `{spec.table}` FINAL WHERE {spec.due(before)} LIMIT {int(limit)}")
    return list(result.column_names), [list(row) for row in result.result_rows]


def pseudonymise_rows(columns: list[str], rows: Iterable[list[Any]], spec: PersonalTable,
                      pseudonym: Pseudonymizer) -> list[list[Any]]:
    index = {name: i for i, name in enumerate(columns)}
    out = []
    for row in rows:
        new = list(row)
        for name in spec.columns:
            value = new[index[name]]
            if isinstance(value, str) and value:
                new[index[name]] = pseudonym(value)
        new[index["payload_json"]] = pseudonymise_document(new[index["payload_json"]], pseudonym)
        new[index["pseudonymised"]] = True
        new[index[spec.version_column]] = int(new[index[spec.version_column]]) + 1
        out.append(new)
    return out


def pseudonymise_due(client: Client, settings: Settings, pseudonym: Pseudonymizer, now: datetime, *,
                     batch: int = 10_000, insert: Callable[[str, list[str], list[list[Any]]], None] | None = None,
                     ) -> dict[str, int]:
    """Pseudonymise every current row whose personal data is older than the configured age; returns rows
    rewritten per table."""
    before = now - timedelta(days=settings.retention.pseudonymise_days)

    def default_insert(table: str, columns: list[str], rows: list[list[Any]]) -> None:
        insert_rows(client, table, columns, rows)

    write = insert or default_insert
    done: dict[str, int] = {}
    for spec in PERSONAL_TABLES:
        total = 0
        while True:
            columns, rows = due_for_pseudonymisation(client, spec, before, batch)
            if not rows:
                break
            write(spec.table, columns, pseudonymise_rows(columns, rows, spec, pseudonym))
            total += len(rows)
            if len(rows) < batch:
                break
        done[spec.table] = total
        deleted = delete_superseded_clear_rows(client, spec, before)
        if deleted:
            log.info("retention: deleted %d clear rows of %s that newer rows replace", deleted, spec.table)
    return done


# Rows go into a DELETE as literal tuples; this many (identities are CiString(36) at most) keep a statement far
# below ClickHouse's default max_query_size of 256 KiB.
_ROWS_PER_STATEMENT: Final = 1_000


def _tuple(values: Iterable[Any]) -> str:
    return "(" + ", ".join(string(v) if isinstance(v, str) else str(int(v)) for v in values) + ")"


def replaced_clear_pages(client: Client, spec: PersonalTable, before: datetime) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of `spec.table` whose personal data is due and in clear and that a row of the same key and a
    higher version replaces (the pseudonymised one a pass wrote, or a newer version, in clear or not, whose own
    personal data is not due yet: a Location PUT that replaced `publish_allowed_to`), as (key..., version) tuples,
    page by page in key order. A page may be deleted before the next is read: the next starts after the last
    candidate read. Candidates are read from the table, not from a pass's inserts, so rows that an interrupted
    pass or an older release left are found too; a clear row without a successor is the current one and is not
    one of them."""
    key = ", ".join(spec.key)
    version = spec.version_column
    after = ""
    while True:
        candidates = client.query(
            f"SELECT {key}, {version} FROM `{spec.table}` WHERE {spec.due(before)}{after} "
            f"ORDER BY {key}, {version} LIMIT {_ROWS_PER_STATEMENT}").result_rows
        if not candidates:
            return
        keys = {tuple(row[:-1]) for row in candidates}
        successors = {tuple(row[:-1]): int(row[-1]) for row in client.query(
            f"SELECT {key}, max({version}) FROM `{spec.table}` WHERE ({key}) IN "
            f"({', '.join(map(_tuple, keys))}) GROUP BY {key}").result_rows}
        replaced = [tuple(row) for row in candidates if int(row[-1]) < successors.get(tuple(row[:-1]), -1)]
        if replaced:
            yield replaced
        if len(candidates) < _ROWS_PER_STATEMENT:
            return
        after = f" AND ({key}, {version}) > {_tuple(candidates[-1])}"


def delete_superseded_clear_rows(client: Client, spec: PersonalTable, before: datetime) -> int:
    """Delete the replaced rows in clear whose personal data is due (`replaced_clear_pages`); returns how many.

    ReplacingMergeTree drops a replaced row only at a merge that nothing schedules; until then every query
    without FINAL reads it. A lightweight DELETE hides it at once (the same SQL on chDB and a server) for a mask
    on the parts it touches, where OPTIMIZE ... FINAL would rewrite the partitions every hour; the bytes leave
    the disk when the part next merges. A replaced row is never what FINAL reads, so deleting it changes no
    current row.
    """
    key = ", ".join(spec.key)
    deleted = 0
    for replaced in replaced_clear_pages(client, spec, before):
        client.command(f"DELETE FROM `{spec.table}` WHERE NOT pseudonymised AND ({key}, {spec.version_column}) IN "
                       f"({', '.join(map(_tuple, replaced))})")
        deleted += len(replaced)
    return deleted


def replaced_clear_rows(client: Client, spec: PersonalTable, before: datetime) -> int:
    """How many rows `delete_superseded_clear_rows` deletes now (queries without FINAL read them)."""
    return sum(len(page) for page in replaced_clear_pages(client, spec, before))


# --- report ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DueRow:
    data_class: str
    table: str
    rule: str
    ttl_in_effect: str
    rows_due: int
    ttl_configured: str = ""  # the policy's TTL expression ('' for a rule that is no TTL)
    # personal: the replaced versions in clear the pass deletes besides (`replaced_clear_rows`)
    replaced_in_clear: int = 0

    @property
    def ttl_differs(self) -> bool:
        """Whether the table's TTL is not the configured one (the worker or `retention apply` has not set it)."""
        return bool(self.ttl_configured) and self.ttl_in_effect != self.ttl_configured


def report_rows(client: Client, database: str, settings: Settings, now: datetime) -> list[DueRow]:
    """What each retention rule will remove or rewrite now, table by table."""
    ttls = current_ttls(client, database)
    rows: list[DueRow] = []
    for data_class in policy(settings):
        for ttl in data_class.ttls:
            # Counted with the TTL in effect, the table's own expression, so the count is what ClickHouse deletes
            # (a configured one not set yet deletes nothing, an older or a wrapping one does); `ttl_differs` says so.
            in_effect = ttls.get(ttl.table, "")
            due = client.query(f"SELECT count() FROM `{ttl.table}` WHERE {in_effect} <= {datetime64(now)}"
                               ).result_rows[0][0] if in_effect else 0
            rows.append(DueRow(data_class.name, ttl.table, f"delete {ttl.amount} {ttl.unit.lower()}(s) after "
                               f"{ttl.column}", in_effect, int(due), ttl.expression))
    before = now - timedelta(days=settings.retention.pseudonymise_days)
    for spec in PERSONAL_TABLES:
        due = client.query(f"SELECT count() FROM `{spec.table}` FINAL WHERE {spec.due(before)}").result_rows[0][0]
        rows.append(DueRow("personal", spec.table,
                           f"pseudonymise {settings.retention.pseudonymise_days} days after {spec.moment}",
                           "worker sweep", int(due), replaced_in_clear=replaced_clear_rows(client, spec, before)))
    return rows


def leftover_rebuilds(client: Client, database: str) -> list[str]:
    """Databases a `replay --rebuild` left with the previous tables: outside the policy's pseudonymisation (the
    passes rewrite the live database), so their personal data stays in clear until they are dropped."""
    rows = client.query("SELECT name FROM system.databases WHERE startsWith(name, {prefix:String}) ORDER BY name",
                        parameters={"prefix": f"{database}_rebuild_"}).result_rows
    return [str(row[0]) for row in rows]


def policy_warnings(settings: Settings) -> list[str]:
    """What in the configured policy keeps data longer than the policy says (the worker logs these at start)."""
    r = settings.retention
    found = []
    if r.raw_days > r.pseudonymise_days:
        found.append(f"raw events are kept {r.raw_days} days in clear, longer than the pseudonymisation age "
                     f"({r.pseudonymise_days} days): lower OCPI_RETENTION_RAW_DAYS")
    return found


def warnings(settings: Settings) -> list[str]:
    """The policy's warnings and what the broker does not enforce (`retention report`)."""
    found = policy_warnings(settings)
    if settings.kafka.is_tansu:
        found.append("the embedded Tansu broker stores topic configs but enforces neither retention.ms nor "
                     "compaction: its data lives as long as the broker process")
    return found


def key_file(settings: Settings) -> Path:
    return settings.storage.path / "secrets" / "pseudonym.key"
