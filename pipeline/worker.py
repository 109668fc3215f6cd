"""Run the Faust worker in this process until SIGINT/SIGTERM."""

from __future__ import annotations

import fcntl
import logging
import re
import shutil
import time
from pathlib import Path
from typing import IO

import faust
from clickhouse_connect.driver.client import Client
from clickhouse_connect.driver.exceptions import DatabaseError

from infra.clickhouse.client import ClickHouseUnavailable
from infra.gc_tuning import tune_gc
from infra.kafka.admin import delete_topics, ensure_topics, partition_counts, set_topic_configs, topic_ends
from infra.kafka.bootstrap import resolve_bootstrap
from infra.settings import Settings, private_dir
from pipeline.app import PARTY_TABLE, TABLES, create_app, sink_client
from pipeline.retention import (
    apply_ttls,
    changelog_configs,
    changelog_topic,
    check_key,
    load_key,
    policy_warnings,
    topic_configs,
)
from pipeline.topics import topic_names

log = logging.getLogger(__name__)

# ClickHouse's answers to a configuration error: UNKNOWN_DATABASE, UNKNOWN_USER, REQUIRED_PASSWORD, ACCESS_DENIED,
# AUTHENTICATION_FAILED. A starting worker does not wait for those to go away.
REFUSALS = frozenset({81, 192, 194, 497, 516})
KEY_CHECK_WAIT_S = 120.0  # how long a starting worker waits for ClickHouse to check its pseudonymisation key


def prepare_topics(settings: Settings, bootstrap: str) -> None:
    """Create our topics if missing, with the retention configs of the policy, and set them on existing ones.

    The state changelogs are created here too, before Faust would create them without our configs (compaction
    lag of those with personal data, record size; Faust leaves an existing topic as it is). Call it after
    `drop_state_without_changelog`, which tells a new broker by its missing changelogs.
    """
    configs = topic_configs(settings) | changelog_configs(settings, TABLES)
    ensure_topics(bootstrap, topic_names(settings), settings.kafka.partitions, configs,
                  replicas=settings.kafka.replication_factor)
    # A changelog takes its source topic's partition count, which is not OCPI_TOPIC_PARTITIONS where another
    # process (`serve`) created the module topics with another value: a table's state for a record is written
    # to the changelog partition of the record's partition (`agents.StateTable`).
    sources = changelog_sources(settings)
    recreate_empty_changelogs(bootstrap, sources)
    counts = partition_counts(bootstrap, sources.values())
    for changelog, source in sources.items():
        ensure_topics(bootstrap, [changelog], counts.get(source, settings.kafka.partitions), configs,
                      replicas=settings.kafka.replication_factor)
    check_copartitioned(sources, partition_counts(bootstrap, (*sources, *sources.values())))
    changed = set_topic_configs(bootstrap, configs).changed
    if changed:
        log.info("topic configs set on %s", ", ".join(changed))


def changelog_topics(app_id: str) -> list[str]:
    return [changelog_topic(app_id, name) for name in TABLES]


class PartitionMismatch(RuntimeError):
    """A state changelog has another partition count than its source topic: the worker does not start."""


def check_copartitioned(sources: dict[str, str], counts: dict[str, int]) -> None:
    """Refuse a source topic whose partition count is not its changelog's (`changelog_sources`).

    Partitions added to a live topic (Kafka allows it) send its records' keys to other partitions than the one
    holding their objects' state, and the state of a partition beyond the changelog's has nowhere to go (the
    worker retries that write for ever); with several workers Faust assigns the topic and its changelog apart,
    so a worker reads and writes state another recovers. Faust's own check is in the table path `StateTable`
    bypasses."""
    wrong = [f"{source} has {counts[source]} partitions, its state changelog {changelog} has {counts[changelog]}"
             for changelog, source in sources.items()
             if source in counts and changelog in counts and counts[source] != counts[changelog]]
    if wrong:
        raise PartitionMismatch("; ".join(wrong) + ". A topic's partition count cannot change under its state: "
                                "restore the topics' partition counts, or start from new topics "
                                "(README, \"Partitions and scaling out\")")


def changelog_sources(settings: Settings) -> dict[str, str]:
    """Each state table's changelog topic, and the topic whose records its state belongs to (co-partitioned)."""
    kafka, app_id = settings.kafka, settings.pipeline.app_id
    sources = {"location-state": kafka.topic_locations, "session-state": kafka.topic_sessions,
               "cdr-state": kafka.topic_cdrs, PARTY_TABLE: settings.pipeline.topic_party_facts}
    return {changelog_topic(app_id, table): sources[table] for table in TABLES}


def drop_state_without_changelog(settings: Settings, bootstrap: str, app_id: str) -> bool:
    """Remove local table state whose changelog topics are gone or never held a record (a new broker, e.g. an
    embedded one restarted, `has_changelog`).

    Local state is only a cache of the changelogs; without them it belongs to another Kafka and would make the
    worker skip records it never processed on this one (and Faust refuse to start on offsets beyond the end).
    """
    datadir = state_dir(settings, app_id)
    if not datadir.exists() or has_changelog(bootstrap, app_id):
        return False
    log.warning("local state in %s has no changelog record on %s; starting from empty state", datadir, bootstrap)
    shutil.rmtree(datadir)
    return True


def has_changelog(bootstrap: str, app_id: str) -> bool:
    """Whether the broker holds a record of this app's state changelogs (none: the state starts empty).

    A changelog that exists but never held a record holds no state either: a broker that creates topics on first
    use (Tansu, whose memory engine loses every topic on a restart) creates the changelogs of a worker that was
    running when it restarted, empty, and local state kept over them would be ahead of them (Faust's
    ConsistencyError at every start)."""
    return any(end > 0 for end in topic_ends(bootstrap, changelog_topics(app_id)).values())


def recreate_empty_changelogs(bootstrap: str, sources: dict[str, str], wait_s: float = 30.0) -> list[str]:
    """Delete the changelogs whose partition count is not their source topic's and that never held a record, so
    that `prepare_topics` creates them again with their source's count; returns their names.

    A broker that creates topics on first use creates them with its own partition count: Tansu, restarted empty
    under a running worker, so creates the changelogs that worker asks about. Empty, they hold no state to lose;
    left as they are, `check_copartitioned` stops every start. A changelog that holds records is left for
    `check_copartitioned` to refuse."""
    counts = partition_counts(bootstrap, (*sources, *sources.values()))
    wrong = [changelog for changelog, source in sources.items()
             if changelog in counts and source in counts and counts[changelog] != counts[source]]
    if not wrong:
        return []
    empty = [topic for topic, end in topic_ends(bootstrap, wrong).items() if end == 0]
    if not empty:
        return []
    delete_topics(bootstrap, empty, wait_s)
    log.warning("state changelogs %s held no record and had another partition count than their source topics "
                "(created by the broker on first use); created again", ", ".join(empty))
    return empty


def state_gap(client: Client) -> str | None:
    """A warning for a worker whose state starts empty over a store that already holds objects (an embedded
    broker restarted, a new Kafka, a new app id); None for an empty store. That state is what refuses a CDR sent
    again with other content, links a credit once, tells a stale update and matches a late CDR to a stored
    session; ClickHouse alone does none of it."""
    ((locations, sessions, cdrs),) = client.query(
        # FINAL: objects, not their versions (each update, each pseudonymisation rewrite) not merged yet.
        "SELECT (SELECT count() FROM locations FINAL), (SELECT count() FROM sessions FINAL), "
        "(SELECT count() FROM cdrs FINAL)"
    ).result_rows
    if not (locations or sessions or cdrs):
        return None
    return (f"the store holds {cdrs} CDR, {sessions} session and {locations} location rows that the worker's "
            "state, starting empty, does not know: until the state is restored, a CDR sent again with other "
            "content is stored instead of refused as a conflict, a second credit of a CDR is linked, an older "
            "update is not recognised as stale, and a CDR is not matched to a session stored before. Restore it "
            "before partners push: ocpi-pipeline export ARCHIVE --source clickhouse, then ocpi-pipeline replay "
            "--from-archive ARCHIVE --wait (the raw events of the last OCPI_RETENTION_RAW_DAYS days)")


def state_dir(settings: Settings, app_id: str) -> Path:
    return settings.storage.path / "faust" / app_id


class StateInUse(RuntimeError):
    """Another worker of this app id runs on this data directory."""


def lock_state(settings: Settings, app_id: str) -> IO[bytes]:
    """Hold this worker's Faust state directory for as long as the returned file stays open (flock: released when
    the process ends, however it ends). Two workers of one app id on one OCPI_DATA_DIR would share it: the second,
    finding no changelog record yet, would delete the first's state under it, and both write its RocksDB."""
    datadir = state_dir(settings, app_id)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    held = (datadir.parent / f"{app_id}.lock").open("a+b")
    try:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        held.close()
        raise StateInUse(f"another worker of {app_id} runs on {datadir} (its Faust state): give each worker on this "
                         "machine its own OCPI_DATA_DIR") from None
    return held


def check_pseudonym_key(settings: Settings, *, wait_s: float = KEY_CHECK_WAIT_S) -> None:
    """Stop before processing anything if this worker's pseudonymisation key is not the store's
    (`retention.check_key`): its pseudonyms would not join with the others'. Waits for ClickHouse to answer, as
    the worker could not write without it anyway."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            check_key(sink_client(settings), load_key(settings), recorded_by=f"worker {settings.pipeline.app_id}")
            return
        except DatabaseError as exc:
            if "UNKNOWN_TABLE" not in str(exc):
                raise
            # A database that exists (created by hand, or by a DBA) but was never migrated.
            raise ClickHouseUnavailable(f"database {settings.clickhouse.database} has no pseudonym_key table: run "
                                        "`ocpi-pipeline migrate`") from exc
        except ClickHouseUnavailable as exc:
            if answered(exc) or time.monotonic() > deadline:
                raise  # a server that refuses us (password, database) will refuse again
            log.warning("ClickHouse does not answer yet; the pseudonymisation key check waits")
            time.sleep(1.0)


def apply_configured_ttls(settings: Settings) -> None:
    """Set the configured TTLs (`retention.apply_ttls`) before anything is processed: ClickHouse drops the rows
    a TTL has expired as it inserts them, so a backlog written under the migrations' defaults (a store restored
    from an archive) would lose what a longer configured retention keeps."""
    changed = apply_ttls(sink_client(settings), settings.clickhouse.database, settings)
    if changed:
        log.info("retention: TTL set on %s", ", ".join(changed))


def answered(exc: ClickHouseUnavailable) -> bool:
    """Whether the store refused us for our configuration (a wrong user or password, no access, a database that
    does not exist), which no wait mends, rather than not answering (yet): a connection refused or timed out, a
    proxy's 503, a chDB path another process holds."""
    code = re.search(r"\bCode: (\d+)", f"{exc} {exc.__cause__}")
    return code is not None and int(code.group(1)) in REFUSALS


def warn_of_retention_policy(settings: Settings) -> None:
    """A policy that keeps personal data in clear longer than it says is logged at every start, not only named by
    `retention report`, which nobody may run."""
    for warning in policy_warnings(settings):
        log.warning("retention: %s", warning)


def run_worker(settings: Settings, *, loglevel: str = "warning") -> None:
    bootstrap = resolve_bootstrap(settings)
    private_dir(settings.storage.path)  # before the key check creates it (secrets/) with the umask's mode
    with lock_state(settings, settings.pipeline.app_id):  # held while this worker runs
        check_pseudonym_key(settings)
        warn_of_retention_policy(settings)
        apply_configured_ttls(settings)
        drop_state_without_changelog(settings, bootstrap, settings.pipeline.app_id)
        if not has_changelog(bootstrap, settings.pipeline.app_id):
            warning = state_gap(sink_client(settings))
            if warning:
                log.warning(warning)
        prepare_topics(settings, bootstrap)
        pipeline = create_app(settings, bootstrap)
        worker = faust.Worker(pipeline.app, loglevel=getattr(logging, loglevel.upper()), quiet=True)
        tune_gc()
        worker.execute_from_commandline()  # installs signal handlers, stops cleanly, exits the process


