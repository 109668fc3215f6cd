"""The state changelogs' partitions follow their source topics' (docs/operations.md, "Partitions and scaling out").

A table's state for a record lives in the changelog partition of the record's partition (`agents.StateTable`
writes it there directly), so a changelog must have exactly its source topic's partition count: fewer, and the
state of the source's higher partitions is written to partitions that do not exist (the batch fails on every
restart); another count at all, and Faust assigns the source and its changelog separately, so with several
workers one reads and writes the state of a partition whose changelog another recovers.
"""

from __future__ import annotations

from typing import Any

import pytest

from infra.kafka import admin
from infra.settings import Settings, load_settings
from pipeline import worker
from pipeline.app import TABLES


class FakeCluster:
    """The calls of kafka-python's KafkaAdminClient that `prepare_topics` makes, on topics of given partitions."""

    topics: dict[str, int] = {}
    ends: dict[str, int] = {}  # a topic's records (end offset of its partition 0); absent: 1, it holds some

    def __init__(self, **_options: Any) -> None:
        pass

    def end_offsets(self, partitions: list[Any]) -> dict[Any, int]:
        return {tp: self.ends.get(tp.topic, 1) if tp.partition == 0 else 0 for tp in partitions}

    def delete_topics(self, topics: list[str]) -> None:
        for topic in topics:
            del self.topics[topic]

    def list_topics(self) -> list[str]:
        return list(self.topics)

    def describe_topics(self, topics: list[str] | None = None) -> list[dict[str, Any]]:
        return [{"name": name, "error_code": 0, "partitions": [{"partition_index": p} for p in range(count)]}
                for name, count in self.topics.items() if topics is None or name in topics]

    def describe_cluster(self) -> dict[str, Any]:
        return {"brokers": [{"broker_id": 1}]}

    def create_topics(self, topics: list[Any]) -> None:
        for topic in topics:
            self.topics[topic.name] = topic.num_partitions

    def close(self) -> None:
        pass


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> type[FakeCluster]:
    monkeypatch.setattr(admin, "KafkaAdminClient", FakeCluster)
    monkeypatch.setattr(admin, "KafkaConsumer", FakeCluster)
    monkeypatch.setattr(worker, "set_topic_configs", lambda *_args: admin.ConfigsSet([], []))
    FakeCluster.topics = {}
    FakeCluster.ends = {}
    return FakeCluster


def settings(partitions: int = 4) -> Settings:
    return load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_TOPIC_PARTITIONS": str(partitions)})


def changelog(table: str) -> str:
    return worker.changelog_topic(settings().pipeline.app_id, table)


def test_changelogs_are_created_with_their_source_topics_partitions(cluster: type[FakeCluster]) -> None:
    """The receivers (`serve`) created the module topics with OCPI_TOPIC_PARTITIONS=8; a worker started without
    it (4) created the module tables' changelogs with 4: the state of partitions 4-7 had nowhere to go."""
    kafka = settings().kafka
    cluster.topics = {kafka.topic_locations: 8, kafka.topic_sessions: 8, kafka.topic_cdrs: 8,
                      kafka.topic_rejections: 8}
    worker.prepare_topics(settings(4), "kafka:9092")
    assert {table: cluster.topics[changelog(table)] for table in TABLES} == {
        "location-state": 8, "session-state": 8, "cdr-state": 8,
        "party-state": cluster.topics[settings().pipeline.topic_party_facts]}
    assert cluster.topics[settings().pipeline.topic_party_facts] == 4  # created by the worker, as configured


@pytest.mark.parametrize("grown", ["locations", "party_facts"])
def test_a_source_topic_whose_partitions_differ_from_its_changelogs_stops_the_worker(
        cluster: type[FakeCluster], grown: str) -> None:
    """An operator added partitions to a live topic (Kafka allows it): its records' keys now go to other
    partitions than their state, and the higher partitions have no changelog partition. The worker refuses to
    start, naming the topics and what to do, instead of failing every batch there (or, with several workers,
    running on state recovered by another)."""
    config = settings(4)
    worker.prepare_topics(config, "kafka:9092")  # a first start: everything with 4 partitions
    source = config.kafka.topic_locations if grown == "locations" else config.pipeline.topic_party_facts
    cluster.topics[source] = 8
    with pytest.raises(worker.PartitionMismatch) as refused:
        worker.prepare_topics(config, "kafka:9092")
    message = str(refused.value)
    table = "location-state" if grown == "locations" else "party-state"
    assert f"{source} has 8 partitions" in message and f"{changelog(table)} has 4" in message
    assert "README" in message


def test_empty_changelogs_of_another_partition_count_are_created_again(cluster: type[FakeCluster]) -> None:
    """Tansu, restarted empty under a running worker, created the changelogs that worker asked about with its own
    partition count (4), empty; the module topics were created again with 2. They hold no state: the next start
    creates them again with their sources' count instead of refusing to start at every start."""
    config = settings(2)
    for topic in (config.kafka.topic_locations, config.kafka.topic_sessions, config.kafka.topic_cdrs):
        cluster.topics[topic] = 2
    for table in TABLES:
        cluster.topics[changelog(table)] = 4
        cluster.ends[changelog(table)] = 0
    worker.prepare_topics(config, "kafka:9092")
    assert {table: cluster.topics[changelog(table)] for table in TABLES} == dict.fromkeys(TABLES, 2)


def test_a_changelog_that_holds_records_is_never_deleted(cluster: type[FakeCluster]) -> None:
    config = settings(4)
    worker.prepare_topics(config, "kafka:9092")
    cluster.topics[config.kafka.topic_locations] = 8
    cluster.ends = {changelog(table): 0 for table in TABLES if table != "location-state"}
    with pytest.raises(worker.PartitionMismatch):
        worker.prepare_topics(config, "kafka:9092")
    assert cluster.topics[changelog("location-state")] == 4


def test_a_worker_keeps_its_local_state_only_over_changelogs_that_hold_records(
        cluster: type[FakeCluster], tmp_path: Any) -> None:
    """Local state over changelogs that exist but never held a record (a broker that restarted empty and created
    them on first use) is ahead of them: dropped, as with no changelog at all."""
    config = load_settings({"OCPI_KAFKA_BOOTSTRAP": "kafka:9092", "OCPI_DATA_DIR": str(tmp_path)})
    app_id = config.pipeline.app_id
    local = worker.state_dir(config, app_id)
    local.mkdir(parents=True)
    for table in TABLES:
        cluster.topics[worker.changelog_topic(app_id, table)] = 2
        cluster.ends[worker.changelog_topic(app_id, table)] = 0
    assert worker.drop_state_without_changelog(config, "kafka:9092", app_id)
    assert not local.exists()
    local.mkdir(parents=True)
    cluster.ends[worker.changelog_topic(app_id, "cdr-state")] = 3
    assert not worker.drop_state_without_changelog(config, "kafka:9092", app_id)
    assert local.exists()
