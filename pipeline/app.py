"""`create_app()`: the Faust app built from settings, with its topics and agents."""

from __future__ import annotations

from dataclasses import dataclass

import faust

from infra.clickhouse.client import connect_for
from infra.kafka import compat
from infra.settings import Settings
from pipeline.ingest import register_ingest_agents
from pipeline.sink import ClickHouseSink
from pipeline.topics import Topics, declare_topics

APP_ID = "ocpi-pipeline"


@dataclass
class Pipeline:
    app: faust.App
    topics: Topics
    sink: ClickHouseSink


def create_app(settings: Settings, bootstrap: str, *, app_id: str = APP_ID) -> Pipeline:
    """The worker's Faust app. `bootstrap` is resolved by the caller (embedded broker or configured cluster).

    `app_id` is also the consumer group: another id reads the topics from the start on its own (a rebuild).
    """
    if settings.kafka.is_tansu:
        compat.patch_faust_highwaters()
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="rocksdb://",
        datadir=str(settings.storage.path / "faust"),
        topic_partitions=settings.kafka.partitions,
        topic_replication_factor=1,
        processing_guarantee="at_least_once",
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        web_enabled=False,
        autodiscover=False,
        **compat.faust_options(settings.kafka),
    )
    topics = declare_topics(app, settings)
    sink = ClickHouseSink(lambda: connect_for(settings))
    register_ingest_agents(app, topics.modules, sink)
    return Pipeline(app=app, topics=topics, sink=sink)
