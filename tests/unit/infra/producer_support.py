"""Shared by tests whose fake aiokafka producer stands in for a broker: the producer's `client` as the publisher
reads it (`infra.kafka.publisher.Publisher._require_topic`)."""

from __future__ import annotations

from typing import Any


class _EveryTopic:
    def __contains__(self, _topic: object) -> bool:
        return True


class _Cluster:
    @staticmethod
    def topics() -> Any:
        return _EveryTopic()


class KnownTopics:
    """A producer's `client` whose cluster metadata holds every topic: the fake broker's topics all exist."""

    cluster = _Cluster()
