"""A CPO that pushes its Location tree in order, every push newer than the last, at any level (08 §3.3, §3.4):
stage 1 ends with the tree a plain model of the spec's rules builds, and `evse_status_history` holds one row per
real status change of an EVSE, dated by the push that made it (an EVSE that leaves the tree: a row to '').

The model: a PUT replaces the node with the same id (CiString) or adds it, its children as given; a PATCH sets the
fields it carries whole (null: unchanged) and keeps the stored identity's spelling; a push raises its parents'
`last_updated` to its own. A push the model cannot apply (a PATCH of an EVSE or Connector not in the tree) is not
sent. A push the pipeline drops as a DUPLICATE must change nothing but `last_updated` (README, "duplicate").
"""

from __future__ import annotations

import copy
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.locations import process_locations
from pipeline.projection import EVSE_HISTORY_COLUMNS, RAW_EVENT_COLUMNS
from pipeline.state import LocationState

from .builders import Harness, column, connector, event, evse, iso, location, rows, ts

KEY = "NL/TNM/LOC1"
UIDS = ("E1", "e1", "E2", "E3")  # "e1" is the CiString "E1"
CONNECTOR_IDS = ("1", "2", "c", "C")
STATUSES = ("AVAILABLE", "CHARGING", "BLOCKED", "REMOVED")

connector_ids = st.lists(st.sampled_from(CONNECTOR_IDS[:3]), min_size=1, max_size=2, unique=True)
evse_specs = st.tuples(st.sampled_from(UIDS), st.sampled_from(STATUSES), connector_ids)
operations = st.one_of(
    st.tuples(st.just("Location"), st.lists(evse_specs, max_size=3, unique_by=lambda s: s[0].upper())),
    st.tuples(st.just("LocationPatch"), st.one_of(
        st.fixed_dictionaries({"name": st.sampled_from(["A", "B", None])}),
        st.fixed_dictionaries({"evses": st.lists(evse_specs, max_size=3, unique_by=lambda s: s[0].upper())}))),
    st.tuples(st.just("EVSE"), evse_specs),
    st.tuples(st.just("EVSEPatch"), st.sampled_from(UIDS), st.one_of(
        st.fixed_dictionaries({"status": st.sampled_from((*STATUSES, None))}),
        st.fixed_dictionaries({"floor_level": st.sampled_from(["0", "1"])}),
        st.fixed_dictionaries({"connectors": connector_ids}))),
    st.tuples(st.just("Connector"), st.sampled_from(UIDS), st.sampled_from(CONNECTOR_IDS), st.integers(6, 64)),
    st.tuples(st.just("ConnectorPatch"), st.sampled_from(UIDS), st.sampled_from(CONNECTOR_IDS),
              st.sampled_from([6, 16, 32])),
)


def _evse(spec: tuple[str, str, list[str]], minute: int) -> dict[str, Any]:
    uid, status, ids = spec
    return evse(uid, status=status, updated=minute, connectors=[connector(i, updated=minute) for i in ids])


def _body(operation: tuple[Any, ...], minute: int) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """(payload type, body, event keywords) of the push, dated `minute` (its children too)."""
    kind, now = operation[0], iso(ts(minute))
    if kind == "Location":
        # `charging_when_closed` as the stored Location has it: its default (08 §4.1) filled in
        return kind, location(evses=[_evse(s, minute) for s in operation[1]], updated=minute,
                              charging_when_closed=True), {}
    if kind == "LocationPatch":
        body = {k: ([_evse(s, minute) for s in v] if k == "evses" else v) for k, v in operation[1].items()}
        return kind, body | {"last_updated": now}, {"object_id": "LOC1"}
    if kind == "EVSE":
        return kind, _evse(operation[1], minute), {"object_id": "LOC1", "evse_uid": operation[1][0]}
    at = {"object_id": "LOC1", "evse_uid": operation[1]}
    if kind == "EVSEPatch":
        fields = {k: ([connector(i, updated=minute) for i in v] if k == "connectors" else v)
                  for k, v in operation[2].items()}
        return kind, fields | {"last_updated": now}, at
    at["connector_id"] = operation[2]
    if kind == "Connector":
        return kind, connector(operation[2], updated=minute) | {"max_amperage": operation[3]}, at
    return kind, {"max_amperage": operation[3], "last_updated": now}, at


class Unknown(Exception):
    pass


def _find(items: list[dict[str, Any]], key: str, wanted: str) -> int | None:
    return next((i for i, item in enumerate(items) if item[key].upper() == wanted.upper()), None)


def _put(items: list[dict[str, Any]], key: str, new: dict[str, Any]) -> None:
    index = _find(items, key, new[key])
    if index is None:
        items.append(new)
    else:
        items[index] = new


def _set(node: dict[str, Any], fields: dict[str, Any]) -> None:
    node.update({k: v for k, v in fields.items() if v is not None})


def model(tree: dict[str, Any] | None, kind: str, body: dict[str, Any], at: dict[str, Any]) -> dict[str, Any]:
    """The tree after the push (08 §3.3, §3.4: the push is newer than everything stored)."""
    if kind == "Location":
        return copy.deepcopy(body)
    if tree is None:
        raise Unknown
    tree = copy.deepcopy(tree)
    body = copy.deepcopy(body)
    tree["last_updated"] = body["last_updated"]
    if kind == "LocationPatch":
        _set(tree, body)
        return tree
    evses = tree["evses"]
    if kind == "EVSE":
        _put(evses, "uid", body)
        return tree
    index = _find(evses, "uid", at["evse_uid"])
    if index is None:
        raise Unknown
    node = evses[index]
    node["last_updated"] = body["last_updated"]
    if kind == "EVSEPatch":
        _set(node, body)
    elif kind == "Connector":
        _put(node["connectors"], "id", body)
    else:
        found = _find(node["connectors"], "id", at["connector_id"])
        if found is None:
            raise Unknown
        _set(node["connectors"][found], body)
    return tree


def _status_changes(before: dict[str, Any] | None, after: dict[str, Any], moment: str) -> set[tuple[str, ...]]:
    """The `evse_status_history` rows (uid, previous, status, changed_at) the push should write."""
    old = {e["uid"].upper(): e["status"] for e in (before or {}).get("evses") or ()}
    new = {e["uid"].upper(): e["status"] for e in after.get("evses") or ()}
    changes = {(uid, old.get(uid, ""), status, moment) for uid, status in new.items() if old.get(uid) != status}
    return changes | {(uid, status, "", moment) for uid, status in old.items() if uid not in new}


def _without_times(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_times(v) for k, v in value.items() if k != "last_updated" and v is not None}
    if isinstance(value, list):
        return [_without_times(v) for v in value]
    return value


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


_HISTORY = tuple(EVSE_HISTORY_COLUMNS.index(name) for name in ("evse_uid", "previous_status", "status", "changed_at"))


@settings(max_examples=200, deadline=None)
@given(st.lists(operations, min_size=1, max_size=8))
def test_a_tree_pushed_in_order_ends_as_the_spec_model_and_its_status_history_has_every_change(
        ops: list[tuple[Any, ...]]) -> None:
    h = Harness(process_locations, LocationState)
    expected: dict[str, Any] | None = None
    for minute, operation in enumerate([("Location", [("E1", "AVAILABLE", ["1"])]), *ops], start=1):
        kind, body, at = _body(operation, minute)
        try:
            after = model(expected, kind, body, at)
        except Unknown:
            continue  # a PATCH of an object the CPO never pushed: not sent
        push = event(kind, body, received=minute, **at)
        out = h.run(push)
        outcome = dict(zip(column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "event_id"),
                           column(out.batch, "raw_events", RAW_EVENT_COLUMNS, "outcome"), strict=True))[push.event_id]
        history = {tuple(str(row[i]) if i != _HISTORY[3] else iso(row[i]) for i in _HISTORY)
                   for row in rows(out.batch, "evse_status_history")}
        if outcome == "DUPLICATE":
            assert _without_times(after) == _without_times(expected), operation
            assert history == set()
            continue
        assert outcome == "APPLIED", (operation, outcome)
        assert history == _status_changes(expected, after, body["last_updated"]), operation
        expected = after
        assert _plain(json.loads(h.state(KEY).object_json)) == _plain(expected), operation
