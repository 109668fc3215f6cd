"""content_hash, to_builtins, to_ocpi_json, ObjectKey, OcpiStatus."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Final

import msgspec
import pytest
from hypothesis import example as case
from hypothesis import given, settings
from hypothesis import strategies as st

from ocpi import (
    ObjectKey,
    OcpiStatus,
    canonical,
    ci_equal,
    content_hash,
    decode,
    merge_session,
    to_builtins,
    to_ocpi_json,
)
from ocpi.canonical import ci_spec, number_text
from ocpi.model import CDR, Connector, ConnectorPatch, Location, Session, SessionPatch

from .support import EXAMPLES, dumps, example

SESSION = example("session_example_2_short_finished.json")


def _hash(body: dict[str, Any], model: type = Session) -> str:
    return content_hash(decode(dumps(body), model).value)


def test_hash_ignores_last_updated_everywhere() -> None:
    location = example("location_example.json")
    bumped = copy.deepcopy(location)
    bumped["last_updated"] = "2020-01-01T00:00:00Z"
    bumped["evses"][0]["last_updated"] = "2020-01-01T00:00:00Z"
    bumped["evses"][0]["connectors"][1]["last_updated"] = "2020-01-01T00:00:00Z"
    assert _hash(location, Location) == _hash(bumped, Location)


@pytest.mark.parametrize(
    "change",
    [
        {"kwh": 41.13},
        {"status": "ACTIVE"},
        {"end_date_time": "2015-06-29T23:50:17Z"},
        {"charging_periods": []},
        {"total_cost": {"excl_vat": 8.50, "incl_vat": 9.36}},
        {"id": "102"},
    ],
)
def test_hash_changes_with_content(change: dict[str, Any]) -> None:
    assert _hash(SESSION) != _hash(SESSION | change)


def test_hash_treats_equivalent_spellings_as_equal() -> None:
    base = _hash(SESSION)
    assert _hash(SESSION | {"kwh": 41.120}) == base  # same amount
    assert _hash(SESSION | {"start_date_time": "2015-06-29T22:39:09"}) == base  # no zone = UTC
    assert _hash(SESSION | {"meter_id": None}) == base  # null = absent
    assert _hash(SESSION | {"authorization_reference": None}) == base
    location = example("location_example.json")
    assert _hash(location, Location) == _hash(location | {"related_locations": []}, Location)  # [] = absent
    assert _hash(location, Location) == _hash(location | {"charging_when_closed": True}, Location)  # default


def test_hash_is_stable_and_hex() -> None:
    digest = _hash(SESSION)
    assert len(digest) == 64 and int(digest, 16) >= 0
    assert digest == _hash(json.loads(json.dumps(SESSION)))


def test_hash_of_patches_keeps_empty_lists() -> None:
    clear = decode(b'{"tariff_ids": [], "last_updated": "2019-06-24T12:39:09Z"}', ConnectorPatch).value
    untouched = decode(b'{"last_updated": "2019-06-24T12:39:09Z"}', ConnectorPatch).value
    assert content_hash(clear) != content_hash(untouched)
    also_untouched = decode(
        b'{"tariff_ids": null, "last_updated": "2020-01-01T00:00:00Z"}', ConnectorPatch
    ).value
    assert content_hash(also_untouched) == content_hash(untouched)


def test_hash_with_a_ci_spec_ignores_the_case_of_ci_strings_only() -> None:
    """`ci=ci_spec(Model)` compares as OCPI does: CiStrings (02 §9) in any case are the same content, at any
    depth; other strings keep their case."""
    spec = ci_spec(Session)
    assert spec is not None and spec["id"] is True and spec["cdr_token"]["uid"] is True and "currency" not in spec
    session = decode(dumps(SESSION), Session).value
    lower = decode(dumps(SESSION | {"id": SESSION["id"].lower() + "a",
                                    "cdr_token": SESSION["cdr_token"] | {"uid": "abc"}}), Session).value
    upper = decode(dumps(SESSION | {"id": SESSION["id"].upper() + "A",
                                    "cdr_token": SESSION["cdr_token"] | {"uid": "ABC"}}), Session).value
    assert content_hash(lower) != content_hash(upper)
    assert content_hash(lower, ci=spec) == content_hash(upper, ci=spec) != content_hash(session, ci=spec)
    # a string that is no CiString keeps its case (a meter id is a String(255))
    assert content_hash(msgspec.structs.replace(upper, meter_id="m1"), ci=spec) != content_hash(
        msgspec.structs.replace(upper, meter_id="M1"), ci=spec)


def test_hash_of_builtins_equals_the_hash_of_the_object() -> None:
    """A dict of builtins (as the Avro decoder gives) is hashed without a copy; any other value in it (an enum, a
    Struct) is taken as msgspec.to_builtins gives it: the same hash either way."""
    session = decode(dumps(SESSION), Session).value
    tree = to_builtins(session)
    assert content_hash(tree) == content_hash(session) == content_hash(tree, ci=None)
    with_objects = tree | {"status": session.status, "cdr_token": session.cdr_token}
    assert type(with_objects["cdr_token"]) is not dict
    assert content_hash(with_objects) == content_hash(session)


def test_hash_rejects_naive_datetimes() -> None:
    session = decode(dumps(SESSION), Session).value
    naive = msgspec.structs.replace(session, end_date_time=datetime(2015, 6, 29))  # noqa: DTZ001
    with pytest.raises(ValueError, match="naive"):
        content_hash(naive)


def test_hash_normalises_time_zones() -> None:
    session = decode(dumps(SESSION), Session).value
    end = session.end_date_time
    assert end is not None
    shifted = msgspec.structs.replace(session, end_date_time=end.astimezone(timezone(timedelta(hours=2))))
    assert content_hash(shifted) == content_hash(session)


def test_to_builtins_keeps_datetime_and_decimal_and_drops_unset() -> None:
    session = decode(dumps(SESSION), Session).value
    tree = to_builtins(session)
    assert tree["kwh"] == Decimal("41.12") and type(tree["kwh"]) is Decimal
    assert tree["last_updated"] == datetime(2015, 6, 29, 23, 50, 17, tzinfo=UTC)
    assert tree["status"] == "COMPLETED" and type(tree["status"]) is str
    patch = decode(b'{"max_voltage": 230, "last_updated": "2019-06-24T12:39:09Z"}', ConnectorPatch).value
    assert to_builtins(patch) == {
        "max_voltage": 230,
        "last_updated": datetime(2019, 6, 24, 12, 39, 9, tzinfo=UTC),
    }


def test_to_ocpi_json_is_wire_conformant() -> None:
    connector = decode(
        b'{"id": "1", "standard": "IEC_62196_T2", "format": "SOCKET", "power_type": "AC_3_PHASE", '
        b'"max_voltage": 220, "max_amperage": 16, "last_updated": "2015-03-16T10:10:02.12345"}',
        Connector,
    ).value
    wire = json.loads(to_ocpi_json(connector))
    assert wire["last_updated"] == "2015-03-16T10:10:02.12345"  # 25 chars: exact, so without Z (UTC too)
    assert "tariff_ids" not in wire  # nulls omitted
    session = decode((EXAMPLES / "session_example_2_short_finished.json").read_bytes(), Session).value
    assert b'"kwh":41.12' in to_ocpi_json(session)  # a JSON number, exact
    assert decode(to_ocpi_json(session), Session).value == session


# --- identity ---------------------------------------------------------------------------------------------


def test_object_key_is_case_insensitive() -> None:
    key = ObjectKey("nl", "Tnm", "loc-1")
    assert key == ObjectKey("NL", "TNM", "LOC-1")
    assert hash(key) == hash(ObjectKey("NL", "TNM", "LOC-1"))
    assert {key: 1}[ObjectKey("NL", "tnm", "Loc-1")] == 1
    assert key.kafka_key() == b"NL/TNM/LOC-1"
    assert key.country_code == "nl" and str(key) == "nl/Tnm/loc-1"  # as sent
    assert key != ObjectKey("NL", "TNM", "LOC-2")
    assert key.same_as("NL", "TNM", "LOC-1")


def test_object_key_of_an_object() -> None:
    session = decode(dumps(SESSION), Session).value
    assert ObjectKey.of(session).kafka_key() == b"BE/BEC/101"


def test_ci_equal_folds_ascii_only() -> None:
    assert ci_equal("abc", "ABC")
    assert not ci_equal("straße", "STRASSE")  # not a CiString; must not collide
    assert ci_equal(None, None) and not ci_equal("a", None)


def test_status_codes() -> None:
    assert [int(s) for s in OcpiStatus] == [
        1000,
        2000,
        2001,
        2002,
        2003,
        2004,
        3000,
        3001,
        3002,
        3003,
        4000,
        4001,
        4002,
        4003,
    ]
    assert OcpiStatus.INVALID_PARAMETERS.description == "Invalid or missing parameters"
    assert OcpiStatus(2003) is OcpiStatus.UNKNOWN_LOCATION
    assert OcpiStatus.SUCCESS.is_success and not OcpiStatus.HUB_ERROR.is_success
    spec_codes = json.loads((EXAMPLES.parent / "ocpi-2.2.1-objects.json").read_text())["status_codes"]
    assert {str(int(s)): s.description for s in OcpiStatus} == {
        code: text for code, text in spec_codes.items() if code.isdigit()
    }


def test_hash_of_a_session_patch_treats_empty_charging_periods_as_absent() -> None:
    """A Session PATCH appends charging_periods: `[]` leaves them unchanged (09 §3.4), as absence does."""
    empty = decode(b'{"kwh": 5, "charging_periods": [], "last_updated": "2019-06-24T12:39:09Z"}', SessionPatch).value
    absent = decode(b'{"kwh": 5, "last_updated": "2019-06-24T12:39:09Z"}', SessionPatch).value
    assert content_hash(empty) == content_hash(absent)
    assert merge_session(decode(dumps(SESSION), Session).value, empty) == merge_session(
        decode(dumps(SESSION), Session).value, absent)


_DIMENSION_TYPES = ("ENERGY", "TIME", "PARKING_TIME", "CURRENT", "MAX_CURRENT", "MIN_CURRENT", "MAX_POWER", "MIN_POWER",
                    "RESERVATION_TIME")


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(_DIMENSION_TYPES), st.decimals(min_value=0, max_value=1000, places=2)),
                min_size=1, max_size=6),
       st.randoms(use_true_random=False))
def test_hash_ignores_the_order_of_a_periods_dimensions_only(dimensions: list[tuple[str, Decimal]],
                                                             rng: Any) -> None:
    """A period's dimensions are a set of measurements (as `ocpi.patch` compares periods): any order hashes alike,
    in a Session and a CDR; another volume, or the periods themselves in another order, do not."""
    def periods(order: list[tuple[str, Decimal]]) -> list[dict[str, Any]]:
        return [{"start_date_time": "2015-06-29T21:39:09Z",
                 "dimensions": [{"type": kind, "volume": float(volume)} for kind, volume in order]},
                {"start_date_time": "2015-06-29T22:00:00Z", "dimensions": [{"type": "TIME", "volume": 1}]}]

    shuffled = list(dimensions)
    rng.shuffle(shuffled)
    assert _hash(SESSION | {"charging_periods": periods(dimensions)}) == _hash(
        SESSION | {"charging_periods": periods(shuffled)})
    assert _hash(SESSION | {"charging_periods": periods(dimensions)}) != _hash(
        SESSION | {"charging_periods": periods(dimensions)[::-1]})
    kind, volume = dimensions[0]
    other = [(kind, volume + 1), *dimensions[1:]]
    assert _hash(SESSION | {"charging_periods": periods(dimensions)}) != _hash(
        SESSION | {"charging_periods": periods(other)})


def _raw_hash(text: bytes) -> str:
    return content_hash(decode(text, Session).value)


def test_hash_treats_number_spellings_alike_and_keeps_fractions_of_a_second() -> None:
    # Spelled in the JSON itself: `json.dumps` of a float (41.120) writes 41.12 and cannot test the normalisation.
    base = dumps(SESSION)
    assert b'"kwh": 41.12,' in base and b'"excl_vat": 8.5,' in base
    assert _raw_hash(base.replace(b'"kwh": 41.12,', b'"kwh": 41.1200,')) == _raw_hash(base)
    assert _raw_hash(base.replace(b'"excl_vat": 8.5,', b'"excl_vat": 8.50,')) == _raw_hash(base)
    zero = base.replace(b'"kwh": 41.12,', b'"kwh": 0,')
    assert _raw_hash(base.replace(b'"kwh": 41.12,', b'"kwh": 0.000,')) == _raw_hash(zero) != _raw_hash(base)
    start = b'"start_date_time": "2015-06-29T22:39:09Z"'
    assert start in base
    fraction = base.replace(start, b'"start_date_time": "2015-06-29T22:39:09.5Z"')
    assert _raw_hash(fraction) != _raw_hash(base)


def _number_text_by_digits(value: Decimal) -> str:
    """The normalised text as first defined: trailing fraction zeros dropped from the digits, then positional."""
    if not value:
        return "0"
    sign, digits, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    while exponent < 0 and digits[-1] == 0:
        digits, exponent = digits[:-1], exponent + 1
    return format(Decimal((sign, digits, exponent)), "f")


@settings(max_examples=2000)
@given(st.decimals(allow_nan=False, allow_infinity=False) | st.builds(
    lambda sign, digits, exponent: Decimal((sign, tuple(digits), exponent)), st.integers(0, 1),
    st.lists(st.integers(0, 9), min_size=1, max_size=60), st.integers(-80, 40)))
def test_number_text_is_the_normalised_positional_text(value: Decimal) -> None:
    """The content hash writes numbers so (a changed text would change stored hashes); normalize() must neither
    round a long number nor differ from stripping the digits."""
    assert number_text(value) == _number_text_by_digits(value)


# --- stored content hashes must never change ---------------------------------------------------------------

_CDR_LIKE: dict[str, Any] = {
    "country_code": "nl", "party_id": "Tnm", "id": "cdr-ß1", "currency": "EUR", "credit": False,
    "start_date_time": datetime(2026, 3, 1, 8, 0, tzinfo=UTC), "end_date_time": datetime(2026, 3, 1, 9, 0, 0, 500,
                                                                                          tzinfo=UTC),
    "cdr_token": {"uid": "tok1", "type": "RFID", "contract_id": "nl-ems-1", "country_code": "nl", "party_id": "ems"},
    "cdr_location": {"id": "loc1", "evse_uid": "e1", "connector_id": "1", "name": "Station", "address": None,
                     "coordinates": {"latitude": "52.1", "longitude": "5.1"}},
    "charging_periods": [{"start_date_time": datetime(2026, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=2))),
                          "tariff_id": "t1", "last_updated": "ignored",
                          "dimensions": [{"type": "TIME", "volume": Decimal("1.000")},
                                         {"type": "ENERGY", "volume": Decimal("10.50")}]}],
    "tariffs": [], "signed_data": None, "total_cost": {"excl_vat": Decimal("3.6750"), "incl_vat": Decimal("4E+0")},
    "total_energy": Decimal("10.5000"), "total_time": Decimal("1"), "remark": "a b", "last_updated": datetime.now(UTC),
}

# Content hashes as computed at 5e094c5 (any faster canonical form must give these): stored in states and
# ClickHouse, so another value for the same content would turn a partner's resend after an upgrade into a CONFLICT.
_PINNED: Final = {
    "session": "57e6764e0a8835073660d188c335df2f5584bf4b3230064cb95817e515d5247c",
    "session_ci": "caf884855eab6bc0a15bcab14936b39390b475ea8f0f99d225c303046a624875",
    "location_ci": "d60f3a9f37d054a7c53cc7e17cb1bfa7e432fc6b0de237a1a7e4af0f38dd4b07",
    "cdr_like": "768093fc07f3cc708edfae2e41d84ae045d4753a6273d4af0ba3e54aed839c59",
    "cdr_like_ci": "8fee04505d71d7b3aeb8f7a9882e95afc516cc034751ba1a429a6f97e45ad3d1",
}


def _canonical_as_first_defined(value: Any, ci: Any) -> Any:
    """`ocpi.canonical._canonical` as it was before its dict loop was unrolled (5e094c5), the reference."""
    leaves = frozenset((str, bool, int, float))
    kept = leaves | {Decimal, datetime, dict}
    kind = type(value)
    if kind is str:
        return value if ci is not True else value.upper() if value.isascii() else value.translate(
            str.maketrans("abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ"))
    if kind is dict:
        if ci is True or ci is None:
            tree = {key: item if type(item) in leaves else _canonical_as_first_defined(item, None)
                    for key, item in value.items()
                    if key != "last_updated" and (type(item) in kept or (item is not None and item != []))}
        else:
            tree = {key: item if (sub := ci.get(key)) is None and type(item) in leaves
                    else _canonical_as_first_defined(item, sub)
                    for key, item in value.items()
                    if key != "last_updated" and (type(item) in kept or (item is not None and item != []))}
        if type(tree.get("dimensions")) is list:
            tree["dimensions"] = sorted(tree["dimensions"], key=msgspec.json.Encoder(order="sorted").encode)
        return tree
    if kind is list:
        return [_canonical_as_first_defined(item, ci) for item in value]
    if value is None or kind in leaves or kind is tuple:
        return value
    if isinstance(value, Decimal):
        return number_text(value)
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError("naive datetime in an OCPI value: OCPI DateTimes are UTC")
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    raise canonical._NotBuiltin


class _SubDecimal(Decimal):
    pass


class _SubDatetime(datetime):
    pass


_KEYS = st.sampled_from(["last_updated", "dimensions", "id", "uid", "country_code", "party_id", "tariff_id",
                         "cdr_location", "cdr_token", "charging_periods", "tariffs", "volume", "credit", "remark"])
_ZONES = st.sampled_from([UTC, timezone(timedelta(0), "Z"), timezone(timedelta(hours=2)),
                          timezone(timedelta(hours=-5, minutes=-30))])
_LEAF_VALUES = (
    st.text(alphabet="abcXYZ-*1 ßéİı", max_size=6) | st.booleans() | st.integers(-5, 5) | st.floats(-10, 10)
    | st.none() | st.just([]) | st.just(()) | st.tuples(st.integers())
    | st.decimals(allow_nan=False, allow_infinity=False, places=4, min_value=-1000, max_value=1000)
    | st.builds(lambda d: _SubDecimal(d), st.decimals(allow_nan=False, allow_infinity=False, places=2))
    | st.builds(lambda d, zone: d.replace(tzinfo=zone), st.datetimes(), _ZONES)
    | st.builds(lambda d: _SubDatetime.combine(d.date(), d.time(), UTC), st.datetimes())
    | st.datetimes()  # naive: refused
)
_TREES = st.recursive(_LEAF_VALUES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_KEYS, inner,
                                                                                                 max_size=5),
                      max_leaves=25)
_SPECS = st.recursive(st.just(True), lambda inner: st.dictionaries(_KEYS, inner, max_size=4), max_leaves=8)


def _outcome(function: Any, tree: Any, ci: Any) -> tuple[str, bytes | str]:
    try:
        return "value", canonical.canonical_json(function(tree, ci))
    except (ValueError, canonical._NotBuiltin) as exc:
        return "raised", type(exc).__name__


@settings(max_examples=1500, deadline=None)
@case({"cdr_location": "loc", "id": {"uid": "e"}, "tariffs": ["t"]}, {"cdr_location": {"id": True}, "id": True,
                                                                        "tariffs": True})
@case({"last_updated": datetime(2026, 1, 1), "x": [{"last_updated": object()}]}, None)  # noqa: DTZ001
@case({"id": "ıß", "dimensions": [{"volume": Decimal("1.50")}, {"volume": Decimal("1.5")}], "credit": None}, True)
@given(st.dictionaries(_KEYS, _TREES, max_size=8) | _TREES,
       st.none() | _SPECS | st.sampled_from([ci_spec(CDR), ci_spec(Session), ci_spec(Location)]))
def test_canonical_is_what_it_was_first(tree: Any, ci: Any) -> None:
    """Mixed-case CiStrings (and non-ASCII ones), Decimals with trailing zeros or of a subclass, null, absent and
    empty members, `last_updated` at any depth, DateTimes in any zone or naive: the same canonical JSON (or the
    same refusal) as the first definition, with the CiSpecs of the models and arbitrary ones."""
    assert _outcome(canonical._canonical, tree, ci) == _outcome(_canonical_as_first_defined, tree, ci)


def test_content_hashes_are_pinned() -> None:
    cdr_ci = ci_spec(CDR)
    hashes = {
        "session": content_hash(decode(dumps(SESSION), Session).value),
        "session_ci": content_hash(decode(dumps(SESSION), Session).value, ci=ci_spec(Session)),
        "location_ci": content_hash(example("location_example.json"), ci=ci_spec(Location)),
        "cdr_like": content_hash(_CDR_LIKE),
        "cdr_like_ci": content_hash(_CDR_LIKE, ci=cdr_ci),
    }
    assert hashes == _PINNED
