"""Billing totals against an independent oracle (hypothesis).

Random CDR traffic of a few CPO parties, locations, days and currencies — normal CDRs, a CPO's exact resends, resends
that differ only in the case of CiString values or in `credit: false` against an absent `credit`, conflicting CDRs of
one id, credits (negating their original or not, several for one CDR, before their original, of an unknown CDR, of a
credit, of themselves) — arrives in a random order, on two CDR partitions, with a producer's resent records, cut
into random batches, some of them read again after a crash (rows and facts written, state lost). Stage 1
(`agents.fold` with `process_cdrs`, the records decoded and sorted out as the agent does) and stage 2
(`agents.fold_party`, `agents.party_batch`) run in-process and write through the real sink into chDB.

What billing reads (`billable_lines`, `billing_daily`, the revenue report per party, location and day) is compared
with totals an oracle computes from README's rules alone ("The pipeline: from pushes to billing truth", the CDR and
billing rows of its table; "Reports and dashboards"):

- per CPO party and CDR id (CiString: case-insensitive) the first CDR to arrive is stored, every later one is a
  duplicate or a conflict and bills nothing;
- a stored CDR is one billing line, on the UTC day it ended, at its (upper-cased) location, in its currency; a credit
  CDR's energy and costs count as -|value|;
- a credit that names a stored credit CDR (itself included) is not billed (CREDIT_OF_CREDIT); of the credits that
  name one stored non-credit CDR the earliest received (then the lowest id) is billed and every other is not
  (DUPLICATE_CREDIT); a credit whose original never came is billed on its own;
- totals never add two currencies; incl. VAT sums the lines that give it, and the others are counted;
- a CDR with `home_charging_compensation` true (and a credit of it, which carries the flag as its original does)
  is billed apart from charging: its line has the flag, billing_daily groups by it, the revenue report gives it
  rows of its own (kind HOME_CHARGING_COMPENSATION); a credit whose flag is not its original's does not cancel it
  (amount_matches false, CREDIT_AMOUNT_MISMATCH), and each line counts by its own flag.
"""

from __future__ import annotations

import asyncio
import os
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest
from clickhouse_connect.driver.client import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline import reports, sweeps
from pipeline.agents import fold, fold_party, party_batch
from pipeline.cdrs import process_cdrs
from pipeline.facts import decode_facts, fact_records
from pipeline.reconcile import PartyOutput
from pipeline.records import DeadLetter, RawMessage, decode_all, sort_out, utc_now
from pipeline.retention import Pseudonymizer
from pipeline.sink import ClickHouseSink
from pipeline.stage import StageOutput
from pipeline.state import CdrState, Codec

from .builders import PSEUDONYM_KEY, DictStore, cdr, event_bytes, stage_rules, ts
from .test_reconcile import RULES

pytestmark = pytest.mark.clickhouse

PARTIES = (("NL", "TNM", "p1"), ("DE", "ABC", "p2"))  # and a Hub, "hub", that sends some of their pushes
STAGE_RULES = stage_rules()
CDR_TOPIC, FACTS_TOPIC = "cdrs", "party-facts"
TABLES = ("cdrs", "cdr_charging_periods", "cdr_tariffs", "billing_lines", "credit_links", "reconciliation",
          "anomalies", "raw_events", "dead_letters")
DAY = 24 * 60  # minutes
# End times (minutes after builders.T0, 08:00 UTC): the next UTC day, and a millisecond either side of midnight.
ENDS = (60, 60 + DAY, 16 * 60 - 1 / 60_000, 16 * 60)


def _swap_case(value: str) -> str:
    return value.swapcase() if value.swapcase() != value else value


def _case_variant(body: dict[str, Any]) -> dict[str, Any]:
    """The same CDR as OCPI compares it: its CiString values in another case, its period dimensions in another
    order."""
    location, token = body["cdr_location"], body["cdr_token"]
    other = {**body, "id": _swap_case(body["id"]), "country_code": body["country_code"].lower(),
             "party_id": body["party_id"].lower(),
             "cdr_location": {**location, "id": _swap_case(location["id"]), "evse_uid": location["evse_uid"].lower(),
                              "evse_id": location["evse_id"].lower()},
             "cdr_token": {**token, "uid": token["uid"].lower(), "contract_id": token["contract_id"].lower(),
                           "party_id": token["party_id"].lower()},
             "charging_periods": [{**period, "tariff_id": period["tariff_id"].lower(),
                                   "dimensions": period["dimensions"][::-1]} for period in body["charging_periods"]]}
    for name in ("session_id", "credit_reference_id", "authorization_reference", "invoice_reference_id"):
        if name in other:
            other[name] = _swap_case(other[name])
    return other


def _credit_false_variant(body: dict[str, Any]) -> dict[str, Any]:
    """The same CDR: `credit: false` where it had none, or none where it had `false`, and so for
    `home_charging_compensation`."""
    other = dict(body)
    for name in ("credit", "home_charging_compensation"):
        if other.get(name) is False:
            del other[name]
        elif name not in other:
            other[name] = False
    return other


AMOUNTS = ("10", "7.5", "0.0001", "123.4567")
COSTS = ("2.50", "1.2345", "0", "99.9999")


@st.composite
def traffic(draw: st.DrawFn) -> list[dict[str, Any]]:
    """The CDR bodies of a few parties, in the order they were made (not the order they arrive in)."""
    bodies: list[dict[str, Any]] = []
    for cc, pid, _partner in PARTIES[:draw(st.integers(1, len(PARTIES)))]:
        originals: list[dict[str, Any]] = []
        for n in range(draw(st.integers(1, 3))):
            body = cdr(draw(st.sampled_from([f"c{n}", f"C{n}"])), session_id=draw(st.sampled_from([None, f"s{n}"])),
                       kwh=draw(st.sampled_from(AMOUNTS)), cost=draw(st.sampled_from(COSTS)),
                       end=draw(st.sampled_from(ENDS)), location=draw(st.sampled_from(["loc1", "LOC2"])),
                       cc=cc, pid=pid, credit=draw(st.sampled_from([None, None, False])))
            body["currency"] = draw(st.sampled_from(["EUR", "EUR", "USD"]))
            home = draw(st.sampled_from([None, None, False, True]))  # absent is false
            if home is not None:
                body["home_charging_compensation"] = home
            if draw(st.booleans()):
                body |= {"authorization_reference": f"Ref{n}", "invoice_reference_id": f"inv-{n}"}
            if draw(st.integers(0, 4)) == 0:  # incl. VAT is optional
                del body["total_cost"]["incl_vat"]
            originals.append(body)
            bodies.append(body)
            for _ in range(draw(st.integers(0, 2))):
                kind = draw(st.sampled_from(["exact", "case", "credit_false", "conflict"]))
                if kind == "exact":
                    bodies.append(body)
                elif kind == "case":
                    bodies.append(_case_variant(body))
                elif kind == "credit_false":
                    bodies.append(_credit_false_variant(body))
                elif draw(st.booleans()):
                    bodies.append({**body, "total_energy": body["total_energy"] + 1})
                elif draw(st.booleans()):  # the other side of home charging compensation
                    bodies.append({**body, "home_charging_compensation": not body.get("home_charging_compensation")})
                elif draw(st.booleans()):  # the same id as a credit
                    bodies.append({**body, "credit": True, "credit_reference_id": "c9",
                                   "total_cost": {"excl_vat": -body["total_cost"]["excl_vat"]}})
                else:  # a plain string is no CiString: another CDR
                    bodies.append({**body, "cdr_location": {**body["cdr_location"], "name": "STATION"}})
        credits: list[dict[str, Any]] = []
        for k in range(draw(st.integers(0, 4))):
            # Its own party's CDRs and credits, an id of no CDR, an id the other party may have.
            targets = [b["id"] for b in originals] + ["zz9", "c2", "c9"] + [c["id"] for c in credits]
            target = draw(st.sampled_from(targets))
            original = next((b for b in originals if b["id"] == target), None)
            cid = f"{target}-cr{k}"
            if draw(st.integers(0, 5)) == 0:
                target = cid  # a credit of itself
            kwh = original["total_energy"] if original else Decimal("5")
            cost = original["total_cost"]["excl_vat"] if original else Decimal("1.25")
            credit = cdr(cid, session_id=None, kwh=str(kwh), cost=str(-cost), cc=cc, pid=pid,
                         end=draw(st.sampled_from(ENDS)),
                         location=original["cdr_location"]["id"] if original else "loc1",
                         credit=True, credit_reference=draw(st.sampled_from([target, target.swapcase()])))
            credit["currency"] = original["currency"] if original else "EUR"
            if original.get("home_charging_compensation") if original else draw(st.booleans()):
                credit["home_charging_compensation"] = True  # all other data as in the original (10 §1.1)
            if original is not None and "incl_vat" in original["total_cost"]:
                credit["total_cost"]["incl_vat"] = -original["total_cost"]["incl_vat"]
            else:
                credit["total_cost"].pop("incl_vat", None)
            variant = draw(st.sampled_from(["", "", "other_amount", "other_currency", "negative_energy",
                                            "other_energy", "positive_cost", "other_home"]))
            if variant == "other_amount":
                credit["total_cost"] = {"excl_vat": (-cost / 2).quantize(Decimal("0.0001"))}
            elif variant == "other_currency":
                credit["currency"] = "USD" if credit["currency"] == "EUR" else "EUR"
            elif variant == "negative_energy":
                credit["total_energy"] = -credit["total_energy"]
            elif variant == "other_energy":  # flagged CREDIT_AMOUNT_MISMATCH; the kWh difference stays billed
                credit["total_energy"] = credit["total_energy"] + 1
            elif variant == "positive_cost":  # flagged CREDIT_POSITIVE_COST; billed as -|cost|
                credit["total_cost"] = {k: abs(v) for k, v in credit["total_cost"].items()}
            elif variant == "other_home":  # flagged CREDIT_AMOUNT_MISMATCH; billed by its own flag
                credit["home_charging_compensation"] = not credit.get("home_charging_compensation")
            credits.append(credit)
            bodies.append(credit)
            if draw(st.integers(0, 3)) == 0:
                bodies.append(draw(st.sampled_from([credit, _case_variant(credit)])))
    return bodies


# --- the oracle -------------------------------------------------------------------------------------------------


def _u(value: str) -> str:
    return value.upper()


@dataclass(frozen=True)
class Arrival:
    """A push as a receiver took it: the body, the partner that sent it, its receive time (minutes)."""

    body: dict[str, Any]
    partner: str
    received: float


Line = tuple[str, str, str, str, Any, str, bool, Decimal, Decimal, Decimal | None, bool]


Stored = dict[tuple[str, str, str], tuple[float, dict[str, Any], str]]


def stored_cdrs(arrived: list[Arrival]) -> Stored:
    """Per (party, CDR id), upper-cased: the first push of it to arrive (receive time, body, partner)."""
    stored: Stored = {}
    for push in arrived:
        body = push.body
        stored.setdefault((_u(body["country_code"]), _u(body["party_id"]), _u(body["id"])),
                          (push.received, body, push.partner))
    return stored


def oracle_lines(arrived: list[Arrival]) -> dict[tuple[str, str, str], Line]:
    """The billing lines README's rules give for the pushes in arrival order."""
    stored = stored_cdrs(arrived)
    lines: dict[tuple[str, str, str], Line] = {}
    for key, (received, body, partner) in stored.items():
        credit = bool(body.get("credit"))
        if credit:
            ref = _u(body["credit_reference_id"])
            original = stored.get((key[0], key[1], ref))
            if original is not None:
                if original[1].get("credit"):
                    continue  # CREDIT_OF_CREDIT
                rivals = [(m, other[2]) for other, (m, b, _p) in stored.items()
                          if other[:2] == key[:2] and b.get("credit") and _u(b["credit_reference_id"]) == ref]
                if min(rivals) != (received, key[2]):  # the earliest received, then the lowest id
                    continue  # DUPLICATE_CREDIT
        cost = body["total_cost"]

        def signed(value: Decimal, credit: bool = credit) -> Decimal:
            return -abs(value) if credit else value

        incl = cost.get("incl_vat")
        lines[key] = (key[0], key[1], partner, _u(body["cdr_location"]["id"]),
                      ts(_minutes(body["end_date_time"])).date(), body["currency"], credit,
                      signed(Decimal(body["total_energy"])), signed(Decimal(cost["excl_vat"])),
                      None if incl is None else signed(Decimal(incl)), bool(body.get("home_charging_compensation")))
    return lines


def _content(body: dict[str, Any]) -> tuple[Any, ...]:
    """What tells two CDRs of one id apart here (the traffic varies nothing else but CiString case, period
    dimension order and `credit: false` against an absent `credit`, which tell nothing apart)."""
    cost = body["total_cost"]
    return (Decimal(body["total_energy"]), body["cdr_location"]["name"], bool(body.get("credit")),
            _u(body.get("credit_reference_id") or "") if body.get("credit") else "", body["currency"],
            Decimal(cost["excl_vat"]), None if cost.get("incl_vat") is None else Decimal(cost["incl_vat"]),
            bool(body.get("home_charging_compensation")))


def _negates(credit: dict[str, Any], original: dict[str, Any]) -> bool:
    """README: the opposite amounts excl. and incl. VAT (incl. VAT on both sides or on neither), same currency, the
    original's energy in either sign, and its home_charging_compensation (absent is false)."""
    mine, theirs = credit["total_cost"], original["total_cost"]
    incl, other_incl = mine.get("incl_vat"), theirs.get("incl_vat")
    return (credit["currency"] == original["currency"] and Decimal(mine["excl_vat"]) == -Decimal(theirs["excl_vat"])
            and abs(Decimal(credit["total_energy"])) == Decimal(original["total_energy"])
            and (incl is None) == (other_incl is None)
            and (incl is None or Decimal(incl) == -Decimal(other_incl))
            and bool(credit.get("home_charging_compensation")) == bool(original.get("home_charging_compensation")))


def oracle_links(arrived: list[Arrival]) -> tuple[dict[Any, tuple[str, str, bool | None]], set[Any], dict[Any, int]]:
    """The credit links (credit -> credited id, status, amount_matches), the anomalies of the credit rules (kind,
    party, CDR), and the conflicting pushes per CDR that README's rules give."""
    stored = stored_cdrs(arrived)
    links: dict[Any, tuple[str, str, bool | None]] = {}
    anomalies: set[Any] = set()
    for key, (received, body, _partner) in stored.items():
        if not body.get("credit"):
            continue
        if any(Decimal(v) > 0 for v in body["total_cost"].values() if v is not None):
            anomalies.add(("CREDIT_POSITIVE_COST", *key))
        ref = _u(body["credit_reference_id"])
        original = stored.get((key[0], key[1], ref))
        if original is None:  # past its grace at the final sweep
            links[key] = (ref, "UNKNOWN_REFERENCE", None)
            anomalies.add(("CREDIT_UNKNOWN_REFERENCE", *key))
            continue
        if original[0] > received + RULES.session_grace.total_seconds() / 60:
            anomalies.add(("CREDIT_UNKNOWN_REFERENCE", *key))  # its original came after the grace
        matches = _negates(body, original[1])
        if original[1].get("credit"):
            anomalies.add(("CREDIT_OF_CREDIT", *key))
            links[key] = (ref, "CREDIT_OF_CREDIT", matches)
            continue
        if not matches:
            anomalies.add(("CREDIT_AMOUNT_MISMATCH", *key))
        rivals = [(m, other[2]) for other, (m, b, _p) in stored.items()
                  if other[:2] == key[:2] and b.get("credit") and _u(b["credit_reference_id"]) == ref]
        if min(rivals) == (received, key[2]):
            links[key] = (ref, "LINKED", matches)
        else:
            anomalies.add(("DUPLICATE_CREDIT", *key))
            links[key] = (ref, "DUPLICATE_CREDIT", matches)
    conflicts: dict[Any, int] = defaultdict(int)
    for push in arrived:
        key = (_u(push.body["country_code"]), _u(push.body["party_id"]), _u(push.body["id"]))
        if _content(push.body) != _content(stored[key][1]):
            conflicts[key] += 1
    return links, anomalies, dict(conflicts)


def _minutes(iso_time: str) -> float:
    from datetime import datetime

    return (datetime.fromisoformat(iso_time.replace("Z", "+00:00")) - ts(0)).total_seconds() / 60


def totals(lines: Any, key: Any) -> dict[Any, tuple[int, int, Decimal, Decimal, Decimal | None, int]]:
    """Per `key(line)`: CDRs, credit CDRs, energy, excl. VAT, incl. VAT (of the lines that give it), lines without."""
    sums: dict[Any, list[Any]] = defaultdict(lambda: [0, 0, Decimal(0), Decimal(0), None, 0])
    for line in lines:
        row = sums[key(line)]
        row[1 if line[6] else 0] += 1
        row[2] += line[7]
        row[3] += line[8]
        if line[9] is None:
            row[5] += 1
        else:
            row[4] = (row[4] or Decimal(0)) + line[9]
    return {k: tuple(v) for k, v in sums.items()}


# --- the pipeline -----------------------------------------------------------------------------------------------


def _object_key(body: dict[str, Any]) -> bytes:
    return f"{_u(body['country_code'])}/{_u(body['party_id'])}/{_u(body['id'])}".encode()


def _batches(items: list[Any], cuts: list[int]) -> list[list[Any]]:
    bounds = sorted({c for c in cuts if 0 < c < len(items)})
    return [items[a:b] for a, b in zip([0, *bounds], [*bounds, len(items)], strict=True)]


class Pipeline:
    """Stage 1 (CDRs, two partitions) and stage 2 (party facts, one partition) into chDB, without Kafka."""

    def __init__(self, client: Client) -> None:
        self.sink = ClickHouseSink(lambda: client)
        self.pseudonym = Pseudonymizer(PSEUDONYM_KEY)
        self.cdr_state, self.party_state = DictStore(), DictStore()
        self.facts: list[RawMessage] = []

    def write(self, batch: Any) -> None:
        asyncio.run(self.sink.write(batch))

    def stage1(self, messages: list[RawMessage], *, crash: bool) -> None:
        records, dead = decode_all(messages)
        records, misfits = sort_out(records, "CDRS")
        assert not dead and not misfits
        out = StageOutput(self.pseudonym)
        overlays = fold(records, lambda _anchor: self.cdr_state.data.get, Codec(CdrState), process_cdrs,
                        STAGE_RULES, out)
        self.write(out.batch)
        for party, facts in out.facts.items():
            for value in fact_records(facts):
                self.facts.append(RawMessage(FACTS_TOPIC, 0, len(self.facts), party.encode(), value))
        if not crash:
            for _anchor, overlay in overlays:
                self.cdr_state.commit(overlay)

    def sweep(self, client: Client) -> None:
        """The deadline sweep (run when no partition has a backlog): overdue credits and reconciliation rows."""
        batch, _promoted = sweeps.collect(client, utc_now(), STAGE_RULES, anomalies_kept=timedelta(days=365))
        self.write(batch)

    def stage2(self, messages: list[RawMessage], *, crash: bool) -> None:
        groups: dict[str, list[tuple[Any, list[Any]]]] = {}
        for message in messages:
            assert message.value is not None and message.key is not None
            groups.setdefault(message.key.decode(), []).append((message, decode_facts(message.value)))
        out, dead = PartyOutput(), list[DeadLetter]()
        overlays = [fold_party(party, batches, self.party_state.data.get, RULES, out, dead)
                    for party, batches in groups.items()]
        assert not dead
        self.write(party_batch(out, dead))
        if not crash:
            for overlay in overlays:
                self.party_state.commit(overlay)


@st.composite
def deliveries(draw: st.DrawFn, bodies: list[dict[str, Any]]) -> tuple[list[Arrival], Any]:
    """An arrival order (with each body's partner) and a plan of how the records are fed to the pipeline."""
    partner = {(cc, pid): p for cc, pid, p in PARTIES}
    arrived: list[Arrival] = []
    received = 0.0
    for body in draw(st.permutations(bodies)):
        # Receive times mostly follow arrival, but two receivers may take pushes in the same microsecond, or
        # publish one received a little earlier after another.
        step = draw(st.sampled_from([0.75, 0.75, 0.75, 0.0, -0.5]))
        received = max(received + step, 0)
        sender = draw(st.sampled_from([partner[(_u(body["country_code"]), _u(body["party_id"]))]] * 3 + ["hub"]))
        arrived.append(Arrival(body, sender, received))
    return arrived, draw(st.randoms(use_true_random=False))


def run(client: Client, arrived: list[Arrival], rnd: random.Random) -> bool:
    """Feed the pushes through both stages and a final sweep; whether a sweep also ran between two stage-2 batches
    (as a `replay` may have it: every fact dated before it)."""
    pipeline = Pipeline(client)
    queued: dict[int, list[tuple[bytes, bytes]]] = {0: [], 1: []}
    resent: list[list[Any]] = []  # [records still to come before it, partition, key, value]
    for push in arrived:
        body = push.body
        key = _object_key(body)
        value = event_bytes("CDR", body, received=push.received, partner=push.partner, cc=body["country_code"],
                            pid=body["party_id"])
        number = zlib.crc32(key) % 2
        queued[number].append((key, value))
        for copy in [c for c in resent if c[0] <= 0]:
            resent.remove(copy)
            queued[copy[1]].append((copy[2], copy[3]))
        for copy in resent:
            copy[0] -= 1
        if rnd.random() >= 0.85:  # a producer's resend: the same record again, a few records later
            resent.append([rnd.randint(0, 3), number, key, value])
    for _wait, number, key, value in resent:
        queued[number].append((key, value))
    partitions = {number: [RawMessage(CDR_TOPIC, number, offset, key, value)
                           for offset, (key, value) in enumerate(records)] for number, records in queued.items()}
    # Stage 1: each partition cut into batches, the two partitions' batches interleaved, some read again.
    queues = {p: _batches(m, [rnd.randrange(1, len(m) + 1) for _ in range(rnd.randint(0, 3))]) if m else []
              for p, m in partitions.items()}
    crashes = 3  # a few per stage
    while any(queues.values()):
        p = rnd.choice([p for p, q in queues.items() if q])
        batch = queues[p].pop(0)
        if rnd.random() >= 0.8 and crashes:  # rows and facts written, the state lost: read again from its start
            crashes -= 1
            pipeline.stage1(batch, crash=True)
            queues[p][:0] = _reread(batch, queues[p], rnd)
            continue
        pipeline.stage1(batch, crash=False)
        if rnd.random() >= 0.9:  # the state written, the offsets not committed
            pipeline.stage1(batch, crash=False)
    # Stage 2: the party facts in the order stage 1 published them, cut into batches, some read again.
    swept, crashes = False, 3
    pending = _batches(pipeline.facts, [rnd.randrange(1, len(pipeline.facts) + 1) for _ in range(rnd.randint(0, 3))])
    while pending:
        batch = pending.pop(0)
        if rnd.random() >= 0.8 and crashes:
            crashes -= 1
            pipeline.stage2(batch, crash=True)
            pending[:0] = _reread(batch, pending, rnd)
            continue
        pipeline.stage2(batch, crash=False)
        if rnd.random() >= 0.9:
            pipeline.stage2(batch, crash=False)
        if rnd.random() >= 0.8:
            pipeline.sweep(client)
            swept = True
    pipeline.sweep(client)
    return swept


def _reread(batch: list[Any], following: list[list[Any]], rnd: random.Random) -> list[list[Any]]:
    """The batches a fetch after a crash may make of `batch` again: the same, cut in two, or with the next batch
    (taken out of `following`)."""
    how = rnd.choice(["same", "split", "joined"])
    if how == "split" and len(batch) > 1:
        cut = rnd.randrange(1, len(batch))
        return [batch[:cut], batch[cut:]]
    if how == "joined" and following:
        return [batch + following.pop(0)]
    return [batch]


# --- the test ---------------------------------------------------------------------------------------------------


def _clear(client: Client) -> None:
    for table in TABLES:
        client.command(f"TRUNCATE TABLE {table}")


def _line_of(row: Any) -> Line:
    return (*row[:2], *row[3:])


@given(data=st.data())
@settings(max_examples=int(os.environ.get("BILLING_EXAMPLES", "25")), deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_billing_totals_agree_with_the_readme_oracle(client: Client, data: st.DataObject) -> None:
    _clear(client)
    bodies = data.draw(traffic())
    arrived, rnd = data.draw(deliveries(bodies))
    swept_between = run(client, arrived, rnd)
    expected = oracle_lines(arrived)

    got = {(r[0], r[1], r[2]): _line_of(r) for r in client.query(
        "SELECT country_code, party_id, cdr_id, partner_id, location_id, day, currency, credit, energy_kwh, "
        "cost_excl_vat, cost_incl_vat, home_charging_compensation FROM billable_lines").result_rows}
    assert got == expected

    # What decided it: the credit links and the anomalies of the CDR and credit rules.
    links, anomalies, conflicts = oracle_links(arrived)
    assert {(r[0], r[1], r[2]): tuple(r[3:]) for r in client.query(
        "SELECT country_code, party_id, credit_cdr_id, credited_cdr_id, status, amount_matches "
        "FROM credit_links FINAL").result_rows} == links
    found = {tuple(r) for r in client.query(
        "SELECT kind, country_code, party_id, object_id FROM anomalies FINAL").result_rows if r[0] != "CDR_CONFLICT"}
    if swept_between:  # a sweep before a late original flagged its credit too (anomalies are not withdrawn)
        late = {a for a in found - anomalies if a[0] == "CREDIT_UNKNOWN_REFERENCE"}
        assert all(links[a[1:]][1] != "UNKNOWN_REFERENCE" for a in late)
        found -= late
    assert found == anomalies
    assert {(r[1], r[2], r[3]): n for *r, n in client.query(
        "SELECT kind, country_code, party_id, object_id, count() FROM anomalies FINAL WHERE kind = 'CDR_CONFLICT' "
        "GROUP BY ALL").result_rows} == conflicts

    # Reconciliation (no sessions here): a credit is CREDIT, a CDR its LINKED credit cancels CREDITED, every
    # other CDR NO_SESSION once its session grace passed (the final sweep).
    credited = {(k[0], k[1], v[0]) for k, v in links.items() if v[1] == "LINKED"}
    outcomes = {k: "CREDIT" if b.get("credit") else "CREDITED" if k in credited else "NO_SESSION"
                for k, (_r, b, _p) in stored_cdrs(arrived).items()}
    assert {(r[0], r[1], r[2]): r[3] for r in client.query(
        "SELECT country_code, party_id, subject_id, outcome FROM reconciliation FINAL WHERE subject = 'CDR'",
    ).result_rows} == outcomes

    # billing_daily: per day, partner, party, location, currency and home charging compensation or not.
    daily = {(r[0], r[1], r[2], r[3], r[4], r[5], r[6]): tuple(r[7:]) for r in client.query(
        "SELECT day, partner_id, country_code, party_id, location_id, currency, home_charging_compensation, cdrs, "
        "credit_cdrs, energy_kwh, cost_excl_vat, cost_incl_vat, lines_without_incl_vat FROM billing_daily").result_rows}
    want = {k: (v[0] + v[1], v[1], *v[2:]) for k, v in totals(
        expected.values(), lambda x: (x[4], x[2], x[0], x[1], x[3], x[5], x[10])).items()}
    assert daily == want

    # The revenue report, by party, location and day: its last column, the kind, is a key too.
    def revenue(query: reports.ReportQuery, width: int) -> dict[Any, Any]:
        _columns, rows = reports.run(client, query)
        return {(*r[:width], r[-1]): tuple(r[width:-1]) for r in rows}

    def kind(x: Line) -> str:
        return "HOME_CHARGING_COMPENSATION" if x[10] else "CHARGING"

    for by, key in (("party", lambda x: (x[0], x[1], x[5], kind(x))),
                    ("location", lambda x: (x[0], x[1], x[3], x[5], kind(x))),
                    ("day", lambda x: (x[4], x[5], kind(x)))):
        width = len(key(next(iter(expected.values())))) - 1 if expected else 0
        assert revenue(reports.revenue(reports.Period(), by=by), width) == totals(expected.values(), key), by
    days = sorted({x[4] for x in expected.values()})
    if days:  # a period of the last day, and of the first
        for period in (reports.Period(start=days[-1]), reports.Period(end=days[0])):
            lines = [x for x in expected.values() if x[4] in (period.start, period.end)]
            assert revenue(reports.revenue(period, by="day"), 2) == totals(lines, lambda x: (x[4], x[5], kind(x))), \
                period
    for cc, pid, partner in PARTIES:
        lines = [x for x in expected.values() if (x[0], x[1]) == (cc, pid)]
        assert revenue(reports.revenue(reports.Period(), by="day", party=f"{cc}/{pid}"), 2) == totals(
            lines, lambda x: (x[4], x[5], kind(x))), (cc, pid)
        for sender in (partner, "hub"):
            lines = [x for x in expected.values() if x[2] == sender]
            assert revenue(reports.revenue(reports.Period(), partner=sender), 3) == totals(
                lines, lambda x: (x[0], x[1], x[5], kind(x))), sender
