"""One invalid variant per constraint kind per object, each reported at its exact JSON path."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ocpi import OcpiValidationError, decode
from ocpi._generated import (
    D2_MAX_LENGTH,
    OBJECTS,
    OPEN_ENUM_FIELDS,
    PATCHES,
    REGEX_MAX_LENGTH,
    Session,
    VersionDetails,
)

from .samples import ENUMS, minimal
from .samples import OBJECTS as SPEC_OBJECTS
from .support import assert_invalid, dumps

Case = tuple[str, str, Any, str, str]  # object, field, bad value (or MISSING), path, reason fragment
MISSING = object()


def _is_list(field: dict[str, Any]) -> bool:
    return field["cardinality"] in ("*", "+")


def _cases() -> Iterator[Case]:
    """The first field of each constraint kind in each object, made invalid."""
    for name, obj in SPEC_OBJECTS.items():
        seen: set[str] = set()

        def once(kind: str, seen: set[str] = seen) -> bool:
            if kind in seen:
                return False
            seen.add(kind)
            return True

        for field in obj["fields"]:
            fname = field["name"]
            listed = _is_list(field)

            def bad(
                value: Any, field: dict[str, Any] = field, listed: bool = listed, fname: str = fname
            ) -> tuple:
                if listed and field["kind"] != "class":
                    return [value], f"$.{fname}[0]"
                return value, f"$.{fname}"

            if field["cardinality"] in ("1", "+") and once("missing"):
                yield name, fname, MISSING, f"$.{fname}", "missing required field"
            if field["cardinality"] == "+" and once("empty_list"):
                yield name, fname, [], f"$.{fname}", "must not be empty"
            if field["cardinality"] in ("1", "?") and field["kind"] == "class" and once("wrong_type"):
                yield name, fname, "text", f"$.{fname}", "expected an object"
            if (
                field["kind"] == "enum"
                and field["enum"] not in ("ModuleID", "VersionNumber")
                and once("enum")
            ):
                value, path = bad("NOT_A_VALUE")
                yield name, fname, value, path, "not one of " + ", ".join(ENUMS[field["enum"]]["values"])
            if (
                field["type"] in ("CiString", "string", "URL")
                and field.get("max_length")
                and once("too_long")
            ):
                limit = D2_MAX_LENGTH.get(OBJECTS[name], {}).get(fname, field["max_length"])
                if "pattern" in field:  # a pattern's own matches may be longer (coordinates): that length
                    limit = REGEX_MAX_LENGTH.get(field["pattern"][:-1] + r"\Z", limit)
                value, path = bad("7" * (limit + 1))
                yield name, fname, value, path, f"longer than {limit} characters"
            if field["type"] == "CiString" and once("non_ascii"):
                value, path = bad("é")
                yield name, fname, value, path, "printable ASCII"
            if field["type"] == "string" and "pattern" not in field and once("control_char"):
                value, path = bad("\t")
                yield name, fname, value, path, "control characters"
            if "pattern" in field and once("pattern"):
                value, path = bad("not it")
                yield name, fname, value, path, ""
            if field["type"] == "DateTime" and once("datetime"):
                value, path = bad("2015-06-29T20:39:09+00:00")
                yield name, fname, value, path, "numeric offsets are not allowed"
            if field["type"] == "number" and once("decimals"):
                value, path = bad(1.23456)
                yield name, fname, value, path, "more than 4 decimal places"
            if field["type"] == "number" and once("number_as_string"):
                value, path = bad("1.5")
                yield name, fname, value, path, "expected a number, got a string"
            if field["type"] == "int" and once("int_range"):
                value, path = bad(10 ** field["max_digits"] if "max_digits" in field else 2**63)
                yield name, fname, value, path, "must be <=" if "max_digits" in field else ""
            if field["type"] == "boolean" and once("boolean"):
                value, path = bad("true")
                yield name, fname, value, path, "got a string"


CASES = list(_cases())


@pytest.mark.parametrize(
    ("name", "field", "value", "path", "reason"), CASES, ids=[f"{c[0]}.{c[1]}" for c in CASES]
)
def test_invalid_variant(name: str, field: str, value: Any, path: str, reason: str) -> None:
    body = minimal(name)
    if value is MISSING:
        del body[field]
    else:
        body[field] = value
    assert_invalid(body, OBJECTS[name], path, reason)


@pytest.mark.parametrize("name", sorted(SPEC_OBJECTS))
def test_minimal_sample_is_valid(name: str) -> None:
    decode(dumps(minimal(name)), OBJECTS[name])


def test_every_object_has_invalid_variants() -> None:
    assert {c[0] for c in CASES} >= set(SPEC_OBJECTS) - {"OcpiResponse"} - set(), {c[0] for c in CASES}
    kinds_per_object = {name: sum(1 for c in CASES if c[0] == name) for name in SPEC_OBJECTS}
    assert kinds_per_object["CDR"] >= 9 and kinds_per_object["Session"] >= 9, kinds_per_object


def test_open_enums_accept_unknown_values() -> None:
    assert OPEN_ENUM_FIELDS
    details = {"version": "3.0", "endpoints": [{"identifier": "nltnm-tokens", "role": "SENDER", "url": "x"}]}
    value = decode(dumps(details), VersionDetails).value
    assert value.endpoints[0].identifier == "nltnm-tokens"


# --- deep paths -------------------------------------------------------------------------------------------


def _session() -> dict[str, Any]:
    return {
        "country_code": "BE",
        "party_id": "BEC",
        "id": "101",
        "start_date_time": "2015-06-29T22:39:09Z",
        "kwh": 0,
        "cdr_token": {
            "country_code": "NL",
            "party_id": "TST",
            "uid": "123abc",
            "type": "RFID",
            "contract_id": "C1",
        },
        "auth_method": "WHITELIST",
        "location_id": "LOC1",
        "evse_uid": "3256",
        "connector_id": "1",
        "currency": "EUR",
        "charging_periods": [
            {
                "start_date_time": "2015-06-29T22:39:09Z",
                "dimensions": [{"type": "ENERGY", "volume": 120}, {"type": "MAX_CURRENT", "volume": 30}],
            }
        ],
        "status": "ACTIVE",
        "last_updated": "2015-06-29T22:39:09Z",
    }


Mutation = Callable[[dict[str, Any]], None]


@pytest.mark.parametrize(
    ("mutate", "path", "reason"),
    [
        (lambda s: s["cdr_token"].pop("uid"), "$.cdr_token.uid", "missing required field"),
        (lambda s: s["cdr_token"].update(uid="u" * 37), "$.cdr_token.uid", "longer than 36 characters"),
        (
            lambda s: s["charging_periods"][0]["dimensions"][1].update(type="AMPS"),
            "$.charging_periods[0].dimensions[1].type",
            "not one of CURRENT, ENERGY, ENERGY_EXPORT",
        ),
        (
            lambda s: s["charging_periods"][0].update(dimensions=[]),
            "$.charging_periods[0].dimensions",
            "must not be empty",
        ),
        (
            lambda s: s["charging_periods"][0]["dimensions"][0].update(volume=0.00001),
            "$.charging_periods[0].dimensions[0].volume",
            "more than 4 decimal places",
        ),
        (
            lambda s: s["charging_periods"][0].update(start_date_time="2015-06-29T22:39:09+01:00"),
            "$.charging_periods[0].start_date_time",
            "numeric offsets are not allowed",
        ),
        (lambda s: s.update(status="RESERVED"), "$.status", "not one of ACTIVE, COMPLETED, INVALID, PENDING"),
        (lambda s: s.update(country_code="BÉ"), "$.country_code", "printable ASCII"),
        (lambda s: s.update(kwh=None), "$.kwh", "expected a number, got null"),
        (lambda s: s.update(kwh=1e15), "$.kwh", "more than 14 integer digits"),
        (lambda s: s.update(kwh=True), "$.kwh", "expected a number, got a boolean"),
        (
            lambda s: s.update(charging_periods={}),
            "$.charging_periods",
            "expected an array or null, got an object",
        ),
        (lambda s: s.update(location_id="#NA"), "$.location_id", "#NA is only allowed"),
        (lambda s: s.update(currency="EU\u0000"), "$.currency", "control characters"),
    ],
)
def test_deep_paths(mutate: Mutation, path: str, reason: str) -> None:
    session = _session()
    decode(dumps(session), OBJECTS["Session"])  # the base is valid
    mutate(session)
    assert_invalid(session, OBJECTS["Session"], path, reason)


def test_na_is_allowed_where_the_spec_says() -> None:
    session = _session() | {"status": "RESERVATION", "evse_uid": "#NA", "connector_id": "#NA"}
    assert decode(dumps(session), Session).value.evse_uid == "#NA"
    escaped = dumps(_session()).replace(b'"101"', b'"\\u0023NA"')  # an escape cannot smuggle it in
    with pytest.raises(OcpiValidationError) as info:
        decode(escaped, OBJECTS["Session"])
    assert info.value.path == "$.id"


def test_root_type_errors() -> None:
    assert_invalid(b"[]", OBJECTS["Session"], "$", "expected an object, got an array")
    assert_invalid(b"null", OBJECTS["Session"], "$", "expected an object, got null")


# --- cross-field constraints (ocpi-2.2.1-objects.json `constraints`) ---------------------------------------


def _with(name: str, **changes: Any) -> dict[str, Any]:
    return minimal(name) | changes


CROSS_FIELD = [
    ("CDR", _with("CDR", credit=True), "$.credit_reference_id", "required when credit is true"),
    ("CDR", _with("CDR", credit=True, credit_reference_id=""), "$.credit_reference_id",
     "required when credit is true"),  # names no CDR
    ("CDR", _with("CDR", id="i" * 37), "$.id", "longer than 36 characters"),
    (
        "CDR",
        _with("CDR", id="i" * 40, credit=True, credit_reference_id="x"),
        "$.id",
        "longer than 39 characters",
    ),
    (
        "CDR",
        _with(
            "CDR",
            charging_periods=[
                {"start_date_time": "2015-06-29T20:39:09Z", "dimensions": [{"type": "ENERGY", "volume": 1}]},
                {
                    "start_date_time": "2015-06-29T20:49:09Z",
                    "dimensions": [{"type": "STATE_OF_CHARGE", "volume": 1}],
                },
            ],
        ),
        "$.charging_periods[1].dimensions[0].type",
        "Session-only",
    ),
    (
        "Credentials",
        _with(
            "Credentials", roles=[minimal("CredentialsRole"), minimal("CredentialsRole") | {"party_id": "X"}]
        ),
        "$.roles[1]",
        "duplicate",
    ),
    (
        "Hours",
        _with("Hours", twentyfourseven=False),
        "$.regular_hours",
        "required when twentyfourseven is false",
    ),
    (
        "Hours",
        _with("Hours", regular_hours=[minimal("RegularHours")]),
        "$.regular_hours",
        "not allowed when twentyfourseven is true",
    ),
    (
        "Location",
        _with("Location", publish_allowed_to=[minimal("PublishTokenType")]),
        "$.publish_allowed_to",
        "only allowed when publish is false",
    ),
    ("PublishTokenType", {}, "$", "needs at least one of uid, visual_number, group_id"),
    ("PublishTokenType", {"uid": "u"}, "$.type", "required when uid is set"),
    ("PublishTokenType", {"visual_number": "v"}, "$.issuer", "required when visual_number is set"),
    ("RegularHours", _with("RegularHours", period_end="08:00"), "$.period_end", "later than period_begin"),
    (
        "Tariff",
        _with(
            "Tariff",
            elements=[
                minimal("TariffElement"),
                {
                    "price_components": [minimal("PriceComponent") | {"type": "ENERGY"}],
                    "restrictions": {"reservation": "RESERVATION"},
                },
            ],
        ),
        "$.elements[1].price_components[0].type",
        "only FLAT and TIME",
    ),
]


@pytest.mark.parametrize(("name", "body", "path", "reason"), CROSS_FIELD, ids=[c[2] for c in CROSS_FIELD])
def test_cross_field_constraint(name: str, body: dict[str, Any], path: str, reason: str) -> None:
    assert_invalid(copy.deepcopy(body), OBJECTS[name], path, reason)


def test_cross_field_constraints_apply_when_nested() -> None:
    location = _with("Location", publish=False, opening_times={"twentyfourseven": False})
    assert_invalid(location, OBJECTS["Location"], "$.opening_times.regular_hours", "twentyfourseven is false")
    location["opening_times"]["regular_hours"] = [
        {"weekday": 1, "period_begin": "10:00", "period_end": "09:00"}
    ]
    assert_invalid(location, OBJECTS["Location"], "$.opening_times.regular_hours[0].period_end", "later than")
    location["opening_times"]["regular_hours"][0]["period_end"] = "11:00"
    location["publish_allowed_to"] = [{"group_id": "g1"}, {"visual_number": "123"}]
    assert_invalid(
        location, OBJECTS["Location"], "$.publish_allowed_to[1].issuer", "required when visual_number"
    )


def test_credit_cdr_may_use_39_characters() -> None:
    decode(dumps(_with("CDR", id="i" * 39, credit=True, credit_reference_id="i" * 36)), OBJECTS["CDR"])


def test_a_non_credit_cdr_id_of_exactly_36_characters_is_accepted() -> None:
    decode(dumps(_with("CDR", id="i" * 36)), OBJECTS["CDR"])


def test_errata_lengths_are_enforced_in_strict_mode() -> None:
    assert_invalid(_with("Location", address="a" * 46), OBJECTS["Location"], "$.address", "longer than 45")
    assert_invalid(_with("Location", address="a" * 256), OBJECTS["Location"], "$.address", "longer than 255")
    cdr = _with("CDR")
    cdr["cdr_location"]["state"] = "s" * 21
    assert_invalid(cdr, OBJECTS["CDR"], "$.cdr_location.state", "longer than 20")


# --- PATCH bodies -----------------------------------------------------------------------------------------


def test_patch_requires_last_updated() -> None:
    for name in ("LocationPatch", "EVSEPatch", "ConnectorPatch", "SessionPatch"):
        from ocpi import model

        patch_cls = getattr(model, name)
        assert_invalid({"status": None}, patch_cls, "$.last_updated", "missing required field")
        assert_invalid({"last_updated": None}, patch_cls, "$.last_updated", "missing required field")
        assert_invalid({"last_updated": "2019-06-24"}, patch_cls, "$.last_updated", "invalid DateTime")


def test_patch_null_means_unchanged_and_constraints_still_apply() -> None:
    from ocpi import model

    patch = decode(dumps({"name": None, "last_updated": "2019-06-24T12:39:09Z"}), model.LocationPatch).value
    assert patch.name is not None and not isinstance(patch.name, str)  # UNSET, not None
    assert_invalid({"name": "n" * 256, "last_updated": "2019-06-24T12:39:09Z"}, model.LocationPatch, "$.name")
    assert_invalid(
        {"address": "a" * 46, "last_updated": "2019-06-24T12:39:09Z"}, model.LocationPatch, "$.address"
    )
    assert_invalid(
        {"evse_uid": "#NA", "location_id": "#NA", "last_updated": "2019-06-24T12:39:09Z"},
        model.SessionPatch,
        "$.location_id",
        "#NA",
    )
    assert_invalid(
        {"connectors": [], "last_updated": "2019-06-24T12:39:09Z"}, model.EVSEPatch, "$.connectors"
    )
    with pytest.raises(OcpiValidationError):
        decode(b'{"last_updated": "2019-06-24T12:39:09Z", "tariff_ids": [1]}', model.ConnectorPatch)


@pytest.mark.parametrize("currency", ["eur", "E", "EU1", "€"])
@pytest.mark.parametrize("name", ["CDR", "Session", "Tariff"])
def test_a_currency_must_be_an_iso_4217_code(name: str, currency: str) -> None:
    # Billing sums per currency: "eur" beside "EUR" would keep a credit from netting its original.
    assert_invalid({**minimal(name), "currency": currency}, OBJECTS[name], "$.currency", "ISO 4217")


def test_a_session_patch_currency_must_be_an_iso_4217_code() -> None:
    patch = PATCHES["Session"]
    assert_invalid({"currency": "eur", "last_updated": "2015-06-29T20:39:09Z"}, patch, "$.currency", "ISO 4217")
    assert decode(dumps({"currency": "EUR", "last_updated": "2015-06-29T20:39:09Z"}), patch).value.currency == "EUR"


@pytest.mark.parametrize("value", [-1, 2**32])
@pytest.mark.parametrize("field", ["max_voltage", "max_amperage", "max_electric_power"])
def test_a_connector_rating_must_fit_the_store(field: str, value: int) -> None:
    # The connectors table holds them as UInt32: a negative value made every insert of its batch fail (the worker
    # retried it forever), one beyond 2**32 - 1 was stored wrapped (5000000000 V as 705032704 V).
    assert_invalid({**minimal("Connector"), field: value}, OBJECTS["Connector"], f"$.{field}", "0 to 4294967295")
    patch = PATCHES["Connector"]
    assert_invalid({field: value, "last_updated": "2015-06-29T20:39:09Z"}, patch, f"$.{field}", "0 to 4294967295")
    location = minimal("Location")
    location["evses"] = [{**minimal("EVSE"), "connectors": [{**minimal("Connector"), field: value}]}]
    assert_invalid(location, OBJECTS["Location"], f"$.evses[0].connectors[0].{field}", "0 to 4294967295")
    assert getattr(decode(dumps({**minimal("Connector"), field: 2**32 - 1}), OBJECTS["Connector"]).value,
                   field) == 2**32 - 1


def _evse(uid: str, *connector_ids: str) -> dict[str, Any]:
    return {**minimal("EVSE"), "uid": uid, "connectors": [{**minimal("Connector"), "id": c} for c in connector_ids]}


@pytest.mark.parametrize("second", ["E1", "e1"])
def test_a_location_lists_each_evse_uid_once(second: str) -> None:
    # EVSE uid is the EVSE's identity (CiString): with two EVSEs of one uid the evses row and the status history
    # of one were lost (same key), and EVSE PATCHes and GETs found only the first.
    location = {**minimal("Location"), "evses": [_evse("E1", "1"), _evse(second, "1")]}
    assert_invalid(location, OBJECTS["Location"], "$.evses[1].uid", "listed twice")
    patch = {"evses": location["evses"], "last_updated": "2015-06-29T20:39:09Z"}
    assert_invalid(patch, PATCHES["Location"], "$.evses[1].uid", "listed twice")
    location["evses"][1]["uid"] = "E2"
    assert len(decode(dumps(location), OBJECTS["Location"]).value.evses) == 2


@pytest.mark.parametrize("second", ["A", "a"])
def test_an_evse_lists_each_connector_id_once(second: str) -> None:
    assert_invalid(_evse("E1", "A", second), OBJECTS["EVSE"], "$.connectors[1].id", "listed twice")
    patch = {"connectors": _evse("E1", "A", second)["connectors"], "last_updated": "2015-06-29T20:39:09Z"}
    assert_invalid(patch, PATCHES["EVSE"], "$.connectors[1].id", "listed twice")
    location = {**minimal("Location"), "evses": [_evse("E1", "A", second)]}
    assert_invalid(location, OBJECTS["Location"], "$.evses[0].connectors[1].id", "listed twice")
    assert len(decode(dumps(_evse("E1", "A", "B")), OBJECTS["EVSE"]).value.connectors) == 2


def test_a_location_patch_that_publishes_and_sets_publish_allowed_to_is_refused() -> None:
    # 08 §4.1: publish_allowed_to only when publish is false. A PATCH setting both contradicts itself whatever is
    # stored: acknowledged, no merge could ever apply it (the pipeline found it INVALID after the CPO's 1000).
    from ocpi import model

    token = {"uid": "012345678", "type": "RFID"}
    body = {"publish": True, "publish_allowed_to": [token], "last_updated": "2019-06-24T12:39:09Z"}
    assert_invalid(body, model.LocationPatch, "$.publish_allowed_to", "only allowed when publish is false")
    # Either alone depends on what is stored (the merge decides); `[]` or null allow nobody.
    for alone in ({"publish": True}, {"publish": False, "publish_allowed_to": [token]},
                  {"publish_allowed_to": [token]}, {"publish": True, "publish_allowed_to": []},
                  {"publish": True, "publish_allowed_to": None}):
        decode(dumps(alone | {"last_updated": "2019-06-24T12:39:09Z"}), model.LocationPatch)


@pytest.mark.parametrize(("latitude", "longitude"), [("-33.8688197", "151.2092955"), ("37.7749295", "-122.4194155"),
                                                     ("-9.1234567", "-77.0427934")])
def test_coordinates_as_long_as_their_regex_allows_are_accepted(latitude: str, longitude: str) -> None:
    """A negative value with 7 decimals matches the spec's regex but is one character over the declared
    string(10)/string(11) (Sydney, San Francisco): the whole Location was refused."""
    body = {**minimal("Location"), "coordinates": {"latitude": latitude, "longitude": longitude}}
    assert decode(dumps(body), OBJECTS["Location"]).value.coordinates.latitude == latitude


@pytest.mark.parametrize(("field", "value"), [("latitude", "-33.86881970"), ("longitude", "-122.41941550"),
                                              ("latitude", "133.8688197")])
def test_coordinates_beyond_their_regex_are_refused(field: str, value: str) -> None:
    body = {**minimal("Location"), "coordinates": {"latitude": "51.047599", "longitude": "3.729944", field: value}}
    with pytest.raises(OcpiValidationError) as refused:
        decode(dumps(body), OBJECTS["Location"])
    assert refused.value.path == f"$.coordinates.{field}"


def test_a_cdr_has_no_more_charging_periods_than_the_store_numbers() -> None:
    # cdr_charging_periods numbers them in a UInt16 of its key: the 65537th was stored as period 0 again and
    # replaced it, losing periods without a word (a pulled page may hold such a CDR; a 4 MB push cannot).
    cdr = minimal("CDR")
    period = cdr["charging_periods"][0]
    cdr["charging_periods"] = [period] * 2**16
    assert len(decode(dumps(cdr), OBJECTS["CDR"]).value.charging_periods) == 2**16
    cdr["charging_periods"].append(period)
    assert_invalid(cdr, OBJECTS["CDR"], "$.charging_periods[65536]", "more than 65536 charging periods")


def test_a_cdr_has_no_more_tariffs_of_one_key_than_the_store_numbers() -> None:
    # cdr_tariffs numbers the Tariffs of one key (country code, party id, id: CiStrings) in a UInt16 of its key
    # (`tariff_occurrence`, 0026): the 65537th of a key was stored as occurrence 0 again and replaced the first, losing
    # a Tariff without a word (a pulled page may hold such a CDR; a 4 MB push cannot). Tariffs of other keys count
    # apart: each key numbers its own.
    cdr = minimal("CDR")
    tariff = minimal("Tariff")
    cdr["tariffs"] = [tariff] * 2**16 + [{**tariff, "id": "another"}]
    assert len(decode(dumps(cdr), OBJECTS["CDR"]).value.tariffs) == 2**16 + 1
    cdr["tariffs"][-1] = {**tariff, "id": tariff["id"].swapcase()}  # the same key
    assert_invalid(cdr, OBJECTS["CDR"], "$.tariffs[65536]", "more than 65536 Tariffs of one key")


@pytest.mark.parametrize("field", ["country_code", "party_id", "id"])
@pytest.mark.parametrize("name", ["CDR", "Location", "Session", "Tariff"])
def test_an_object_with_an_empty_identity_is_refused(name: str, field: str) -> None:
    # An object is named by its owner and id (the push URL, a CDR POST's answer): an empty one names nothing. One
    # rule for pushes and pulls; a copy nested in another object (a CDR's tariffs) is not named by it and may.
    assert_invalid(_with(name, **{field: ""}), OBJECTS[name], f"$.{field}", "empty")
    tariff = minimal("Tariff") | {"id": ""}
    assert decode(dumps(_with("CDR", tariffs=[tariff])), OBJECTS["CDR"]).value.tariffs[0].id == ""
