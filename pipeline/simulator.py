"""A simulated CPO: realistic OCPI traffic pushed through real HTTP to the receivers.

Everything a run sends is planned up front from the seed (ids, energy, prices, statuses, which sessions get
retried, credited or resent out of order), so a seed always produces the same traffic relative to its time
anchor (`anchor`, default: now to the minute); only the interleaving of concurrent charging sessions varies.

Full traffic (`Traffic()`, the default) per CPO:
1. Locations: a PUT of each of its Locations (1-4 EVSEs, 1-2 Connectors each).
2. One charging story per session, stories running concurrently, each in order:
   EVSE status PATCH `CHARGING`; Session PUT (`PENDING`, then a PATCH to `ACTIVE` with the new
   `start_date_time`; or `ACTIVE` at once); 1-3 PATCHes of `kwh` with one new charging period each; the end,
   either a PUT of the complete `COMPLETED` Session or a PATCH of `status`, `end_date_time`, `kwh` and
   `total_cost`; EVSE status PATCH `AVAILABLE`; then the CDR POST. Some stories also:
   - resend a push unchanged (a retry: a PATCH, or the CDR POST),
   - resend an older Session PUT after the newer ones (out of order: its `last_updated` is older),
   - correct the CDR: a credit CDR (`<id>-C`, `credit`, `credit_reference_id`, negated `total_cost`) and a
     corrected CDR (`<id>-R`) with the new amount.
3. Afterwards, per Location, a Connector `tariff_ids` PATCH, and for some EVSEs a status PATCH with an old
   `last_updated`, sent last (out of order).
`Traffic.minimal()` is the foundation's story: a Session PUT `ACTIVE`, a PUT `COMPLETED` and the CDR.

`Expected` is the final state the pipeline must end with; see its docstring.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import random
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import msgspec

from ocpi.datetime import format_datetime, parse_datetime

RECEIVER_BASE = "/ocpi/emsp/2.2.1"
CREDENTIALS_PATH = "/ocpi/2.2.1/credentials"
FOUR_PLACES = Decimal("0.0001")
VAT = Decimal("1.21")

Key = tuple[str, str, str]  # (country_code, party_id, id) as sent
EvseKey = tuple[str, str, str, str]  # (country_code, party_id, location_id, evse_uid)
ConnectorKey = tuple[str, str, str, str, str]  # (country_code, party_id, location_id, evse_uid, connector_id)
Cost = tuple[Decimal, Decimal | None]  # total_cost (excl_vat, incl_vat)
# A CDR's billing line: (location_id, day (UTC) of its end, currency, credit, kWh, cost excl. VAT, incl. VAT), a
# credit's energy and costs negative (-|value|)
BillingLine = tuple[str, date, str, bool, Decimal, Decimal, Decimal | None]
# A CDR as sent: (session_id, currency, credit, credit_reference_id, total_energy, total_cost excl. VAT, incl. VAT)
CdrRow = tuple[str, str, bool, str | None, Decimal, Decimal, Decimal | None]


@dataclass(frozen=True)
class StatusPush:
    """An acknowledged push setting an EVSE's status: `sent` and `acked` are ticks of one clock of its CPO (its
    request went out, its 1000 came back). A push acknowledged before another was sent is ahead of it in Kafka
    (the receivers answer 1000 once the broker has acknowledged the record), so the pipeline saw it first;
    pushes whose windows overlap reached it in either order."""

    updated: datetime
    status: str
    sent: int
    acked: int


HistoryRow = tuple[str, str, datetime]  # (previous_status, status, changed_at) of an EVSE status history row

_json = msgspec.json.Encoder(decimal_format="number")


@dataclass(frozen=True)
class SimulatedParty:
    country_code: str
    party_id: str


@dataclass(frozen=True)
class Traffic:
    """What a simulated CPO sends besides a Session and a CDR per charging session (see module docstring)."""

    locations: bool = True  # PUT its Locations first, EVSE status PATCHes around every session
    session_patches: bool = True  # lifecycle by PATCHes (else a PUT ACTIVE and a PUT COMPLETED)
    pending_share: float = 0.3  # sessions that start PENDING
    end_by_patch_share: float = 0.5  # sessions completed by a PATCH rather than a full PUT
    retry_share: float = 0.1  # stories that resend a push unchanged
    stale_share: float = 0.1  # stories that resend an older Session PUT after the newer ones
    credit_share: float = 0.08  # CDRs corrected by a credit CDR and a new CDR

    @classmethod
    def minimal(cls) -> Traffic:
        """Two Session PUTs (ACTIVE, COMPLETED) and one CDR per session, nothing else."""
        return cls(locations=False, session_patches=False, pending_share=0, end_by_patch_share=0, retry_share=0,
                   stale_share=0, credit_share=0)


@dataclass
class Expected:
    """What the simulator pushed and was acknowledged: the final state the pipeline must reproduce.

    - `sessions`: the Sessions whose final state is `COMPLETED` (every story's, unless a push was refused);
      `session_status`, `session_kwh`, `session_periods`: each Session's final status, `kwh` and number of
      charging periods. Retried PATCHes must not append their periods twice, and a Session PUT resent out
      of order (older `last_updated`) must not bring back its older state.
    - `cdrs`: every CDR id acknowledged: originals, credit CDRs and corrected CDRs (a resent CDR once).
    - `kwh_by_party` / `cost_by_party` / `incl_by_party` ("CC/PID"): what billing must total. Costs: the sum of
      `total_cost.excl_vat` (`incl_vat`) over all CDRs; a credit CDR carries the negated total of the CDR it cancels, so
      the two cancel and the corrected CDR counts. Energy: a credit CDR repeats its original's positive
      `total_energy`, so energy counts negative on credit CDRs: Σ total_energy (not credit) − Σ total_energy
      (credit). `credited` holds the ids of the cancelled originals. `currencies` ("CC/PID"): the currencies its
      CDRs were sent in (the simulated CPOs bill in EUR only, so the figures above are each in one currency).
      `cdr_rows`: each CDR as sent (`CdrRow`); `billing_lines`: its one billing line (`BillingLine`), which the
      totals above add up.
      `credit_links`: each credit CDR's original's id (it must be LINKED to it, the amounts matching: the
      credit negates it exactly).
    - `cdr_reconciliation` / `session_reconciliation`: the reconciliation outcome each CDR and each completed
      Session must end with: a credit CDR CREDIT, the CDR it cancels CREDITED, a corrected CDR (re-priced on
      purpose) and its Session MISMATCH, every other CDR and Session MATCHED (they agree to the cent and second).
      `session_cost`: each Session's final `total_cost` (excl. VAT, incl. VAT; None: none sent).
      `session_history`: each Session's status changes, in order, as (previous status, status) (the first
      from ''): every change a newer push made, none from a resend or a push older than the Session.
    - `locations`: every Location pushed; `evse_status`: each EVSE's final status, the one with the newest
      `last_updated` (status PATCHes of overlapping sessions and deliberately old PATCHes arrive out of
      order; an older one must not win). `evse_pushes`: every acknowledged push setting an EVSE's status
      (`StatusPush`), from which `evse_history_bounds` derives the status history rows that must and may
      exist (which of two overlapping pushes reached the pipeline first is unknown, so is their row).
    - `connector_tariffs`: each Connector's final `tariff_ids`, the ones with the newest `last_updated` (the
      Location PUT's, then the late Connector PATCH's).
    - `pushes`: HTTP requests sent; `events`: answered 1000 (= records in Kafka, resends included);
      `rejected`: not acknowledged (a demo expects 0); `retries` / `stale`: deliberate resends and
      out-of-order pushes among the events, which must leave the final state unchanged.
    """

    sessions: set[Key] = field(default_factory=set)
    cdrs: set[Key] = field(default_factory=set)
    kwh_by_party: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    cost_by_party: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    incl_by_party: dict[str, Decimal] = field(default_factory=lambda: defaultdict(Decimal))
    currencies: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))
    pushes: int = 0
    rejected: int = 0
    events: int = 0
    retries: int = 0
    stale: int = 0
    credited: set[Key] = field(default_factory=set)
    locations: set[Key] = field(default_factory=set)
    evse_status: dict[EvseKey, str] = field(default_factory=dict)
    session_status: dict[Key, str] = field(default_factory=dict)
    session_kwh: dict[Key, Decimal] = field(default_factory=dict)
    session_periods: dict[Key, int] = field(default_factory=dict)
    session_cost: dict[Key, Cost | None] = field(default_factory=dict)
    session_history: dict[Key, list[tuple[str, str]]] = field(default_factory=dict)
    evse_pushes: dict[EvseKey, list[StatusPush]] = field(default_factory=dict)
    connector_tariffs: dict[ConnectorKey, tuple[str, ...]] = field(default_factory=dict)
    cdr_rows: dict[Key, CdrRow] = field(default_factory=dict)
    billing_lines: dict[Key, BillingLine] = field(default_factory=dict)
    credit_links: dict[Key, str] = field(default_factory=dict)
    cdr_reconciliation: dict[Key, str] = field(default_factory=dict)
    session_reconciliation: dict[Key, str] = field(default_factory=dict)
    _evse_updated: dict[EvseKey, datetime] = field(default_factory=dict, repr=False)
    _session_updated: dict[Key, datetime] = field(default_factory=dict, repr=False)
    _connector_updated: dict[ConnectorKey, datetime] = field(default_factory=dict, repr=False)
    _ticks: itertools.count[int] = field(default_factory=itertools.count, repr=False)

    def merge(self, other: Expected) -> None:
        """Add another CPO's expectations (disjoint parties) to these."""
        self.sessions |= other.sessions
        self.cdrs |= other.cdrs
        self.credited |= other.credited
        self.locations |= other.locations
        for party, kwh in other.kwh_by_party.items():
            self.kwh_by_party[party] += kwh
        for party, cost in other.cost_by_party.items():
            self.cost_by_party[party] += cost
        for party, cost in other.incl_by_party.items():
            self.incl_by_party[party] += cost
        for party, currencies in other.currencies.items():
            self.currencies[party] |= currencies
        for name in ("pushes", "rejected", "events", "retries", "stale"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for mapping in ("evse_status", "session_status", "session_kwh", "session_periods", "session_cost",
                        "session_history", "evse_pushes", "connector_tariffs", "cdr_rows", "billing_lines",
                        "credit_links", "cdr_reconciliation", "session_reconciliation", "_evse_updated",
                        "_session_updated", "_connector_updated"):
            getattr(self, mapping).update(getattr(other, mapping))

    def observe_evse(self, key: EvseKey, status: str, updated: datetime,
                     window: tuple[int, int] | None = None) -> None:
        """A push setting the EVSE's status was acknowledged; `window`: (sent, acked) on its CPO's clock (None:
        after every push observed before, and before every later one)."""
        if window is None:
            tick = next(self._ticks)
            window = (tick, tick)
        self.evse_pushes.setdefault(key, []).append(StatusPush(updated, status, *window))
        if key not in self._evse_updated or updated > self._evse_updated[key]:
            self._evse_updated[key] = updated
            self.evse_status[key] = status

    def evse_history_bounds(self, key: EvseKey) -> tuple[set[HistoryRow], set[tuple[str, datetime]]]:
        """(the status history rows the EVSE must have, the (status, changed_at) any of its rows may have).

        The pipeline keeps the status of the newest push received (an older one is stale) and writes a row
        when that status changes. A push is certainly applied if every newer push was sent after it was
        acknowledged, certainly stale if a newer one was acknowledged before it was sent (the deliberately late
        ones). An applied push finds the status of the newest older push that reached the pipeline before it: if
        the newest older push not sent after it was acknowledged was acknowledged before it was sent (or there is
        none), that status is known, and so is whether the push writes a row, and which.
        """
        pushes = sorted(self.evse_pushes.get(key, ()), key=lambda p: p.updated)
        required: set[HistoryRow] = set()
        allowed: set[tuple[str, datetime]] = set()
        for index, push in enumerate(pushes):
            newer = pushes[index + 1:]
            if not any(other.acked < push.sent for other in newer):
                allowed.add((push.status, push.updated))
            if any(other.sent < push.acked for other in newer):
                continue  # perhaps overtaken by a newer push
            older = [other for other in pushes[:index] if other.sent < push.acked]  # perhaps received before it
            before = older[-1] if older else None
            if before is not None and before.acked > push.sent:
                continue  # the status it found is unknown
            previous = before.status if before is not None else ""
            if previous != push.status:
                required.add((previous, push.status, push.updated))
        return required, allowed

    def observe_connector(self, key: ConnectorKey, tariff_ids: list[str], updated: datetime) -> None:
        """A push setting the Connector's `tariff_ids` was acknowledged; the newest `last_updated` wins."""
        if key not in self._connector_updated or updated > self._connector_updated[key]:
            self._connector_updated[key] = updated
            self.connector_tariffs[key] = tuple(tariff_ids)

    def observe_session(self, key: Key, updated: datetime, *, status: str | None = None,
                        kwh: Decimal | None = None, periods: int | None = None, cost: Cost | None = None,
                        replace: bool = False) -> None:
        """A Session push was acknowledged; only the newest `last_updated` changes the expected state.
        `replace`: a PUT (what it leaves out, e.g. `total_cost`, is gone)."""
        if key in self._session_updated and updated <= self._session_updated[key]:
            return
        self._session_updated[key] = updated
        if cost is not None or replace:
            self.session_cost[key] = cost
        if status is not None:
            previous = self.session_status.get(key, "")
            if status != previous:
                self.session_history.setdefault(key, []).append((previous, status))
            self.session_status[key] = status
            if status == "COMPLETED":
                self.sessions.add(key)
            else:
                self.sessions.discard(key)
        if kwh is not None:
            self.session_kwh[key] = kwh
        if periods is not None:
            self.session_periods[key] = periods if replace else self.session_periods.get(key, 0) + periods

    def observe_cdr(self, party: SimulatedParty, cdr: dict[str, Any], *, outcome: str = "MATCHED") -> None:
        """A CDR POST was acknowledged; `outcome`: its reconciliation with its Session (not a credit's)."""
        key = (party.country_code, party.party_id, cdr["id"])
        if key in self.cdrs:
            return  # a resend: the pipeline keeps one CDR per id
        self.cdrs.add(key)
        name = f"{party.country_code}/{party.party_id}"
        self.cost_by_party[name] += cdr["total_cost"]["excl_vat"]
        self.incl_by_party[name] += cdr["total_cost"].get("incl_vat") or Decimal(0)
        self.currencies[name].add(cdr["currency"])
        credit, incl = bool(cdr.get("credit")), cdr["total_cost"].get("incl_vat")
        self.cdr_rows[key] = (cdr["session_id"], cdr["currency"], credit, cdr.get("credit_reference_id"),
                              cdr["total_energy"], cdr["total_cost"]["excl_vat"], incl)
        self.billing_lines[key] = (
            cdr["cdr_location"]["id"], parse_datetime(cdr["end_date_time"]).astimezone(UTC).date(), cdr["currency"],
            credit, _billed(cdr["total_energy"], credit), _billed(cdr["total_cost"]["excl_vat"], credit),
            None if incl is None else _billed(incl, credit))
        if cdr.get("credit"):
            self.kwh_by_party[name] -= cdr["total_energy"]
            credited = (party.country_code, party.party_id, cdr["credit_reference_id"])
            self.credited.add(credited)
            self.credit_links[key] = cdr["credit_reference_id"]
            self.cdr_reconciliation[key] = "CREDIT"
            self.cdr_reconciliation[credited] = "CREDITED"
        else:
            self.kwh_by_party[name] += cdr["total_energy"]
            self.cdr_reconciliation[key] = outcome
            self.session_reconciliation[(party.country_code, party.party_id, cdr["session_id"])] = outcome


def _billed(value: Decimal, credit: bool) -> Decimal:
    """An amount as billing counts it: a credit CDR's negative, whatever sign it was sent with."""
    return -abs(value) if credit else value


def _money(value: float) -> Decimal:
    return Decimal(str(value)).quantize(FOUR_PLACES)


def auth_header(token: str) -> str:
    return "Token " + base64.b64encode(token.encode()).decode()


# --- the plan: what to send, and what its acknowledgement means ---------------------------------------------

@dataclass
class Push:
    """One request, and its effect on Expected once it is acknowledged."""

    method: str
    path: str
    body: dict[str, Any]
    effect: Callable[[Expected], None] | None = None
    party: SimulatedParty | None = None  # the owner, sent as OCPI-from-*
    retry: bool = False  # a deliberate resend of an earlier push
    stale: bool = False  # deliberately older than what was sent before for the same object
    window: tuple[int, int] | None = None  # once acknowledged: (sent, acked) on its CPO's clock


@dataclass
class SimulatedLocation:
    party: SimulatedParty
    id: str
    body: dict[str, Any]
    evses: list[tuple[str, list[str]]]  # (evse uid, connector ids)
    created: datetime
    dc: set[str] = field(default_factory=set)  # uids of the DC EVSEs

    @property
    def path(self) -> str:
        return f"{RECEIVER_BASE}/locations/{self.party.country_code}/{self.party.party_id}/{self.id}"

    def evse_key(self, uid: str) -> EvseKey:
        return self.party.country_code, self.party.party_id, self.id, uid


def _location(rng: random.Random, party: SimulatedParty, number: int, created: datetime) -> SimulatedLocation:
    location_id = f"LOC{number:03d}"
    stamp = format_datetime(created)
    evses, evse_bodies, dc_evses = [], [], set()
    for e in range(1, rng.randint(1, 4) + 1):
        uid = f"{location_id}-E{e}"
        connector_ids = [str(c) for c in range(1, rng.randint(1, 2) + 1)]
        evses.append((uid, connector_ids))
        dc = rng.random() < 0.3
        if dc:
            dc_evses.add(uid)
        evse_bodies.append({
            "uid": uid, "evse_id": f"{party.country_code}*{party.party_id}*E{number:03d}{e}", "status": "AVAILABLE",
            "capabilities": ["RFID_READER", "REMOTE_START_STOP_CAPABLE"],
            "connectors": [{"id": c, "standard": "IEC_62196_T2_COMBO" if dc else "IEC_62196_T2",
                            "format": "CABLE" if dc else "SOCKET", "power_type": "DC" if dc else "AC_3_PHASE",
                            "max_voltage": 920 if dc else 230, "max_amperage": 200 if dc else 32,
                            "tariff_ids": ["DC1" if dc else "AC1"], "last_updated": stamp}
                           for c in connector_ids],
            "physical_reference": str(e), "last_updated": stamp})
    latitude = Decimal("52.0") + Decimal(rng.randint(0, 999999)) / Decimal(1000000)
    longitude = Decimal("4.5") + Decimal(rng.randint(0, 999999)) / Decimal(1000000)
    body = {
        "country_code": party.country_code, "party_id": party.party_id, "id": location_id, "publish": True,
        "name": f"Station {location_id}", "address": f"Main Street {number}", "city": "Utrecht",
        "postal_code": "3511AB", "country": "NLD",
        "coordinates": {"latitude": f"{latitude:.6f}", "longitude": f"{longitude:.6f}"},
        "parking_type": "PARKING_LOT", "evses": evse_bodies, "operator": {"name": f"CPO {party.party_id}"},
        "time_zone": "Europe/Amsterdam", "last_updated": stamp,
    }
    return SimulatedLocation(party, location_id, body, evses, created, dc_evses)


def evse_status(path: str, key: EvseKey, status: str, updated: datetime, *, stale: bool = False) -> Push:
    """An EVSE status PATCH; acknowledged, it is the EVSE's expected status if it is the newest."""
    push = Push("PATCH", path, {"status": status, "last_updated": format_datetime(updated)}, stale=stale)

    def observe(expected: Expected) -> None:
        expected.observe_evse(key, status, updated, push.window)

    push.effect = observe
    return push


class ChargingStory:
    """One charging session at a party: its Session pushes, EVSE status changes and CDR(s)."""

    def __init__(self, rng: random.Random, party: SimulatedParty, number: int, start: datetime,
                 location: SimulatedLocation | None = None, traffic: Traffic | None = None) -> None:
        traffic = traffic or Traffic.minimal()
        self.party = party
        self.traffic = traffic
        self.number = number
        self.session_id = f"S{number:06d}"
        self.cdr_id = f"C{number:06d}"
        self.start = start
        self.minutes = rng.randint(15, 180)
        self.end = start + timedelta(minutes=self.minutes)
        self.kwh = _money(rng.uniform(3.0, 75.0))
        self.price_per_kwh = _money(rng.choice([0.29, 0.35, 0.42, 0.59]))
        self.cost_excl = (self.kwh * self.price_per_kwh).quantize(FOUR_PLACES)
        self.cost_incl = (self.cost_excl * VAT).quantize(FOUR_PLACES)
        if location is None:
            self.location_id = f"LOC{rng.randint(1, 40):03d}"
            self.evse_uid = f"{self.location_id}-E{rng.randint(1, 4)}"
            self.connector_id = "1"
        else:
            self.location_id = location.id
            self.evse_uid, connectors = rng.choice(location.evses)
            self.connector_id = rng.choice(connectors)
        self.location = location
        self.token_uid = f"TOK{rng.randint(1, 500):05d}"
        self.contract_id = f"{party.country_code}-EMS-C{rng.randint(1, 500):08d}"
        # Full traffic only (drawn in every mode, so the values above do not depend on the traffic).
        self.pending = rng.random() < traffic.pending_share
        self.end_by_patch = rng.random() < traffic.end_by_patch_share
        self.retry = rng.random() < traffic.retry_share
        self.stale = rng.random() < traffic.stale_share
        self.credit = rng.random() < traffic.credit_share
        self.corrected_price = _money(rng.choice([0.25, 0.31, 0.39]))
        self.periods = self._split(rng, rng.randint(1, 3))

    @property
    def key(self) -> Key:
        return self.party.country_code, self.party.party_id, self.session_id

    @property
    def url(self) -> str:
        return f"{RECEIVER_BASE}/sessions/{self.party.country_code}/{self.party.party_id}/{self.session_id}"

    def _step(self, parts: int) -> timedelta:
        """The length of each of `parts` charging periods, in whole seconds (timestamps stay exact on the wire)."""
        return timedelta(seconds=self.minutes * 60 // parts)

    def _split(self, rng: random.Random, parts: int) -> list[tuple[datetime, Decimal, Decimal]]:
        """(start, kWh, hours) of each charging period; the kWh add up to the session's exactly."""
        step = self._step(parts)
        shares = [Decimal(rng.randint(1, 10)) for _ in range(parts)]
        total = sum(shares)
        energy = [(self.kwh * s / total).quantize(FOUR_PLACES) for s in shares[:-1]]
        energy.append(self.kwh - sum(energy, Decimal(0)))
        hours = (Decimal(self.minutes) / Decimal(60) / parts).quantize(FOUR_PLACES)
        return [(self.start + step * i, energy[i], hours) for i in range(parts)]

    def _token(self) -> dict[str, Any]:
        return {"country_code": self.party.country_code, "party_id": "EMS", "uid": self.token_uid,
                "type": "RFID", "contract_id": self.contract_id}

    def _period(self, index: int) -> dict[str, Any]:
        start, kwh, hours = self.periods[index]
        return {"start_date_time": format_datetime(start),
                "dimensions": [{"type": "ENERGY", "volume": kwh}, {"type": "TIME", "volume": hours}]}

    def session(self, status: str, kwh: Decimal, updated: datetime, *, final: bool = False,
                periods: int = 0, start: datetime | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "country_code": self.party.country_code, "party_id": self.party.party_id, "id": self.session_id,
            "start_date_time": format_datetime(start or self.start), "kwh": kwh, "cdr_token": self._token(),
            "auth_method": "WHITELIST", "location_id": self.location_id, "evse_uid": self.evse_uid,
            "connector_id": self.connector_id, "currency": "EUR", "status": status,
            "last_updated": format_datetime(updated),
        }
        if periods:
            body["charging_periods"] = [self._period(i) for i in range(periods)]
        if final:
            body["end_date_time"] = format_datetime(self.end)
            body["total_cost"] = {"excl_vat": self.cost_excl, "incl_vat": self.cost_incl}
        return body

    def cdr(self, *, cdr_id: str | None = None, cost_excl: Decimal | None = None, credit_of: str | None = None,
            updated: datetime | None = None) -> dict[str, Any]:
        hours = (Decimal(self.minutes) / Decimal(60)).quantize(FOUR_PLACES)
        excl = self.cost_excl if cost_excl is None else cost_excl
        body: dict[str, Any] = {
            "country_code": self.party.country_code, "party_id": self.party.party_id, "id": cdr_id or self.cdr_id,
            "start_date_time": format_datetime(self.start), "end_date_time": format_datetime(self.end),
            "session_id": self.session_id, "cdr_token": self._token(), "auth_method": "WHITELIST",
            "cdr_location": {
                "id": self.location_id, "name": f"Station {self.location_id}", "address": "Main Street 1",
                "city": "Utrecht", "postal_code": "3511AB", "country": "NLD",
                "coordinates": {"latitude": "52.090736", "longitude": "5.121420"},
                "evse_uid": self.evse_uid,
                "evse_id": f"{self.party.country_code}*{self.party.party_id}*E{self.evse_uid}".replace("-", ""),
                "connector_id": self.connector_id, "connector_standard": "IEC_62196_T2",
                "connector_format": "SOCKET", "connector_power_type": "AC_3_PHASE",
            },
            "currency": "EUR",
            "charging_periods": [self._period(i) for i in range(len(self.periods))],
            "total_cost": {"excl_vat": excl, "incl_vat": (excl * VAT).quantize(FOUR_PLACES)},
            "total_energy": self.kwh, "total_time": hours,
            "last_updated": format_datetime(updated or self.end),
        }
        if credit_of is not None:
            body["credit"] = True
            body["credit_reference_id"] = credit_of
        return body

    # --- the pushes -----------------------------------------------------------------------------------------

    def pushes(self) -> list[Push]:
        plan = self._minimal() if not self.traffic.session_patches else self._lifecycle()
        plan += self._cdrs()
        if self.location is not None:
            location = self.location
            evse = location.evse_key(self.evse_uid)
            path = f"{location.path}/{self.evse_uid}"
            # A per-story fraction of a second: two sessions at one EVSE never share a status timestamp,
            # so "the newest status wins" has one answer.
            offset = timedelta(microseconds=100 * (self.number % 10000))
            plan.insert(0, evse_status(path, evse, "CHARGING", self.start + offset))
            at_end = next(i for i, push in enumerate(plan) if push.method == "POST")
            plan.insert(at_end, evse_status(path, evse, "AVAILABLE", self.end + offset))
        for push in plan:
            push.party = self.party
        return plan

    def _minimal(self) -> list[Push]:
        key = self.key
        return [
            Push("PUT", self.url, self.session("ACTIVE", Decimal(0), self.start),
                 lambda e: e.observe_session(key, self.start, status="ACTIVE", kwh=Decimal(0), periods=0,
                                             replace=True)),
            Push("PUT", self.url, self.session("COMPLETED", self.kwh, self.end, final=True),
                 lambda e: e.observe_session(key, self.end, status="COMPLETED", kwh=self.kwh, periods=0,
                                             cost=(self.cost_excl, self.cost_incl), replace=True)),
        ]

    def _lifecycle(self) -> list[Push]:
        key, url = self.key, self.url
        plan: list[Push] = []
        created = self.start - timedelta(minutes=2)
        if self.pending:
            first = self.session("PENDING", Decimal(0), created, start=created)
            plan.append(Push("PUT", url, first, lambda e: e.observe_session(
                key, created, status="PENDING", kwh=Decimal(0), periods=0, replace=True)))
            plan.append(Push("PATCH", url, {"status": "ACTIVE", "start_date_time": format_datetime(self.start),
                                            "last_updated": format_datetime(self.start)},
                             lambda e: e.observe_session(key, self.start, status="ACTIVE")))
        else:
            first = self.session("ACTIVE", Decimal(0), self.start)
            plan.append(Push("PUT", url, first, lambda e: e.observe_session(
                key, self.start, status="ACTIVE", kwh=Decimal(0), periods=0, replace=True)))
        kwh = Decimal(0)
        for index, (period_start, energy, _hours) in enumerate(self.periods):
            kwh += energy
            updated = period_start + self._step(len(self.periods))
            if index == len(self.periods) - 1:
                updated -= timedelta(minutes=1)  # the last period's update comes before the end
            body = {"kwh": kwh, "charging_periods": [self._period(index)], "last_updated": format_datetime(updated)}
            plan.append(Push("PATCH", url, body, self._observe_period(updated, kwh)))
            if self.retry and index == 0:
                plan.append(Push("PATCH", url, body, self._observe_period(updated, kwh), retry=True))
        end = self.end
        if self.end_by_patch:
            body = {"status": "COMPLETED", "end_date_time": format_datetime(end), "kwh": self.kwh,
                    "total_cost": {"excl_vat": self.cost_excl, "incl_vat": self.cost_incl},
                    "last_updated": format_datetime(end)}
            plan.append(Push("PATCH", url, body, lambda e: e.observe_session(
                key, end, status="COMPLETED", kwh=self.kwh, cost=(self.cost_excl, self.cost_incl))))
        else:
            body = self.session("COMPLETED", self.kwh, end, final=True, periods=len(self.periods))
            plan.append(Push("PUT", url, body, lambda e: e.observe_session(
                key, end, status="COMPLETED", kwh=self.kwh, periods=len(self.periods),
                cost=(self.cost_excl, self.cost_incl), replace=True)))
        if self.stale:
            # The first PUT again, after the end: older than what the pipeline holds, it must change nothing.
            plan.append(Push("PUT", url, first, lambda e: e.observe_session(
                key, created if self.pending else self.start, status=first["status"], kwh=Decimal(0),
                periods=0, replace=True), stale=True))
        return plan

    def _observe_period(self, updated: datetime, kwh: Decimal) -> Callable[[Expected], None]:
        key = self.key

        def observe(expected: Expected) -> None:
            expected.observe_session(key, updated, kwh=kwh, periods=1)

        return observe

    def _cdrs(self) -> list[Push]:
        path = f"{RECEIVER_BASE}/cdrs"
        party = self.party
        original = self.cdr(updated=self.end + timedelta(minutes=5))
        plan = [Push("POST", path, original, lambda e: e.observe_cdr(party, original))]
        if self.retry:
            plan.append(Push("POST", path, original, lambda e: e.observe_cdr(party, original), retry=True))
        if self.credit:
            credit = self.cdr(cdr_id=f"{self.cdr_id}-C", cost_excl=-self.cost_excl, credit_of=self.cdr_id,
                              updated=self.end + timedelta(hours=2))
            corrected_cost = (self.kwh * self.corrected_price).quantize(FOUR_PLACES)
            corrected = self.cdr(cdr_id=f"{self.cdr_id}-R", cost_excl=corrected_cost,
                                 updated=self.end + timedelta(hours=3))
            plan.append(Push("POST", path, credit, lambda e: e.observe_cdr(party, credit)))
            # Re-priced (the corrected prices differ from every original price): it and its Session disagree.
            plan.append(Push("POST", path, corrected, lambda e: e.observe_cdr(party, corrected, outcome="MISMATCH")))
        return plan


class SimulatedCpo:
    """Pushes Locations, Sessions and CDRs for its parties to one receiver base URL with one token."""

    def __init__(self, base_url: str, token: str, parties: list[SimulatedParty], *, seed: int = 7,
                 concurrency: int = 32, traffic: Traffic | None = None, anchor: datetime | None = None,
                 client: httpx.AsyncClient | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.parties = parties
        self.rng = random.Random(seed)
        self.concurrency = concurrency
        self.traffic = traffic or Traffic()
        self.anchor = anchor or datetime.now(UTC).replace(second=0, microsecond=0)
        self.expected = Expected()
        self._client = client  # an open client to use instead of one per run (tests: an in-process app)
        self._clock = itertools.count()  # orders sends and acknowledgements (`Push.window`)
        self.receiver: SimulatedParty | None = None  # our party (OCPI-to-*), learned from our credentials

    async def _send(self, client: httpx.AsyncClient, push: Push) -> bool:
        headers = {"Authorization": auth_header(self.token), "X-Request-ID": str(uuid.uuid4()),
                   "X-Correlation-ID": str(uuid.uuid4()), "Content-Type": "application/json"}
        if self.receiver is not None and push.party is not None:
            # Required from a platform with several parties (04 §8.1), harmless from one with one.
            headers.update({"OCPI-from-country-code": push.party.country_code,
                            "OCPI-from-party-id": push.party.party_id,
                            "OCPI-to-country-code": self.receiver.country_code,
                            "OCPI-to-party-id": self.receiver.party_id})
        content = _json.encode(push.body)
        sent = next(self._clock)
        for attempt in range(5):
            response = await client.request(push.method, f"{self.base_url}{push.path}", content=content,
                                            headers=headers)
            status = response.json().get("status_code")
            self.expected.pushes += 1
            if status == 1000:
                self.expected.events += 1
                self.expected.retries += push.retry
                self.expected.stale += push.stale
                push.window = (sent, next(self._clock))
                if push.effect is not None:
                    push.effect(self.expected)
                return True
            if status is not None and 3000 <= status < 4000 and attempt < 4:
                await asyncio.sleep(0.2 * (attempt + 1))  # a real CPO retries server errors
                continue
            self.expected.rejected += 1
            return False
        return False

    def plan(self, sessions: int) -> tuple[list[Push], list[ChargingStory], list[Push]]:
        """(location pushes, stories, late location pushes) for `sessions` charging sessions."""
        rng, traffic = self.rng, self.traffic
        locations: dict[SimulatedParty, list[SimulatedLocation]] = {}
        if traffic.locations:
            created = self.anchor - timedelta(days=30)
            for party in self.parties:
                share = sessions // len(self.parties) + 1
                locations[party] = [_location(rng, party, n + 1, created) for n in range(min(40, max(2, share // 4)))]
        stories = []
        for i in range(sessions):
            party = self.parties[i % len(self.parties)]
            start = self.anchor - timedelta(days=rng.randint(0, 6), minutes=rng.randint(200, 600))
            location = rng.choice(locations[party]) if locations else None
            stories.append(ChargingStory(rng, party, i + 1, start, location, traffic))
        used = {story.location.evse_key(story.evse_uid) for story in stories if story.location is not None}
        first: list[Push] = []
        late: list[Push] = []
        for party_locations in locations.values():
            for location in party_locations:
                put = Push("PUT", location.path, location.body, party=location.party)
                put.effect = self._observe_location(location, put)
                first.append(put)
                for push in self._late(rng, location, used):
                    push.party = location.party
                    late.append(push)
        return first, stories, late

    @staticmethod
    def _observe_location(location: SimulatedLocation, push: Push) -> Callable[[Expected], None]:
        def observe(expected: Expected) -> None:
            expected.locations.add((location.party.country_code, location.party.party_id, location.id))
            for evse in location.body["evses"]:
                expected.observe_evse(location.evse_key(evse["uid"]), evse["status"], location.created, push.window)
                for connector in evse["connectors"]:
                    expected.observe_connector((*location.evse_key(evse["uid"]), connector["id"]),
                                               connector["tariff_ids"], location.created)

        return observe

    def _late(self, rng: random.Random, location: SimulatedLocation, used: set[EvseKey]) -> list[Push]:
        """A Connector tariff change (newer than everything), and for some EVSEs that had a session a status
        PATCH older than their session's (out of order: it must not win)."""
        uid, connectors = location.evses[0]
        updated = self.anchor - timedelta(minutes=1)
        tariff = "DC2" if uid in location.dc else "AC2"
        connector = (*location.evse_key(uid), connectors[0])
        pushes = [Push("PATCH", f"{location.path}/{uid}/{connectors[0]}",
                       {"tariff_ids": [tariff], "last_updated": format_datetime(updated)},
                       lambda e: e.observe_connector(connector, [tariff], updated))]
        for uid, _connectors in location.evses:
            if rng.random() < 0.25 and location.evse_key(uid) in used:
                old = location.created + timedelta(hours=1)
                key = location.evse_key(uid)
                pushes.append(evse_status(f"{location.path}/{uid}", key, "OUTOFORDER", old, stale=True))
        return pushes

    async def run(self, sessions: int, progress: Callable[[int], None] | None = None) -> Expected:
        """Push the Locations, then `sessions` charging stories concurrently, then the late Location pushes.

        `progress(1)` is called once per finished story.
        """
        if self._client is not None:
            return await self._run(self._client, sessions, progress)
        limits = httpx.Limits(max_connections=self.concurrency)
        async with httpx.AsyncClient(timeout=30, limits=limits) as client:
            return await self._run(client, sessions, progress)

    async def _learn_receiver(self, client: httpx.AsyncClient) -> None:
        """Our party, as the credentials GET names it (what a CPO knows after the handshake)."""
        response = await client.get(f"{self.base_url}{CREDENTIALS_PATH}",
                                    headers={"Authorization": auth_header(self.token)})
        roles = (response.json().get("data") or {}).get("roles") or []
        if response.status_code == 200 and roles:
            self.receiver = SimulatedParty(roles[0]["country_code"], roles[0]["party_id"])

    async def _run(self, client: httpx.AsyncClient, sessions: int,
                   progress: Callable[[int], None] | None) -> Expected:
        await self._learn_receiver(client)
        first, stories, late = self.plan(sessions)
        slots = asyncio.Semaphore(self.concurrency)

        async def one(push: Push) -> None:
            async with slots:
                await self._send(client, push)

        async def story(plan: ChargingStory) -> None:
            async with slots:
                for push in plan.pushes():  # one object's pushes in order
                    await self._send(client, push)
            if progress:
                progress(1)

        await asyncio.gather(*(one(push) for push in first))
        await asyncio.gather(*(story(s) for s in stories))
        for push in late:  # in order, after everything else: the old ones must arrive last
            await self._send(client, push)
        return self.expected
