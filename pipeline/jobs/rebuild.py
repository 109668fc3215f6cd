"""Rebuild: recompute every pipeline table from the Kafka topics into a fresh database, then swap it in.

0. Check the pseudonymisation key against the live database's (`retention.check_key`): the rebuild worker
   checks it only against the fresh database, where none is recorded yet.
1. Migrate a fresh database `<database>_rebuild_<stamp>` (same migrations, same schema), with the configured TTLs
   (`retention.apply_ttls`).
2. Fix the targets: the end offset of every source topic now (the module topics and the rejections topic, which
   the receivers write).
3. Run the pipeline's own worker (`ocpi-pipeline worker`: the same rules as the live worker, whatever they
   are) as a child process under its own app id (OCPI_PIPELINE_APP_ID) and consumer group
   `ocpi-pipeline-rebuild-<stamp>` (so its own state changelogs) and its own names for the internal topics
   (every OCPI_TOPIC_* but the source topics, suffixed with the group), writing into the fresh database, until
   its committed offsets reach the targets (progress bar on the committed offsets) and it has also consumed
   what it wrote to its internal topics up to then (their end offsets once the targets were reached). Then
   stop it: it commits only what it wrote, so its committed offsets say what the fresh tables hold.
4. Swap: `EXCHANGE TABLES` each table the pipeline writes (every table but `partners`, `credential_claims`,
   `pseudonym_key` and `schema_migrations`, which are not derived from the topics) between the live and the
   fresh database. Views and materialized views stay where they are: they name their tables, so the live ones
   work on the swapped-in tables (the fresh database's own fed its tables during the rebuild).
   Each exchange is atomic; the table UUIDs recorded beforehand say which ones are done, so a swap that was
   interrupted is finished, never undone, on resume.
5. Close the gap: the live worker kept writing to the old tables while the rebuild worker was behind it. The
   rebuild worker is started again, now writing into the live database (the swapped-in tables), and runs
   from its committed offsets until it committed the end offsets of the source topics taken after the swap
   (and consumed its internal topics up to then). Everything after those ends reached the live worker after
   the swap, so it wrote it into the swapped-in tables itself.
6. Stop the rebuild worker and delete its internal and changelog topics, and its local state (personal data in
   clear that no retention pass would reach). The checkpoint says so first ("cleanup"): a rerun after an
   interruption there only finishes the deletions, it never starts that worker again without its state. The
   old tables are left in the rebuild database: check, then `DROP DATABASE <that database>`.

Needs a ClickHouse every process can reach: a server, or the embedded store while `dev` runs (its shim), or
else this process serves its chDB path to the rebuild worker through a shim of its own. The checkpoint is
`OCPI_DATA_DIR/jobs/rebuild/current.json`: one rebuild at a time (a second one started meanwhile is refused:
`current.lock`); rerunning after an interruption resumes it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from aiokafka.structs import TopicPartition
from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import chdb_path, connect, effective_dsn
from infra.clickhouse.migrations import migrate
from infra.clickhouse.shim import ChdbEngine, ClickHouseShim
from infra.process import spawn, terminate
from infra.settings import Settings, as_environ
from pipeline.jobs.common import (
    MODULES,
    Checkpoint,
    JobError,
    JobProgress,
    NoProgress,
    iso,
    jobs_dir,
    running_alone,
    uninterrupted,
)
from pipeline.jobs.kafka_io import committed_offsets, offset_bounds, partitions_of, topic_partitions
from pipeline.retention import apply_ttls

log = logging.getLogger(__name__)

# Not derived from the topics: kept live. `pseudonym_key` records when the key in force was first used, and by
# whom; the fresh database's holds only the rebuild worker's row of the same key, of the rebuild's time.
NOT_DERIVED = frozenset({"partners", "credential_claims", "pseudonym_key", "schema_migrations"})


@dataclass
class RebuildReport:
    job: str
    database: str  # the live database, now holding the rebuilt tables
    old_database: str  # the rebuild database, now holding the previous tables
    swapped: list[str] = field(default_factory=list)
    events: int = 0  # records the rebuild worker consumed
    tail: int = 0  # records replayed to close the gap after the swap
    status: str = "done"


def _now() -> datetime:
    return datetime.now(UTC)


def _tables(client: Client, database: str) -> dict[str, str]:
    """Name → UUID of the tables holding data. Views and materialized views are left out: they refer to
    tables by name, so the live ones read from and write to whatever tables carry those names after the
    exchange (measured: exchanging a materialized view would leave it writing into the other database)."""
    # Client-side parameters (%(name)s), bound by clickhouse-connect before the query is sent.
    rows = client.query("SELECT name, toString(uuid) FROM system.tables WHERE database = %(db)s "
                        "AND engine NOT LIKE '%%View' AND engine != 'Dictionary' AND NOT startsWith(name, '.inner')",
                        parameters={"db": database}).result_rows
    return {str(name): str(uuid) for name, uuid in rows}


async def rebuild(settings: Settings, bootstrap: str, *, timeout: float = 3600.0,
                  progress: JobProgress | None = None, on_phase: Callable[[str], None] | None = None,
                  partial_history: bool = False) -> RebuildReport:
    """Run (or resume) the rebuild of this data dir's database; see the module docstring. One at a time: a
    second one started meanwhile would resume the same checkpoint and exchange every table back.

    Refused when retention deleted the start of a source partition, unless `partial_history`: see
    `truncated_partitions`."""
    with running_alone(jobs_dir(settings, "rebuild") / "current.lock", "a rebuild of this data dir's database"):
        return await _rebuild(settings, bootstrap, timeout=timeout, progress=progress, on_phase=on_phase,
                              partial_history=partial_history)


async def source_targets(settings: Settings, bootstrap: str) -> list[list[Any]]:
    """[topic, partition, first offset held, end offset] of every partition a rebuild reads (the module topics and
    the rejections topic); JobError when one of those topics does not exist (a wrong OCPI_TOPIC_* or bootstrap):
    the rebuild worker would create it empty, and the swap put its empty tables live."""
    try:
        tps = await partitions_of(bootstrap, *_source_topics(settings))
    except JobError as exc:
        raise JobError(f"rebuild not started: {exc}") from None
    bounds = await offset_bounds(settings.kafka, bootstrap, tps, exact=True)
    return [[tp.topic, tp.partition, begin, end] for tp, (begin, end) in bounds.items()]


def truncated_partitions(targets: list[list[Any]]) -> list[str]:
    """The source partitions whose first offset is not 0: Kafka deleted their oldest records (retention). A
    rebuild from them swaps in tables without what only those records held (CDRs, Sessions, Locations not
    pushed since): billing would lose them, silently, until someone swapped the previous tables back."""
    return [f"{topic}/{partition} (from offset {begin})" for topic, partition, begin, _end in targets if begin > 0]


async def _rebuild(settings: Settings, bootstrap: str, *, timeout: float, progress: JobProgress | None,
                   on_phase: Callable[[str], None] | None, partial_history: bool) -> RebuildReport:
    progress = progress or NoProgress()
    checkpoint = Checkpoint(jobs_dir(settings, "rebuild") / "current.json")
    state = checkpoint.load()
    if state is None or state.get("status") == "done":
        stamp = _now().strftime("%Y%m%d%H%M%S")
        live = settings.clickhouse.database
        state = {"job": f"rebuild-{stamp}", "status": "building", "database": live,
                 "rebuild_database": f"{live}_rebuild_{stamp}", "group": f"ocpi-pipeline-rebuild-{stamp}",
                 "started_at": iso(_now())}
    elif state["database"] != settings.clickhouse.database:
        raise JobError(f"an interrupted rebuild of database {state['database']} is pending in "
                       f"{checkpoint.path}; finish it with OCPI_CLICKHOUSE_DATABASE={state['database']}")
    report = RebuildReport(job=state["job"], database=state["database"], old_database=state["rebuild_database"])
    dsn, password = effective_dsn(settings)
    shim: ClickHouseShim | None = None
    worker = None
    client = await asyncio.to_thread(connect, dsn, password=password)
    try:
        # The rebuild worker checks its key against the database it writes, the fresh one, where none is recorded
        # yet: checked here against the live one, or a rebuild with another key would pseudonymise with it and
        # swap in a `pseudonym_key` table that stops the live worker.
        await asyncio.to_thread(_check_key, settings, dsn, password, state["database"])
        if dsn.startswith("chdb://"):
            # Nobody serves the embedded store: this process holds it, so it serves it to the rebuild worker.
            token = secrets.token_urlsafe(16)
            shim = await ClickHouseShim(ChdbEngine(chdb_path(dsn)), token).start()
            dsn = shim.dsn
        log_path = jobs_dir(settings, "rebuild") / state["job"] / "worker.log"
        if state["status"] == "building":
            if "targets" not in state:
                targets = await source_targets(settings, bootstrap)
                truncated = truncated_partitions(targets)
                if truncated and not partial_history:
                    named = ", ".join(truncated[:3]) + (" …" if len(truncated) > 3 else "")
                    raise JobError(
                        f"the topics no longer hold their whole history: retention deleted the start of "
                        f"{len(truncated)} partition(s), {named}. "
                        "Rebuilt from them, the tables would lack what only those records held (CDRs, Sessions, "
                        "Locations not pushed since). Replay that history from an archive first (`ocpi-pipeline "
                        "replay --from-archive DIR`), then run `replay --rebuild --partial-history`; nothing was "
                        "changed")
                state["targets"] = targets
            await asyncio.to_thread(migrate, client, state["rebuild_database"])  # once the topics are known good
            # The configured TTLs, not the migrations' defaults, before the worker writes: ClickHouse drops the rows
            # a TTL has expired as it inserts them, and the tables swapped in keep their TTLs (the live worker sets
            # them once, at its first sweep).
            await asyncio.to_thread(apply_ttls, client, state["rebuild_database"], settings)
            checkpoint.save(state)
            worker = _start_worker(settings, bootstrap, dsn, state, state["rebuild_database"])
            if on_phase:
                on_phase("building")
            report.events = await _wait_built(bootstrap, state, state["targets"], worker, log_path, timeout,
                                              progress, f"rebuild into {state['rebuild_database']}")
            await _wait_internal(settings, bootstrap, state, worker, log_path, timeout)
            # Stopped before the swap: after it the rebuild database holds the previous tables, and what the
            # worker wrote there would be missing from the live ones. It commits only what it has written, so
            # once stopped its committed offsets say exactly what the fresh tables hold.
            await asyncio.to_thread(terminate, worker, 20.0)
            worker = None
            state["status"] = "swapping"
            state["new_uuids"] = await asyncio.to_thread(_tables, client, state["rebuild_database"])
            checkpoint.save(state)
        if state["status"] == "swapping":
            if on_phase:
                on_phase("swapping")
            # In a thread (the shim serving the store may run on this loop), finished even on Ctrl-C.
            report.swapped = await uninterrupted(asyncio.to_thread(_swap, client, state))
            committed = await _committed(bootstrap, state)
            # Exact ends (Tansu's ListOffsets may be short): a gap ending short would leave out of the swapped-in
            # tables what the live worker wrote into the previous ones.
            bounds = await offset_bounds(settings.kafka, bootstrap, list(committed), exact=True)
            # The gap: [what the fresh tables hold, the source topics' end after the swap). Records the live
            # worker handled before the swap went into the previous tables; every record after these ends
            # reaches it after the swap, so it writes it into the swapped-in tables itself.
            state["tail"] = [[tp.topic, tp.partition, offset, max(bounds[tp][1], offset)]
                             for tp, offset in committed.items()]
            state["swapped"] = report.swapped
            state["status"] = "tail"
            checkpoint.save(state)
        if state["status"] == "tail":
            if on_phase:
                on_phase("tail")
            # The gap cannot be replayed to the live worker: its state saw those events, so a replayed copy is a
            # DUPLICATE that writes nothing. The rebuild worker has not seen them (its committed offsets are
            # where it stopped): it processes them into the live database, from its own state, with the same
            # rules. At least once: a record both workers handled is written twice. Stage-1 rows carry versions
            # from the objects' `last_updated`, stage-2 rows from the event time of the fact that caused them
            # (`reconcile.next_seq`), not from how many rows either worker wrote: so the row of the newer fact
            # wins, whichever worker wrote it, and the gap's rows never supersede the live worker's newer ones.
            worker = _start_worker(settings, bootstrap, dsn, state, state["database"])
            report.tail = await _wait_built(bootstrap, state, state["tail"], worker, log_path, timeout, progress,
                                            f"close the gap in {state['database']}")
            await _wait_internal(settings, bootstrap, state, worker, log_path, timeout)
            await asyncio.to_thread(terminate, worker, 20.0)
            worker = None
            state["tail_events"] = report.tail
            state["status"] = "cleanup"  # from here on the rebuild worker never runs again: its topics go
            checkpoint.save(state)
        if state["status"] == "cleanup":
            report.tail = int(state.get("tail_events", 0))
            await asyncio.to_thread(_drop_worker_topics, settings, bootstrap, state["group"])
            await asyncio.to_thread(_drop_worker_state, settings, state["group"])
            state["status"] = "done"
            state["finished_at"] = iso(_now())
            checkpoint.save(state)
        report.swapped = list(state.get("swapped", []))
        return report
    finally:
        if worker is not None:
            await asyncio.to_thread(terminate, worker, 20.0)
        if shim is not None:
            await shim.stop()
        await asyncio.to_thread(client.close)


def _drop_worker_state(settings: Settings, group: str) -> None:
    """The rebuild worker's local Faust state (its app id's directory) goes with its changelogs: it holds the
    Sessions and Locations it replayed, personal data in clear, and no worker of that app id runs again to
    pseudonymise it."""
    from pipeline.worker import state_dir

    shutil.rmtree(state_dir(settings, group), ignore_errors=True)


def _check_key(settings: Settings, dsn: str, password: str | None, database: str) -> None:
    from pipeline.retention import PseudonymKeyError, check_key, load_key

    client = connect(dsn, database=database, password=password)
    try:
        check_key(client, load_key(settings), recorded_by="rebuild")
    except PseudonymKeyError as exc:
        raise JobError(f"rebuild not started: {exc}") from None
    finally:
        client.close()


# The topics the receivers write (the module topics and the refused pushes): the rebuild reads them as they are,
# to their targets and through the gap. Renamed, the rejections topic would be empty for the rebuild worker, and
# its empty `rejections` table would be swapped in, the history left in the old tables.
_SOURCE_TOPIC_VARS = frozenset({"OCPI_TOPIC_LOCATIONS", "OCPI_TOPIC_SESSIONS", "OCPI_TOPIC_CDRS",
                                "OCPI_TOPIC_REJECTIONS", "OCPI_TOPIC_PARTITIONS"})


def _source_topics(settings: Settings) -> list[str]:
    return [*(settings.kafka.topic_for(m) for m in MODULES), settings.kafka.topic_rejections]


def _internal_topics(settings: Settings, group: str) -> dict[str, str]:
    """The rebuild worker's own names for the pipeline's internal topics (every OCPI_TOPIC_* but the source
    topics): what it writes there must not reach the live worker."""
    return {var: f"{value}.{group}" for var, value in as_environ(settings).items()
            if var.startswith("OCPI_TOPIC_") and var not in _SOURCE_TOPIC_VARS}


def _consumed_internal_topics(settings: Settings, group: str) -> list[str]:
    """The rebuild worker's names of the internal topics the pipeline consumes (`pipeline.topics`); the ones
    it only writes (results for others) are nobody's to wait for."""
    import faust

    from pipeline.topics import declare_topics

    consumed = {t.get_topic_name() for t in declare_topics(faust.App("probe", autodiscover=False), settings).consumed}
    renamed = {value: f"{value}.{group}" for var, value in as_environ(settings).items()
               if var in _internal_topics(settings, group)}
    return sorted(renamed[name] for name in consumed if name in renamed)


def _start_worker(settings: Settings, bootstrap: str, dsn: str, state: dict[str, Any], database: str) -> Any:
    job_dir = jobs_dir(settings, "rebuild") / state["job"]
    env = dict(os.environ)
    env.update(as_environ(settings))
    env.update(_internal_topics(settings, state["group"]))
    env.update({"OCPI_KAFKA_BOOTSTRAP": bootstrap, "OCPI_KAFKA_FLAVOR": "tansu" if settings.kafka.is_tansu else "kafka",
                "OCPI_CLICKHOUSE_DSN": dsn, "OCPI_CLICKHOUSE_DATABASE": database,
                "OCPI_PIPELINE_APP_ID": state["group"]})
    # Same data dir as the live worker: its secrets (the pseudonymisation key) must be the same, and the
    # worker keeps its Faust state per app id.
    if settings.http.port == 0:  # "any free port" (demo, tests) is no valid setting; the worker serves no HTTP
        env["OCPI_HTTP_PORT"] = "8080"
    log.info("rebuild worker: group %s into database %s, log %s", state["group"], database,
             job_dir / "worker.log")
    return spawn([sys.executable, "-m", "pipeline", "--log-level", "info", "worker"], env=env,
                 log_path=job_dir / "worker.log")


async def _committed(bootstrap: str, state: dict[str, Any]) -> dict[TopicPartition, int]:
    tps = [TopicPartition(t, p) for t, p, _b, _e in state["targets"]]
    found = await committed_offsets(bootstrap, state["group"], tps)
    begins = {TopicPartition(t, p): b for t, p, b, _e in state["targets"]}
    return {tp: max(found[tp] or 0, begins[tp]) for tp in tps}


async def _wait_built(bootstrap: str, state: dict[str, Any], ranges: list[list[Any]], worker: Any, log_path: Path,
                      timeout: float, progress: JobProgress, description: str) -> int:
    """Wait until the rebuild group committed the end of every [topic, partition, begin, end] range; returns the
    records in them."""
    targets = {TopicPartition(t, p): (b, e) for t, p, b, e in ranges}
    total = sum(max(e - b, 0) for b, e in targets.values())
    progress.start(description, total)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    done = 0
    while True:
        if worker.poll() is not None:
            raise JobError(f"the rebuild worker exited with code {worker.returncode}; see {log_path}; "
                           "rerun to resume")
        committed = await _committed(bootstrap, state)
        reached = sum(max(min(committed[tp], e) - b, 0) for tp, (b, e) in targets.items())
        progress.advance(reached - done)
        done = reached
        if all(committed[tp] >= e for tp, (_b, e) in targets.items()):
            return total
        if loop.time() > deadline:
            raise JobError(f"the rebuild worker did not catch up within {timeout:.0f}s ({done} of {total}); "
                           "rerun to resume")
        await asyncio.sleep(0.5)


async def _wait_internal(settings: Settings, bootstrap: str, state: dict[str, Any], worker: Any, log_path: Path,
                         timeout: float) -> None:
    """Wait until the rebuild worker also consumed what it wrote to its internal topics (facts it derives
    from the module topics and handles in a second step) for the records it committed so far.

    Called once it committed its module targets: it sends a batch's facts and waits for their acks before it
    commits the batch, so the internal topics' ends now cover every record up to the targets. Those ends are
    the fixed goal (partners pushing meanwhile keep moving them: a rebuild must not wait for a quiet moment).
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    names = _consumed_internal_topics(settings, state["group"])
    tps = await topic_partitions(bootstrap, names)
    ends = await offset_bounds(settings.kafka, bootstrap, tps, exact=True)
    targets = {tp: end for tp, (_b, end) in ends.items() if end > 0}
    while True:
        if worker.poll() is not None:
            raise JobError(f"the rebuild worker exited with code {worker.returncode}; see {log_path}")
        found = await committed_offsets(bootstrap, state["group"], targets)
        if all((found[tp] or 0) >= end for tp, end in targets.items()):
            return
        if loop.time() > deadline:
            raise JobError(f"the rebuild worker did not catch up on its internal topics within {timeout:.0f}s; "
                           "rerun to resume")
        await asyncio.sleep(0.5)


def _swap(client: Client, state: dict[str, Any]) -> list[str]:
    """Exchange the derived tables; idempotent through the recorded UUIDs (an exchange done before a crash
    is recognised by the live table's UUID, and not done again)."""
    live, fresh = state["database"], state["rebuild_database"]
    new_uuids: dict[str, str] = state["new_uuids"]
    live_tables = _tables(client, live)
    swapped = []
    for table, uuid in sorted(new_uuids.items()):
        if table in NOT_DERIVED:
            continue
        if live_tables.get(table) != uuid:
            if table in live_tables:
                client.command(f"EXCHANGE TABLES `{live}`.`{table}` AND `{fresh}`.`{table}`")
            else:
                client.command(f"RENAME TABLE `{fresh}`.`{table}` TO `{live}`.`{table}`")
        swapped.append(table)
    return swapped


def _drop_worker_topics(settings: Settings, bootstrap: str, group: str) -> None:
    """The rebuild worker's internal and changelog topics are of no use once it stopped (and Tansu keeps every
    topic in memory)."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10000)
    try:
        ours = set(_internal_topics(settings, group).values())
        doomed = sorted(t for t in admin.list_topics() if t in ours or t.startswith(f"{group}-"))
        if doomed:
            admin.delete_topics(doomed)
            log.info("deleted the rebuild worker's topics %s", doomed)
    except Exception as exc:  # leftovers cost space, not correctness
        log.warning("could not delete the rebuild worker's topics: %s", exc)
    finally:
        admin.close()
