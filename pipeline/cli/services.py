"""Service commands: serve, worker, dev, demo."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import signal
import sys
import tempfile
from pathlib import Path

import click
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Column, Table

from infra.clickhouse.client import ClickHouseUnavailable, chdb_path, connect_for, effective_dsn
from infra.clickhouse.migrations import MigrationError
from infra.kafka.admin import TopicConfigError
from infra.kafka.bootstrap import KafkaNotConfigured, reachable, resolve_bootstrap
from infra.kafka.embedded import EmbeddedBrokerError
from infra.settings import Settings, load_settings
from pipeline.cli.errors import kafka_failed, seconds
from pipeline.demo import DemoSummary, PartyTotals, run_demo
from pipeline.stack import Stack, StackError, check_port_free
from receivers.registry import PartnerRegistry, PartnerStatus

FIRST_PARTNER = "first-cpo"


@click.command()
@click.option("--workers", default=1, show_default=True, type=click.IntRange(min=1), help="granian worker processes.")
def serve(workers: int) -> None:
    """Serve the OCPI receivers over HTTP (granian), publishing to the configured Kafka.

    Needs a Kafka and a ClickHouse server (the partner registry), or a running `ocpi-pipeline dev`, whose
    embedded ones it then uses.

    Example: OCPI_KAFKA_BOOTSTRAP=kafka:9092 OCPI_CLICKHOUSE_DSN=http://default:pw@ch:8123 ocpi-pipeline serve
    """
    from granian.constants import Interfaces
    from granian.server import Server

    settings = load_settings()
    try:
        # granian binds with SO_REUSEPORT: next to another server on the port (a `dev`, a second `serve`) its bind
        # would succeed and the kernel would split the partners' connections between them.
        check_port_free(settings.http.host, settings.http.port)
        bootstrap = resolve_bootstrap(settings)
    except (StackError, KafkaNotConfigured) as exc:
        raise click.ClickException(str(exc)) from None
    dsn, _password = effective_dsn(settings)
    if dsn.startswith("chdb://"):
        # The receivers' workers would each open the chDB directory, which one process only may hold (and a
        # worker could not open it next to them): refused here, not a receiver that never answers.
        raise click.ClickException(
            f"serve needs a ClickHouse server (OCPI_CLICKHOUSE_DSN=http://user:password@host:8123) or a running "
            f"`ocpi-pipeline dev`, whose embedded store it then uses; the embedded store at {chdb_path(dsn)} opens "
            "in one process only (`ocpi-pipeline dev` runs everything on the embedded engines)")
    try:
        # The receivers read the partner registry at start: a store that is down (or not migrated) would end
        # granian's worker in a traceback, and the server with it.
        connect_for(settings).close()
    except ClickHouseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    create_receiver_topics(settings, bootstrap)
    Server("receivers.asgi:app", address=settings.http.host, port=settings.http.port,
           interface=Interfaces.ASGI, workers=workers, websockets=False).serve()


def create_receiver_topics(settings: Settings, bootstrap: str) -> None:
    """Create the topics the receivers write (module topics, rejections) with our partitions, replicas and configs,
    as `dev` does: a Kafka that creates topics on first use (Apache Kafka's default) would otherwise create them
    on the first push before any worker ran, with its own defaults (one partition, one replica, 1 MB records),
    which the worker keeps (it sets configs, not partitions or replicas, on existing topics). Kafka down: the
    receivers start anyway (pushes answer 3000 until it answers and the worker has created them)."""
    from infra.kafka import admin
    from pipeline.retention import topic_configs

    kafka = settings.kafka
    if not reachable(bootstrap):  # at once, not after the admin client's bootstrap timeout
        click.echo(f"warning: topics not created (Kafka at {bootstrap} does not answer); pushes answer 3000 until "
                   "it does and the worker has created them", err=True)
        return
    try:
        admin.ensure_topics(bootstrap, (*kafka.module_topics, kafka.topic_rejections),
                            kafka.partitions, topic_configs(settings), replicas=kafka.replication_factor)
    except Exception as exc:  # the broker went away meanwhile, or refused: the receivers answer 3000 meanwhile
        click.echo(f"warning: topics not created ({type(exc).__name__}: {exc}); pushes answer 3000 until the worker "
                   "has created them", err=True)


@click.command()
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run the Faust worker: module topics -> rules -> ClickHouse.

    Example: OCPI_KAFKA_BOOTSTRAP=kafka:9092 ocpi-pipeline worker
    """
    import kafka.errors

    from infra.kafka.bootstrap import KafkaNotConfigured
    from pipeline.retention import PseudonymKeyError
    from pipeline.worker import PartitionMismatch, StateInUse, run_worker

    settings = load_settings()
    try:
        run_worker(settings, loglevel=ctx.obj["log_level"])
    except (KafkaNotConfigured, ClickHouseUnavailable, PseudonymKeyError, TopicConfigError, PartitionMismatch,
            StateInUse) as exc:
        raise click.ClickException(str(exc)) from None
    except kafka.errors.KafkaError as exc:  # the broker down or unreachable (the topics are prepared before Faust)
        raise kafka_failed(settings.kafka.bootstrap or "the running `dev` instance", exc) from None


def first_partner_line(registry: PartnerRegistry) -> str:
    """What `dev` says of the first partner: a fresh Token A while it has not registered, else where it stands."""
    partner = registry.get(FIRST_PARTNER)
    if partner is None:
        return f"Token A ({FIRST_PARTNER}): {registry.invite(FIRST_PARTNER, 'First CPO')[1]}"
    if partner.status is PartnerStatus.INVITED:
        return f"Token A ({FIRST_PARTNER}): {registry.reinvite(FIRST_PARTNER)}"
    if partner.status is PartnerStatus.REGISTERED:
        return f"{FIRST_PARTNER} is registered already; `ocpi-pipeline partners invite` adds another"
    return (f"{FIRST_PARTNER} is {partner.status.value.lower()} (`ocpi-pipeline partners show {FIRST_PARTNER}`); "
            "`ocpi-pipeline partners invite` adds another")


async def _run_dev(settings: Settings, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(settings)
    try:
        await stack.start()
        assert stack.clickhouse is not None
        first_partner = await asyncio.to_thread(first_partner_line, PartnerRegistry(stack.clickhouse))
        console.print(f"[bold green]ready[/] data in {stack.data_dir}, logs in {stack.log_dir}")
        console.print(f"Kafka (embedded Tansu): {stack.bootstrap}" if stack.broker else f"Kafka: {stack.bootstrap}")
        click.echo(f"versions URL: {stack.versions_url}")
        click.echo(first_partner)
        if stack.broker is not None:  # an embedded broker starts empty, and so does the worker's state
            from pipeline.worker import state_gap

            warning = await asyncio.to_thread(state_gap, stack.clickhouse)
            if warning:
                console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)
        console.print("query it from another terminal: ocpi-pipeline query \"SELECT count() FROM raw_events FINAL\"")
        console.print("Ctrl-C stops everything.")
        while not stop.is_set():
            stack.check_children()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    finally:
        console.print("stopping…")
        await stack.stop()


@click.command()
def dev() -> None:
    """Run everything embedded (Tansu, chDB, worker, receivers) until Ctrl-C or SIGTERM.

    Prints the versions URL and a Token A for a first partner. Data stays in OCPI_DATA_DIR (chDB);
    Kafka is in memory and starts empty on every run, and so does the worker's state: on a data dir that
    holds data it warns, and export --source clickhouse then replay --from-archive restores the state.

    A Kafka or ClickHouse that OCPI_KAFKA_BOOTSTRAP or OCPI_CLICKHOUSE_DSN names is used instead of the
    embedded one (the worker then joins the consumer group OCPI_PIPELINE_APP_ID there): unset them for a
    sandbox.

    Example: ocpi-pipeline dev
    """
    import kafka.errors

    console = Console(stderr=True)
    settings = load_settings()
    try:
        asyncio.run(_run_dev(settings, console))
    except (StackError, EmbeddedBrokerError, ClickHouseUnavailable, MigrationError, TopicConfigError) as exc:
        raise click.ClickException(str(exc)) from None
    except kafka.errors.KafkaError as exc:  # a configured Kafka (OCPI_KAFKA_BOOTSTRAP) down or unreachable
        raise kafka_failed(settings.kafka.bootstrap, exc, "empty: an embedded broker") from None


def print_summary(console: Console, summary: DemoSummary) -> None:
    # Short headers so the figures fit 80 columns (a piped output's width too); a figure that still does not fit
    # (or a party) is folded onto further lines of its cell, never cut short with an ellipsis.
    def figure(header: str) -> Column:
        return Column(header, justify="right", overflow="fold")

    def totals(title: str, parties: list[PartyTotals], *, sessions: bool) -> Table:
        table = Table(Column("party", overflow="fold"), Column("currency", overflow="fold"),
                      *([figure("sessions")] if sessions else []), figure("CDRs"), figure("kWh"), figure("excl. VAT"),
                      figure("incl. VAT"), title=title)
        for p in parties:
            table.add_row(f"{p.country_code}/{p.party_id}", p.currency, *([str(p.sessions)] if sessions else []),
                          str(p.cdrs), f"{p.kwh:.4f}", f"{p.cost_excl_vat:.4f}", f"{p.cost_incl_vat:.4f}")
        return table

    console.print(totals("Billing totals read back from ClickHouse: completed sessions, CDRs (credits too, netted), "
                         "kWh and cost of charging per party and currency", summary.parties, sessions=True))
    if summary.compensation:  # owed to drivers: never in the billing totals above
        console.print(totals("Home charging compensation read back from ClickHouse (owed to drivers, not in the "
                             "billing totals): CDRs (credits too, netted), kWh and amount per party and currency",
                             summary.compensation, sessions=False))
    e = summary.expected
    console.print(f"raw events: {summary.raw_events}   dead letters: {summary.dead_letters}")
    # Beyond the simulator's deliberate retries and late pushes, EVSE status pushes of overlapping stories repeat a
    # stored status (duplicates) or arrive after a newer one (stale): both counts vary a little between runs.
    console.print(f"duplicates dropped: {summary.duplicates} ({e.retries} deliberate retries, the rest EVSE statuses "
                  f"pushed again)   stale updates: {summary.stale} ({e.stale} sent late on purpose, the rest EVSE "
                  "statuses overtaken by newer ones)")
    console.print("outcomes: " + ", ".join(f"{k} {v}" for k, v in summary.outcomes.items()))
    console.print("anomalies: " + (", ".join(f"{k} {v}" for k, v in summary.anomalies.items()) or "none"))
    console.print("reconciliation: " + (", ".join(f"{s} {o} {n}" for (s, o), n in summary.reconciliation.items())
                                        or "none")
                  + "   credit links: " + (", ".join(f"{k} {v}" for k, v in summary.credit_links.items()) or "none"))
    console.print("  (MISMATCH: the corrected CDRs, re-priced on purpose, and their sessions; CREDIT/CREDITED: the "
                  "credit CDRs and the CDRs they cancel)")
    # `pushes` counts requests: a push answered 3000 is sent again (events + rejected: the pushes themselves).
    resent = e.pushes - e.events - e.rejected
    console.print(f"pushes acknowledged: {e.events} of {e.events + e.rejected}"
                  + (f" ({resent} resent after a 3000 answer)" if resent else "")
                  + f"   elapsed: {summary.seconds:.1f}s")
    verdict = "[green]matches[/]" if summary.matches_expected else "[red]DOES NOT MATCH[/]"
    console.print(f"ClickHouse {verdict} what the simulated CPOs pushed "
                  f"({len(e.sessions)} sessions, {len(e.cdrs)} CDRs, {len(e.evse_status)} EVSEs).")
    for problem in summary.mismatches:
        console.print(f"  [red]-[/] {problem}")


def _stop_like_ctrl_c(_signum: int, _frame: object) -> None:
    """A SIGTERM (kill, timeout, a CI runner) stops the demo like Ctrl-C: its default would end the process at once,
    leaving the temporary data directory behind. Not by raising SIGINT when that is ignored (a process started in
    the background by a script, `demo &`, ignores it): the SIGTERM would do nothing."""
    if callable(signal.getsignal(signal.SIGINT)):  # Python's handler, or asyncio's while `asyncio.run` runs
        signal.raise_signal(signal.SIGINT)
    else:
        raise KeyboardInterrupt


@click.command()
@click.option("--sessions", default=300, show_default=True, type=click.IntRange(min=0),
              help="Charging sessions the simulated CPOs push.")
@click.option("--seed", default=7, show_default=True, help="Seed of the simulated traffic.")
@click.option("--timeout", default=120.0, show_default=True, callback=lambda _c, _p, v: seconds(v, least=0.0),
              help="Seconds to wait for the rows in ClickHouse.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep the demo's data here, a new or empty directory (default: a fresh temporary directory, "
                   "removed afterwards unless the run failed: then it is kept, and named).")
def demo(sessions: int, seed: int, timeout: float, data_dir: Path | None) -> None:
    """The main job on the embedded defaults: simulated CPOs push over HTTP, the summary comes from ClickHouse.

    Starts Tansu, chDB, the worker and the receivers; the simulated CPOs push sessions and CDRs through real
    HTTP; waits until they are in ClickHouse; prints totals per party and currency; stops everything.

    Example: ocpi-pipeline demo --sessions 300
    """
    console = Console()
    signal.signal(signal.SIGTERM, _stop_like_ctrl_c)
    configured = load_settings()  # a wrong value stops the demo here, before it made a directory
    if data_dir is not None and data_dir.is_dir() and any(data_dir.iterdir()):
        # The demo checks that ClickHouse holds exactly what its simulated CPOs pushed: over an earlier run's data
        # (the same partners, parties and object ids) it waited out --timeout and exited 1 with a page of
        # mismatches, and over an operator's data dir it would write its simulated partners and CDRs into it.
        raise click.ClickException(f"--data-dir {data_dir} is not empty: the demo needs a new or empty directory "
                                   "(remove the earlier run's data, or choose another)")
    temp = None
    failed = False  # KeyboardInterrupt (Ctrl-C, SIGTERM) is no failure: its temporary data goes
    if data_dir is None:
        temp = Path(tempfile.mkdtemp(prefix="ocpi-demo-"))
        data_dir = temp
    # Its own stack on a free port: OCPI_PUBLIC_URL (production's, or the container's) would be where the simulated
    # CPOs push and what the receivers advertise. The operator's OCPI_TOKEN_PARTIES would flag every simulated CDR
    # (tokens of the simulator's own eMSP parties) CDR_OF_ANOTHER_EMSP, a mismatch.
    try:
        settings = configured.with_overrides(storage={"data_dir": str(data_dir)}, http={"port": 0, "public_url": ""},
                                             clickhouse={"dsn": ""}, kafka={"bootstrap": ""},
                                             pipeline={"token_parties": ""})
        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console) as progress:
            task = progress.add_task("starting the stack", total=sessions)

            def started(stack: Stack) -> None:
                progress.update(task, description=f"pushing to {stack.base_url}")

            summary = asyncio.run(run_demo(settings, sessions=sessions, seed=seed, timeout=timeout,
                                           on_started=started, progress=lambda n: progress.advance(task, n)))
        print_summary(console, summary)
        failed = not summary.matches_expected
    except (StackError, EmbeddedBrokerError, ClickHouseUnavailable, MigrationError, TopicConfigError) as exc:
        failed = True
        raise click.ClickException(f"{exc}{_kept(temp)}") from None
    except Exception:  # a traceback: its data and logs tell why too
        failed = True
        if temp is not None:
            click.echo(_kept(temp).lstrip("; "), err=True)
        raise
    finally:
        # A failed run keeps its temporary directory: the message names its logs, and its store holds the rows a
        # mismatch is about. A good run, Ctrl-C and SIGTERM remove it.
        if temp is not None and not failed:
            shutil.rmtree(temp, ignore_errors=True)
    if not summary.matches_expected:
        click.echo(_kept(temp).lstrip("; ") or f"its data is in {data_dir}", err=True)
        sys.exit(1)


def _kept(temp: Path | None) -> str:
    """What a failed demo says of its temporary directory, which it keeps."""
    return "" if temp is None else f"; its data and logs are kept in {temp} (remove it when done)"
