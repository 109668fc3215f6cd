"""`ocpi-pipeline serve` against a configured Kafka: the receivers' topics exist before the first push."""

from __future__ import annotations

from typing import Any

import granian.server
import pytest
from click.testing import CliRunner

import infra.kafka.admin
from infra.kafka.embedded import free_port
from pipeline.cli import cli


class NoServer:
    """granian's Server, serving nothing."""

    def __init__(self, *_args: Any, **_options: Any) -> None:
        pass

    def serve(self) -> None:
        pass


def serve(monkeypatch: pytest.MonkeyPatch, ensure: Any) -> Any:
    monkeypatch.setattr(granian.server, "Server", NoServer)
    monkeypatch.setattr(infra.kafka.admin, "ensure_topics", ensure)
    env = {"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_HTTP_PORT": str(free_port()), "OCPI_TOPIC_PARTITIONS": "6"}
    return CliRunner().invoke(cli, ["serve"], env=env)


def test_serve_creates_the_topics_the_receivers_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Kafka that creates topics on first use (Apache Kafka's default) would create a module topic on the first
    push, with its own defaults (1 partition, 1 replica, 1 MB records), when no worker has run yet; the worker
    leaves an existing topic's partitions and replicas as they are."""
    calls: list[Any] = []

    def ensure(bootstrap: str, topics: Any, partitions: int, configs: Any = None, *, replicas: int = 0) -> list[str]:
        calls.append((bootstrap, tuple(topics), partitions, dict(configs or {}), replicas))
        return []

    result = serve(monkeypatch, ensure)
    assert result.exit_code == 0, result.output
    [(bootstrap, topics, partitions, configs, replicas)] = calls
    assert bootstrap == "kafka:9092"
    assert topics == ("ocpi.locations.v1", "ocpi.sessions.v1", "ocpi.cdrs.v1", "ocpi.rejections.v1")
    assert partitions == 6
    assert replicas == 0  # the cluster's brokers decide, as for the worker's topics
    assert all(configs[t]["max.message.bytes"] == str(infra.kafka.admin.RECORD_MAX_BYTES) for t in topics)


def test_serve_starts_while_kafka_is_down(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pushes answer 3000 until Kafka is back; the worker creates the topics then."""

    def ensure(*_args: Any, **_options: Any) -> list[str]:
        raise OSError("NoBrokersAvailable")

    result = serve(monkeypatch, ensure)
    assert result.exit_code == 0, result.output
    assert "topics not created" in result.output
