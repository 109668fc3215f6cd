"""The demo: the whole stack on the embedded engines, simulated CPOs, and a summary read back from ClickHouse.

The simulated CPOs (`pipeline.simulator`) send full traffic: Locations with EVSE status PATCHes, Session
lifecycles by PATCH, retries, out-of-order pushes, credit and corrected CDRs. The summary is read from
ClickHouse only: billing totals per party and currency (credits netted), duplicates, stale updates, anomalies and
reconciliation outcomes; and it is checked against what the simulator says must be stored (`Expected`): every
acknowledged push applied or dropped as a duplicate or stale (none in dead letters, no row refused, no anomaly
but STALE_UPDATE and SESSION_IDLE), each CDR and
its billing line, each credit CDR's link, reconciliation outcomes of every CDR and Session included, and every
Session's, EVSE's and Connector's final state and status history as far as the acknowledged pushes determine it;
and nothing else (no row of an object no acknowledged push made).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Final

import httpx
from clickhouse_connect.driver.client import Client

from infra.settings import Settings
from ocpi.datetime import format_datetime
from pipeline.simulator import EvseKey, Expected, SimulatedCpo, SimulatedParty
from pipeline.stack import Stack, StackError
from receivers.registry import PartnerRegistry, PartyRole

DEMO_PARTNERS = {
    "demo-cpo-nl": ("Demo CPO Netherlands", [SimulatedParty("NL", "TNM"), SimulatedParty("NL", "EVB")]),
    "demo-cpo-be": ("Demo CPO Belgium", [SimulatedParty("BE", "BEC")]),
}
PARTNER_OF = {f"{party.country_code}/{party.party_id}": partner_id
              for partner_id, (_name, parties) in DEMO_PARTNERS.items() for party in parties}


@dataclass(frozen=True)
class PartyTotals:
    """A party's billing totals in one currency ('' for a party without billing lines)."""

    country_code: str
    party_id: str
    currency: str
    sessions: int
    cdrs: int
    kwh: Decimal
    cost_excl_vat: Decimal
    cost_incl_vat: Decimal


@dataclass(frozen=True)
class DemoSummary:
    sessions: int
    cdrs: int
    raw_events: int
    dead_letters: int
    parties: list[PartyTotals]
    outcomes: dict[str, int]  # raw_events.outcome -> events
    anomalies: dict[str, int]  # anomalies.kind -> rows
    reconciliation: dict[tuple[str, str], int]  # (subject, outcome) -> rows
    credit_links: dict[str, int]  # status -> links
    expected: Expected
    seconds: float
    mismatches: list[str] = field(default_factory=list)
    # Home charging compensation (owed to drivers, not charging revenue), per party and currency; `sessions` 0.
    compensation: list[PartyTotals] = field(default_factory=list)

    @property
    def duplicates(self) -> int:
        return self.outcomes.get("DUPLICATE", 0)

    @property
    def stale(self) -> int:
        return self.outcomes.get("STALE", 0)

    @property
    def matches_expected(self) -> bool:
        """Every push acknowledged, and ClickHouse holds exactly what was acknowledged."""
        return not self.mismatches


def _scalar(client: Client, sql: str) -> int:
    return int(client.query(sql).result_rows[0][0])


def _counts(client: Client, sql: str) -> dict[str, int]:
    return {str(k): int(n) for k, n in client.query(sql).result_rows}


def read_summary(client: Client, expected: Expected, seconds: float, *, settled: bool = True) -> DemoSummary:
    """The summary read from ClickHouse, checked against `expected`; `settled`: whether `wait_for_rows` saw every
    row arrive (if not, that is a mismatch of its own)."""
    completed = dict(((cc, pid), int(n)) for cc, pid, n in client.query(
        "SELECT country_code, party_id, count() FROM sessions FINAL WHERE status = 'COMPLETED' "
        "GROUP BY country_code, party_id").result_rows)
    # Per currency: amounts in two currencies are never added up. Charging apart from home charging compensation,
    # which is owed to drivers.
    lines = {(bool(home), cc, pid, currency): (int(n), kwh, excl, incl or Decimal(0))
             for home, cc, pid, currency, n, kwh, excl, incl in client.query(
                 "SELECT home_charging_compensation, country_code, party_id, currency, count(), sum(energy_kwh), "
                 "sum(cost_excl_vat), sum(cost_incl_vat) FROM billable_lines "
                 "GROUP BY home_charging_compensation, country_code, party_id, currency").result_rows}
    billed = {key[1:]: figures for key, figures in lines.items() if not key[0]}
    compensation = [PartyTotals(cc, pid, currency, 0, *figures)
                    for (home, cc, pid, currency), figures in sorted(lines.items()) if home]
    # Every party with completed sessions or billing lines: one without lines shows (and is checked) as 0.
    unbilled = {(cc, pid, ""): (0, Decimal(0), Decimal(0), Decimal(0))
                for cc, pid in completed.keys() - {(cc, pid) for cc, pid, _currency in billed}}
    parties = [PartyTotals(cc, pid, currency, completed.get((cc, pid), 0), *figures)
               for (cc, pid, currency), figures in sorted({**billed, **unbilled}.items())]
    reconciliation = {(str(s), str(o)): int(n) for s, o, n in client.query(
        "SELECT subject, outcome, count() FROM reconciliation FINAL GROUP BY subject, outcome "
        "ORDER BY subject, outcome").result_rows}
    summary = DemoSummary(
        sessions=_scalar(client, "SELECT count() FROM sessions FINAL WHERE status = 'COMPLETED'"),
        cdrs=_scalar(client, "SELECT count() FROM cdrs FINAL"),
        raw_events=_scalar(client, "SELECT count() FROM raw_events FINAL"),
        dead_letters=_scalar(client, "SELECT count() FROM dead_letters FINAL"),
        parties=parties,
        outcomes=_counts(client, "SELECT outcome, count() FROM raw_events FINAL GROUP BY outcome ORDER BY outcome"),
        anomalies=_counts(client, "SELECT kind, count() FROM anomalies FINAL GROUP BY kind ORDER BY kind"),
        reconciliation=reconciliation,
        credit_links=_counts(client, "SELECT status, count() FROM credit_links FINAL GROUP BY status"),
        expected=expected, seconds=seconds, compensation=compensation)
    if not settled:
        summary.mismatches.append("ClickHouse did not reach the expected rows in time (outcomes, billing lines, "
                                  "reconciliation)")
    summary.mismatches.extend(mismatches(client, summary, expected))
    return summary


_MISMATCHES_SHOWN: Final = 20


def mismatches(client: Client, summary: DemoSummary, expected: Expected) -> list[str]:
    """Every way ClickHouse differs from what the simulated CPOs had acknowledged (empty: it matches)."""
    found = []
    if expected.rejected:
        found.append(f"{expected.rejected} pushes were not acknowledged")
    if summary.raw_events != expected.events:
        found.append(f"{summary.raw_events} raw events for {expected.events} acknowledged pushes")
    if summary.outcomes.get("PARKED"):
        found.append(f"{summary.outcomes['PARKED']} events still PARKED")
    for outcome, events in sorted(summary.outcomes.items()):
        if outcome not in ("APPLIED", "DUPLICATE", "STALE", "PARKED"):
            found.append(f"{events} events {outcome}: an acknowledged push the pipeline did not apply (not a "
                         "duplicate, not stale)")
    if summary.dead_letters:
        found.append(f"{summary.dead_letters} dead letters: records the pipeline could not process")
    if summary.anomalies.get("ROW_REFUSED"):
        found.append(f"{summary.anomalies['ROW_REFUSED']} rows ClickHouse refused (anomalies ROW_REFUSED): rows lost")
    for kind, flagged in sorted(summary.anomalies.items()):
        if kind not in EXPECTED_ANOMALIES:
            found.append(f"{flagged} anomalies {kind}: none of the simulated pushes should raise one")
    if summary.sessions != len(expected.sessions):
        found.append(f"{summary.sessions} completed sessions, expected {len(expected.sessions)}")
    if summary.cdrs != len(expected.cdrs):
        found.append(f"{summary.cdrs} CDRs, expected {len(expected.cdrs)}")
    for home in summary.compensation:
        found.append(f"{home.country_code}/{home.party_id}: {home.cdrs} home charging compensation CDRs "
                     f"({home.currency}), the simulated CPOs sent none")
    # Every printed figure of every party, stored or expected (a party missing from ClickHouse is all zeros), in the
    # currencies its CDRs were sent in.
    stored_parties: dict[str, list[PartyTotals]] = {}
    for totals in summary.parties:
        stored_parties.setdefault(f"{totals.country_code}/{totals.party_id}", []).append(totals)
    sessions_by_party = Counter(f"{cc}/{pid}".upper() for cc, pid, _id in expected.sessions)
    cdrs_by_party = Counter(f"{cc}/{pid}".upper() for cc, pid, _id in expected.cdrs)
    zero = Decimal(0)
    for name in sorted(stored_parties.keys() | sessions_by_party.keys() | cdrs_by_party.keys()):
        rows = stored_parties.get(name, [])
        billed_in = sorted(p.currency for p in rows if p.currency)
        sent_in = sorted(expected.currencies.get(name, ()))
        if billed_in and billed_in != sent_in:
            found.append(f"{name}: billed in {', '.join(billed_in)}, expected {', '.join(sent_in) or 'no CDR'}")
            continue
        party = rows[0] if rows else None
        figures = ((party.sessions, party.cdrs, party.kwh, party.cost_excl_vat, party.cost_incl_vat) if party
                   else (0, 0, zero, zero, zero))
        wanted = (sessions_by_party[name], cdrs_by_party[name], expected.kwh_by_party.get(name, zero),
                  expected.cost_by_party.get(name, zero), expected.incl_by_party.get(name, zero))
        if figures != wanted:
            found.append(f"{name}: (completed sessions, CDRs, kWh, cost excl. VAT, cost incl. VAT) billed "
                         f"({', '.join(map(str, figures))}), expected ({', '.join(map(str, wanted))})")
    found.extend(_cdr_problems(client, expected))
    found.extend(_billing_line_problems(client, expected))
    if summary.duplicates < expected.retries:
        found.append(f"{summary.duplicates} duplicates for {expected.retries} deliberate retries")
    sessions = {(cc, pid, sid): (status, kwh, len(json.loads(doc).get("charging_periods") or ()))
                for cc, pid, sid, status, kwh, doc in client.query(
                    "SELECT country_code, party_id, session_id, status, kwh, payload_json FROM sessions FINAL"
                ).result_rows}
    for key, status in expected.session_status.items():
        got = sessions.get((key[0].upper(), key[1].upper(), key[2].upper()))
        want = (status, expected.session_kwh.get(key), expected.session_periods.get(key))
        if got is None or got[0] != want[0] or (want[1] is not None and got[1] != want[1]) or (
                want[2] is not None and got[2] != want[2]):
            found.append(f"session {'/'.join(key)}: stored {got}, expected {want}")
    found += _unacknowledged("session", dict.fromkeys(sessions, "stored"), expected.session_status, "Session")
    costs: dict[tuple[str, ...], object] = {
        (cc, pid, sid): None if excl is None else (excl, incl) for cc, pid, sid, excl, incl in client.query(
            "SELECT country_code, party_id, session_id, total_cost_excl_vat, total_cost_incl_vat FROM sessions FINAL"
        ).result_rows}
    for key, cost in expected.session_cost.items():
        stored_cost = costs.get(_upper(key), "no row")
        if stored_cost != cost:
            found.append(f"session {'/'.join(key)}: total_cost {_text(stored_cost)}, expected {_text(cost)}")
    histories: dict[tuple[str, ...], list[tuple[str, str]]] = {}
    for cc, pid, sid, previous, status in client.query(
            "SELECT country_code, party_id, session_id, previous_status, status FROM session_status_history FINAL "
            "ORDER BY country_code, party_id, session_id, last_updated, version").result_rows:
        histories.setdefault((cc, pid, sid), []).append((previous, status))
    for key, history in expected.session_history.items():
        stored_history = histories.get(_upper(key), [])
        if stored_history != history:
            found.append(f"session {'/'.join(key)}: status history {_changes(stored_history)}, "
                         f"expected {_changes(history)}")
    found += _unacknowledged("session", {key: f"status history {_changes(history)}" for key, history in
                                         histories.items()}, expected.session_status, "Session")
    locations = {tuple(key) for key in client.query(
        "SELECT country_code, party_id, location_id FROM locations FINAL").result_rows}
    for location_key in sorted(expected.locations):
        if _upper(location_key) not in locations:
            found.append(f"Location {'/'.join(location_key)}: not stored")
    found += _unacknowledged("Location", dict.fromkeys(locations, "stored"), expected.locations, "Location")
    evses: dict[tuple[str, ...], str] = {(cc, pid, lid, uid): status for cc, pid, lid, uid, status in client.query(
        "SELECT country_code, party_id, location_id, evse_uid, status FROM evses FINAL WHERE present").result_rows}
    for evse_key, evse_status in expected.evse_status.items():
        stored_status = evses.get(_upper(evse_key))
        if stored_status != evse_status:
            found.append(f"EVSE {'/'.join(evse_key)}: stored {stored_status}, expected {evse_status}")
    found += _unacknowledged("EVSE", dict.fromkeys(evses, "stored"), expected.evse_status, "EVSE")
    evse_histories: dict[tuple[str, ...], list[tuple[str, str, datetime]]] = {}
    for cc, pid, lid, uid, previous, status, changed_at in client.query(
            "SELECT country_code, party_id, location_id, evse_uid, previous_status, status, changed_at "
            "FROM evse_status_history FINAL ORDER BY country_code, party_id, location_id, evse_uid, changed_at, "
            "version").result_rows:
        evse_histories.setdefault((cc, pid, lid, uid), []).append((previous, status, _utc(changed_at)))
    for evse_key in sorted(expected.evse_pushes):
        found.extend(f"EVSE {'/'.join(evse_key)}: status history {problem}" for problem in _evse_history_problems(
            evse_histories.get(_upper(evse_key), []), expected, evse_key))
    found += _unacknowledged("EVSE", {key: f"status history {_changes([row[:2] for row in rows])}" for key, rows in
                                      evse_histories.items()}, expected.evse_pushes, "EVSE")
    connectors: dict[tuple[str, ...], tuple[str, ...]] = {
        (cc, pid, lid, uid, cid): tuple(tariffs) for cc, pid, lid, uid, cid, tariffs in client.query(
            "SELECT country_code, party_id, location_id, evse_uid, connector_id, tariff_ids FROM connectors FINAL "
            "WHERE present").result_rows}
    for connector_key, tariff_ids in sorted(expected.connector_tariffs.items()):
        stored_tariffs = connectors.get(_upper(connector_key))
        if stored_tariffs != tariff_ids:
            found.append(f"Connector {'/'.join(connector_key)}: tariff_ids {stored_tariffs}, expected {tariff_ids}")
    found += _unacknowledged("Connector", dict.fromkeys(connectors, "stored"), expected.connector_tariffs,
                             "Connector")
    links: dict[tuple[str, ...], tuple[str, str, bool | None]] = {
        (cc, pid, credit_id): (credited_id, status, amounts) for cc, pid, credit_id, credited_id, status, amounts
        in client.query("SELECT country_code, party_id, credit_cdr_id, credited_cdr_id, status, amount_matches "
                        "FROM credit_links FINAL").result_rows}
    for credit_key, credited_id in sorted(expected.credit_links.items()):
        link = links.pop(_upper(credit_key), None)
        wanted_link = (credited_id.upper(), "LINKED", True)
        if link != wanted_link:
            found.append(f"credit CDR {'/'.join(credit_key)}: credit link {_text(link)}, expected {_text(wanted_link)}")
    found += _unacknowledged("credit CDR", {key: f"credit link {_text(link)}" for key, link in links.items()},
                             expected.credit_links, "credit CDR")
    reconciled: dict[tuple[str, ...], str] = {
        (subject, cc, pid, subject_id): outcome for subject, cc, pid, subject_id, outcome in client.query(
        "SELECT subject, country_code, party_id, subject_id, outcome FROM reconciliation FINAL").result_rows}
    for subject, outcomes in (("CDR", expected.cdr_reconciliation), ("SESSION", expected.session_reconciliation)):
        for key, outcome in outcomes.items():
            stored_outcome = reconciled.get((subject, *_upper(key)))
            if stored_outcome != outcome:
                found.append(f"{subject} {'/'.join(key)}: reconciliation {stored_outcome}, expected {outcome}")
    for subject, name, outcomes in (("CDR", "CDR", expected.cdr_reconciliation),
                                    ("SESSION", "Session", expected.session_reconciliation)):
        found += _unacknowledged(subject, {key[1:]: f"reconciliation {outcome}" for key, outcome in reconciled.items()
                                           if key[0] == subject}, outcomes, name)
    if len(found) > _MISMATCHES_SHOWN:  # the first ones name the kind of fault; say the rest exist
        return [*found[:_MISMATCHES_SHOWN], f"... and {len(found) - _MISMATCHES_SHOWN} more"]
    return found


# The anomalies the simulated traffic may cause: its deliberately late pushes are STALE_UPDATEs, and an open Session
# is flagged SESSION_IDLE by the wall clock (OCPI_PIPELINE_SESSION_IDLE); ROW_REFUSED is reported as rows lost.
EXPECTED_ANOMALIES: Final = frozenset({"STALE_UPDATE", "SESSION_IDLE", "ROW_REFUSED"})


NONE = "''"  # the previous status of a first status


def _unacknowledged(kind: str, stored: Mapping[tuple[str, ...], str], acknowledged: Collection[tuple[str, ...]],
                    name: str) -> list[str]:
    """A line for each stored key (as the tables hold it) of an object no acknowledged push wrote, saying what is
    stored of it (its row, status history, credit link, billing lines, reconciliation outcome)."""
    keys = {_upper(key) for key in acknowledged}
    return [f"{kind} {'/'.join(key)}: {what}, no such {name} acknowledged" for key, what in sorted(stored.items())
            if key not in keys]


def _upper(key: tuple[str, ...]) -> tuple[str, ...]:
    """A key as sent, as the tables hold it (CiString ids upper-cased)."""
    return tuple(part.upper() for part in key)


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _text(value: object) -> str:
    if isinstance(value, tuple):
        return "(" + ", ".join(map(str, value)) + ")"
    return str(value)


def _changes(history: list[tuple[str, str]]) -> str:
    return ", ".join(f"{previous or NONE} -> {status}" for previous, status in history) or "none"


def _evse_history_problems(rows: list[tuple[str, str, datetime]], expected: Expected, key: EvseKey) -> list[str]:
    """How an EVSE's status history rows (ordered by changed_at) differ from what its acknowledged status pushes
    allow (`Expected.evse_history_bounds`): a row missing, one no push could write, a broken chain, another end."""
    required, allowed = expected.evse_history_bounds(key)
    problems = [f"lacks {previous or NONE} -> {status} at {format_datetime(at)}"
                for previous, status, at in sorted(required - set(rows), key=lambda row: row[2])]
    problems += [f"has {previous or NONE} -> {status} at {format_datetime(at)}, which no push applied"
                 for previous, status, at in rows if (status, at) not in allowed]
    chain = [previous for previous, _status, _at in rows] != ["", *(status for _p, status, _at in rows[:-1])]
    if chain or any(previous == status for previous, status, _at in rows):
        problems.append(f"does not chain: {_changes([(previous, status) for previous, status, _at in rows])}")
    final = rows[-1][1] if rows else None
    if final != expected.evse_status.get(key):
        problems.append(f"ends at {final}, expected {expected.evse_status.get(key)}")
    return problems


def _cdr_problems(client: Client, expected: Expected) -> list[str]:
    """How the stored CDRs differ from what was acknowledged: amounts, currency, session, credit reference."""
    stored: dict[tuple[str, ...], tuple[object, ...]] = {
        (cc, pid, cdr_id): tuple(row) for cc, pid, cdr_id, *row in client.query(
            "SELECT country_code, party_id, cdr_id, session_id, currency, credit, credit_reference_id, total_energy, "
            "total_cost_excl_vat, total_cost_incl_vat FROM cdrs FINAL").result_rows}
    problems = []
    for key, (session_id, currency, credit, reference, kwh, excl, incl) in sorted(expected.cdr_rows.items()):
        want = (session_id.upper(), currency, credit, None if reference is None else reference.upper(), kwh, excl,
                incl)
        got = stored.get(_upper(key))
        if got is not None and got != want:  # a CDR not stored at all: counted above
            problems.append(f"CDR {'/'.join(key)}: stored (session, currency, credit, credit_reference_id, kWh, "
                            f"cost excl. VAT, cost incl. VAT) {_text(got)}, expected {_text(want)}")
    return problems


def _billing_line_problems(client: Client, expected: Expected) -> list[str]:
    """How the billing lines differ, CDR by CDR, from the one line each acknowledged CDR must have (its partner,
    location, day, currency, credit, kWh and costs): the totals per party add up a line moved to another location,
    day or partner, or amounts shifted between lines, to the same figures."""
    stored: dict[tuple[str, ...], list[tuple[object, ...]]] = {}
    for cc, pid, cdr_id, *line in client.query(
            "SELECT country_code, party_id, cdr_id, partner_id, location_id, day, currency, credit, energy_kwh, "
            "cost_excl_vat, cost_incl_vat FROM billable_lines ORDER BY country_code, party_id, cdr_id, day, "
            "partner_id, location_id").result_rows:
        stored.setdefault((cc, pid, cdr_id), []).append(tuple(line))
    problems = []
    for key, (location_id, day, currency, credit, kwh, excl, incl) in sorted(expected.billing_lines.items()):
        partner = PARTNER_OF.get(f"{key[0]}/{key[1]}".upper(), "")
        want: list[tuple[object, ...]] = [(partner, location_id.upper(), day, currency, credit, kwh, excl, incl)]
        got = stored.pop(_upper(key), [])
        if got != want:
            problems.append(f"CDR {'/'.join(key)}: billing lines {_lines(got)}, expected {_lines(want)}")
    problems += _unacknowledged("CDR", {key: f"billing lines {_lines(lines)}" for key, lines in stored.items()},
                                expected.billing_lines, "CDR")
    return problems


def _lines(lines: list[tuple[object, ...]]) -> str:
    return "[" + "; ".join(", ".join(map(str, line)) for line in lines) + "]"


def _expected_reconciliation(expected: Expected) -> list[tuple[str, str, int]]:
    """(subject, outcome, rows) the reconciliation table must end with, sorted."""
    counts = Counter(("CDR", outcome) for outcome in expected.cdr_reconciliation.values())
    counts.update(("SESSION", outcome) for outcome in expected.session_reconciliation.values())
    return sorted((subject, outcome, n) for (subject, outcome), n in counts.items())


RECHECK_S: Final = 10.0  # how long a mismatch found after the wait must persist to be reported


async def settled_summary(read: Callable[[], DemoSummary], recheck_s: float = RECHECK_S) -> DemoSummary:
    """The summary, read again while it shows a mismatch, for up to `recheck_s`: the sink inserts a batch's tables
    side by side and `wait_for_rows` counts only some of them, so a current-state row (sessions, evses ...) may
    become visible a moment after the rows it counted. A mismatch is reported once it persists, never from one
    read taken in that moment."""
    summary = await asyncio.to_thread(read)
    until = time.monotonic() + recheck_s
    while not summary.matches_expected and time.monotonic() < until:
        await asyncio.sleep(0.5)
        summary = await asyncio.to_thread(read)
    return summary


async def wait_for_rows(client: Client, expected: Expected, timeout: float,
                        check: Callable[[], None] | None = None) -> bool:
    """Poll until every acknowledged push has its final outcome, every CDR is billed, and every CDR and Session
    has the reconciliation outcome it must end with (not one still AWAITING_SESSION: stage 2 has not caught up),
    and the status history, Connector and credit link rows are there too (the sink inserts a batch's tables side
    by side, so an outcome may be visible before the rows its event wrote); False if the timeout came first.
    `check` runs before every poll and raises to end the wait (`Stack.check_children`: a part that exited writes
    no more rows)."""
    deadline = time.monotonic() + timeout
    tariffs = sorted(Counter(expected.connector_tariffs.values()).items())
    want = (expected.events, len(expected.cdrs), _expected_reconciliation(expected),
            sum(map(len, expected.session_history.values())), tariffs, len(expected.credit_links))
    evse_rows = sum(len(expected.evse_history_bounds(key)[0]) for key in expected.evse_pushes)
    while time.monotonic() < deadline:
        if check is not None:
            check()
        got = await asyncio.to_thread(lambda: (
            _scalar(client, "SELECT count() FROM raw_events FINAL WHERE outcome != 'PARKED'"),
            _scalar(client, "SELECT count() FROM billing_lines FINAL"),
            [(str(s), str(o), int(n)) for s, o, n in client.query(
                "SELECT subject, outcome, count() FROM reconciliation FINAL GROUP BY subject, outcome "
                "ORDER BY subject, outcome").result_rows],
            _scalar(client, "SELECT count() FROM session_status_history FINAL"),
            sorted((tuple(t), int(n)) for t, n in client.query(
                "SELECT tariff_ids, count() FROM connectors FINAL WHERE present GROUP BY tariff_ids").result_rows),
            _scalar(client, "SELECT count() FROM credit_links FINAL WHERE status = 'LINKED'"),
            _scalar(client, "SELECT count() FROM evse_status_history FINAL")))
        if got[:-1] == want and got[-1] >= evse_rows:
            return True
        await asyncio.sleep(0.5)
    return False


def provision_demo_partners(client: Client) -> dict[str, tuple[str, list[SimulatedParty]]]:
    """Register the demo CPOs directly (operator-provisioned) and return their tokens."""
    registry = PartnerRegistry(client)
    tokens = {}
    for partner_id, (name, parties) in DEMO_PARTNERS.items():
        roles = [PartyRole(country_code=p.country_code, party_id=p.party_id, role="CPO", business_name=name)
                 for p in parties]
        _partner, token = registry.register_direct(partner_id, name, roles)
        tokens[partner_id] = (token, parties)
    return tokens


EXIT_SEEN_WITHIN_S: Final = 5.0  # how long a part whose connection broke may take to be seen as exited


async def _name_the_part_that_exited(stack: Stack) -> None:
    """Raise `StackError` naming the part of the stack that exited (receivers that died under the pushes break
    their connections a moment before their exit is seen), if one does within `EXIT_SEEN_WITHIN_S`."""
    deadline = time.monotonic() + EXIT_SEEN_WITHIN_S
    while True:
        stack.check_children()
        if time.monotonic() >= deadline:
            return
        await asyncio.sleep(0.2)


async def run_demo(settings: Settings, *, sessions: int, seed: int, timeout: float,
                   on_started: Callable[[Stack], None] | None = None,
                   progress: Callable[[int], None] | None = None) -> DemoSummary:
    started = time.monotonic()
    stack = await Stack(settings).start()
    try:
        assert stack.clickhouse is not None
        if on_started:
            on_started(stack)
        partners = await asyncio.to_thread(provision_demo_partners, stack.clickhouse)
        share = [sessions // len(partners) + (1 if i < sessions % len(partners) else 0)
                 for i in range(len(partners))]
        cpos = [SimulatedCpo(stack.base_url, token, parties, seed=seed + i)
                for i, (token, parties) in enumerate(partners.values())]
        try:
            results = await asyncio.gather(*(cpo.run(n, progress) for cpo, n in zip(cpos, share, strict=True)))
        except httpx.TransportError as exc:
            await _name_the_part_that_exited(stack)
            raise StackError(f"the simulated CPOs lost the receivers ({type(exc).__name__}: {exc}); see "
                             f"{stack.log_dir / 'receivers.log'}") from exc
        expected = Expected()
        for result in results:
            expected.merge(result)
        settled = await wait_for_rows(stack.clickhouse, expected, timeout, check=stack.check_children)
        stack.check_children()
        client = stack.clickhouse
        return await settled_summary(lambda: read_summary(client, expected, time.monotonic() - started,
                                                          settled=settled), RECHECK_S if settled else 0.0)
    finally:
        await stack.stop()
