"""Every topic the pipeline reads or writes, declared once (names from settings)."""

from __future__ import annotations

from dataclasses import dataclass

import faust
from faust.types import TopicT

from infra.settings import Settings


@dataclass(frozen=True)
class Topics:
    """The pipeline's topics; keys and values are bytes (codecs are ours, not Faust's).

    - locations, sessions, cdrs: the receivers' Avro OcpiEvent records (`infra.codec`), keyed `CC/PID/ID`;
    - party_facts: stage 1 → stage 2, JSON `pipeline.facts.FactBatch`, keyed `CC/PID` of the CPO party;
    - reconciliation: the results, one JSON object per reconciliation row, keyed `CC/PID/SUBJECT/ID`.
    """

    locations: TopicT
    sessions: TopicT
    cdrs: TopicT
    party_facts: TopicT
    reconciliation: TopicT

    @property
    def modules(self) -> tuple[TopicT, ...]:
        return (self.locations, self.sessions, self.cdrs)

    @property
    def consumed(self) -> tuple[TopicT, ...]:
        return (*self.modules, self.party_facts)


def topic_names(settings: Settings) -> tuple[str, ...]:
    """Every topic name, for creating them before the worker starts."""
    return (*settings.kafka.module_topics, settings.pipeline.topic_party_facts,
            settings.pipeline.topic_reconciliation, settings.kafka.topic_rejections)


def declare_topics(app: faust.App, settings: Settings) -> Topics:
    def raw(name: str) -> TopicT:
        # raw serializers: the Avro codec is ours (schemas parsed once, our own error type), not Faust's.
        return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
                         partitions=settings.kafka.partitions)

    return Topics(
        locations=raw(settings.kafka.topic_locations),
        sessions=raw(settings.kafka.topic_sessions),
        cdrs=raw(settings.kafka.topic_cdrs),
        party_facts=raw(settings.pipeline.topic_party_facts),
        reconciliation=raw(settings.pipeline.topic_reconciliation),
    )
