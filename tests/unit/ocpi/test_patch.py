"""PATCH merge rules and parent last_updated propagation (08 §3, 09 §3.4)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import msgspec
import pytest

from ocpi import (
    OcpiValidationError,
    UnknownObjectError,
    decode,
    merge_connector,
    merge_evse,
    merge_location,
    merge_session,
    patch_connector,
    patch_evse,
    put_connector,
    put_evse,
)
from ocpi.model import (
    EVSE,
    Connector,
    ConnectorPatch,
    EVSEPatch,
    Location,
    LocationPatch,
    Session,
    SessionPatch,
    Status,
)

from .support import dumps, example

SESSION = decode(dumps(example("session_example_2_short_finished.json")), Session).value
LOCATION = decode(
    dumps(example("location_example.json")), Location
).value  # last_updated 2015-06-29T20:39:09Z


def _patch(model: type, body: dict[str, Any]) -> Any:
    return decode(dumps(body), model).value


def _period(start: str, volume: float) -> dict[str, Any]:
    return {"start_date_time": start, "dimensions": [{"type": "ENERGY", "volume": volume}]}


# --- Session ----------------------------------------------------------------------------------------------


def test_session_patch_replaces_fields_and_keeps_the_rest() -> None:
    patch = _patch(SessionPatch, example("session_patch_example_total_cost.json"))
    merged = merge_session(SESSION, patch)
    assert merged.total_cost is not None and merged.total_cost.excl_vat == Decimal("0.60")
    assert merged.last_updated == datetime(2019, 6, 23, 8, 11, tzinfo=UTC)
    assert merged.charging_periods == SESSION.charging_periods and merged.kwh == SESSION.kwh
    assert SESSION.total_cost is not None and SESSION.total_cost.excl_vat == Decimal("8.50")  # pure


def test_charging_periods_are_appended() -> None:
    body = {
        "kwh": 50,
        "charging_periods": [_period("2015-06-29T23:30:00Z", 8.88)],
        "last_updated": "2015-06-29T23:55:00Z",
    }
    merged = merge_session(SESSION, _patch(SessionPatch, body))
    assert merged.charging_periods is not None and SESSION.charging_periods is not None
    assert merged.charging_periods[:3] == SESSION.charging_periods
    assert len(merged.charging_periods) == 4 and merged.charging_periods[3].dimensions[0].volume == Decimal(
        "8.88"
    )
    assert merged.kwh == 50


def test_retried_patch_does_not_double_periods() -> None:
    body = {
        "charging_periods": [_period("2015-06-29T23:30:00Z", 8.88), _period("2015-06-29T23:40:00Z", 1)],
        "last_updated": "2015-06-29T23:55:00Z",
    }
    once = merge_session(SESSION, _patch(SessionPatch, body))
    twice = merge_session(once, _patch(SessionPatch, body))
    assert twice == once
    # A period identical to one already stored (same start, dimensions, tariff) is skipped too.
    stored = example("session_example_2_short_finished.json")["charging_periods"][0]
    again = merge_session(
        SESSION, _patch(SessionPatch, {"charging_periods": [stored], "last_updated": body["last_updated"]})
    )
    assert again.charging_periods == SESSION.charging_periods
    # ... but a period with the same start and different content is new information.
    changed = copy.deepcopy(stored) | {"tariff_id": "13"}
    grown = merge_session(
        SESSION, _patch(SessionPatch, {"charging_periods": [changed], "last_updated": body["last_updated"]})
    )
    assert grown.charging_periods is not None and len(grown.charging_periods) == 4


def test_a_period_sent_again_with_its_tariff_id_in_another_case_is_the_same_period() -> None:
    # tariff_id is a CiString (02 §9): a Sender that upper-cases ids resends the same period, not a new one.
    body = {"charging_periods": [_period("2015-06-29T23:30:00Z", 8.88) | {"tariff_id": "tariff-a"}],
            "last_updated": "2015-06-29T23:55:00Z"}
    once = merge_session(SESSION, _patch(SessionPatch, body))
    body["charging_periods"][0]["tariff_id"] = "TARIFF-A"
    again = merge_session(once, _patch(SessionPatch, body))
    assert again.charging_periods == once.charging_periods and len(again.charging_periods or ()) == 4


def test_periods_differing_only_in_their_start_are_both_kept() -> None:
    # Identical means the same start too: the same energy at the same tariff a quarter later is a new period.
    body = {
        "charging_periods": [_period("2015-06-29T23:30:00Z", 1), _period("2015-06-29T23:45:00Z", 1)],
        "last_updated": "2015-06-29T23:55:00Z",
    }
    merged = merge_session(SESSION, _patch(SessionPatch, body))
    assert merged.charging_periods is not None and len(merged.charging_periods) == 5


def test_a_period_repeated_within_one_patch_is_kept_once() -> None:
    # The same period twice in one PATCH ends like the same period in two PATCHes: stored once.
    period = _period("2015-06-29T23:30:00Z", 8.88)
    last_updated = "2015-06-29T23:55:00Z"
    once = merge_session(SESSION, _patch(SessionPatch, {"charging_periods": [period, period],
                                                        "last_updated": last_updated}))
    split = merge_session(SESSION, _patch(SessionPatch, {"charging_periods": [period], "last_updated": last_updated}))
    split = merge_session(split, _patch(SessionPatch, {"charging_periods": [period], "last_updated": last_updated}))
    assert once.charging_periods is not None and len(once.charging_periods) == 4
    assert once == split


@pytest.mark.parametrize("periods", [[], None])
def test_empty_or_null_periods_in_a_patch_leave_them_unchanged(periods: Any) -> None:
    merged = merge_session(
        SESSION, _patch(SessionPatch, {"charging_periods": periods, "last_updated": "2016-01-01T00:00:00Z"})
    )
    assert merged.charging_periods == SESSION.charging_periods


def test_patch_onto_a_session_without_periods() -> None:
    empty = msgspec.structs.replace(SESSION, charging_periods=None)
    merged = merge_session(
        empty,
        _patch(
            SessionPatch,
            {
                "charging_periods": [_period("2015-06-29T23:30:00Z", 1)],
                "last_updated": "2016-01-01T00:00:00Z",
            },
        ),
    )
    assert merged.charging_periods is not None and len(merged.charging_periods) == 1


def test_put_replaces_periods() -> None:
    """PUT is a full replace: decoding a new Session is the new state (absent/empty periods = cleared)."""
    body = example("session_example_2_short_finished.json")
    body["charging_periods"] = []
    assert decode(dumps(body), Session).value.charging_periods == []
    del body["charging_periods"]
    assert decode(dumps(body), Session).value.charging_periods is None


def test_patch_cannot_change_identity() -> None:
    same = merge_session(
        SESSION,
        _patch(SessionPatch, {"id": "101", "party_id": "bec", "last_updated": "2016-01-01T00:00:00Z"}),
    )
    assert same.party_id == "BEC"  # stored spelling kept
    with pytest.raises(OcpiValidationError) as info:
        merge_session(SESSION, _patch(SessionPatch, {"id": "102", "last_updated": "2016-01-01T00:00:00Z"}))
    assert info.value.path == "$.id"


def test_merge_requires_last_updated() -> None:
    with pytest.raises(OcpiValidationError) as info:
        merge_session(SESSION, SessionPatch(kwh=Decimal(1)))
    assert info.value.path == "$.last_updated"


def test_none_in_a_patch_built_in_code_means_unchanged() -> None:
    patch = SessionPatch(meter_id=None, last_updated=datetime(2016, 1, 1, tzinfo=UTC))
    assert merge_session(SESSION, patch).meter_id == SESSION.meter_id


# --- Location / EVSE / Connector ---------------------------------------------------------------------------


def test_location_patch_replaces_whole_fields() -> None:
    merged = merge_location(LOCATION, _patch(LocationPatch, example("location_patch_example_location.json")))
    assert merged.name == "Interparking Gent Zuid" and merged.evses == LOCATION.evses
    one_evse = _patch(
        LocationPatch,
        {"evses": [example("location_example.json")["evses"][1]], "last_updated": "2019-06-24T12:39:09Z"},
    )
    replaced = merge_location(LOCATION, one_evse)
    assert replaced.evses is not None and [e.uid for e in replaced.evses] == ["3257"]  # replace, not merge


def test_evse_and_connector_merges() -> None:
    assert LOCATION.evses is not None
    evse = merge_evse(LOCATION.evses[0], _patch(EVSEPatch, example("location_patch_example_status.json")))
    assert evse.status is Status.CHARGING and evse.connectors == LOCATION.evses[0].connectors
    connector = merge_connector(
        evse.connectors[0], _patch(ConnectorPatch, {"tariff_ids": [], "last_updated": "2019-06-24T12:39:09Z"})
    )
    assert connector.tariff_ids == [] and connector.max_voltage == 220


def test_evse_patch_raises_the_location_last_updated() -> None:
    patch = _patch(EVSEPatch, example("location_patch_example_status.json"))  # 2019-06-24T12:39:09Z
    updated = patch_evse(LOCATION, "3256", patch)
    assert updated.evses is not None and updated.evses[0].status is Status.CHARGING
    assert updated.last_updated == datetime(2019, 6, 24, 12, 39, 9, tzinfo=UTC)
    assert updated.evses[1] == (LOCATION.evses or [])[1]


def test_parent_last_updated_is_never_lowered() -> None:
    old = _patch(EVSEPatch, {"status": "CHARGING", "last_updated": "2015-01-01T00:00:00Z"})
    updated = patch_evse(LOCATION, "3256", old)
    assert updated.last_updated == LOCATION.last_updated  # not moved back in time
    # Nor the EVSE's own (a Connector push may have raised it beyond its status PATCH): the status is applied.
    assert updated.evses is not None and updated.evses[0].status is Status.CHARGING
    assert updated.evses[0].last_updated == (LOCATION.evses or [])[0].last_updated
    named = merge_location(LOCATION, _patch(LocationPatch, {"name": "Old", "last_updated": "2015-01-01T00:00:00Z"}))
    assert named.name == "Old" and named.last_updated == LOCATION.last_updated


def test_put_evse_adds_or_replaces_case_insensitively() -> None:
    evse_body = copy.deepcopy(example("location_example.json")["evses"][0]) | {
        "uid": "9999",
        "last_updated": "2020-01-01T00:00:00Z",
    }
    added = put_evse(LOCATION, decode(dumps(evse_body), EVSE).value)
    assert added.evses is not None and [e.uid for e in added.evses] == ["3256", "3257", "9999"]
    assert added.last_updated == datetime(2020, 1, 1, tzinfo=UTC)
    replacement = decode(dumps(evse_body | {"uid": "3257", "status": "REMOVED"}), EVSE).value
    replaced = put_evse(added, replacement)
    assert replaced.evses is not None and [e.uid for e in replaced.evses] == ["3256", "3257", "9999"]
    assert replaced.evses[1].status is Status.REMOVED
    older = decode(dumps(evse_body | {"last_updated": "2010-01-01T00:00:00Z"}), EVSE).value
    assert put_evse(replaced, older).last_updated == datetime(2020, 1, 1, tzinfo=UTC)


def test_children_are_found_by_uid_and_id_ignoring_case() -> None:
    # EVSE uids and Connector ids are CiStrings: "ab1" addresses the stored "AB1", it does not add a second EVSE.
    evse_body = copy.deepcopy(example("location_example.json")["evses"][0]) | {"uid": "AB1"}
    evse_body["connectors"] = [evse_body["connectors"][0] | {"id": "c1"}]
    location = put_evse(LOCATION, decode(dumps(evse_body), EVSE).value)
    replaced = put_evse(location, decode(dumps(evse_body | {"uid": "ab1", "status": "REMOVED"}), EVSE).value)
    assert replaced.evses is not None and [e.uid for e in replaced.evses] == ["3256", "3257", "ab1"]
    assert replaced.evses[2].status is Status.REMOVED
    patched = patch_evse(location, "ab1", _patch(EVSEPatch, {"status": "CHARGING",
                                                             "last_updated": "2030-01-01T00:00:00Z"}))
    assert patched.evses is not None and patched.evses[2].status is Status.CHARGING and len(patched.evses) == 3
    connector = patch_connector(location, "ab1", "C1", _patch(ConnectorPatch, {
        "max_amperage": 32, "last_updated": "2030-01-01T00:00:00Z"}))
    assert connector.evses is not None and [c.max_amperage for c in connector.evses[2].connectors] == [32]


def test_put_and_patch_connector_update_both_parents() -> None:
    body = copy.deepcopy(example("location_example.json")["evses"][0]["connectors"][0]) | {
        "id": "3",
        "last_updated": "2021-01-01T00:00:00Z",
    }
    connector = decode(dumps(body), Connector).value
    updated = put_connector(LOCATION, "3256", connector)
    assert updated.evses is not None
    assert [c.id for c in updated.evses[0].connectors] == ["1", "2", "3"]
    assert updated.evses[0].last_updated == updated.last_updated == datetime(2021, 1, 1, tzinfo=UTC)
    patched = patch_connector(
        updated,
        "3256",
        "2",
        _patch(ConnectorPatch, {"max_amperage": 32, "last_updated": "2015-01-01T00:00:00Z"}),
    )
    assert patched.evses is not None and patched.evses[0].connectors[1].max_amperage == 32
    assert (
        patched.evses[0].last_updated == patched.last_updated == datetime(2021, 1, 1, tzinfo=UTC)
    )  # never lowered


def test_unknown_children_raise() -> None:
    patch = _patch(ConnectorPatch, {"max_amperage": 32, "last_updated": "2015-01-01T00:00:00Z"})
    with pytest.raises(UnknownObjectError):
        patch_connector(LOCATION, "3256", "7", patch)
    with pytest.raises(UnknownObjectError):
        patch_connector(LOCATION, "nope", "1", patch)
    with pytest.raises(UnknownObjectError):
        patch_evse(LOCATION, "nope", _patch(EVSEPatch, example("location_patch_example_status.json")))
    empty = msgspec.structs.replace(LOCATION, evses=None)
    with pytest.raises(UnknownObjectError):
        put_connector(empty, "3256", (LOCATION.evses or [])[0].connectors[0])
    assert put_evse(empty, (LOCATION.evses or [])[0]).evses == [(LOCATION.evses or [])[0]]
