"""`create_app()`: the Faust app built from settings, with its topics, state tables, agents and timers."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from urllib.parse import urlparse

import faust
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import connect, effective_dsn
from infra.kafka import compat
from infra.kafka.admin import RECORD_MAX_BYTES, replication_factor
from infra.settings import Settings, private_dir
from pipeline.agents import BATCH_WITHIN_S, AgentContext, Progress, StateTable, register_agents
from pipeline.backlog import state_backlog, sweep_backlog
from pipeline.delivery import BatchDelivery
from pipeline.projection import refused_row_anomalies
from pipeline.reconcile import Rules
from pipeline.rejections import register_rejections_agent
from pipeline.retention import Pseudonymizer, load_key
from pipeline.sink import ClickHouseSink
from pipeline.stage import StageRules
from pipeline.state_retention import register_state_retention
from pipeline.sweeps import Sweeper
from pipeline.topics import Topics, declare_topics

APP_ID = "ocpi-pipeline"  # the default of OCPI_PIPELINE_APP_ID

# State tables (Faust tables with changelog topics `<app id>-<name>-changelog`, stored with rocksdict).
PARTY_TABLE = "party-state"  # stage 2: reconciliation and credit links per CPO party
TABLES = ("location-state", "session-state", "cdr-state", PARTY_TABLE)


@dataclass
class Pipeline:
    app: faust.App
    topics: Topics
    sink: ClickHouseSink
    tables: dict[str, StateTable]
    sweeper: Sweeper
    context: AgentContext


def sink_client(settings: Settings) -> Client:
    """The worker's ClickHouse client; uncompressed to a server on this machine (the embedded store's shim),
    where compressing costs the worker CPU and saves no network."""
    dsn, password = effective_dsn(settings)
    local = dsn.startswith("http") and urlparse(dsn).hostname in ("127.0.0.1", "localhost", "::1")
    return connect(dsn, database=settings.clickhouse.database, password=password,
                   **({"compress": False} if local else {}))


def create_app(settings: Settings, bootstrap: str, *, app_id: str | None = None) -> Pipeline:
    """The worker's Faust app. `bootstrap` is resolved by the caller (embedded broker or configured cluster);
    `app_id` (default OCPI_PIPELINE_APP_ID) names the consumer group and the state changelogs."""
    if settings.kafka.is_tansu:
        compat.patch_faust_highwaters()
    app_id = app_id or settings.pipeline.app_id
    datadir = settings.storage.path / "faust" / app_id
    private_dir(settings.storage.path)
    private_dir(datadir)
    app = faust.App(
        app_id,
        broker=f"kafka://{bootstrap}",
        store="rocksdb://",  # rocksdict-backed (research note §1: `rocksdict://` is not a valid store URL)
        datadir=str(datadir),
        topic_partitions=settings.kafka.partitions,
        # The changelogs Faust creates itself (those of `worker.prepare_topics` exist by then) get ours too.
        topic_replication_factor=replication_factor(bootstrap, settings.kafka.replication_factor),
        processing_guarantee="at_least_once",  # exactly-once is impossible on Tansu; every sink is idempotent
        broker_commit_interval=1.0,
        consumer_auto_offset_reset="earliest",
        table_standby_replicas=0,
        # Changelog records and facts go out in batches: per-request cost dominates small records (note §3).
        producer_linger=0.005,
        producer_max_batch_size=256 * 1024,
        producer_max_request_size=RECORD_MAX_BYTES,  # a state value is a whole object (see RECORD_MAX_BYTES)
        web_enabled=False,
        autodiscover=False,
        **compat.faust_options(settings.kafka),
    )

    async def drop_monitor_sensor() -> None:
        # Faust's Monitor sensor keeps per-event statistics for its web views, which are off (web_enabled=False);
        # it costs microseconds per event on every hop, so it leaves the sensor chain once the app added it.
        if app.monitor in set(app.sensors):
            app.sensors.remove(app.monitor)

    app.task(drop_monitor_sensor)
    topics = declare_topics(app, settings)
    tables = {
        # bytes key and value types select Faust's raw serializer: the state codec is ours (pipeline.state).
        name: StateTable(app.Table(name, key_type=bytes, value_type=bytes, partitions=settings.kafka.partitions),
                         whole_batches=name == PARTY_TABLE)
        for name in TABLES
    }
    pseudonym = Pseudonymizer(load_key(settings))
    sink = ClickHouseSink(lambda: sink_client(settings),
                          refused_rows=functools.partial(refused_row_anomalies, pseudonym=pseudonym))
    context = AgentContext(
        app=app, settings=settings, topics=topics, sink=sink, progress=Progress(),
        stage_rules=StageRules.from_settings(settings.pipeline, send_timeout_s=settings.kafka.send_timeout_s),
        party_rules=Rules.from_settings(settings.pipeline),
        pseudonym=pseudonym,
    )
    delivery = BatchDelivery(app, settings.pipeline.batch_max, BATCH_WITHIN_S)
    register_agents(context, tables, delivery)
    register_rejections_agent(context, delivery)  # refused pushes → `rejections` (partner health)
    # Session and location state pseudonymised when due; session and CDR state deleted past the billing retention.
    register_state_retention(context, tables, state_backlog(settings, bootstrap, app_id))
    sweeper = Sweeper(context, sweep_backlog(settings, bootstrap, app_id))
    app.timer(settings.pipeline.sweep_interval_s, name="deadline-sweep")(sweeper.tick)
    return Pipeline(app=app, topics=topics, sink=sink, tables=tables, sweeper=sweeper, context=context)
