"""Replicas of the topics we create: one per broker up to three, or what OCPI_KAFKA_REPLICATION_FACTOR says."""

from __future__ import annotations

from typing import Any

import pytest

from infra.kafka import admin
from infra.settings import SettingsError, load_settings


class FakeAdmin:
    """The calls of kafka-python's KafkaAdminClient that `infra.kafka.admin` makes, on a cluster of `brokers`."""

    brokers = 1
    created: list[Any] = []
    described = 0

    def __init__(self, **_options: Any) -> None:
        pass

    def list_topics(self) -> list[str]:
        return ["existing"]

    def describe_cluster(self) -> dict[str, Any]:
        FakeAdmin.described += 1
        return {"brokers": [{"broker_id": n} for n in range(self.brokers)]}

    def create_topics(self, topics: list[Any]) -> None:
        FakeAdmin.created.extend(topics)

    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[FakeAdmin]:
    monkeypatch.setattr(admin, "KafkaAdminClient", FakeAdmin)
    FakeAdmin.created, FakeAdmin.described = [], 0
    return FakeAdmin


@pytest.mark.parametrize(("brokers", "replicas"), [(1, 1), (2, 2), (3, 3), (6, 3)])
def test_topics_get_one_replica_per_broker_up_to_three(cluster: type[FakeAdmin], brokers: int,
                                                       replicas: int) -> None:
    cluster.brokers = brokers
    assert admin.ensure_topics("kafka:9092", ["existing", "new"], 4) == ["new"]
    assert [(t.name, t.num_partitions, t.replication_factor) for t in cluster.created] == [("new", 4, replicas)]
    assert admin.replication_factor("kafka:9092") == replicas


def test_a_configured_replication_factor_is_used_as_it_is(cluster: type[FakeAdmin]) -> None:
    cluster.brokers = 6
    admin.ensure_topics("kafka:9092", ["new"], 4, replicas=5)
    assert [t.replication_factor for t in cluster.created] == [5]
    assert admin.replication_factor("kafka:9092", 2) == 2
    assert cluster.described == 0  # the cluster is not asked


def test_replication_factor_setting() -> None:
    assert load_settings({}).kafka.replication_factor == 0  # the cluster decides
    assert load_settings({"OCPI_KAFKA_REPLICATION_FACTOR": "3"}).kafka.replication_factor == 3
    with pytest.raises(SettingsError, match="OCPI_KAFKA_REPLICATION_FACTOR"):
        load_settings({"OCPI_KAFKA_REPLICATION_FACTOR": "-1"})
