"""A small ClickHouse-HTTP endpoint over the chDB engine this process holds.

chDB has no server mode and lets only one process open a path, so the process that holds it (`dev`, `demo`)
serves enough of ClickHouse's HTTP interface for clickhouse-connect's ordinary HTTP client: the worker, the
receivers, `query` and `partners` then use the same code they use against a ClickHouse server.

Protected by the admin token (HTTP Basic password or X-ClickHouse-Key). A request with the setting
`readonly=1` runs on a connection that is itself read-only, so `query` cannot write; it may not name INTO OUTFILE
either, which chDB carries out in this process whatever `readonly` says.
Based on the shim measured in ../shared/research/infra-feasibility.md (appendix B).
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hmac
import json
import os
import re
import tempfile
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

import chdb
from aiohttp import web

from infra.clickhouse.client import names_outfile
from infra.process import process_alive

# Not `format ASC`/`format DESC`: the end of `ORDER BY format DESC` (a column named format, as `connectors.format`).
_FORMAT_AT_END = re.compile(r"\bFORMAT\s+(?!(?:ASC|DESC|ASCENDING|DESCENDING)\b)([A-Za-z0-9_]+)\s*;?\s*$",
                            re.IGNORECASE)
_INSERT = re.compile(r"^\s*INSERT\s+INTO\b", re.IGNORECASE)
# A data insert's head, as clickhouse-connect puts it before the data: its first line, ending in the FORMAT clause. A
# `FORMAT <word>` elsewhere (a string literal of an INSERT ... VALUES) is no head: that statement is run as it is.
_INSERT_HEAD = re.compile(rb"\s*(INSERT\s+INTO\b[^\n]*\bFORMAT\s+[A-Za-z0-9_]+)[ \t]*(?:\r?\n|\Z)", re.IGNORECASE)
# Settings clickhouse-connect sends that the shim handles itself or that do not apply to chDB.
_CLIENT_PARAMS = {"query", "database", "default_format", "readonly", "session_id", "session_timeout",
                  "wait_end_of_query", "send_progress_in_http_headers", "http_headers_progress_interval_ms",
                  "enable_http_compression", "query_id", "compress", "decompress", "user", "password"}


class ChdbEngine:
    """Thread-local chDB connections to one path; read-only ones are kept apart."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        # chDB reads an insert's rows from a file (INFILE). They hold personal data in clear, so the file lives with
        # the store (a private directory), not in the system's temp directory; one a process killed mid-insert
        # left is removed by the next engine on the path.
        self.inserts = path / "shim-inserts"
        self.inserts.mkdir(mode=0o700, parents=True, exist_ok=True)
        for left in self.inserts.iterdir():
            owner = left.name.partition("-")[0]
            if not (owner.isdigit() and process_alive(int(owner))):
                left.unlink(missing_ok=True)

    def connection(self, readonly: bool) -> Any:
        attr = "ro" if readonly else "rw"
        conn = getattr(self._local, attr, None)
        if conn is None:
            conn = chdb.connect(str(self.path))
            if readonly:
                conn.query("SET readonly = 1")
            setattr(self._local, attr, conn)
        return conn

    def run(self, sql: str, body: bytes, params: dict[str, str]) -> tuple[bytes, str]:
        readonly = _readonly(params)
        if readonly and names_outfile(sql):
            raise PermissionError("Code: 164. DB::Exception: INTO OUTFILE writes a file: not allowed in readonly mode. "
                                  "(READONLY)")
        conn = self.connection(readonly)
        match = _FORMAT_AT_END.search(sql)
        fmt = match.group(1) if match else params.get("default_format", "TabSeparated")
        database = params.get("database")
        if database:
            conn.query(f"USE `{database}`")
        # Query parameters (`{id:String}`) arrive as `param_id`, as ClickHouse's HTTP interface takes them, and go to
        # chDB as parameters: they are not settings, and read-only connections need them too.
        bound = {k.removeprefix("param_"): v for k, v in params.items() if k.startswith("param_")}
        # A read-only connection may not change settings at all, so the client's are dropped there.
        settings = [] if readonly else [f"{k} = {_quote(v)}" for k, v in params.items()
                                        if k not in _CLIENT_PARAMS and not k.startswith("param_")]
        if _INSERT.match(sql) and body:
            with tempfile.NamedTemporaryFile(dir=self.inserts, prefix=f"{os.getpid()}-", suffix=".bin",
                                             delete=False) as fh:
                fh.write(body)
                name = fh.name
            try:
                infile = f"FROM INFILE '{name}' FORMAT {fmt}"
                stmt = _FORMAT_AT_END.sub(infile, sql) if match else f"{sql} {infile}"
                conn.query(stmt, "TabSeparated")
                return b"", fmt
            finally:
                Path(name).unlink()
        stmt = _FORMAT_AT_END.sub("", sql) if match else sql
        if match and _FORMAT_AT_END.search(stmt):
            # Two FORMAT clauses (the query's and the one clickhouse-connect appends): chDB would answer in the
            # query's format, labelled with the other. A server refuses the query.
            raise ValueError("Code: 62. DB::Exception: Syntax error: a query has one FORMAT clause, this one has two: "
                             "leave the format to the client. (SYNTAX_ERROR)")
        if settings and re.match(r"^\s*(SELECT|WITH)\b", stmt, re.IGNORECASE) and " SETTINGS " not in stmt.upper():
            stmt = f"{stmt.rstrip().rstrip(';')} SETTINGS {', '.join(settings)}"
        result = conn.query(stmt, fmt, params=bound or None)
        return result.bytes(), fmt


def _readonly(params: dict[str, str]) -> bool:
    return params.get("readonly", "0") not in ("0", "")


def _decompress(body: bytes, encoding: str) -> bytes:
    """Undo the client's request compression (clickhouse-connect compresses inserts with lz4 by default).

    clickhouse-connect compresses each block of an insert (1-2 MB of data) as a frame of its own (a gzip stream
    once): every frame is decompressed, not the first alone. aiohttp's own decoding is off (`start`): it knows no
    lz4, and decoded gzip and zstd before this ran again on the result."""
    encoding = encoding.strip().lower()
    if not body or encoding in ("", "identity"):
        return body
    if encoding == "lz4":
        import lz4.frame

        parts, rest = [], body
        while rest:
            decompressor = lz4.frame.LZ4FrameDecompressor()
            parts.append(decompressor.decompress(rest))
            if not decompressor.eof:
                raise ValueError("truncated lz4 frame")
            rest = decompressor.unused_data
        return b"".join(parts)
    if encoding == "zstd":
        from backports import zstd

        return bytes(zstd.decompress(body))  # every frame
    if encoding == "gzip":
        return gzip.decompress(body)  # every member
    if encoding == "deflate":
        return zlib.decompress(body)
    raise ValueError(f"unsupported Content-Encoding {encoding!r}")


def _quote(value: str) -> str:
    return value if re.fullmatch(r"-?\d+(\.\d+)?", value) else "'" + value.replace("'", "\\'") + "'"


def _authorized(request: web.Request, token: str) -> bool:
    presented = request.headers.get("X-ClickHouse-Key", "")
    auth = request.headers.get("Authorization", "")
    if auth.startswith("Basic "):
        try:
            presented = base64.b64decode(auth[6:]).decode().partition(":")[2]
        except (ValueError, UnicodeDecodeError):
            return False
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


def _error(status: int, code: str, message: str) -> web.Response:
    return web.Response(status=status, text=f"Code: {code}. DB::Exception: {message}\n",
                        headers={"X-ClickHouse-Exception-Code": code})


class ClickHouseShim:
    """Serve `engine` on host:port until `stop()`."""

    def __init__(self, engine: ChdbEngine, token: str, host: str = "127.0.0.1", port: int = 0) -> None:
        self.engine, self.token, self.host, self.port = engine, token, host, port
        self._runner: web.AppRunner | None = None
        self._pools: dict[bool, ThreadPoolExecutor] = {}

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def dsn(self) -> str:
        """The DSN a client of this shim connects with: the token percent-encoded as the password (clients decode
        it), so that a '/', '#', '?' or '%' in it does not end the host part or change the token."""
        return f"http://ocpi:{quote(self.token, safe='')}@{self.host}:{self.port}"

    async def _handle(self, request: web.Request) -> web.Response:
        if request.path == "/ping":
            return web.Response(text="Ok.\n")
        if not _authorized(request, self.token):
            return _error(401, "516", "Authentication failed: password is incorrect")
        params = dict(request.query)
        body = await request.read() if request.can_read_body else b""
        try:
            body = _decompress(body, request.headers.get("Content-Encoding", ""))
        except Exception as exc:
            return _error(400, "1000", f"cannot decompress the request body: {exc}")
        sql = params.pop("query", None)
        if sql is None:  # clickhouse-connect puts "INSERT ... FORMAT Native\n" at the head of an insert body
            head = _INSERT_HEAD.match(body)
            sql, body = (head.group(1).decode(), body[head.end():]) if head else (body.decode(), b"")
        elif body and not _INSERT.match(sql):
            sql, body = f"{sql} {body.decode()}", b""
        started = time.perf_counter()
        try:
            data, fmt = await asyncio.get_running_loop().run_in_executor(
                self._pools[_readonly(params)], self.engine.run, sql, body, params)
        except Exception as exc:
            message = str(exc)
            code = re.search(r"Code: (\d+)", message)
            return _error(500, code.group(1) if code else "1000", message)
        summary = {"read_rows": "0", "read_bytes": "0", "written_rows": "0", "written_bytes": "0",
                   "total_rows_to_read": "0", "result_rows": "0", "result_bytes": str(len(data)),
                   "elapsed_ns": str(int((time.perf_counter() - started) * 1e9))}
        return web.Response(body=data, headers={
            "X-ClickHouse-Format": fmt, "X-ClickHouse-Timezone": "UTC",
            "X-ClickHouse-Summary": json.dumps(summary), "Content-Type": "application/octet-stream"})

    async def start(self) -> ClickHouseShim:
        # Threads of our own (as many as the loop's default executor has, min(32, cores + 4)), read-only requests
        # (`query`, reports, the receivers' GET reads) apart from the others (the worker's inserts, the partner
        # registry): on the default executor, as many slow queries held every thread, and the writes waited for one
        # of them to end, however long.
        self._pools = {readonly: ThreadPoolExecutor(thread_name_prefix=f"shim-{name}")
                       for readonly, name in ((True, "ro"), (False, "rw"))}
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # The body is decompressed by `_decompress`, every frame of it (aiohttp would decode gzip and zstd too).
        self._runner = web.AppRunner(app, access_log=None, auto_decompress=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server
        if self.port == 0 and server is not None:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        for pool in self._pools.values():
            pool.shutdown(wait=False)
