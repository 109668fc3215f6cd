"""Job commands: replay, export, pull (the work itself is in `pipeline.jobs`)."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import aiokafka.errors
import click
import kafka.errors
from click.core import ParameterSource
from clickhouse_connect.driver.exceptions import ClickHouseError
from rich.console import Console
from rich.markup import escape

from infra.clickhouse.client import ClickHouseUnavailable, connect_for
from infra.clickhouse.migrations import MigrationError
from infra.kafka.bootstrap import KafkaNotConfigured, resolve_bootstrap
from infra.settings import Settings, load_settings
from pipeline.cli.errors import kafka_failed, seconds
from pipeline.cli.tables import folded_table
from pipeline.jobs.common import MODULES, JobError, RichProgress, check_modules, parse_time, relative_text
from pipeline.jobs.pull import KINDS

T = TypeVar("T")


def _run(coro: Coroutine[Any, Any, T], resume_hint: str, bootstrap: str) -> T:
    """Run a job; Ctrl-C ends it cleanly (its checkpoint is consistent) and says how to resume."""
    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        click.echo(f"interrupted: {resume_hint}", err=True)
        sys.exit(130)
    except (JobError, KafkaNotConfigured, ClickHouseUnavailable, MigrationError, TimeoutError) as exc:
        raise click.ClickException(str(exc)) from None
    except (aiokafka.errors.KafkaError, kafka.errors.KafkaError) as exc:  # the broker down, unreachable, refusing
        raise kafka_failed(bootstrap, exc, resume_hint) from None


def _bootstrap(settings: Settings) -> str:
    try:
        return resolve_bootstrap(settings)
    except KafkaNotConfigured as exc:
        raise click.ClickException(str(exc)) from None


_JOB_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]*")


def _job_name(value: str | None) -> str | None:
    """A job's name names its files under OCPI_DATA_DIR/jobs/replay/: a path (`../x`, `/tmp/x`, `a/b`) put them
    elsewhere, and an empty name passed for none."""
    if value is not None and not _JOB_NAME.fullmatch(value):
        raise click.BadParameter(f"{value!r}: a job name is letters, digits, '.', '_' and '-', not starting with '.'")
    return value


def _time(value: str | None) -> Any:
    """A time option's value; an empty one is refused, not taken for none (`--since "$UNSET"` would replay all)."""
    try:
        return parse_time(value) if value is not None else None
    except JobError as exc:
        raise click.BadParameter(str(exc)) from None


def _partner(value: str | None) -> str | None:
    """--partner's value; an empty one is refused, not taken for the partner id "" (`--partner "$UNSET"` selected
    no event: the replay sent nothing and ended as a success)."""
    if value is not None and not value.strip():
        raise click.BadParameter("empty: give a partner id, or leave the option out for all partners")
    return value


@click.command()
@click.option("--module", "modules", multiple=True, type=click.Choice(MODULES),
              help="Module to replay (repeatable; default: all).")
@click.option("--partner", callback=lambda _c, _p, v: _partner(v),
              help="Only events pushed or pulled from this partner id.")
@click.option("--since", help="Only events received at or after this time (2024-05-01T12:00:00Z, 2024-05-01, 6h).")
@click.option("--until", help="Only events received before this time.")
@click.option("--partition", type=click.IntRange(min=0), help="Kafka: only this partition.")
@click.option("--from-offset", type=click.IntRange(min=0),
              help="Kafka: first offset (inclusive) of every selected partition.")
@click.option("--to-offset", type=click.IntRange(min=1),
              help="Kafka: last offset (exclusive) of every selected partition.")
@click.option("--from-archive", "archive", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Replay from archive files written by `export` instead of Kafka.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed (per module, partition and offset "
              "range, or archive file) and send nothing.")
@click.option("--rebuild", is_flag=True, help="Rebuild every pipeline table from the topics into a fresh "
              "database and swap it in (no selection options).")
@click.option("--partial-history", is_flag=True, help="--rebuild: go on although retention deleted the start of "
              "some topics' partitions (replay their history from an archive first).")
@click.option("--wait/--no-wait", default=False, show_default=True,
              help="Wait until the pipeline's worker has consumed the replayed events (not with --rebuild, which "
              "always waits for its own worker).")
@click.option("--timeout", default=3600.0, show_default=True, callback=lambda _c, _p, v: seconds(v, least=0.0),
              help="Seconds --wait may take; with --rebuild, each step that waits for its worker may (the build, "
              "the gap after the swap, and then each one's internal topics).")
@click.option("--job", callback=lambda _c, _p, v: _job_name(v),
              help="Name of the job (default: derived from the selection, so a rerun resumes it).")
@click.option("--again", is_flag=True, help="Replay once more even if this job has completed before.")
def replay(modules: tuple[str, ...], partner: str | None, since: str | None, until: str | None,
           partition: int | None, from_offset: int | None, to_offset: int | None, archive: Path | None,
           dry_run: bool, rebuild: bool, partial_history: bool, wait: bool, timeout: float, job: str | None,
           again: bool) -> None:
    """Send recorded events through the pipeline again, marked source=REPLAY.

    From the Kafka topics (by offsets or by a time range) or from archive files, for some modules, one partner
    or all. Events keep their id and content hash, so the pipeline's deduplication makes a replay change no
    total. Interrupted (Ctrl-C)? Run the same command again: it resumes from its checkpoint.

    \b
    Examples:
      ocpi-pipeline replay --module cdrs --since 2024-05-01 --until 2024-05-02 --dry-run
      ocpi-pipeline replay --partner cpo-nl --since 6h --wait
      ocpi-pipeline replay --from-archive /backup/ocpi --module sessions
      ocpi-pipeline replay --rebuild
    """
    from pipeline.jobs.replay import Selection

    settings = load_settings()
    bootstrap = _bootstrap(settings)
    console = Console()
    if rebuild:
        if any((modules, partner is not None, since is not None, until is not None, partition is not None,
                from_offset is not None, to_offset is not None, archive, job is not None, again)):
            raise click.UsageError("--rebuild recomputes everything from the topics: it takes no selection")
        if click.get_current_context().get_parameter_source("wait") is not ParameterSource.DEFAULT:
            raise click.UsageError("--rebuild always waits for its own worker and returns once the rebuilt tables "
                                   "are swapped in and caught up: it takes no --wait/--no-wait")
        _rebuild(settings, bootstrap, dry_run, timeout, console, partial_history)
        return
    if partial_history:
        raise click.UsageError("--partial-history goes with --rebuild")
    try:
        selection = Selection(modules=check_modules(modules), partner=partner, since=_time(since),
                              until=_time(until), partition=partition, from_offset=from_offset, to_offset=to_offset,
                              relative=(relative_text(since), relative_text(until)))
    except JobError as exc:
        raise click.UsageError(str(exc)) from None
    if archive is not None and selection.by_offset:
        raise click.UsageError("--partition/--from-offset/--to-offset select Kafka offsets; they do not apply "
                               "to an archive")
    with RichProgress() as progress:
        if archive is not None:
            from pipeline.jobs.replay import replay_archive

            coro = replay_archive(settings, bootstrap, archive, selection, job=job, again=again, dry_run=dry_run,
                                  progress=progress)
        else:
            from pipeline.jobs.replay import replay_kafka

            coro = replay_kafka(settings, bootstrap, selection, job=job, again=again, dry_run=dry_run,
                                progress=progress)
        report = _run(coro, "run the same command again to resume from its checkpoint", bootstrap)
    table = folded_table("module", "where", "records", *(["would replay"] if dry_run else []),
                  title=f"replay {report.job}" + (" (dry run: nothing sent)" if dry_run else ""))
    for line in report.lines:
        table.add_row(line.module, line.where, str(line.records), *([str(line.matching)] if dry_run else []))
    console.print(table)
    if report.status == "already-done":  # a rerun of `--wait` whose wait was cut short still waits
        console.print(f"job {report.job} completed before ({report.sent} events sent); --again replays once more")
    else:
        verb = "would send" if dry_run else "sent"
        total = sum(line.matching or 0 for line in report.lines) if dry_run else report.sent
        console.print(f"{verb} {total} events; left out by the selection {report.filtered}, "
                      f"repeated event ids {report.duplicates}, undecodable {report.undecodable}")
    if report.truncated:
        named = _first_few(report.truncated)
        console.print(f"[yellow]Kafka no longer holds the start of {len(report.truncated)} partition(s) the "
                      f"selection reaches before ({named}): retention deleted those records, so they are not "
                      "replayed; an archive `export` wrote may hold them (replay --from-archive DIR)[/]")
    if report.lost:
        named = _first_few(report.lost)
        console.print(f"[yellow]{len(report.lost)} offset range(s) were deleted by Kafka's retention before the "
                      f"replay read them ({named}): not replayed; an archive `export` wrote may hold them[/]")
    if wait and not dry_run and report.written:
        from pipeline.jobs.replay import wait_for_replayed

        _run(wait_for_replayed(settings, bootstrap, report.written, timeout=timeout),
             "the events are in Kafka already", bootstrap)
        console.print("the pipeline has consumed them")


def _first_few(names: list[str]) -> str:
    """The first three of `names`, and an ellipsis when there are more."""
    return ", ".join(names[:3]) + (" …" if len(names) > 3 else "")


def _rebuild(settings: Settings, bootstrap: str, dry_run: bool, timeout: float, console: Console,
             partial_history: bool) -> None:
    from pipeline.jobs.rebuild import rebuild, source_targets, truncated_partitions

    if dry_run:
        targets = _run(source_targets(settings, bootstrap), "nothing was changed",
                       bootstrap)
        modules = {settings.kafka.topic_for(m): m for m in MODULES} | {settings.kafka.topic_rejections: "rejections"}
        table = folded_table("module", "partition", "offsets", "records",
                      title=f"rebuild of database {settings.clickhouse.database} (dry run: nothing changed)")
        for topic, partition, begin, end in targets:
            table.add_row(modules[topic], f"{topic}/{partition}", f"{begin}-{end - 1}" if end > begin else "–",
                          str(end - begin))
        console.print(table)
        truncated = truncated_partitions(targets)
        if truncated:
            console.print(f"retention deleted the start of {len(truncated)} partition(s) (offsets not from 0): a "
                          "rebuild is refused without --partial-history")
        return
    with RichProgress() as progress:
        report = _run(rebuild(settings, bootstrap, timeout=timeout, progress=progress,
                              partial_history=partial_history),
                      "run `ocpi-pipeline replay --rebuild` again to resume", bootstrap)
    console.print(f"rebuilt {', '.join(report.swapped)} in database {report.database} from {report.events} "
                  f"records; then {report.tail} records the live worker handled meanwhile, into them after the swap")
    console.print(f"the previous tables are in database {report.old_database}: "
                  f"check them, then DROP DATABASE `{report.old_database}`")


def _directory(value: str) -> Path:
    """The archive's directory; an empty one is refused, not taken for `.` (`export "$UNSET"` archived into whatever
    directory the command ran in)."""
    if not value.strip():
        raise click.BadParameter("empty: give the archive's directory (`.` for the current one)")
    return Path(value)


@click.command()
@click.argument("directory", type=click.Path(file_okay=False),
                callback=lambda _c, _p, v: _directory(v))
@click.option("--module", "modules", multiple=True, type=click.Choice(MODULES),
              help="Module to export (repeatable; default: all).")
@click.option("--source", type=click.Choice(["kafka", "clickhouse"]), default="kafka", show_default=True,
              help="kafka: the topics (the source of truth); clickhouse: raw_events, for history the topics "
              "no longer hold.")
@click.option("--max-records", default=50_000, show_default=True, type=click.IntRange(min=1),
              help="Records per archive file at most.")
def export(directory: Path, modules: tuple[str, ...], source: str, max_records: int) -> None:
    """Archive raw events to Avro container files: DIRECTORY/<module>/<YYYY-MM-DD>/part-*.avro.

    The OcpiEvent schema is in every file, so later versions read them (`replay --from-archive`). Reruns add
    only what is not archived yet; an interrupted export leaves only complete files.

    \b
    Examples:
      ocpi-pipeline export /backup/ocpi
      ocpi-pipeline export /backup/ocpi --source clickhouse --module cdrs
    """
    from pipeline.jobs.archive import container_codec, export_from_clickhouse, export_from_kafka

    settings = load_settings()
    wanted = check_modules(modules)
    with RichProgress() as progress:
        if source == "kafka":
            bootstrap = _bootstrap(settings)
            result = _run(export_from_kafka(settings, bootstrap, directory, wanted, max_records=max_records,
                                            progress=progress), "run it again: complete files are kept", bootstrap)
        else:
            try:
                client = connect_for(settings, readonly=True)
            except ClickHouseUnavailable as exc:
                raise click.ClickException(str(exc)) from None
            try:
                result = export_from_clickhouse(settings, client, directory, wanted, max_records=max_records,
                                                progress=progress)
            except KeyboardInterrupt:
                click.echo("interrupted: run it again: complete files are kept", err=True)
                sys.exit(130)
            except JobError as exc:  # another export into the directory, a damaged archive file
                raise click.ClickException(str(exc)) from None
            except ClickHouseError as exc:  # a server (or `dev` and its shim) gone or failing after the connect
                raise click.ClickException(f"ClickHouse failed during the export ({exc}); run it again: complete "
                                           "files are kept") from None
            finally:
                client.close()
    console = Console()
    table = folded_table("module", "events archived now", title=f"export to {directory} ({container_codec()})")
    for module, count in result.records.items():
        table.add_row(module, str(count))
    console.print(table)
    console.print(f"{len(result.files)} new files, {result.undecodable} undecodable records skipped"
                  + (f", {result.skipped_days} unchanged days skipped" if source == "clickhouse" else ""))
    for lost in result.lost:
        console.print(f"[yellow]gone from Kafka before it was archived: {lost}[/]")
    if source == "kafka" and not result.total and not result.files:
        console.print("nothing new in Kafka; for history the topics no longer hold use --source clickhouse")
    if result.lost:  # for good: a rerun goes on after them, so the run that saw it must not end as a success
        raise click.ClickException(f"{len(result.lost)} offset range(s) were deleted by Kafka's retention before "
                                   "they were archived (listed above); raw_events may still hold them: "
                                   "export --source clickhouse into another directory")
    if source == "clickhouse" and result.undecodable:
        # Every raw_events row is an event the pipeline accepted: one that cannot be rebuilt as an OcpiEvent is
        # archived by no rerun either, and the archive is what outlives the row's TTL. (From Kafka, records that
        # are no OcpiEvent are the worker's dead letters: not events, not archived.)
        raise click.ClickException(f"{result.undecodable} raw events could not be archived (the log names each and "
                                   "why): the archive lacks them, and raw_events keeps them only until its TTL "
                                   "(OCPI_RETENTION_RAW_DAYS)")


@click.command()
@click.option("--partner", required=True, help="Partner id in the registry (`ocpi-pipeline partners list`).")
@click.option("--module", required=True, type=click.Choice(list(KINDS)), help="Sender interface to pull.")
@click.option("--since", help="date_from (inclusive); default: where the pulls completed so far end without a "
              "gap, for each party its own (a one-off window apart from them, after a gap or an old one again, "
              "does not move it).")
@click.option("--until", help="date_to (exclusive); default: 5 minutes before now (the partner's clock may run "
              "behind ours; the next pull starts there).")
@click.option("--limit", default=100, show_default=True, type=click.IntRange(min=1),
              help="Objects per page asked for (the server may cap it).")
@click.option("--restart", is_flag=True, help="Abandon an interrupted crawl instead of resuming it.")
@click.option("--full", is_flag=True, help="Read the whole list, without date_from (not where the pulls ended), "
              "for full sync of Locations. With --schedule, the first round.")
@click.option("--no-full-sync", "no_full_sync", is_flag=True,
              help="Do not unlist the stored Locations a complete Locations list no longer holds; only report them.")
@click.option("--max-attempts", default=8, show_default=True, type=click.IntRange(min=1),
              help="Attempts per page on HTTP 429 or 5xx, a timeout or connection error, OCPI 3xxx or a Hub's "
                   "4002/4003.")
@click.option("--schedule", type=float, metavar="SECONDS", callback=lambda _c, _p, v: seconds(v, least=0.0),
              help="Pull again every SECONDS (plus a random splay) until Ctrl-C or SIGTERM; each round after the "
              "first continues where the pulls completed so far end without a gap (--since counts for a party "
              "until one of its pulls has completed), up "
              "to 5 minutes before now.")
@click.option("--splay", type=float, metavar="SECONDS", callback=lambda _c, _p, v: seconds(v, least=None),
              help="Random extra delay per round (default: 10% of "
              "--schedule).")
def pull(partner: str, module: str, since: str | None, until: str | None, limit: int, restart: bool, full: bool,
         no_full_sync: bool, max_attempts: int, schedule: float | None, splay: float | None) -> None:
    """Catch up from a partner's Sender interface (GET with date_from/date_to, paginated) into the pipeline.

    Objects are validated like pushes and published to the same topics, marked source=PULL. The GETs are
    addressed (OCPI-to-*) to each CPO party of the partner in turn (a platform hosting several lists only the
    addressed party's objects), or to a Hub's own party. The position is checkpointed per partner, module and
    party: an interrupted pull resumes, the next one starts where the pulls completed so far end without a gap.
    Full sync (08 §2.1): a complete Locations list (read without date_from, to the default date_to, nothing left
    unread: a party's first pull, or --full) is the new truth. The stored Locations of the party it no longer lists
    are unlisted (marked so in the store, answered unknown by the receivers' GET; a push newer than the list, or a later
    pull that returns it, lists one again),
    counted in the summary and named in OCPI_DATA_DIR/jobs/pull/<partner>.locations.not-listed.jsonl; with
    --no-full-sync they are only reported.

    \b
    Examples:
      ocpi-pipeline pull --partner cpo-nl --module cdrs --since 2024-05-01
      ocpi-pipeline pull --partner cpo-nl --module sessions --schedule 3600
      ocpi-pipeline pull --partner cpo-nl --module locations --full
    """
    from pipeline.jobs.kafka_io import JobProducer
    from pipeline.jobs.pull import (
        PullError,
        PullReport,
        RetryPolicy,
        not_listed_path,
        pull_every,
        record_not_listed,
        stored_not_listed,
    )
    from pipeline.jobs.pull import pull as pull_once
    from pipeline.retention import PseudonymKeyError, check_key, load_key
    from receivers.registry import PartnerRegistry, RegistryError

    settings = load_settings()
    bootstrap = _bootstrap(settings)
    start, end = _time(since), _time(until)
    if schedule is not None and end is not None:
        raise click.UsageError("--schedule pulls up to now every round; it takes no --until")
    if splay is not None and schedule is None:
        raise click.UsageError("--splay delays the rounds of --schedule; a single pull takes none")
    if no_full_sync and module != "locations":
        raise click.UsageError("--no-full-sync is for Locations: full sync applies to no other module")
    if full and (since is not None or module == "sessions"):
        raise click.UsageError("--full reads the whole list, without date_from: it takes no --since, and Sessions "
                               "have none (09 §2.1)")
    console = Console()

    async def once(progress: RichProgress, later_round: bool) -> Any:
        try:
            client = await asyncio.to_thread(connect_for, settings)
            try:
                found = await asyncio.to_thread(PartnerRegistry(client).require, partner)
                # The objects it refuses are recorded with the store's pseudonyms: another key's would join nothing.
                await asyncio.to_thread(check_key, client, load_key(settings), recorded_by="pull")
            finally:
                client.close()
        except (RegistryError, PseudonymKeyError) as exc:
            raise JobError(str(exc)) from None
        async def not_listed(of: Any, report: PullReport) -> list[tuple[str, str, str]]:
            """Full sync (08 §2.1): the stored Locations a complete list no longer holds, recorded for the operator."""
            def read() -> list[tuple[str, str, str]]:
                client = connect_for(settings)
                try:
                    return stored_not_listed(client, of, report)
                finally:
                    client.close()
            try:
                report.not_listed = await asyncio.to_thread(read)
            except (ClickHouseError, ClickHouseUnavailable, OSError) as exc:  # the crawl stays at its end: rerun
                raise PullError(f"full sync: the stored Locations could not be read ({type(exc).__name__}: {exc}); "
                                "run the pull again to compare its complete list") from None
            record_not_listed(settings, report, unlisted=not no_full_sync)
            return report.not_listed

        async with JobProducer(settings.kafka, bootstrap) as producer:
            return await pull_once(settings, found, module, producer, since=start, until=end, limit=limit,
                                   relative=(relative_text(since) if start is not None else None,
                                             relative_text(until)),
                                   restart=restart, since_unless_completed=later_round,
                                   retry=RetryPolicy(max_attempts=max_attempts), progress=progress,
                                   full=full and not later_round, not_listed=not_listed, unlist=not no_full_sync)

    def show(report: Any) -> None:
        for each in report.parties or [report]:  # one line per party the GETs were addressed to
            whose = f" (party {'/'.join(each.party)})" if each.party is not None else ""
            console.print(f"pulled {each.objects} {module} from {partner}{whose} for "
                          f"[{each.since or 'the beginning'}, {each.until}) in {each.pages} pages"
                          f"{' (resumed)' if each.resumed else ''}; invalid {each.invalid}, not the partner's "
                          f"{each.foreign}, re-read pages {each.rereads}, retries {each.retries}")
            if each.unread:
                console.print(f"[yellow]the partner announced {each.unread} more objects (X-Total-Count) than "
                              f"its pages led to{whose}: not read; see the log[/]")
            if each.not_listed is not None:
                named = ", ".join("/".join(ident) for ident in each.not_listed[:5])
                more = f" and {len(each.not_listed) - 5} more" if len(each.not_listed) > 5 else ""
                done = "reported only (--no-full-sync)" if no_full_sync else f"unlisted {each.unlisted}"
                console.print(f"full sync{whose}: the complete list holds {len(each.listed or ())} Locations; "
                              f"{len(each.not_listed)} stored ones are no longer listed"
                              f"{f' ({escape(named)}{more})' if named else ''}: {done}; see "
                              f"{not_listed_path(settings, partner)}")
            elif full and each.not_full is not None:
                console.print(f"[yellow]no full sync{whose}: {escape(each.not_full)}[/]")

    hint = "run the same command again to resume from its checkpoint"
    if schedule is None:
        with RichProgress() as progress:
            report = _run(once(progress, False), hint, bootstrap)
        show(report)
        return

    async def forever() -> Any:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)

        rounds = 0

        async def round_() -> Any:
            nonlocal rounds
            rounds += 1
            with RichProgress() as progress:
                report = await once(progress, rounds > 1)
            show(report)
            return report

        def failed(exc: Exception) -> None:
            console.print(f"[red]pull failed:[/] {escape(str(exc))}; next round as scheduled")  # partner text

        return await pull_every(schedule, schedule * 0.1 if splay is None else splay, round_, stop, failed)

    state = _run(forever(), hint, bootstrap)
    console.print(f"stopped after {state.runs} rounds ({state.failures} failed)")
