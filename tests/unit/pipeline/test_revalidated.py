"""`wire.revalidated` (the rule walk on a merged Struct) agrees with decoding the merged object's OCPI JSON.

The pipeline re-validates every merged or converted object. Decoding its JSON again (`wire.validated`) was the
reference; `revalidated` skips the parse when the JSON is an exact image of the Struct. These properties merge
generated PATCHes (valid and invalid ones: rules spanning fields, `#NA`, DateTimes with fractions, errata
lengths) into stored objects and require the same object and JSON, or the same error, from both.
`database=None`: no example database is written into the working tree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ocpi.errors import OcpiValidationError, UnknownObjectError
from ocpi.model import EVSE, Connector, ConnectorPatch, EVSEPatch, Location, LocationPatch, Session, SessionPatch
from ocpi.patch import merge_location, merge_session, patch_connector, patch_evse, put_connector, put_evse
from pipeline import wire

from .builders import connector, evse, location, session

SETTINGS = settings(max_examples=300, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

_NAIVE_BOUNDS = (datetime(2020, 1, 1), datetime(2030, 1, 1))  # noqa: DTZ001 - hypothesis wants naive bounds
MOMENTS = st.datetimes(min_value=_NAIVE_BOUNDS[0], max_value=_NAIVE_BOUNDS[1], timezones=st.just(UTC))
WHOLE_SECONDS = MOMENTS.map(lambda moment: moment.replace(microsecond=0))
DATETIMES = st.one_of(WHOLE_SECONDS, WHOLE_SECONDS, MOMENTS)  # mostly exact images, sometimes a fraction
SHORT_TEXT = st.one_of(st.text(max_size=6), st.sampled_from(["#NA", "1", "-1", "B1", "é", "a\\b", 'q"']))
AMOUNTS = st.decimals(min_value=0, max_value=10_000, places=4).map(lambda d: d.quantize(Decimal("0.0001")))

TOKENS = st.fixed_dictionaries({}, optional={
    "uid": st.sampled_from(["TOK1", "#NA"]), "type": st.sampled_from(["RFID", "APP_USER"]),
    "visual_number": st.sampled_from(["1234", "V"]), "issuer": st.just("Issuer"), "group_id": st.just("G1")})
HOURS = st.fixed_dictionaries({"twentyfourseven": st.booleans()}, optional={
    "regular_hours": st.lists(st.fixed_dictionaries({
        "weekday": st.integers(1, 7), "period_begin": st.sampled_from(["08:00", "12:00", "18:00"]),
        "period_end": st.sampled_from(["08:00", "12:00", "20:00"])}), max_size=2)})


def connectors() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda cid, power, updated, tariffs: {**connector(cid, power=power),
                                                           "last_updated": updated, "tariff_ids": tariffs},
                     st.sampled_from(["1", "2", "3"]), st.integers(0, 350_000), DATETIMES,
                     st.lists(st.sampled_from(["T1", "T2", "#NA"]), max_size=2))


def evses() -> st.SearchStrategy[dict[str, Any]]:
    return st.builds(lambda uid, status, updated, plugs: {**evse(uid, status=status), "last_updated": updated,
                                                          "connectors": plugs},
                     st.sampled_from(["E1", "E2", "E9"]), st.sampled_from(["AVAILABLE", "CHARGING", "REMOVED"]),
                     DATETIMES, st.lists(connectors(), min_size=1, max_size=2))


EVSE_PATCHES = st.fixed_dictionaries({"last_updated": DATETIMES}, optional={
    "status": st.sampled_from(["AVAILABLE", "CHARGING", "OUTOFORDER", "UNKNOWN"]),
    "capabilities": st.lists(st.sampled_from(["RFID_READER", "REMOTE_START_STOP_CAPABLE"]), max_size=2),
    "floor_level": SHORT_TEXT, "physical_reference": SHORT_TEXT,
    "connectors": st.lists(connectors(), min_size=1, max_size=2),
    "directions": st.lists(st.fixed_dictionaries({"language": st.just("en"), "text": SHORT_TEXT}), max_size=1)})
CONNECTOR_PATCHES = st.fixed_dictionaries({"last_updated": DATETIMES}, optional={
    "max_voltage": st.integers(0, 1000), "max_electric_power": st.integers(0, 350_000),
    "tariff_ids": st.lists(st.sampled_from(["T1", "T2", "#NA"]), max_size=2),
    "terms_and_conditions": st.sampled_from(["https://example.com/t", "x"])})
LOCATION_PATCHES = st.fixed_dictionaries({"last_updated": DATETIMES}, optional={
    "publish": st.booleans(), "publish_allowed_to": st.lists(TOKENS, max_size=2), "name": SHORT_TEXT,
    "postal_code": st.sampled_from(["3511AB", "12345678901"]), "opening_times": HOURS,
    "evses": st.lists(evses(), max_size=2), "time_zone": SHORT_TEXT})
PERIODS = st.lists(st.builds(lambda start, kind, volume: {"start_date_time": start,
                                                          "dimensions": [{"type": kind, "volume": volume}]},
                             DATETIMES, st.sampled_from(["ENERGY", "TIME", "MAX_CURRENT"]), AMOUNTS), max_size=2)
SESSION_PATCHES = st.fixed_dictionaries({"last_updated": DATETIMES}, optional={
    "kwh": AMOUNTS, "status": st.sampled_from(["ACTIVE", "COMPLETED", "INVALID"]), "end_date_time": DATETIMES,
    "total_cost": st.fixed_dictionaries({"excl_vat": AMOUNTS}, optional={"incl_vat": AMOUNTS}),
    "charging_periods": PERIODS, "authorization_reference": SHORT_TEXT, "meter_id": SHORT_TEXT})

_JSON = msgspec.json.Encoder(decimal_format="number")
STORED_LOCATION = location(evses=[evse("E1"), evse("E2", connectors=[connector("1"), connector("2")])])
STORED_SESSION = session(kwh="1.5", periods=[{"start_date_time": "2026-01-01T00:00:00Z",
                                              "dimensions": [{"type": "ENERGY", "volume": Decimal("1.5")}]}])


def stored(body: dict[str, Any], model: type[Any]) -> Any:
    return wire.validated(_JSON.encode(body), model)


def converted(payload: dict[str, Any], model: type[Any]) -> Any:
    """The PATCH as the pipeline converts it; None when msgspec rejects a field (the event is then invalid
    before any merge, whichever re-validation follows)."""
    try:
        return wire.to_struct(payload, model)
    except (msgspec.ValidationError, ValueError, TypeError):
        return None


def assert_agree(merged: Any, model: type[Any]) -> None:
    document = wire.struct_json(merged)
    try:
        expected: Any = wire.validated(document, model)
    except OcpiValidationError as exc:
        expected = (exc.path, exc.reason)
    try:
        value, built = wire.revalidated(merged, model)
    except OcpiValidationError as exc:
        assert (exc.path, exc.reason) == expected
        return
    assert built == document
    assert value == expected


def assert_merge_agrees(payload: dict[str, Any], patch_model: type[Any], merge: Any, body: dict[str, Any],
                        model: type[Any]) -> None:
    patch = converted(payload, patch_model)
    if patch is not None:
        assert_agree(merge(stored(body, model), patch), model)


@SETTINGS
@given(payload=EVSE_PATCHES, uid=st.sampled_from(["E1", "E2"]))
def test_evse_patch(payload: dict[str, Any], uid: str) -> None:
    assert_merge_agrees(payload, EVSEPatch, lambda current, patch: patch_evse(current, uid, patch), STORED_LOCATION,
                        Location)


@SETTINGS
@given(payload=CONNECTOR_PATCHES, connector_id=st.sampled_from(["1", "2"]))
def test_connector_patch(payload: dict[str, Any], connector_id: str) -> None:
    assert_merge_agrees(payload, ConnectorPatch,
                        lambda current, patch: patch_connector(current, "E2", connector_id, patch), STORED_LOCATION,
                        Location)


@SETTINGS
@given(payload=LOCATION_PATCHES)
def test_location_patch(payload: dict[str, Any]) -> None:
    assert_merge_agrees(payload, LocationPatch, merge_location, STORED_LOCATION, Location)


@SETTINGS
@given(payload=SESSION_PATCHES)
def test_session_patch(payload: dict[str, Any]) -> None:
    assert_merge_agrees(payload, SessionPatch, merge_session, STORED_SESSION, Session)


@SETTINGS
@given(body=evses(), plug=connectors())
def test_evse_and_connector_put(body: dict[str, Any], plug: dict[str, Any]) -> None:
    new_evse, new_connector = converted(body, EVSE), converted(plug, Connector)
    current = stored(STORED_LOCATION, Location)
    if new_evse is not None:
        assert_agree(put_evse(current, new_evse), Location)
    if new_connector is not None:
        assert_agree(put_connector(current, "E1", new_connector), Location)


@SETTINGS
@given(payload=LOCATION_PATCHES)
def test_location_put(payload: dict[str, Any]) -> None:
    """A Location PUT is converted from the event, then re-validated the same way."""
    new = converted({**STORED_LOCATION, **payload}, Location)
    if new is not None:
        assert_agree(new, Location)


def test_rules_spanning_fields_are_still_checked() -> None:
    """A merge of individually valid fields into an invalid whole is refused, as by the full decode."""
    current = stored({**STORED_LOCATION, "publish": False,
                      "publish_allowed_to": [{"visual_number": "1234", "issuer": "Issuer"}]}, Location)
    patch = wire.to_struct({"publish": True, "last_updated": datetime(2026, 1, 1, tzinfo=UTC)}, LocationPatch)
    with pytest.raises(OcpiValidationError) as refused:
        wire.revalidated(merge_location(current, patch), Location)
    assert (refused.value.path, refused.value.reason) == ("$.publish_allowed_to", "only allowed when publish is false")


def test_a_fraction_takes_the_full_decode() -> None:
    """A DateTime with microseconds is not exactly representable in OCPI JSON: the decoded document is returned,
    so rows and state agree with the stored JSON."""
    current = stored(STORED_SESSION, Session)
    moment = datetime(2026, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)
    merged = merge_session(current, wire.to_struct({"last_updated": moment}, SessionPatch))
    value, document = wire.revalidated(merged, Session)
    assert b'"last_updated":"2026-01-01T00:00:00.1234Z"' in document
    assert value.last_updated == datetime(2026, 1, 1, 0, 0, 0, 123400, tzinfo=UTC)


def operations() -> st.SearchStrategy[Any]:
    """One event's change to a Location tree, as the pipeline applies it."""
    def evse_patch(payload: dict[str, Any], uid: str) -> Any:
        patch = converted(payload, EVSEPatch)
        return None if patch is None else lambda current: patch_evse(current, uid, patch)

    def connector_patch(payload: dict[str, Any], connector_id: str) -> Any:
        patch = converted(payload, ConnectorPatch)
        return None if patch is None else lambda current: patch_connector(current, "E2", connector_id, patch)

    def location_patch(payload: dict[str, Any]) -> Any:
        patch = converted(payload, LocationPatch)
        return None if patch is None else lambda current: merge_location(current, patch)

    def evse_put(body: dict[str, Any]) -> Any:
        new = converted(body, EVSE)
        return None if new is None else lambda current: put_evse(current, new)

    return st.one_of(st.builds(evse_patch, EVSE_PATCHES, st.sampled_from(["E1", "E2"])),
                     st.builds(connector_patch, CONNECTOR_PATCHES, st.sampled_from(["1", "2"])),
                     st.builds(location_patch, LOCATION_PATCHES), st.builds(evse_put, evses()))


@SETTINGS
@given(changes=st.lists(operations(), max_size=6))
def test_evse_json_writes_what_struct_json_writes(changes: list[Any]) -> None:
    """A run's JSON with unchanged EVSEs' JSON reused: the same bytes and exactness as encoding the whole tree."""
    run = wire.EvseJson()
    current = stored(STORED_LOCATION, Location)
    assert run.encode(current) == wire._struct_json(current)
    for change in changes:
        try:
            current = current if change is None else change(current)
        except UnknownObjectError:
            continue  # an EVSE or Connector the tree no longer has: the pipeline parks such an event
        assert run.encode(current) == wire._struct_json(current)
    without = msgspec.structs.replace(current, evses=None)
    assert run.encode(without) == wire._struct_json(without)
