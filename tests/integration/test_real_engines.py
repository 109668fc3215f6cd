"""The same code against Apache Kafka and a ClickHouse server (testcontainers), where a Docker engine answers.

Skipped cleanly on machines without Docker (such as CI here); the embedded-engine tests prove the features.
"""

from __future__ import annotations

import pytest

from infra.clickhouse.client import connect
from infra.clickhouse.migrations import migrate
from infra.kafka.admin import ensure_topics


def _docker_available() -> bool:
    try:
        import docker

        docker.from_env(timeout=2).ping()
        return True
    except Exception:
        return False


pytestmark = [pytest.mark.docker, pytest.mark.integration,
              pytest.mark.skipif(not _docker_available(), reason="no Docker engine answers on this machine")]


def test_migrations_run_unchanged_on_a_clickhouse_server() -> None:
    from testcontainers.clickhouse import ClickHouseContainer

    with ClickHouseContainer("clickhouse/clickhouse-server:25.8") as server:
        host, port = server.get_container_host_ip(), server.get_exposed_port(8123)
        client = connect(f"http://{server.username}:{server.password}@{host}:{port}")
        assert migrate(client, "ocpi")
        assert migrate(client, "ocpi") == []


def test_topics_are_created_on_apache_kafka() -> None:
    from testcontainers.kafka import KafkaContainer

    with KafkaContainer() as kafka:
        bootstrap = kafka.get_bootstrap_server()
        assert ensure_topics(bootstrap, ["ocpi.sessions.v1"], 4) == ["ocpi.sessions.v1"]
