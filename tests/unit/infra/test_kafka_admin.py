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


@pytest.mark.parametrize(("replicas", "min_insync"), [(1, None), (2, None), (3, "2"), (5, "2")])
def test_topics_of_three_replicas_or_more_acknowledge_only_what_two_hold(cluster: type[FakeAdmin], replicas: int,
                                                                         min_insync: str | None) -> None:
    # acks=all waits for the in-sync replicas only, and Kafka's default min.insync.replicas is 1: a replica that
    # fell behind leaves the leader alone in sync, acknowledging pushes one disk holds. With three replicas, two must
    # hold a record before it is acknowledged (one broker may still be down); with fewer, that would stop every
    # write while one is down, so the broker's own setting stands. A config given for the topic wins.
    admin.ensure_topics("kafka:9092", ["new", "given"], 4, {"new": {"retention.ms": "1"},
                                                             "given": {"min.insync.replicas": "3"}}, replicas=replicas)
    configs = {t.name: t.topic_configs for t in cluster.created}
    assert configs["new"].get("min.insync.replicas") == min_insync and configs["new"]["retention.ms"] == "1"
    assert configs["given"]["min.insync.replicas"] == "3"


def test_replication_factor_setting() -> None:
    assert load_settings({}).kafka.replication_factor == 0  # the cluster decides
    assert load_settings({"OCPI_KAFKA_REPLICATION_FACTOR": "3"}).kafka.replication_factor == 3
    with pytest.raises(SettingsError, match="OCPI_KAFKA_REPLICATION_FACTOR"):
        load_settings({"OCPI_KAFKA_REPLICATION_FACTOR": "-1"})


class ConfigAdmin(FakeAdmin):
    """A cluster whose topic `t` has Kafka's default retention, and that answers an alteration with `answer`
    (kafka-python's `alter_configs` reports each resource's error as text instead of raising it)."""

    answer = "OK"
    altered: list[Any] = []

    def list_topics(self) -> list[str]:
        return ["t"]

    def describe_configs(self, resources: list[Any], config_filter: Any = None) -> dict[str, Any]:
        return {"topic": {r.name: {"retention.ms": {"value": "604800000"}} for r in resources}}

    def alter_configs(self, resources: list[Any], raise_on_unknown: bool = True) -> dict[str, Any]:
        ConfigAdmin.altered.extend(resources)
        return {"topic": {r.name: self.answer for r in resources}}


def test_topic_configs_are_set_where_they_differ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin, "KafkaAdminClient", ConfigAdmin)
    monkeypatch.setattr(ConfigAdmin, "altered", [])
    assert admin.set_topic_configs("kafka:9092", {"t": {"retention.ms": "604800000"}, "missing": {"a": "1"}}
                                   ) == ([], ["missing"])
    assert admin.set_topic_configs("kafka:9092", {"t": {"retention.ms": "2592000000"}}) == (["t"], [])
    assert [(r.name, r.configs) for r in ConfigAdmin.altered] == [("t", {"retention.ms": "2592000000"})]


def test_a_topic_config_the_broker_refuses_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """Apache Kafka refuses an alteration per topic (an alter-config policy, a missing ACL, a value out of range),
    in the response, not by raising: the worker said it had set the retention and the record size it had not."""
    monkeypatch.setattr(admin, "KafkaAdminClient", ConfigAdmin)
    monkeypatch.setattr(ConfigAdmin, "answer", "PolicyViolationError: max.message.bytes above 8388608")
    with pytest.raises(admin.TopicConfigError, match=r"t: PolicyViolationError: max\.message\.bytes above"):
        admin.set_topic_configs("kafka:9092", {"t": {"retention.ms": "2592000000"}})
