"""Topic administration: create the module topics with the configured partitions (idempotent)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Mapping

from kafka import KafkaAdminClient
from kafka.admin import NewTopic
from kafka.errors import TopicAlreadyExistsError

log = logging.getLogger(__name__)


def ensure_topics(bootstrap: str, topics: Iterable[str], partitions: int,
                  configs: Mapping[str, Mapping[str, str]] | None = None) -> list[str]:
    """Create the topics that do not exist yet; returns the names it created."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        existing = set(admin.list_topics())
        wanted = [t for t in dict.fromkeys(topics) if t not in existing]
        if not wanted:
            return []
        new = [NewTopic(name=t, num_partitions=partitions, replication_factor=1,
                        topic_configs=dict((configs or {}).get(t, {}))) for t in wanted]
        with contextlib.suppress(TopicAlreadyExistsError):  # a concurrent creator won the race; fine
            admin.create_topics(new)
        log.info("created topics %s", wanted)
        return wanted
    finally:
        admin.close()
