"""`ocpi-pipeline serve`: the receivers' topics exist before the first push, and what cannot work is refused at
start with a message, not a receiver that never answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import granian.server
import pytest
from click.testing import CliRunner

import infra.kafka.admin
import pipeline.cli.services
from infra.kafka.embedded import free_port
from pipeline.cli import cli

SERVER = "http://default:pw@clickhouse:8123"


class NoServer:
    """granian's Server, serving nothing; counts the servers started."""

    started = 0

    def __init__(self, *_args: Any, **_options: Any) -> None:
        pass

    def serve(self) -> None:
        NoServer.started += 1


def serve(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, ensure: Any, *, kafka_answers: bool = True,
          clickhouse_answers: bool = True, args: tuple[str, ...] = (), **env: str) -> Any:
    NoServer.started = 0
    monkeypatch.setattr(granian.server, "Server", NoServer)
    monkeypatch.setattr(infra.kafka.admin, "ensure_topics", ensure)
    monkeypatch.setattr(pipeline.cli.services, "reachable", lambda _bootstrap: kafka_answers)
    if clickhouse_answers:
        monkeypatch.setattr(pipeline.cli.services, "connect_for", lambda _settings: NoClient())
    env = {"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_CLICKHOUSE_DSN": SERVER, "OCPI_DATA_DIR": str(tmp_path),
           "OCPI_HTTP_PORT": str(free_port()), "OCPI_TOPIC_PARTITIONS": "6", **env}
    return CliRunner().invoke(cli, ["serve", *args], env=env)


class NoClient:
    """A ClickHouse client that answered: `serve` only checks that the store is there."""

    def close(self) -> None:
        pass


def no_ensure(*_args: Any, **_options: Any) -> list[str]:
    raise AssertionError("no topic should be created")


def test_serve_creates_the_topics_the_receivers_write(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A Kafka that creates topics on first use (Apache Kafka's default) would create a module topic on the first
    push, with its own defaults (1 partition, 1 replica, 1 MB records), when no worker has run yet; the worker
    leaves an existing topic's partitions and replicas as they are."""
    calls: list[Any] = []

    def ensure(bootstrap: str, topics: Any, partitions: int, configs: Any = None, *, replicas: int = 0) -> list[str]:
        calls.append((bootstrap, tuple(topics), partitions, dict(configs or {}), replicas))
        return []

    result = serve(monkeypatch, tmp_path, ensure)
    assert result.exit_code == 0, result.output
    [(bootstrap, topics, partitions, configs, replicas)] = calls
    assert bootstrap == "kafka:9092"
    assert topics == ("ocpi.locations.v1", "ocpi.sessions.v1", "ocpi.cdrs.v1", "ocpi.rejections.v1")
    assert partitions == 6
    assert replicas == 0  # the cluster's brokers decide, as for the worker's topics
    assert all(configs[t]["max.message.bytes"] == str(infra.kafka.admin.RECORD_MAX_BYTES) for t in topics)
    assert NoServer.started == 1


def test_serve_starts_at_once_while_kafka_is_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Pushes answer 3000 until Kafka is back; the worker creates the topics then. The admin client is not asked
    (it would wait its bootstrap timeout, about 30 s, before the receivers listen)."""
    result = serve(monkeypatch, tmp_path, no_ensure, kafka_answers=False)
    assert result.exit_code == 0, result.output
    assert "topics not created (Kafka at kafka:9092 does not answer)" in result.output
    assert NoServer.started == 1


def test_serve_starts_when_kafka_refuses_the_topics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def ensure(*_args: Any, **_options: Any) -> list[str]:
        raise OSError("NoBrokersAvailable")

    result = serve(monkeypatch, tmp_path, ensure)
    assert result.exit_code == 0, result.output
    assert "topics not created (OSError: NoBrokersAvailable)" in result.output
    assert NoServer.started == 1


def test_serve_refuses_the_embedded_clickhouse_without_a_running_instance(monkeypatch: pytest.MonkeyPatch,
                                                                          tmp_path: Path) -> None:
    """The receivers read the partner registry. On a chDB directory of their own, granian's worker hung for good
    in its first query (never listening, and deaf to SIGTERM), and a worker could not open the directory next to
    them: one process only may hold it."""
    result = serve(monkeypatch, tmp_path, no_ensure, OCPI_CLICKHOUSE_DSN=f"chdb://{tmp_path / 'ch'}")
    assert result.exit_code == 1
    assert "serve needs a ClickHouse server" in result.output and str(tmp_path / "ch") in result.output
    assert NoServer.started == 0


def test_serve_refuses_without_kafka(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No bootstrap and no running `dev` to borrow one from: every push would answer 3000 for ever."""
    result = serve(monkeypatch, tmp_path, no_ensure, OCPI_KAFKA_BOOTSTRAP="")
    assert result.exit_code == 1
    assert "OCPI_KAFKA_BOOTSTRAP is empty" in result.output
    assert NoServer.started == 0


@pytest.mark.parametrize("host", ["no-such-host.invalid", "192.0.2.1"])  # no name; an address of no interface here
def test_serve_names_a_host_it_cannot_listen_on(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, host: str) -> None:
    """A listen address that is not this machine's was reported as a port in use, telling to set OCPI_HTTP_PORT."""
    result = serve(monkeypatch, tmp_path, no_ensure, OCPI_HTTP_HOST=host)
    assert result.exit_code == 1 and NoServer.started == 0, result.output
    assert f"OCPI_HTTP_HOST={host!r}" in result.output and "in use" not in result.output, result.output


def test_serve_with_clickhouse_down_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The receivers read the partner registry at start. With the ClickHouse server down (or the database not
    migrated), serve started granian, whose worker then ended in a ClickHouseUnavailable traceback and took the
    server down with it: the store is checked before the server starts."""
    dsn = f"http://default:pw@127.0.0.1:{free_port()}"  # nothing listens there
    result = serve(monkeypatch, tmp_path, lambda *_a, **_o: [], clickhouse_answers=False, OCPI_CLICKHOUSE_DSN=dsn)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # a ClickException, not a traceback
    error = result.output.strip().splitlines()[-1]
    assert error.startswith("Error: cannot reach ClickHouse at http://default:****@127.0.0.1:"), result.output
    assert NoServer.started == 0


@pytest.mark.parametrize("workers", ["0", "-2"])
def test_serve_refuses_fewer_than_one_worker(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, workers: str) -> None:
    """granian takes max(1, workers): `serve --workers 0` (or -2) started one receiver process without a word."""
    result = serve(monkeypatch, tmp_path, no_ensure, kafka_answers=False, args=("--workers", workers))
    assert result.exit_code == 2 and NoServer.started == 0, result.output
    assert "--workers" in result.output, result.output
