"""The simulated CPO against the real receivers (in-process, fake Kafka sink): every push is acknowledged,
and its `Expected` is exactly what an independent replay of the published events gives under the rules the
pipeline must apply (newest `last_updated` wins, equal or older is a duplicate or stale, Session PATCHes
merge and append charging periods, EVSE/Connector pushes merge into their Location, one CDR per id, credit
CDRs cancel their original)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient

from infra.codec import DecodedEvent, decode_event
from ocpi.decode import decode
from ocpi.model import CDR, ConnectorPatch, EVSEPatch, Location, Session, SessionPatch
from ocpi.patch import merge_session, patch_connector, patch_evse
from pipeline.simulator import Expected, SimulatedCpo, SimulatedParty, Traffic
from tests.unit.receivers.app_support import AppEnv, make_env  # noqa: F401
from tests.unit.receivers.push_support import payload_as

ANCHOR = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
WIRE = msgspec.json.Encoder(decimal_format="number")
PARTIES = [SimulatedParty("NL", "TNM"), SimulatedParty("NL", "EVB")]


def replay(events: list[DecodedEvent]) -> dict[str, Any]:
    """The final state the pipeline must reach from these events, computed with the ocpi rules."""
    sessions: dict[tuple[str, ...], Session] = {}
    locations: dict[tuple[str, ...], Location] = {}
    cdrs: dict[tuple[str, ...], CDR] = {}
    for event in events:
        key = (event.country_code.upper(), event.party_id.upper(), event.object_id.upper())
        if event.payload_type == "Session":
            session = payload_as(event, Session)
            if key not in sessions or session.last_updated > sessions[key].last_updated:
                sessions[key] = session
        elif event.payload_type == "SessionPatch":
            patch = payload_as(event, SessionPatch)
            assert key in sessions, "a PATCH of a Session never PUT"
            if patch.last_updated > sessions[key].last_updated:
                sessions[key] = merge_session(sessions[key], patch)
        elif event.payload_type == "Location":
            locations[key] = payload_as(event, Location)
        elif event.payload_type == "EVSEPatch":
            evse_patch = payload_as(event, EVSEPatch)
            assert event.evse_uid is not None
            current = next(e for e in locations[key].evses or () if e.uid == event.evse_uid)
            if evse_patch.last_updated > current.last_updated:  # staleness per EVSE, not per Location
                locations[key] = patch_evse(locations[key], event.evse_uid, evse_patch)
        elif event.payload_type == "ConnectorPatch":
            connector_patch = payload_as(event, ConnectorPatch)
            assert event.evse_uid is not None and event.connector_id is not None
            locations[key] = patch_connector(locations[key], event.evse_uid, event.connector_id, connector_patch)
        elif event.payload_type == "CDR":
            cdrs.setdefault(key, payload_as(event, CDR))
        else:
            raise AssertionError(event.payload_type)
    kwh: dict[str, Decimal] = defaultdict(Decimal)
    cost: dict[str, Decimal] = defaultdict(Decimal)
    incl: dict[str, Decimal] = defaultdict(Decimal)
    for (cc, pid, _id), cdr in cdrs.items():
        kwh[f"{cc}/{pid}"] += -cdr.total_energy if cdr.credit else cdr.total_energy
        cost[f"{cc}/{pid}"] += cdr.total_cost.excl_vat
        incl[f"{cc}/{pid}"] += cdr.total_cost.incl_vat or Decimal(0)
    return {
        "completed": {k for k, s in sessions.items() if s.status == "COMPLETED"},
        "status": {k: s.status.value for k, s in sessions.items()},
        "kwh": {k: s.kwh for k, s in sessions.items()},
        "periods": {k: len(s.charging_periods or ()) for k, s in sessions.items()},
        "cdrs": set(cdrs), "credited": {(k[0], k[1], c.credit_reference_id) for k, c in cdrs.items() if c.credit},
        "kwh_by_party": dict(kwh), "cost_by_party": dict(cost), "incl_by_party": dict(incl),
        "locations": set(locations),
        "evse_status": {(*k, e.uid): e.status.value for k, loc in locations.items() for e in loc.evses or ()},
    }


def upper(keys: Any) -> Any:
    if isinstance(keys, dict):
        return {tuple(part.upper() for part in k): v for k, v in keys.items()}
    return {tuple(part.upper() for part in k) for k in keys}


@pytest.fixture
def envs(make_env: Callable[..., AppEnv]) -> Callable[..., AppEnv]:  # noqa: F811
    return make_env


async def simulate(envs: Callable[..., AppEnv], sessions: int, traffic: Traffic,
                   seed: int = 11) -> tuple[Expected, list[DecodedEvent]]:
    env = envs()
    token = env.provision("cpo", *[(p.country_code, p.party_id, "CPO") for p in PARTIES])
    async with AsyncTestClient(env.app) as client:
        # One partner with two parties: the simulator must send routing headers (04 §8.1), as in the demo.
        cpo = SimulatedCpo(str(client.base_url), token, PARTIES, seed=seed, traffic=traffic, anchor=ANCHOR,
                           client=client)
        expected = await cpo.run(sessions)
    return expected, [decode_event(value) for _t, _k, value in env.sink.records]


async def test_full_traffic_is_acknowledged_and_expected_is_what_the_events_replay_to(
        envs: Callable[..., AppEnv]) -> None:
    expected, events = await simulate(envs, 60, Traffic())
    assert {(e.from_country_code, e.from_party_id) for e in events} == {("NL", "TNM"), ("NL", "EVB")}
    assert expected.rejected == 0 and expected.events == expected.pushes == len(events)
    got = replay(events)
    assert upper(expected.sessions) == got["completed"] and len(expected.sessions) == 60
    assert upper(expected.session_status) == got["status"]
    assert upper(expected.session_kwh) == got["kwh"]
    assert upper(expected.session_periods) == got["periods"]
    assert upper(expected.cdrs) == got["cdrs"] and upper(expected.credited) == got["credited"]
    assert dict(expected.kwh_by_party) == got["kwh_by_party"]
    assert dict(expected.cost_by_party) == got["cost_by_party"]
    assert dict(expected.incl_by_party) == got["incl_by_party"]
    assert upper(expected.locations) == got["locations"]
    assert upper(expected.evse_status) == got["evse_status"]
    # The run exercised what it promises: lifecycles, retries, stale pushes, credits, every level.
    kinds = {(e.module, e.operation, e.payload_type) for e in events}
    assert kinds == {("LOCATIONS", "PUT", "Location"), ("LOCATIONS", "PATCH", "EVSEPatch"),
                     ("LOCATIONS", "PATCH", "ConnectorPatch"), ("SESSIONS", "PUT", "Session"),
                     ("SESSIONS", "PATCH", "SessionPatch"), ("CDRS", "POST", "CDR")}
    assert expected.retries > 0 and expected.stale > 0 and expected.credited
    assert {s for s in got["status"].values()} == {"COMPLETED"}
    assert "CHARGING" not in set(got["evse_status"].values())  # every session ended


async def test_minimal_traffic_is_two_session_puts_and_a_cdr_per_session(envs: Callable[..., AppEnv]) -> None:
    expected, events = await simulate(envs, 10, Traffic.minimal())
    assert expected.events == len(events) == 30
    assert sorted((e.module, e.operation) for e in events) == sorted(
        [("SESSIONS", "PUT")] * 20 + [("CDRS", "POST")] * 10)
    got = replay(events)
    assert upper(expected.sessions) == got["completed"] and dict(expected.kwh_by_party) == got["kwh_by_party"]


def test_the_traffic_is_deterministic_per_seed() -> None:
    def planned(seed: int) -> bytes:
        cpo = SimulatedCpo("http://x", "t", PARTIES, seed=seed, anchor=ANCHOR)
        first, stories, late = cpo.plan(40)
        pushes = first + [push for story in stories for push in story.pushes()] + late
        return WIRE.encode([(p.method, p.path, p.body, p.retry, p.stale) for p in pushes])

    assert planned(3) == planned(3)
    assert planned(3) != planned(4)


def test_every_planned_body_is_valid_ocpi() -> None:
    cpo = SimulatedCpo("http://x", "t", PARTIES, seed=5, anchor=ANCHOR)
    first, stories, late = cpo.plan(30)
    models = {("PUT", "sessions"): Session, ("PATCH", "sessions"): SessionPatch, ("POST", "cdrs"): CDR,
              ("PUT", "locations"): Location}
    for push in first + [p for s in stories for p in s.pushes()] + late:
        module = push.path.split("/")[4]
        model = models.get((push.method, module))
        if model is not None:
            decode(WIRE.encode(push.body), model)
