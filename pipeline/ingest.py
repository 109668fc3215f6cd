"""The ingest agents: module topic → decoded events → rows → ClickHouse, a batch at a time.

Agents stay thin: decoding is `infra.codec`, row building is `pipeline.projection`, writing is
`pipeline.sink`. A record that cannot be decoded goes to `dead_letters` whole, with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import faust
from faust.types import EventT, TopicT

from infra.codec import AvroCodecError, DecodedEvent, decode_event
from pipeline import projection
from pipeline.sink import Batch, ClickHouseSink

log = logging.getLogger(__name__)

BATCH_MAX = 2000
BATCH_WITHIN_S = 0.3

DEAD_LETTER_COLUMNS = ("kafka_topic", "kafka_partition", "kafka_offset", "key_hex", "value_hex", "error",
                       "recorded_at")


def build_batch(events: Sequence[EventT]) -> Batch:
    """Rows for a batch of Kafka events (pure apart from decoding)."""
    batch = Batch()
    for event in events:
        message = event.message
        try:
            decoded = decode_event(message.value)
        except AvroCodecError as exc:
            batch.add("dead_letters", DEAD_LETTER_COLUMNS, [
                message.topic, message.partition, message.offset, (message.key or b"").hex(),
                (message.value or b"").hex(), f"undecodable record: {exc}", datetime.now(UTC)])
            continue
        add_event_rows(batch, decoded, message.topic, message.partition, message.offset)
    return batch


def add_event_rows(batch: Batch, event: DecodedEvent, topic: str, partition: int, offset: int) -> None:
    batch.add("raw_events", projection.RAW_EVENT_COLUMNS, projection.raw_event_row(event, topic, partition, offset))
    if event.payload_type == "Session":
        batch.add("sessions", projection.SESSION_COLUMNS, projection.session_row(event, event.payload))
    elif event.payload_type == "CDR":
        batch.add("cdrs", projection.CDR_COLUMNS, projection.cdr_row(event, event.payload))


def register_ingest_agents(app: faust.App, topics: Sequence[TopicT], sink: ClickHouseSink) -> list[Any]:
    agents = []
    for topic in topics:
        name = topic.get_topic_name().replace(".", "_")

        async def ingest(stream: faust.StreamT[bytes]) -> None:
            async for events in stream.take_events(BATCH_MAX, within=BATCH_WITHIN_S):
                await sink.write(build_batch(events))  # returns only once written; then the batch is acked

        agents.append(app.agent(topic, name=f"ingest_{name}")(ingest))
    return agents
