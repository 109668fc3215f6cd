"""The Location tree's merges (`ocpi.patch`) against a plain model of the spec's rules (08 §3.3, §3.4, §8).

The model works on OCPI JSON dicts: a PUT at a level replaces the node with the same id (compared as CiString)
or adds it; a PATCH sets the fields it carries whole (absent and null: unchanged), keeps the stored identity's
spelling; a Connector PATCH's `last_updated` is its own, a Location's or EVSE's is never lowered; every EVSE or
Connector push raises its parents' `last_updated` to its new one, never lowers it; a PATCH of, or a Connector push
into, an EVSE or Connector the tree does not hold is refused (`UnknownObjectError`: the pipeline parks it).
"""

from __future__ import annotations

import copy
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ocpi import UnknownObjectError, decode, merge_location, patch_connector, patch_evse, put_connector, put_evse
from ocpi.model import EVSE, Connector, ConnectorPatch, EVSEPatch, Location, LocationPatch

from .support import dumps, example

START = example("location_example.json")  # EVSEs 3256 (Connectors 1, 2) and 3257 (Connector 1)
UIDS = ("3256", "3257", "AB", "ab")  # "ab" is the CiString "AB"
CONNECTOR_IDS = ("1", "2", "c", "C")
STATUSES = ("AVAILABLE", "CHARGING", "BLOCKED", "REMOVED", "OUTOFORDER")

times = st.integers(0, 59).map(lambda m: f"2016-01-01T10:{m:02d}:00Z")  # one format: strings compare as times
maybe = st.none()


def _connector(connector_id: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "id": st.just(connector_id), "standard": st.just("IEC_62196_T2"),
        "format": st.sampled_from(["SOCKET", "CABLE"]), "power_type": st.just("AC_3_PHASE"),
        "max_voltage": st.just(230), "max_amperage": st.integers(6, 64),
        "tariff_ids": st.lists(st.sampled_from(["T1", "T2"]), max_size=2, unique=True), "last_updated": times,
    })


connector_lists = st.lists(st.sampled_from(CONNECTOR_IDS[:3]), min_size=1, max_size=2, unique=True).flatmap(
    lambda ids: st.tuples(*(_connector(i) for i in ids)).map(list))


def _evse(uid: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.fixed_dictionaries({
        "uid": st.just(uid), "status": st.sampled_from(STATUSES), "connectors": connector_lists, "last_updated": times,
    }, optional={"floor_level": st.sampled_from(["-1", "2"]), "capabilities": st.just(["RESERVABLE"])})


operations = st.one_of(
    st.tuples(st.just("location_patch"), st.fixed_dictionaries({"last_updated": times}, optional={
        "name": st.one_of(maybe, st.sampled_from(["A", "B"])),
        "postal_code": st.one_of(maybe, st.just("1000")),
        "facilities": st.one_of(maybe, st.lists(st.sampled_from(["CAFE", "HOTEL"]), max_size=2, unique=True)),
        "directions": st.one_of(maybe, st.lists(st.fixed_dictionaries(
            {"language": st.just("en"), "text": st.sampled_from(["left", "right"])}), max_size=1)),
        "id": st.sampled_from(["loc1", "LOC1"]),
        "evses": st.lists(st.sampled_from(UIDS[:3]), max_size=2, unique=True).flatmap(
            lambda uids: st.tuples(*(_evse(u) for u in uids)).map(list)),
    })),
    st.tuples(st.just("evse_put"), st.sampled_from(UIDS).flatmap(_evse)),
    st.tuples(st.just("evse_patch"), st.sampled_from(UIDS), st.fixed_dictionaries({"last_updated": times}, optional={
        "status": st.one_of(maybe, st.sampled_from(STATUSES)),
        "floor_level": st.one_of(maybe, st.sampled_from(["0", "3"])),
        "capabilities": st.one_of(maybe, st.lists(st.just("RFID_READER"), max_size=1)),
        "connectors": st.one_of(maybe, connector_lists),
    })),
    st.tuples(st.just("connector_put"), st.sampled_from(UIDS), st.sampled_from(CONNECTOR_IDS).flatmap(_connector)),
    st.tuples(st.just("connector_patch"), st.sampled_from(UIDS), st.sampled_from(CONNECTOR_IDS),
              st.fixed_dictionaries({"last_updated": times}, optional={
                  "max_amperage": st.one_of(maybe, st.integers(6, 64)),
                  "tariff_ids": st.one_of(maybe, st.lists(st.sampled_from(["T3", "t3"]), max_size=1)),
              })),
)


# --- the model ----------------------------------------------------------------------------------------------


class Unknown(Exception):
    pass


def _find(items: list[dict[str, Any]], key: str, wanted: str) -> int | None:
    return next((i for i, item in enumerate(items) if item[key].upper() == wanted.upper()), None)


def _later(a: str, b: str) -> str:
    return max(a, b)


def _set_fields(node: dict[str, Any], patch: dict[str, Any], identity: str) -> None:
    for name, value in patch.items():
        if value is None or name in (identity, "last_updated"):
            continue  # null: unchanged; identity: the stored spelling stays
        node[name] = copy.deepcopy(value)


def model(location: dict[str, Any], operation: tuple[Any, ...]) -> dict[str, Any]:
    location = copy.deepcopy(location)
    kind = operation[0]
    evses = location.setdefault("evses", [])
    if kind == "location_patch":
        patch = operation[1]
        _set_fields(location, patch, "id")
        location["last_updated"] = _later(location["last_updated"], patch["last_updated"])
        return location
    uid = operation[1]["uid"] if kind == "evse_put" else operation[1]
    index = _find(evses, "uid", uid)
    if kind == "evse_put":
        if index is None:
            evses.append(copy.deepcopy(operation[1]))
        else:
            evses[index] = copy.deepcopy(operation[1])
        child = operation[1]["last_updated"]
    elif index is None:
        raise Unknown(uid)
    elif kind == "evse_patch":
        evse = evses[index]
        _set_fields(evse, operation[2], "uid")
        evse["last_updated"] = child = _later(evse["last_updated"], operation[2]["last_updated"])
    else:
        evse = evses[index]
        connector_id = operation[2]["id"] if kind == "connector_put" else operation[2]
        found = _find(evse["connectors"], "id", connector_id)
        if kind == "connector_put":
            if found is None:
                evse["connectors"].append(copy.deepcopy(operation[2]))
            else:
                evse["connectors"][found] = copy.deepcopy(operation[2])
            child = operation[2]["last_updated"]
        else:
            if found is None:
                raise Unknown(connector_id)
            connector = evse["connectors"][found]
            _set_fields(connector, operation[3], "id")
            connector["last_updated"] = child = operation[3]["last_updated"]  # its own, as sent
        evse["last_updated"] = _later(evse["last_updated"], child)
    location["last_updated"] = _later(location["last_updated"], child)
    return location


# --- the code -----------------------------------------------------------------------------------------------


def _decode(body: dict[str, Any], kind: type) -> Any:
    return decode(dumps(body), kind).value


def apply(location: Location, operation: tuple[Any, ...]) -> Location:
    kind = operation[0]
    if kind == "location_patch":
        return merge_location(location, _decode(operation[1], LocationPatch))
    if kind == "evse_put":
        return put_evse(location, _decode(operation[1], EVSE))
    if kind == "evse_patch":
        return patch_evse(location, operation[1], _decode(operation[2], EVSEPatch))
    if kind == "connector_put":
        return put_connector(location, operation[1], _decode(operation[2], Connector))
    return patch_connector(location, operation[1], operation[2], _decode(operation[3], ConnectorPatch))


def _plain(value: Any) -> Any:
    """OCPI JSON without nulls (absent and null are one in OCPI)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


@settings(max_examples=300, deadline=None)
@given(st.lists(operations, min_size=1, max_size=8))
def test_the_tree_merges_as_the_spec_model_says(ops: list[tuple[Any, ...]]) -> None:
    location = _decode(START, Location)
    expected = _plain(msgspec.to_builtins(location))
    for operation in ops:
        try:
            expected = model(expected, operation)
        except Unknown:
            with pytest.raises(UnknownObjectError):
                apply(location, operation)
            continue
        location = apply(location, operation)
        assert _plain(msgspec.to_builtins(location)) == _plain(expected), operation
