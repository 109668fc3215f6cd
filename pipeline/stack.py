"""The embedded stack behind `dev` and `demo`: broker, ClickHouse, worker and receivers, started and stopped together.

This process holds the embedded engines: the Tansu broker (a child process) and the chDB path, which it serves
to the other processes through the ClickHouse-HTTP shim. The worker and the receivers (granian) are child
processes configured by environment variables, exactly as they would be in production.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import chdb_path, connect
from infra.clickhouse.migrations import migrate
from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
from infra.kafka.admin import ensure_topics
from infra.kafka.embedded import EmbeddedBroker, free_port
from infra.process import spawn, terminate
from infra.runfile import (
    RunningInstance,
    process_start,
    read_running_instance,
    remove_running_instance,
    write_running_instance,
)
from infra.settings import Settings, as_environ, local_url, private_dir
from pipeline.retention import topic_configs

log = logging.getLogger(__name__)

VERSIONS_PATH = "/ocpi/versions"


class StackError(RuntimeError):
    """A part of the stack did not start; the message says which, and where its log is."""


def check_port_free(host: str, port: int) -> None:
    """Refuse a port another server listens on. granian binds with SO_REUSEPORT, so its own start does not fail
    next to another granian (a second `dev`): the kernel would split the connections between the two."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free
            sock.bind((host, port))
    except OSError as exc:
        # A name that does not resolve, or an address of no interface here: the host is wrong, not the port.
        if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL:
            raise StackError(f"OCPI_HTTP_HOST={host!r}: cannot listen there ({exc.strerror or exc}); give an "
                             "address of this machine (127.0.0.1, 0.0.0.0, ::)") from None
        if exc.errno != errno.EADDRINUSE:
            raise StackError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); check OCPI_HTTP_HOST and "
                             "OCPI_HTTP_PORT") from None
        raise StackError(f"{host}:{port} is in use ({exc.strerror or exc}): another `dev` or `serve`, or another "
                         "server; stop it, or set OCPI_HTTP_PORT") from None


@dataclass
class Stack:
    settings: Settings
    run_worker: bool = True
    run_receivers: bool = True
    broker: EmbeddedBroker | None = None
    shim: ClickHouseShim | None = None
    clickhouse: Client | None = None
    bootstrap: str = ""
    clickhouse_url: str = ""
    http_port: int = 0
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    wrote_runfile: bool = False
    receivers_ready: bool = False  # they have answered HTTP: a stop lets them finish the pushes in flight

    @property
    def data_dir(self) -> Path:
        return self.settings.storage.path

    @property
    def log_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def base_url(self) -> str:
        return self.settings.http.public_url or local_url(self.settings.http.host, self.http_port)

    @property
    def versions_url(self) -> str:
        return f"{self.base_url}{VERSIONS_PATH}"

    @property
    def admin_token(self) -> str:
        return self.settings.admin.token

    async def start(self) -> Stack:
        try:
            await self._start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def _start(self) -> None:
        other = read_running_instance(self.data_dir)
        if other is not None and other.pid != os.getpid():
            raise StackError(f"another instance (pid {other.pid}) is running on {self.data_dir}; "
                             "stop it, or give this one its own OCPI_DATA_DIR")
        if self.settings.http.port:
            check_port_free(self.settings.http.host, self.settings.http.port)
        private_dir(self.data_dir)
        kafka = self.settings.kafka
        if kafka.embedded:
            self.broker = await asyncio.to_thread(
                EmbeddedBroker(log_path=self.log_dir / "tansu.log").start)
            self.bootstrap = self.broker.bootstrap
        else:
            self.bootstrap = kafka.bootstrap
        # Created with the policy's retention (the worker sets it again on topics that exist).
        await asyncio.to_thread(ensure_topics, self.bootstrap, (*kafka.module_topics, kafka.topic_rejections),
                                kafka.partitions, topic_configs(self.settings), replicas=kafka.replication_factor)

        database = self.settings.clickhouse.database
        dsn = self.settings.clickhouse_dsn
        self.clickhouse = await asyncio.to_thread(connect, dsn)
        await asyncio.to_thread(migrate, self.clickhouse, database)
        self.clickhouse.database = database
        if dsn.startswith("chdb://"):
            self.shim = await ClickHouseShim(ChdbEngine(chdb_path(dsn)), self.admin_token).start()
            self.clickhouse_url = self.shim.dsn
        else:
            self.clickhouse_url = dsn

        self.http_port = self.settings.http.port or free_port()
        write_running_instance(self.data_dir, RunningInstance(
            pid=os.getpid(), versions_url=self.versions_url, admin_url=self.base_url,
            clickhouse_url=self.clickhouse_url if self.shim else "", admin_token=self.admin_token,
            kafka_bootstrap=self.bootstrap,
            kafka_embedded=self.broker is not None, started=process_start(os.getpid())))
        self.wrote_runfile = True
        env = self.child_environment()
        if self.run_worker:
            self.children["worker"] = spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"],
                                            env=env, log_path=self.log_dir / "worker.log")
        if self.run_receivers:
            self.children["receivers"] = spawn(
                [sys.executable, "-m", "granian", "--interface", "asgi", "--host", self.settings.http.host,
                 "--port", str(self.http_port), "--workers", "1", "--no-ws", "--log-level", "warning",
                 "receivers.asgi:app"], env=env, log_path=self.log_dir / "receivers.log")
            await self._wait_http_ready(timeout=30)

    def child_environment(self) -> dict[str, str]:
        """The worker's and receivers' environment: our settings, pointed at the engines this process holds."""
        env = dict(os.environ)
        env.update(as_environ(self.settings))
        env["OCPI_KAFKA_BOOTSTRAP"] = self.bootstrap
        if self.broker is not None:
            env["OCPI_KAFKA_FLAVOR"] = "tansu"
        env["OCPI_CLICKHOUSE_DSN"] = self.clickhouse_url
        env["OCPI_HTTP_PORT"] = str(self.http_port)
        env["OCPI_PUBLIC_URL"] = self.base_url
        return env

    async def _wait_http_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while time.monotonic() < deadline:
                self.check_children()
                try:
                    await client.get(local_url(self.settings.http.host, self.http_port) + VERSIONS_PATH)
                    self.receivers_ready = True
                    return  # any answer (401 without a token) means the app is serving
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
        raise StackError(f"the receivers did not answer within {timeout}s; see {self.log_dir / 'receivers.log'}")

    def check_children(self) -> None:
        for name, process in self.children.items():
            if process.poll() is not None:
                raise StackError(f"the {name} exited with code {process.returncode}; "
                                 f"see {self.log_dir / (name + '.log')}")
        # The embedded broker too: nobody starts it again, and without it every push is answered 3000.
        broker = self.broker.process if self.broker is not None else None
        if broker is not None and broker.poll() is not None:
            raise StackError(f"the embedded Kafka broker exited with code {broker.returncode}; "
                             f"see {self.log_dir / 'tansu.log'}")

    async def stop(self) -> None:
        """Stop children first (they use the engines), then the shim, chDB and the broker; by PID."""
        for name in ("receivers", "worker"):
            process = self.children.pop(name, None)
            if process is not None:
                # granian loses a SIGTERM that comes while it spawns its worker, and then waits for that worker
                # forever; receivers that never answered have no push in flight, so they get no 20 s grace.
                grace = 20.0 if name == "worker" or self.receivers_ready else 2.0
                await asyncio.to_thread(terminate, process, grace)
        if self.shim is not None:
            await self.shim.stop()
            self.shim = None
        if self.clickhouse is not None:
            self.clickhouse.close()
            self.clickhouse = None
        if self.broker is not None:
            await asyncio.to_thread(self.broker.stop)
            self.broker = None
        if self.wrote_runfile:  # never the run file of another instance (a second `dev` that did not start)
            remove_running_instance(self.data_dir)
            self.wrote_runfile = False
