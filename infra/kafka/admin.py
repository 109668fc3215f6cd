"""Topic administration: create topics with partitions and configs, set and read topic configs (idempotent).

Tansu stores topic configs (and `alter_configs` works) but reports every value as a default and enforces
neither `retention.ms` nor compaction (research note §2): configs are set for the day the same code runs
against Apache Kafka, where they apply.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Final, NamedTuple

from kafka import KafkaAdminClient, KafkaConsumer, TopicPartition
from kafka.admin import ConfigFilterType, ConfigResource, ConfigResourceType, NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)


# The largest record we produce. A push may be 4 MB of JSON (`receivers.app.MAX_BODY_BYTES`), and a state value
# is a whole object (a Location's tree with its parked pushes) in one changelog record. A broker refuses a record
# above its `message.max.bytes` (1 MB by default on Kafka) for good: a receiver would answer a valid push 3000
# forever, and a worker would be stuck on its batch. So every topic we create says `max.message.bytes` (via
# `topic_configs`), and our producers may send that much (`compat.producer_options`, the worker's Faust app).
RECORD_MAX_BYTES: Final = 16 * 1024 * 1024

# Replicas of a topic we create when OCPI_KAFKA_REPLICATION_FACTOR does not say: Kafka's usual production
# choice, or one per broker on a smaller cluster (1 on the embedded Tansu, a single broker).
DEFAULT_REPLICAS = 3

# acks=all waits for the in-sync replicas only, and Kafka's default min.insync.replicas is 1: a replica that fell
# behind leaves the leader alone in sync, and what it acknowledges (a push answered 1000, a state) is on one disk.
# A topic of this many replicas or more we create requires two (one broker may be down and writes go on); with
# fewer, requiring two would stop every write while one broker is down, so the broker's own setting stands.
MIN_INSYNC_FROM_REPLICAS: Final = 3


def creation_configs(configs: Mapping[str, str], replicas: int) -> dict[str, str]:
    """The configs a topic of `replicas` replicas is created with: `configs`, and min.insync.replicas 2 from
    MIN_INSYNC_FROM_REPLICAS replicas on, unless `configs` say."""
    if replicas >= MIN_INSYNC_FROM_REPLICAS:
        return {"min.insync.replicas": "2", **configs}
    return dict(configs)


def replication_factor(bootstrap: str, configured: int = 0) -> int:
    """Replicas for the topics we create: `configured` (OCPI_KAFKA_REPLICATION_FACTOR) when set (> 0), else
    min(DEFAULT_REPLICAS, the cluster's brokers). One replica on a cluster would keep every acknowledged push on
    one broker's disk, and fail every acks=all send where the broker requires `min.insync.replicas` > 1."""
    if configured > 0:
        return configured
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        return _cluster_replicas(admin)
    finally:
        admin.close()


def _cluster_replicas(admin: KafkaAdminClient) -> int:
    brokers = admin.describe_cluster().get("brokers") or ()
    return max(1, min(DEFAULT_REPLICAS, len(brokers)))


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int,
                  configs: Mapping[str, Mapping[str, str]] | None = None, *, replicas: int = 0) -> list[str]:
    """Create the topics that do not exist yet, with `replicas` replicas (0: `replication_factor`'s default);
    returns the names it created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        if not wanted:
            return []
        replication = replicas if replicas > 0 else _cluster_replicas(admin)
        new = [NewTopic(name=t, num_partitions=partitions, replication_factor=replication,
                        topic_configs=creation_configs((configs or {}).get(t, {}), replication)) for t in wanted]
        with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won the race; fine
            admin.create_topics(new)
        log.info("created topics %s (%d replicas)", wanted, replication)
        return wanted
    finally:
        admin.close()


def _existing(admin: KafkaAdminClient, topics: Iterable[str]) -> list[str]:
    """`topics` that exist, once each, in their order."""
    existing = set(admin.list_topics())
    return [t for t in dict.fromkeys(topics) if t in existing]


def partition_counts(bootstrap: str, topics: Iterable[str]) -> dict[str, int]:
    """The partition count of each of `topics` that exists (a missing topic is left out)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        names = _existing(admin, topics)
        if not names:
            return {}
        return {topic["name"]: len(topic["partitions"]) for topic in admin.describe_topics(names)
                if topic["name"] in names and topic["partitions"]}
    finally:
        admin.close()


def topic_ends(bootstrap: str, topics: Iterable[str]) -> dict[str, int]:
    """The sum of the end offsets of each of `topics` that exists: 0 for a topic that never held a record (on
    Tansu too, whose ListOffsets under-reports only a partition that holds records)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        existing = set(admin.list_topics())
        names = [topic for topic in dict.fromkeys(topics) if topic in existing]
        described = admin.describe_topics(names) if names else []
    finally:
        admin.close()
    partitions = [TopicPartition(topic["name"], partition["partition_index"])
                  for topic in described if topic["name"] in names for partition in topic["partitions"]]
    ends = dict.fromkeys(names, 0)
    if partitions:
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, request_timeout_ms=10000)
        try:
            for tp, end in consumer.end_offsets(partitions).items():
                ends[tp.topic] += end
        finally:
            consumer.close()
    return ends


def delete_topics(bootstrap: str, topics: list[str], wait_s: float = 30.0) -> None:
    """Delete `topics` and wait (up to `wait_s`) until the cluster no longer lists them: Kafka deletes a topic
    after it answered, and a topic created again meanwhile would fail as existing."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        admin.delete_topics(topics)
        deadline = time.monotonic() + wait_s
        while set(topics) & set(admin.list_topics()) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        admin.close()


def topic_configs(bootstrap: str, topics: Iterable[str]) -> dict[str, dict[str, str]]:
    """The stored configs of existing topics (all keys; Tansu reports them all as defaults)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        names = _existing(admin, topics)
        if not names:
            return {}
        described = admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in names],
                                           config_filter=ConfigFilterType.ALL)
        found: dict[str, dict[str, str]] = {}
        for name, entries in (described.get("topic") or {}).items():
            found[name] = {key: str(entry.get("value")) if isinstance(entry, Mapping) else str(entry)
                           for key, entry in entries.items()}
        return found
    finally:
        admin.close()


class TopicConfigError(RuntimeError):
    """The broker refused to set a topic's configs."""


class ConfigsSet(NamedTuple):
    changed: list[str]  # the topics whose configs were set
    missing: list[str]  # the topics not created yet, so not set


def set_topic_configs(bootstrap: str, configs: Mapping[str, Mapping[str, str]]) -> ConfigsSet:
    """Set configs of existing topics where they differ; says which it changed and which do not exist.

    Raises TopicConfigError when the broker refused a topic's configs (an alter-config policy, a missing ACL,
    a value out of range): kafka-python reports such refusals in its result, per topic, and does not raise."""
    current = topic_configs(bootstrap, configs)
    changes = [ConfigResource(ConfigResourceType.TOPIC, topic, configs=dict(wanted))
               for topic, wanted in configs.items()
               if topic in current and any(current[topic].get(k) != v for k, v in wanted.items())]
    missing = sorted(set(configs) - set(current))
    if not changes:
        return ConfigsSet([], missing)
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        # raise_on_unknown=False: kafka-python checks keys against the dynamic configs the broker lists, and
        # Tansu lists none.
        result = admin.alter_configs(changes, raise_on_unknown=False)
    finally:
        admin.close()
    refused = {topic: answer for topic, answer in ((result or {}).get("topic") or {}).items() if answer != "OK"}
    if refused:
        raise TopicConfigError("Kafka refused the configs of " + "; ".join(
            f"{topic}: {answer}" for topic, answer in sorted(refused.items())))
    return ConfigsSet([c.name for c in changes], missing)
