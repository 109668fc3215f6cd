"""The rejections agent: refused pushes (receivers.rejections records, JSON) into the `rejections` table.

A record that does not decode becomes a dead letter like any other; the table is keyed by the record's own
id, so reprocessing a batch rewrites the same rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from faust.types import Message

from infra.rejections import COLUMNS as REJECTION_COLUMNS
from infra.rejections import Rejection, decode_rejection
from ocpi.decode import UNPARSABLE, unparsable_reason
from pipeline import projection
from pipeline.agents import AgentContext, run_batch
from pipeline.delivery import BatchDelivery
from pipeline.records import DeadLetter, utc_now
from pipeline.sink import Batch


def rejection_row(rejection: Rejection) -> list[Any]:
    return [getattr(rejection, column) for column in REJECTION_COLUMNS]


def rejections_batch(messages: Sequence[tuple[str, int, int, bytes, bytes]], now: datetime) -> Batch:
    """The rows of a batch of (topic, partition, offset, key, value) records."""
    batch = Batch()
    for topic, partition, offset, key, value in messages:
        try:
            rejection = decode_rejection(value)
        except UNPARSABLE as exc:  # RecursionError too: JSON nested deeper than the parser goes
            letter = DeadLetter(topic, partition, offset, key, value,
                                f"undecodable rejection record: {unparsable_reason(exc)}")
            batch.add("dead_letters", projection.DEAD_LETTER_COLUMNS, projection.dead_letter_row(letter, now))
            continue
        batch.add("rejections", REJECTION_COLUMNS, rejection_row(rejection))
    return batch


def register_rejections_agent(context: AgentContext, delivery: BatchDelivery) -> None:
    """Consume the rejections topic with the pipeline's batch discipline (pipeline.agents: write, then ack)."""
    settings = context.settings
    topic = context.app.topic(settings.kafka.topic_rejections, key_type=bytes, value_type=bytes,
                              key_serializer="raw", value_serializer="raw", partitions=settings.kafka.partitions)

    async def handle(messages: Sequence[Message]) -> None:
        records = [(m.topic, m.partition, m.offset, bytes(m.key or b""), bytes(m.value or b"")) for m in messages]
        await context.sink.write(rejections_batch(records, utc_now()))

    delivery.agent(topic, "rejections", handle, run_batch)
