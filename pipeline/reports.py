"""Named reports: the SQL of each one, once, and a runner (the CLI `ocpi-pipeline report ...` and tests use them).

Every report is a function returning a `ReportQuery` (SQL with client-side `%(name)s` parameters, bound by
clickhouse-connect) over the tables the pipeline writes:

- revenue: `billable_lines` (`billing_lines`, one line per CDR, credits already negated by the `billing_lines_v2_mv`
  view, so a credit CDR nets out the CDR it cancels; without the lines of DUPLICATE_CREDIT and CREDIT_OF_CREDIT
  credits, which would net it twice); grouped by party, location or day, one row per currency and kind: CHARGING,
  or HOME_CHARGING_COMPENSATION for the CDRs of sessions on a driver's home charger (energy compensated to the
  driver, not charging revenue);
- reconciliation: `reconciliation` outcomes per CPO party, subject, outcome and currency, with the summed deltas;
- anomalies: `anomalies` per kind, module and CPO party;
- health: per partner and module, pushes accepted (`raw_events`, source PUSH), pushes refused
  (`rejections`), the refusal rate and the ingestion lag (`inserted_at - received_at`: from the receiver
  taking the push to its row being written) as p50/p95/max seconds; within the last OCPI_RETENTION_RAW_DAYS
  at most, where the pushes are kept;
- rejections: the refusals themselves, grouped by partner, module, status and field path.

Periods are UTC dates, both ends inclusive; a missing end is unbounded. Identity columns hold upper-cased
keys, so a `--party` filter is upper-cased too.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Final

from clickhouse_connect.driver.client import Client

from infra.clickhouse.client import select
from infra.settings import KafkaSettings, Settings
from ocpi.identity import owner_from_key_part
from pipeline.records import Anomaly

if TYPE_CHECKING:
    from aiokafka import TopicPartition

GROUPINGS: Final = ("party", "location", "day")
ANOMALY_KINDS: Final = tuple(Anomaly)
# `CC/PID`: CiString(2) / CiString(3) (printable ASCII, not empty), as the receivers take and the pipeline stores
# them; a `/` or `%` in either part written `%2F` / `%25`, as in the pipeline's keys (`ocpi.identity.owner_key_part`).
_PARTY: Final = re.compile(r"^([\x20-\x2E\x30-\x7E]+)/([\x20-\x2E\x30-\x7E]+)\Z")


class ReportError(ValueError):
    """A report parameter is invalid; the message says which."""


@dataclass(frozen=True)
class Period:
    """UTC dates, both inclusive; None = unbounded."""

    start: date | None = None
    end: date | None = None

    def __post_init__(self) -> None:
        if self.start and self.end and self.start > self.end:
            raise ReportError(f"the period starts ({self.start}) after it ends ({self.end})")


@dataclass(frozen=True)
class ReportQuery:
    sql: str
    params: dict[str, Any] = field(default_factory=dict)


def parse_party(value: str) -> tuple[str, str]:
    """`CC/PID` (case-insensitive; a `/` or `%` in either part as `%2F` / `%25`) → upper-cased (country_code,
    party_id)."""
    match = _PARTY.match(value.strip())
    parts = [] if match is None else [owner_from_key_part(part) for part in match.groups()]
    if not parts or len(parts[0]) > 2 or len(parts[1]) > 3:
        raise ReportError(f"party {value!r}: expected COUNTRY_CODE/PARTY_ID, e.g. NL/TNM (a / in either as %2F)")
    return parts[0].upper(), parts[1].upper()


class _Filters:
    """WHERE conditions and their parameters, built up in order."""

    def __init__(self) -> None:
        self.conditions: list[str] = []
        self.params: dict[str, Any] = {}

    def period(self, day_expr: str, period: Period) -> _Filters:
        if period.start is not None:
            self.conditions.append(f"{day_expr} >= %(from_day)s")
            self.params["from_day"] = period.start
        if period.end is not None:
            self.conditions.append(f"{day_expr} <= %(to_day)s")
            self.params["to_day"] = period.end
        return self

    def party(self, party: str | None) -> _Filters:
        if party:
            country_code, party_id = parse_party(party)
            self.conditions += ["country_code = %(country_code)s", "party_id = %(party_id)s"]
            self.params.update(country_code=country_code, party_id=party_id)
        return self

    def equals(self, column: str, name: str, value: str | None) -> _Filters:
        if value:
            self.conditions.append(f"{column} = %({name})s")
            self.params[name] = value
        return self

    @property
    def where(self) -> str:
        return ("WHERE " + " AND ".join(self.conditions)) if self.conditions else ""


def revenue(period: Period, *, by: str = "party", party: str | None = None,
            partner: str | None = None) -> ReportQuery:
    """Energy and revenue (credits netted) per CPO party, location or day, currency and kind. `incl_vat` is optional
    in OCPI: revenue incl. VAT sums the CDRs that give it, and `lines_without_incl_vat` counts the others (neither
    VAT-free nor guessed), as `billing_daily` does. `kind` (the last column, so the others keep their places) is
    CHARGING, or HOME_CHARGING_COMPENSATION: the amounts of that row are owed to drivers, not revenue."""
    keys = {"party": ["country_code", "party_id"],
            "location": ["country_code", "party_id", "location_id"],
            "day": ["day"]}.get(by)
    if keys is None:
        raise ReportError(f"--by {by!r}: expected one of {', '.join(GROUPINGS)}")
    filters = _Filters().period("day", period).party(party).equals("partner_id", "partner", partner)
    group = ", ".join([*keys, "currency"])
    sql = f"""
SELECT {group},
       countIf(NOT credit) AS cdrs,
       countIf(credit) AS credit_cdrs,
       sum(energy_kwh) AS energy_kwh,
       sum(cost_excl_vat) AS revenue_excl_vat,
       sum(cost_incl_vat) AS revenue_incl_vat,
       countIf(cost_incl_vat IS NULL) AS lines_without_incl_vat,
       if(home_charging_compensation, 'HOME_CHARGING_COMPENSATION', 'CHARGING') AS kind
FROM billable_lines
{filters.where}
GROUP BY {group}, kind
ORDER BY {group}, kind"""
    return ReportQuery(sql, filters.params)


def reconciliation(period: Period, *, party: str | None = None) -> ReportQuery:
    """Reconciliation outcomes per CPO party, subject (SESSION, CDR), outcome and currency, with summed deltas (cost
    deltas only add up within a currency)."""
    filters = _Filters().period("toDate(event_time)", period).party(party)
    sql = f"""
SELECT country_code, party_id, subject, outcome, currency,
       count() AS subjects,
       countIf(late) AS late,
       sum(ifNull(delta_kwh, 0)) AS sum_delta_kwh,
       sum(ifNull(delta_cost_excl_vat, 0)) AS sum_delta_cost_excl_vat,
       max(abs(ifNull(delta_kwh, 0))) AS max_abs_delta_kwh
FROM reconciliation FINAL
{filters.where}
GROUP BY country_code, party_id, subject, outcome, currency
ORDER BY country_code, party_id, subject, outcome, currency"""
    return ReportQuery(sql, filters.params)


def anomalies(period: Period, *, party: str | None = None, kind: str | None = None) -> ReportQuery:
    """Anomalies per kind, module and CPO party, with when they were first and last seen. `kind` in any case; one
    the pipeline never flags is refused: it would select nothing, as if none had been flagged."""
    if kind and kind.strip().upper() not in ANOMALY_KINDS:
        raise ReportError(f"--kind {kind!r}: the pipeline flags none of that kind; expected one of "
                          f"{', '.join(ANOMALY_KINDS)}")
    filters = _Filters().period("toDate(observed_at)", period).party(party).equals(
        "kind", "kind", kind.strip().upper() if kind else None)
    sql = f"""
SELECT kind, module, country_code, party_id,
       count() AS anomalies,
       min(observed_at) AS first_seen,
       max(observed_at) AS last_seen
FROM anomalies FINAL
{filters.where}
GROUP BY kind, module, country_code, party_id
ORDER BY kind, module, country_code, party_id"""
    return ReportQuery(sql, filters.params)


# The one refused push the receivers publish all the same: a CDR POSTed again with other content under a held id
# (2001 on `$.id`), for the pipeline to record the CONFLICT. Its raw event is a refusal, not a push accepted: told
# by partner and X-Request-ID (unique per request, 04 §11; ours when the partner sent none), and, since not every
# partner keeps its ids unique, by its outcome, within the window the pushes are counted in.
_REFUSED_BUT_PUBLISHED: Final = (
    "NOT (module = 'CDRS' AND outcome = 'CONFLICT' AND (partner_id, request_id) IN ("
    "SELECT partner_id, request_id FROM rejections FINAL WHERE module = 'cdrs' AND field_path = '$.id' "
    "AND rejected_at >= now64(6, 'UTC') - toIntervalDay(%(raw_days)s)))")


def health(period: Period, *, partner: str | None = None, raw_days: int) -> ReportQuery:
    """Per partner and module: pushes accepted and refused, refusal rate, ingestion lag p50/p95/max (s).

    Pushes (`raw_events`) are kept `raw_days` (OCPI_RETENTION_RAW_DAYS), refusals (`rejections`) as long as the
    histories: both are counted only within the last `raw_days` (of 24 hours, as the TTL counts them, whatever the
    server's time zone), or a refusal would count against pushes retention deleted (the `rejections` report lists
    them all). A refused push the receivers published all the same counts as refused only."""
    pushed = _Filters().period("toDate(received_at)", period).equals("partner_id", "partner", partner)
    pushed.conditions += ["source = 'PUSH'", "received_at >= now64(6, 'UTC') - toIntervalDay(%(raw_days)s)",
                          _REFUSED_BUT_PUBLISHED]
    refused = _Filters().period("toDate(rejected_at)", period).equals("partner_id", "partner", partner)
    refused.conditions.append("rejected_at >= now64(6, 'UTC') - toIntervalDay(%(raw_days)s)")
    refused.params["raw_days"] = raw_days
    # One stream of pushes and refusals, aggregated with -If combinators (-OrNull: no pushes, no lag).
    sql = f"""
SELECT partner_id, module,
       countIf(kind = 'push') AS pushes,
       countIf(kind = 'reject') AS rejects,
       round(rejects / (pushes + rejects), 4) AS reject_rate,
       round(quantileExactIfOrNull(0.5)(lag, kind = 'push'), 3) AS lag_p50_s,
       round(quantileExactIfOrNull(0.95)(lag, kind = 'push'), 3) AS lag_p95_s,
       round(maxIfOrNull(lag, kind = 'push'), 3) AS lag_max_s,
       maxIfOrNull(at, kind = 'push') AS last_push,
       maxIfOrNull(at, kind = 'reject') AS last_reject
FROM
(
    SELECT partner_id, module, 'push' AS kind, received_at AS at,
           greatest(toFloat64(dateDiff('microsecond', received_at, inserted_at)) / 1e6, 0) AS lag
    FROM raw_events FINAL
    {pushed.where}
    UNION ALL
    SELECT partner_id, upper(module) AS module, 'reject' AS kind, rejected_at AS at, 0 AS lag
    FROM rejections FINAL
    {refused.where}
)
GROUP BY partner_id, module
ORDER BY partner_id, module"""
    return ReportQuery(sql, {**pushed.params, **refused.params})


def rejections(period: Period, *, partner: str | None = None) -> ReportQuery:
    """Refused pushes per partner, module, method, OCPI/HTTP status and field path, with an example reason."""
    filters = _Filters().period("toDate(rejected_at)", period).equals("partner_id", "partner", partner)
    sql = f"""
SELECT partner_id, upper(module) AS module, method, ocpi_status, http_status, field_path,
       count() AS rejects,
       any(reason) AS example_reason,
       max(rejected_at) AS last_rejected
FROM rejections FINAL
{filters.where}
GROUP BY partner_id, module, method, ocpi_status, http_status, field_path
ORDER BY partner_id, module, rejects DESC, ocpi_status, field_path, method, http_status"""
    return ReportQuery(sql, filters.params)


def run(client: Client, query: ReportQuery) -> tuple[list[str], list[Sequence[Any]]]:
    """Run a report; (column names, rows)."""
    return select(client, query.sql, query.params)


CONSUMER_LAG_COLUMNS: Final = ("topic", "partitions", "committed", "end_offset", "lag", "oldest_unread",
                               "retention_left_days", "lost")


def consumed_topics(settings: Settings) -> tuple[str, ...]:
    """The topics the worker consumes (its output topics, e.g. reconciliation results, have no lag of ours)."""
    return (*settings.kafka.module_topics, settings.pipeline.topic_party_facts, settings.kafka.topic_rejections)


async def consumer_lag(kafka: KafkaSettings, bootstrap: str, group_id: str, topics: Sequence[str], *,
                       retention_days: int, now: datetime | None = None,
                       ) -> tuple[list[str], list[Sequence[Any]]]:
    """Per topic: the records the consumer group has not processed yet, and how close the oldest of them is to
    Kafka's retention, which deletes a record `retention_days` after it was written, read or not.

    A partition is read from the group's committed offset, or from its log start where the group never
    committed or committed below it (what the worker does); `lost` counts records retention deleted past a
    committed offset (between it and the log start), which the worker never processed; where the group has no
    offset (never committed, or Kafka expired it) nothing tells what was lost (README, Retention).
    `oldest_unread` is the write time of the oldest unprocessed record; `retention_left_days` what is left of its
    retention, the time the worker has to catch up before it is deleted. On the embedded Tansu broker the end
    offsets come from `infra.kafka.compat` (its ListOffsets is wrong), and retention is not enforced there.
    """
    from pipeline.jobs.kafka_io import committed_offsets, first_record_times, offset_bounds, topic_partitions

    tps = await topic_partitions(bootstrap, topics)
    bounds = await offset_bounds(kafka, bootstrap, tps)
    committed = await committed_offsets(bootstrap, group_id, tps)
    totals: dict[str, list[int]] = {}
    unread: dict[TopicPartition, int] = {}
    for tp in tps:
        start, end = bounds[tp]
        done = committed.get(tp)
        position = start if done is None else max(done, start)
        row = totals.setdefault(tp.topic, [0, 0, 0, 0, 0])
        row[0] += 1
        row[1] += done or 0
        row[2] += end
        row[3] += max(end - position, 0)
        row[4] += max(start - done, 0) if done is not None else 0
        if end > position:
            unread[tp] = position
    written = await first_record_times(bootstrap, unread)
    oldest: dict[str, datetime] = {}
    for tp, moment in written.items():
        oldest[tp.topic] = min(moment, oldest.get(tp.topic, moment))
    now = now or datetime.now(UTC)
    rows: list[Sequence[Any]] = []
    for topic, (partitions, done_sum, end_sum, lag, lost) in sorted(totals.items()):
        first = oldest.get(topic)
        left = None if first is None else round(retention_days - (now - first).total_seconds() / 86_400, 1)
        rows.append((topic, partitions, done_sum, end_sum, lag, first, left, lost))
    return list(CONSUMER_LAG_COLUMNS), rows
