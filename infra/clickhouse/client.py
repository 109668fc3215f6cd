"""One ClickHouse client factory for every process: chDB in-process or a server over HTTP, same code.

chDB lets one process open a data path at a time. While `dev` or `demo` holds it, other processes (the worker,
the receivers, `query`, `partners`) reach it through the ClickHouse-HTTP shim that the holder serves
(`infra.clickhouse.shim`); they find it in the run file (`infra.runfile`).
"""

from __future__ import annotations

import contextlib
import fcntl
import re
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

from infra.runfile import read_running_instance
from infra.settings import Settings, private_dir


class ClickHouseUnavailable(RuntimeError):
    """The store cannot be opened (locked by another process, or a server that does not answer)."""


_chdb_lock = threading.Lock()


def chdb_path(dsn: str) -> Path:
    return Path(urlparse(dsn).path)


def _held_elsewhere(path: Path) -> bool:
    """Whether another process holds the store: ClickHouse locks the `status` file of its path (flock) while it
    runs. chDB's exception says only "Error initializing EmbeddedServer" (the lock error goes to stderr)."""
    try:
        with (path / "status").open("rb") as status:
            try:
                fcntl.flock(status, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(status, fcntl.LOCK_UN)
            return False
    except OSError:  # no status file: nobody ran ClickHouse there
        return False


def connect(dsn: str, *, database: str | None = None, readonly: bool = False, password: str | None = None,
            **options: Any) -> Client:
    """A client for `dsn`; `readonly` makes the server refuse anything but reads (setting readonly=1)."""
    settings = {"readonly": 1} if readonly else {}
    options.setdefault("tz_mode", "aware")  # never hand out naive datetimes: every column of ours is UTC
    if dsn.startswith("chdb://"):
        path = private_dir(chdb_path(dsn))
        with _chdb_lock:  # first open initialises the process-wide engine
            try:
                client = clickhouse_connect.get_client(dsn=f"chdb://{path}", **options)
            except Exception as exc:
                if _held_elsewhere(path) or "Cannot lock file" in str(exc):
                    raise ClickHouseUnavailable(
                        f"the embedded ClickHouse at {path} is held by another process "
                        "(a running `ocpi-pipeline dev` or `demo`, or a worker); use that instance's ClickHouse shim, "
                        "which `query` and `partners` find by themselves through the run file"
                    ) from exc
                raise ClickHouseUnavailable(f"cannot open the embedded ClickHouse at {path}: {exc}") from exc
        if database:
            client.database = database
        try:
            # chDB selects the database with the client's first statement: asked now, a database that does not
            # exist is a clear error here rather than a DatabaseError from whatever the caller runs first.
            client.command("SET readonly = 1" if readonly else "SELECT 1")  # readonly: for this connection only
        except Exception as exc:
            if database and _unknown_database(exc):
                raise ClickHouseUnavailable(_not_migrated(database, str(path))) from exc
            raise
        return client
    # No HTTP session: we use no temporary tables or session settings, and a session would forbid the
    # concurrent queries our agents and the registry make from their threads.
    options.setdefault("autogenerate_session_id", False)
    if urlparse(dsn).scheme in ("https", "clickhouses"):
        # clickhouse-connect takes no interface from the DSN's scheme: it chooses TLS by the port alone (443,
        # 8443), and spoke plain HTTP, the password in clear, to https://host:8123 or a port-less https://host.
        options.setdefault("interface", "https")
    try:
        if password:
            options["password"] = password
        return clickhouse_connect.get_client(dsn=dsn, database=database or None, settings=settings, **options)
    except Exception as exc:
        if database and _unknown_database(exc):
            raise ClickHouseUnavailable(_not_migrated(database, redact_dsn(dsn))) from exc
        raise ClickHouseUnavailable(f"cannot reach ClickHouse at {redact_dsn(dsn)}: {exc}") from exc


def _unknown_database(exc: BaseException) -> bool:
    return "UNKNOWN_DATABASE" in str(exc)


def _not_migrated(database: str, where: str) -> str:
    return (f"database {database} does not exist in the ClickHouse at {where}: run `ocpi-pipeline migrate` "
            "(or check OCPI_CLICKHOUSE_DATABASE)")


# INTO OUTFILE is carried out by chDB itself, in the process that runs the query, whatever `readonly` says (a server
# refuses it over HTTP). A keyword is never quoted or split by a comment, so the word anywhere (a literal too,
# rarely) counts.
_OUTFILE = re.compile(r"OUTFILE", re.IGNORECASE)


def names_outfile(sql: str) -> bool:
    """Whether `sql` may write a file through INTO OUTFILE: a read-only query may not."""
    return _OUTFILE.search(sql) is not None


def several_statements(client: Client, sql: str) -> bool:
    """Whether `sql` holds more than one statement, by ClickHouse's own parser (`formatQuery`): a `;` in a literal
    or a comment, or one at the end, starts none. A server refuses several statements in one request; chDB runs
    them all and hands back their rows as one result, the later statements' under the first one's columns."""
    try:
        client.query("SELECT formatQuery(%(sql)s)", parameters={"sql": sql})
    except Exception as exc:  # any other error (a syntax error, say) is the query's to report when it runs
        return "Multi-statements are not allowed" in str(exc)
    return False


def kills(client: Client, sql: str) -> bool:
    """Whether `sql` is a KILL (QUERY, MUTATION), by ClickHouse's own parser (comments, case and line breaks aside).
    `readonly=1` lets a connection kill the queries of its own user, and every connection to a `dev` shim is the one
    user `default`: a read-only KILL QUERY there cancels the worker's inserts and the receivers' reads."""
    try:
        normalised = client.query("SELECT formatQuery(%(sql)s)", parameters={"sql": sql}).result_rows[0][0]
    except Exception:  # a syntax error (or several statements) is the query's to report when it runs
        return False
    return re.match(r"KILL\b", str(normalised), re.IGNORECASE) is not None


def redact_dsn(dsn: str) -> str:
    """`dsn` with its password shown as ****."""
    parsed = urlparse(dsn)
    if parsed.password:
        return dsn.replace(f":{parsed.password}@", ":****@")
    return dsn


def effective_dsn(settings: Settings) -> tuple[str, str | None]:
    """The DSN this process should use, and the password to send.

    When the configured store is a chDB path held by a running `dev`/`demo`, that instance's shim is used.
    """
    dsn = settings.clickhouse_dsn
    if dsn.startswith("chdb://"):
        instance = read_running_instance(settings.storage.path)
        if instance is not None and instance.clickhouse_url:
            return instance.clickhouse_url, instance.admin_token
    return dsn, None


def connect_for(settings: Settings, *, readonly: bool = False, timeout_s: float | None = None) -> Client:
    """The client for the configured store, through a running instance's shim where one holds chDB. `timeout_s`, for
    a server or a shim, bounds the wait to connect and for each answer (the client library's default is 300 s); chDB
    runs in this process, with nothing to wait for."""
    dsn, password = effective_dsn(settings)
    timeouts = {} if timeout_s is None or dsn.startswith("chdb://") else {
        "connect_timeout": timeout_s, "send_receive_timeout": timeout_s}
    return connect(dsn, database=settings.clickhouse.database, readonly=readonly, password=password, **timeouts)


def select(client: Client, sql: str, parameters: dict[str, Any] | None = None,
           ) -> tuple[list[str], list[Sequence[Any]]]:
    """(column names, rows) of a query, the names even when it returns no row.

    ClickHouse sends an empty result without its header (HTTP in the Native format, as from a server or the
    shim, and chDB), so clickhouse-connect has no column names for it; they come from `DESCRIBE` of the query
    then. A statement DESCRIBE does not take (SHOW, a FORMAT clause) keeps none. The query goes into DESCRIBE with
    its own last line ended: a `-- comment` there would otherwise comment out the closing parenthesis. A statement
    without a result set (USE) has neither columns nor rows."""
    result = client.query(sql, parameters=parameters)
    columns, rows = list(result.column_names), list(result.result_rows)
    if not columns and not rows:
        with contextlib.suppress(Exception):  # only the header is at stake: the query itself has run
            described = client.query(f"DESCRIBE TABLE ({sql.strip().rstrip(';')}\n)", parameters=parameters)
            columns = [str(row[0]) for row in described.result_rows]
    if not columns:
        # No result set (USE, a SYSTEM statement): over HTTP clickhouse-connect reads the empty answer as one row of
        # one empty string, without a column. Rows have columns, so there is no row.
        rows = []
    return columns, rows


# Stored before the insert returns, even where a server's profile makes inserts asynchronous: for a row that the
# caller acts on at once (answers a partner with it) or that another process reads back next.
SYNCHRONOUS_INSERT: Final = {"async_insert": 0}


def insert_first(client: Client, into: str, values: str, *, token: str, in_force: str,
                 parameters: dict[str, Any] | None = None) -> Any:
    """First insert wins, across processes: insert one row (`into`: `table (columns)`; `values`: their SQL, with
    `parameters`) with `token` as its deduplication token, then read back the value in force (`in_force`: a SELECT
    of one column, ordered so that the first row comes first); None if there is none.

    Processes racing for one thing all insert with the same token: ClickHouse keeps the first insert that lands and
    drops the others as repeats (the table keeps a deduplication window: migrations 0023, 0025), and each reads
    back which one won. Comparing timestamps instead would let two win: one's earlier-stamped row can land after
    the other has read its own back alone. The insert is synchronous even where a server's profile makes inserts
    asynchronous: a row still buffered when its inserter reads back would let a later one win too."""
    client.command(f"INSERT INTO {into} SETTINGS insert_deduplication_token = %(insert_token)s VALUES ({values})",
                   parameters={**(parameters or {}), "insert_token": token}, settings=SYNCHRONOUS_INSERT)
    rows = client.query(in_force, parameters=parameters).result_rows
    return rows[0][0] if rows else None
