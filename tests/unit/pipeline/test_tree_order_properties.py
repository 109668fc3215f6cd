"""Stage 1 on a whole Location tree (hypothesis): today's rules for EVSEs and Connectors a newer list leaves out.

Histories of a CPO that keeps one Location tree consistent: Location PUTs and `evses` PATCHes that leave EVSEs out
and list them again (new, or with the older own `last_updated` they had), EVSE PUTs that replace Connector lists,
EVSE PATCHes to any status (REMOVED too), Connector PUTs and PATCHes, re-pushes that bump `last_updated` (a
duplicate confirming a time), retries; delivered in any order, received at equal or later times. Checked:

- `LocationState.confirmed` pruning (`locations._prune_confirmed`) changes no outcome and no row (README, #5);
- a replay of every event (`source=REPLAY`, the same event ids and receive times) afterwards changes nothing;
- batching and crashes (a batch's state lost, the batch read again) change nothing.
- each EVSE's `evse_status_history`, ordered by `changed_at`, chains from '' to the status stored.

ORDER_EXAMPLES=2000 to search longer."""
from __future__ import annotations

import json
import os
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline.locations as locations_module
from infra.codec import DecodedEvent
from pipeline.locations import process_locations
from pipeline.projection import EVSE_HISTORY_COLUMNS
from pipeline.state import LocationState

from .builders import connector, event, evse, iso, location, ts
from .test_order_properties import LOCATION_KEY, again, check_versions, comparable, records_of, run

SET = settings(max_examples=int(os.environ.get("ORDER_EXAMPLES", "30")), deadline=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
ALL = ["E1", "E2", "E3"]
ST = ["AVAILABLE", "CHARGING", "BLOCKED", "REMOVED"]


@st.composite
def cpo_history(draw: st.DrawFn) -> list[DecodedEvent]:
    tree: dict[str, dict[str, Any]] = {}
    gone: dict[str, dict[str, Any]] = {}
    events: list[DecodedEvent] = []
    name = "A"

    def new_evse(uid: str, m: int) -> dict[str, Any]:
        cids = draw(st.sampled_from([["1"], ["1", "2"], ["2"]]))
        return evse(uid, status=draw(st.sampled_from(ST)), updated=m,
                    connectors=[connector(c, updated=m, power=draw(st.sampled_from([11000, 22000]))) for c in cids])

    def listing(m: int) -> list[dict[str, Any]]:
        uids = draw(st.lists(st.sampled_from(ALL), unique=True, max_size=3))
        out = []
        for uid in uids:
            if uid in tree and draw(st.booleans()):
                out.append(tree[uid])
            elif uid not in tree and uid in gone and draw(st.booleans()):
                out.append(gone[uid])  # re-listed with its older own times
            else:
                out.append(new_evse(uid, m))
        for uid in list(tree):
            if uid not in uids:
                gone[uid] = tree.pop(uid)
        for e in out:
            tree[e["uid"]] = e
            gone.pop(e["uid"], None)
        return out

    for m in range(draw(st.integers(1, 7))):
        ops = ["Location", "LocationPatch", "EVSE", "again"] if events else ["Location"]
        if tree:
            ops += ["EVSEPatch", "Connector", "ConnectorPatch"]
        op = draw(st.sampled_from(ops))
        if op == "again":
            events.append(again(events[-1], m))
            prev = events[-1]
            if prev.level in ("EVSE", "CONNECTOR") and prev.evse_uid in tree:
                e = dict(tree[prev.evse_uid])
                e["last_updated"] = iso(ts(m))
                if prev.level == "CONNECTOR":
                    e["connectors"] = [dict(c, last_updated=iso(ts(m))) if c["id"] == prev.connector_id else c
                                       for c in e["connectors"]]
                tree[prev.evse_uid] = e
            continue
        if op == "Location":
            name = draw(st.sampled_from(["A", "B"]))
            events.append(event("Location", location(evses=listing(m), updated=m, name=name)))
        elif op == "LocationPatch":
            if draw(st.booleans()):
                events.append(event("LocationPatch", {"evses": listing(m), "last_updated": iso(ts(m))},
                                    object_id="LOC1"))
            else:
                events.append(event("LocationPatch", {"name": draw(st.sampled_from(["A", "B"])),
                                                      "last_updated": iso(ts(m))}, object_id="LOC1"))
        elif op == "EVSE":
            uid = draw(st.sampled_from(ALL))
            e = new_evse(uid, m)
            tree[uid] = e
            gone.pop(uid, None)
            events.append(event("EVSE", e, object_id="LOC1", evse_uid=uid))
        elif op == "EVSEPatch":
            uid = draw(st.sampled_from(sorted(tree)))
            status = draw(st.sampled_from(ST))
            tree[uid] = dict(tree[uid], status=status, last_updated=iso(ts(m)))
            events.append(event("EVSEPatch", {"status": status, "last_updated": iso(ts(m))}, object_id="LOC1",
                                evse_uid=uid))
        else:
            uid = draw(st.sampled_from(sorted(tree)))
            e = dict(tree[uid])
            ids = [c["id"] for c in e["connectors"]]
            if op == "ConnectorPatch":
                cid = draw(st.sampled_from(ids))
                power = draw(st.sampled_from([11000, 22000]))
                body = {"max_electric_power": power, "last_updated": iso(ts(m))}
                e["connectors"] = [dict(c, max_electric_power=power, last_updated=iso(ts(m))) if c["id"] == cid
                                   else c for c in e["connectors"]]
                events.append(event("ConnectorPatch", body, object_id="LOC1", evse_uid=uid, connector_id=cid))
            else:
                cid = draw(st.sampled_from(["1", "2"]))
                c = connector(cid, updated=m, power=draw(st.sampled_from([11000, 22000])))
                e["connectors"] = [x for x in e["connectors"] if x["id"] != cid] + [c]
                events.append(event("Connector", c, object_id="LOC1", evse_uid=uid, connector_id=cid))
            e["last_updated"] = iso(ts(m))
            tree[uid] = e
    return events


def norm(state: LocationState | None, times: bool) -> Any:
    """The stored tree, EVSEs and Connectors by id (their order is arrival's), with or without `last_updated`."""
    if state is None or state.object_json is None:
        return None
    tree = json.loads(state.object_json)

    def strip(d: dict[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in d.items() if times or k != "last_updated"}
    return {**strip({k: v for k, v in tree.items() if k != "evses"}),
            "evses": {e["uid"]: {**strip({k: v for k, v in e.items() if k != "connectors"}),
                                 "connectors": {c["id"]: strip(c) for c in e["connectors"]}}
                      for e in tree["evses"]}}


def show(events: list[DecodedEvent]) -> str:
    """A delivery, one line per event (for a counterexample's message)."""
    lines = []
    for e in events:
        p = e.payload
        body = {k: v for k, v in p.items() if k in ("status", "name", "max_electric_power")}
        if "evses" in p:
            body["evses"] = [(x["uid"], x["status"], x["last_updated"].minute,
                              [(c["id"], c["last_updated"].minute) for c in x["connectors"]]) for x in p["evses"]]
        if "connectors" in p:
            body["connectors"] = [(c["id"], c["last_updated"].minute) for c in p["connectors"]]
        lines.append(f"{e.payload_type} {e.evse_uid or ''}/{e.connector_id or ''} t{p['last_updated'].minute} "
                     f"received {e.received_at.minute} {e.source} {e.event_id[:4]} {body}")
    return "\n".join(lines)


def received(data: st.DataObject, order: list[DecodedEvent]) -> list[DecodedEvent]:
    """Receive times in delivery order, some equal."""
    moments = sorted(data.draw(st.lists(st.integers(0, 3), min_size=len(order), max_size=len(order))))
    return [msgspec.structs.replace(e, received_at=ts(m)) for e, m in zip(order, moments, strict=True)]


@SET
@given(st.data())
def test_pruning_changes_no_outcome(data: st.DataObject) -> None:
    history = data.draw(cpo_history())
    extra = data.draw(st.lists(st.sampled_from(history), max_size=2))
    bumped = [again(e, data.draw(st.integers(0, 8)))
              for e in data.draw(st.lists(st.sampled_from(history), max_size=2))]
    order = data.draw(st.permutations(history + [again(e, None) for e in extra] + bumped))
    order = received(data, order)
    records = records_of(order)
    over = locations_module.PRUNE_OVER
    locations_module.PRUNE_OVER = -1  # pruned after every event (a tree this small never reaches PRUNE_OVER)
    try:
        pruned = run(process_locations, LocationState, records)
    finally:
        locations_module.PRUNE_OVER = over
    keep = locations_module._prune_confirmed
    locations_module._prune_confirmed = lambda state, location: None
    try:
        unpruned = run(process_locations, LocationState, records)
    finally:
        locations_module._prune_confirmed = keep
    assert comparable(pruned.final()) == comparable(unpruned.final()), show(order)
    assert norm(pruned.state(LOCATION_KEY), True) == norm(unpruned.state(LOCATION_KEY), True), show(order)


@SET
@given(st.data())
def test_replay_changes_nothing(data: st.DataObject) -> None:

    history = data.draw(cpo_history())
    extra = data.draw(st.lists(st.sampled_from(history), max_size=2))
    order = data.draw(st.permutations(history + [again(e, None) for e in extra]))
    order = received(data, order)
    records = records_of(order)
    before = run(process_locations, LocationState, records)
    copies = [msgspec.structs.replace(e, source="REPLAY") for e in order]
    after = run(process_locations, LocationState, records_of(order + copies))
    assert norm(after.state(LOCATION_KEY), True) == norm(before.state(LOCATION_KEY), True), show(order)
    assert comparable(after.final()) == comparable(before.final()), show(order)


@SET
@given(st.data())
def test_batches_and_crashes(data: st.DataObject) -> None:
    history = data.draw(cpo_history())
    bumped = [again(e, data.draw(st.integers(0, 8)))
              for e in data.draw(st.lists(st.sampled_from(history), max_size=2))]
    order = data.draw(st.permutations(history + bumped))
    cuts = data.draw(st.lists(st.integers(1, 9), max_size=4))
    crashes = data.draw(st.sets(st.integers(0, 4), max_size=2))
    records = records_of(order)
    whole = run(process_locations, LocationState, records)
    split = run(process_locations, LocationState, records, cuts, crashes)
    assert whole.state(LOCATION_KEY) == split.state(LOCATION_KEY), show(order)
    assert comparable(whole.final()) == comparable(split.final()), show(order)
    check_versions(split)


@st.composite
def field_patches(draw: st.DrawFn) -> list[DecodedEvent]:
    """After a Location PUT, PATCHes that each set other fields of the tree, times moving forward: EVSE statuses, a
    Connector's power, the Location's name, some repeated with their body and a newer time (a duplicate)."""
    events: list[DecodedEvent] = []
    for m in range(1, draw(st.integers(2, 7)) + 1):
        kind = draw(st.sampled_from(["EVSEPatch", "ConnectorPatch", "LocationPatch", "again"]))
        if kind == "again" and events:
            events.append(again(draw(st.sampled_from(events)), m))
        elif kind == "EVSEPatch" or kind == "again":
            events.append(event("EVSEPatch", {"status": draw(st.sampled_from(ST)), "last_updated": iso(ts(m))},
                                object_id="LOC1", evse_uid=draw(st.sampled_from(["E1", "E2", "e1"]))))
        elif kind == "ConnectorPatch":
            events.append(event("ConnectorPatch", {"max_electric_power": draw(st.sampled_from([7000, 11000])),
                                                   "last_updated": iso(ts(m))}, object_id="LOC1",
                                evse_uid=draw(st.sampled_from(["E1", "E2"])), connector_id="1"))
        else:
            events.append(event("LocationPatch", {"name": draw(st.sampled_from(["A", "B"])),
                                                  "last_updated": iso(ts(m))}, object_id="LOC1"))
    return events


@SET
@given(st.data())
def test_patches_of_different_fields_end_as_in_push_order(data: st.DataObject) -> None:
    # A PATCH of an EVSE's or the Location's own fields is compared with the pushes that set those fields, not with
    # the time its Connectors' (EVSEs') pushes raised its last_updated to: in any order, every field ends as the
    # newest push that set it says (docs/pipeline.md "stale").
    put = event("Location", location(evses=[evse("E1"), evse("E2")]))
    history = data.draw(field_patches())
    order = data.draw(st.permutations(history))
    in_order = run(process_locations, LocationState, records_of([put, *history]))
    shuffled = run(process_locations, LocationState, records_of([put, *order]))
    assert norm(shuffled.state(LOCATION_KEY), False) == norm(in_order.state(LOCATION_KEY), False), show(order)


@SET
@given(st.data())
def test_every_evse_status_history_chains_in_time_order_to_its_stored_status(data: st.DataObject) -> None:
    # Ordered by `changed_at` (then version, as the demo's oracle reads it), each EVSE's rows start from '', each
    # continues from the status of the one before and changes it, and the last holds the status stored (or '' once
    # it left the tree): an EVSE listed again with its older own time came back before it left. (Without re-pushes
    # of an old tree with a bumped time: a Location PUT that sets an EVSE's status back with the EVSE's older own
    # time, the CPO's time going back, dates that change by it, before the change it undoes.)
    history = data.draw(cpo_history())
    order = received(data, data.draw(st.permutations(history)))
    worker = run(process_locations, LocationState, records_of(order))
    uid, previous, status, changed_at, version = (EVSE_HISTORY_COLUMNS.index(name) for name in (
        "evse_uid", "previous_status", "status", "changed_at", "version"))
    chains: dict[str, list[tuple[str, str]]] = {}
    for row in sorted((row for table, row in worker.inserted if table == "evse_status_history"),
                      key=lambda row: (row[changed_at], row[version])):
        chains.setdefault(row[uid], []).append((str(row[previous]), str(row[status])))
    state = worker.state(LOCATION_KEY)
    tree = json.loads(state.object_json) if state is not None and state.object_json else {}
    stored = {e["uid"].upper(): e["status"] for e in tree.get("evses") or ()}
    for evse_uid, chain in chains.items():
        assert [p for p, _ in chain] == ["", *(s for _, s in chain[:-1])], (evse_uid, chain, show(order))
        assert all(p != s for p, s in chain) and chain[-1][1] == stored.get(evse_uid, ""), (evse_uid, chain,
                                                                                             show(order))
    assert set(stored) <= set(chains), show(order)
