"""Every topic the pipeline reads or writes, declared once (names from settings)."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from infra.settings import Settings


@dataclass(frozen=True)
class Topics:
    """The pipeline's topics. Values are Avro single-object bytes (decoded by `infra.codec`), keys bytes."""

    locations: TopicT
    sessions: TopicT
    cdrs: TopicT

    @property
    def modules(self) -> tuple[TopicT, ...]:
        return (self.locations, self.sessions, self.cdrs)


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    def raw(name: str) -> TopicT:
        # raw serializers: the Avro codec is ours (schemas parsed once, our own error type), not Faust's.
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=settings.kafka.partitions)

    return Topics(
        locations=raw(settings.kafka.topic_locations),
        sessions=raw(settings.kafka.topic_sessions),
        cdrs=raw(settings.kafka.topic_cdrs),
    )
