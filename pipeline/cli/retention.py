"""Retention commands: what the policy is and what is due (`report`), and enforcing it now (`apply`)."""

from __future__ import annotations

import click
import kafka.errors
from clickhouse_connect.driver.exceptions import ClickHouseError
from rich.console import Console

from infra.clickhouse.client import ClickHouseUnavailable, connect_for
from infra.kafka.bootstrap import KafkaNotConfigured, reachable, resolve_bootstrap
from infra.settings import Settings, load_settings
from pipeline import retention
from pipeline.cli.errors import kafka_failed
from pipeline.cli.tables import folded_table
from pipeline.records import utc_now


@click.group("retention")
def retention_group() -> None:
    """Data retention: raw events, histories, personal data (pseudonymised), billing records."""


def _topic_configs_in_effect(settings: Settings) -> dict[str, dict[str, str]] | str:
    """The configs of the policy's topics as the broker reports them (existing topics only), or why not."""
    from infra.kafka.admin import topic_configs

    try:
        bootstrap = resolve_bootstrap(settings)
    except KafkaNotConfigured:
        return "not available (no Kafka configured and no running instance)"
    if not reachable(bootstrap):
        return f"not available ({bootstrap} does not answer)"
    try:
        return topic_configs(bootstrap, retention.topic_configs(settings))
    except kafka.errors.KafkaError as exc:  # it accepted the connection, then timed out or refused
        return f"not available (Kafka at {bootstrap} failed: {type(exc).__name__}: {exc})"


@retention_group.command("report")
def report() -> None:
    """Show the retention policy, the TTL in effect per table (flagged where it is not the configured one), and
    how many rows it removes (by the TTL in effect: what ClickHouse deletes) or pseudonymises now (with the replaced
    versions in clear that pass deletes); and the configs of the topics (retention.ms, the state changelogs'
    compaction).

    Example: ocpi-pipeline retention report
    """
    settings = load_settings()
    try:
        client = connect_for(settings, readonly=True)
        rows = retention.report_rows(client, settings.clickhouse.database, settings, utc_now())
        leftovers = retention.leftover_rebuilds(client, settings.clickhouse.database)
    except ClickHouseUnavailable as exc:
        raise click.ClickException(str(exc)) from None
    except ClickHouseError as exc:  # a server (or `dev` and its shim) gone or failing after the connect
        raise click.ClickException(f"ClickHouse failed: {exc}") from None
    console = Console(width=max(Console().width, 130))
    policy = folded_table("class", "what", "kept", title="Retention policy")
    for data_class in retention.policy(settings):
        policy.add_row(data_class.name, data_class.what, data_class.keep)
    console.print(policy)
    due = folded_table("class", "table", "rule", "in effect", "rows due now", title="Due now")
    for row in rows:
        in_effect = row.ttl_in_effect or "[red]none[/]"
        if row.ttl_differs:  # the rows due are the TTL in effect's, which `retention apply` would replace
            in_effect = f"[yellow]{in_effect} (policy: {row.ttl_configured})[/]"
        count = str(row.rows_due)
        if row.replaced_in_clear:  # versions in clear the current rows replace, deleted by the same pass
            count += f" (+ {row.replaced_in_clear} replaced versions in clear, deleted)"
        due.add_row(row.data_class, row.table, row.rule, in_effect, count)
    console.print(due)
    topics = folded_table("topic", "config", "in effect",
                   title="Kafka topics (raw class) and state changelogs (personal class)")
    found = _topic_configs_in_effect(settings)
    if isinstance(found, str):
        topics.add_row("*", "", found)
    else:
        for topic, wanted in retention.topic_configs(settings).items():
            if topic not in found:
                topics.add_row(topic, "", "not created yet")
                continue
            for key, value in wanted.items():
                have = found[topic].get(key, "?")
                topics.add_row(topic, key, have if have == value else f"{have} (policy: {value})")
    console.print(topics)
    for warning in retention.warnings(settings):
        console.print(f"[yellow]note:[/] {warning}")
    for database in leftovers:
        console.print(f"[yellow]note:[/] {database} holds the tables a rebuild replaced, personal data in clear "
                      f"(pseudonymisation rewrites only the live database): DROP DATABASE `{database}` once the "
                      "rebuild is verified")


@retention_group.command("apply")
def apply() -> None:
    """Enforce the policy now: set the configured TTLs and topic retention, pseudonymise what is due.

    The worker does this by itself (TTLs and topic configs at start, pseudonymisation every hour), its own state
    too; this command changes the ClickHouse tables and the existing topics only.

    Example: OCPI_RETENTION_RAW_DAYS=14 ocpi-pipeline retention apply
    """
    from infra.kafka.admin import TopicConfigError, set_topic_configs

    settings = load_settings()
    try:
        client = connect_for(settings)
        key = retention.load_key(settings)
        retention.check_key(client, key, recorded_by="retention apply")  # before anything changes
        changed = retention.apply_ttls(client, settings.clickhouse.database, settings)
        done = retention.pseudonymise_due(client, settings, retention.Pseudonymizer(key), utc_now())
    except (ClickHouseUnavailable, retention.PseudonymKeyError) as exc:
        raise click.ClickException(str(exc)) from None
    except ClickHouseError as exc:  # a server (or `dev` and its shim) gone or failing after the connect
        raise click.ClickException(f"ClickHouse failed: {exc}; run the command again (what it set is kept)") from None
    click.echo(f"TTL set on: {', '.join(changed) or 'nothing (already as configured)'}")
    click.echo("pseudonymised: " + ", ".join(f"{table} {n}" for table, n in done.items()))
    try:
        bootstrap = resolve_bootstrap(settings)
    except KafkaNotConfigured as exc:
        click.echo(f"topics not changed: {exc}")
        return
    if not reachable(bootstrap):  # fail at once, not after the Kafka client's timeout, and not as a traceback
        raise click.ClickException(f"topics not changed: Kafka at {bootstrap} does not answer (the ClickHouse part "
                                   "above is done); run the command again when it does")
    wanted = retention.topic_configs(settings)
    try:
        topics, missing = set_topic_configs(bootstrap, wanted)
    except TopicConfigError as exc:
        raise click.ClickException(f"topics not changed: {exc}") from None
    except kafka.errors.KafkaError as exc:  # it accepted the connection, then timed out or refused
        note = "the ClickHouse part above is done; run the command again"
        raise click.ClickException(f"topics not changed: {kafka_failed(bootstrap, exc, note).message}") from None
    unchanged = "nothing" if missing else "nothing (already as configured)"
    click.echo(f"topic retention set on: {', '.join(topics) or unchanged}")
    if missing:
        click.echo(f"topics not created yet (the worker creates them with this policy): {', '.join(missing)}")
