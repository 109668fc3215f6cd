"""Property: a CDR POSTed again exactly as before (or as OCPI compares CDRs: CiStrings in another case, `false` for an
absent `credit`, another `last_updated`, the same numbers and DateTimes spelt otherwise) is judged the SAME as the
CDR the pipeline stored from the first POST (`receivers.cdrs.judge`), never another CDR: a false conflict refuses a
CPO's retry with 2001.

The stored side takes the pipeline's real path: the body decoded under the partner's profile, the event built and
encoded as the receivers publish it, decoded from Avro as the pipeline reads it, written as `payload_json`
(`pipeline.wire.ocpi_json`; ClickHouse keeps its exact text: `tests/unit/pipeline/test_store.py`), and after
`OCPI_RETENTION_PSEUDONYMISE_DAYS` pseudonymised by the retention pass. The CDR bodies are generated from the model
itself (every field, every constraint msgspec checks), so a field added to the model is covered without touching
this file. `database=None`: no example database in the working tree.

The pipeline judges the same resend again from the two events (`pipeline.cdrs`, on the Avro payloads rather than the
stored JSON), and must decide alike: DUPLICATE where the receivers answered the SAME CDR, CONFLICT (the original kept,
`CDR_CONFLICT`) for another; a false CONFLICT there records an anomaly to settle by hand for nothing.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any, Final

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from infra.codec import DecodedEvent, decode_event, encode_event
from infra.events import build_event
from ocpi import types as ocpi_types
from ocpi.compat import CompatProfile, Relaxation
from ocpi.decode import decode
from ocpi.errors import OcpiError
from ocpi.identity import ObjectKey
from ocpi.model import CDR, CdrDimensionType, ChargingPeriod
from pipeline import wire
from pipeline.cdrs import process_cdrs
from pipeline.projection import RAW_EVENT_COLUMNS
from pipeline.retention import Pseudonymizer, pseudonymise_document
from pipeline.state import CdrState
from receivers.cdrs import Held, judge
from receivers.pushes import CDR_POST
from tests.unit.pipeline.builders import Harness, column

SETTINGS: Final = settings(max_examples=200, deadline=None, database=None,
                           suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
_JSON: Final = msgspec.json.Encoder(decimal_format="number")
_PSEUDONYM: Final = Pseudonymizer(b"k" * 32)

# --- valid CDR bodies, from the model ----------------------------------------------------------------------------

_CI_TEXT: Final = "".join(chr(c) for c in range(0x20, 0x7F))
# Any Unicode but C0/C1 controls and surrogates (what STRING_PATTERN admits and JSON can carry); astral included.
_TEXT: Final = st.characters(blacklist_categories=["Cs"], blacklist_characters=[
    *(chr(c) for c in range(0x20)), *(chr(c) for c in range(0x7F, 0xA0))])
_FALSE_MEANS_ABSENT: Final = ("credit", "home_charging_compensation")
_SESSION_ONLY: Final = frozenset({"CURRENT", "ENERGY_EXPORT", "ENERGY_IMPORT", "POWER", "STATE_OF_CHARGE"})
_EARLIEST: Final = datetime(1970, 1, 1, 0, 0, 1)  # noqa: DTZ001 - hypothesis bounds are naive
_LATEST: Final = datetime(2149, 6, 6, 23, 59, 58)  # noqa: DTZ001


def _datetime_text(moment: datetime, digits: int, zone: bool) -> str:
    """An OCPI DateTime as a CPO may spell it: 0-4 fraction digits with `Z` (5 without), trailing zeros kept."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    if digits:
        text += "." + f"{moment.microsecond:06d}"[:digits]
    return text + ("Z" if zone else "")


DATETIMES: Final = st.builds(lambda moment, digits, zone: _datetime_text(moment, digits, zone and digits < 5),
                             st.datetimes(min_value=_EARLIEST, max_value=_LATEST), st.integers(0, 5), st.booleans())


_EXACT: Final = st.decimals(min_value=-(10**14) + 1, max_value=10**14 - 1, places=4)
# Numbers as JSON spells them (ocpi.types: 4 places, 14 integer digits): trailing zeros, an exponent, ints too.
NUMBERS: Final = st.one_of(_EXACT, _EXACT.map(Decimal.normalize), _EXACT.map(lambda d: d.quantize(Decimal("0.0001"))),
                           st.integers(-(10**14) + 1, 10**14 - 1))
PERCENTAGES: Final = st.decimals(min_value=0, max_value=100, places=4)


def _string(kind: mi.StrType) -> st.SearchStrategy[str]:
    if kind.pattern == ocpi_types.CI_STRING_PATTERN:
        return st.text(_CI_TEXT, min_size=kind.min_length or 0, max_size=kind.max_length or 40)
    if kind.pattern == ocpi_types.STRING_PATTERN:
        return st.text(_TEXT, min_size=kind.min_length or 0, max_size=min(kind.max_length or 40, 40))
    assert kind.pattern is not None, kind
    return st.from_regex(kind.pattern, fullmatch=True).filter(lambda text: len(text) <= (kind.max_length or 99))


def _member(kind: mi.Type) -> mi.Type:
    """The type of a `?` field's value (its union with None)."""
    if isinstance(kind, mi.UnionType):
        [member] = [k for k in kind.types if not isinstance(k, mi.NoneType)]
        return member
    return kind


def values(kind: mi.Type) -> st.SearchStrategy[Any]:
    """JSON values of an OCPI type that msgspec accepts (the cross-field rules: `structs`, `_credit_rules`)."""
    if isinstance(kind, mi.UnionType):
        return values(_member(kind))
    if isinstance(kind, mi.StructType):
        return structs(kind)
    if isinstance(kind, mi.ListType):
        return st.lists(values(kind.item_type), min_size=kind.min_length or 0, max_size=3)
    if isinstance(kind, mi.StrType):
        return _string(kind)
    if isinstance(kind, mi.EnumType):
        return st.sampled_from([m.value for m in kind.cls if not (kind.cls is CdrDimensionType and
                                                                  m.value in _SESSION_ONLY)])
    if isinstance(kind, mi.IntType):
        return st.integers(kind.ge if kind.ge is not None else -(2**63), kind.le if kind.le is not None else 2**63 - 1)
    if isinstance(kind, mi.BoolType):
        return st.booleans()
    if isinstance(kind, mi.CustomType):
        if kind.cls is ocpi_types.DateTime:
            return DATETIMES
        if kind.cls is ocpi_types.Percentage:
            return PERCENTAGES
        if kind.cls is ocpi_types.Number:
            return NUMBERS
    raise NotImplementedError(kind)


def structs(kind: mi.StructType) -> st.SearchStrategy[dict[str, Any]]:
    required = {f.encode_name: values(f.type) for f in kind.fields if f.required}
    optional = {f.encode_name: st.one_of(st.none(), values(f.type)) for f in kind.fields if not f.required}
    if kind.cls is CDR:  # the cross-field rules the decoder checks, so that most bodies are valid
        required["currency"] = st.sampled_from(["EUR", "USD", "SEK"])
        required["id"] = st.text(_CI_TEXT, min_size=1, max_size=39)
        required["country_code"] = st.text(_CI_TEXT, min_size=1, max_size=2)
        required["party_id"] = st.text(_CI_TEXT, min_size=1, max_size=3)
        optional["credit_reference_id"] = st.one_of(st.none(), st.text(_CI_TEXT, min_size=1, max_size=39))
    elif "currency" in required:  # ISO 4217 (`ocpi._validate`)
        required["currency"] = st.sampled_from(["EUR", "USD", "SEK"])
    return st.fixed_dictionaries(required, optional=optional)


def _credit_rules(body: dict[str, Any]) -> dict[str, Any]:
    """A credit CDR names the CDR it credits; only its id may be longer than 36 characters."""
    if body.get("credit") is True:
        return {"credit_reference_id": "ORIGINAL-1", **{k: v for k, v in body.items() if v is not None}}
    return {**body, "id": body["id"][:36]}


CDR_BODIES: Final = structs(mi.type_info(CDR)).map(_credit_rules)  # type: ignore[arg-type]
PROFILES: Final = st.sampled_from([CompatProfile(), CompatProfile(relaxations=frozenset(Relaxation))])


def decoded(body: dict[str, Any], profile: CompatProfile) -> Any:
    try:
        return decode(_JSON.encode(body), CDR, profile=profile)
    except OcpiError:
        return None


def published(body: dict[str, Any], profile: CompatProfile) -> DecodedEvent:
    """The event the receivers publish for a POST of `body`, as the pipeline reads it back from Avro."""
    first = decoded(body, profile)
    assume(first is not None)
    cdr = first.value
    event = build_event(partner_id="cpo", module=CDR_POST.module, operation=CDR_POST.operation, level=CDR_POST.level,
                        key=ObjectKey(cdr.country_code, cdr.party_id, cdr.id), decoded=first,
                        payload_type=CDR_POST.payload_type, source="PUSH", request_id="r", correlation_id="c")
    return decode_event(encode_event(event))


def stored_json(body: dict[str, Any], profile: CompatProfile) -> bytes:
    """`payload_json` of the CDR the pipeline stores from a POST of `body`."""
    return wire.ocpi_json(published(body, profile).payload)


def pipeline_outcome(first: DecodedEvent, again: DecodedEvent) -> str:
    """What stage 1 (`pipeline.cdrs.process_cdrs`) makes of `again`, the CDR of `first` being stored."""
    harness = Harness(process_cdrs, CdrState)
    harness.run(first)
    [outcome] = column(harness.run(again).batch, "raw_events", RAW_EVENT_COLUMNS, "outcome")
    return str(outcome)


@SETTINGS
@given(body=CDR_BODIES, profile=PROFILES)
def test_the_same_cdr_posted_again_is_the_same(body: dict[str, Any], profile: CompatProfile) -> None:
    """A retry whose first answer was lost, byte for byte; also once the held CDR's personal identifiers are
    pseudonyms (then UNDECIDED at worst: answered 1000 as well)."""
    held = stored_json(body, profile)
    again = decoded(body, profile)
    assert again is not None
    assert judge(msgspec.Raw(held), again.value) is Held.SAME
    pseudonymised = pseudonymise_document(held.decode(), _PSEUDONYM).encode()
    assert judge(msgspec.Raw(pseudonymised), again.value) in (Held.SAME, Held.UNDECIDED)


# --- the same CDR, spelt otherwise ------------------------------------------------------------------------------


def _respelt_datetime(data: st.DataObject, text: str) -> str:
    """The same instant: `Z` or none, the fraction's trailing zeros added or dropped (within 25 characters)."""
    stem, _, fraction = text.rstrip("Z").partition(".")
    fraction = fraction.rstrip("0")
    digits = data.draw(st.integers(len(fraction), 5))
    zone = digits < 5 and data.draw(st.booleans())
    return stem + ("." + fraction.ljust(digits, "0") if digits else "") + ("Z" if zone else "")


def _respelt_number(data: st.DataObject, value: Decimal | int) -> Decimal | int:
    number = Decimal(value)
    forms: list[Decimal | int] = [number.normalize(), number.quantize(Decimal("0.0001"))]
    if number == number.to_integral_value():
        forms.append(int(number))
    return data.draw(st.sampled_from(forms))


def _absent(kind: mi.StructType, name: str, member: Any) -> bool:
    """Whether `member` says nothing: absent, null, `[]` (a `*` list), `false` for a CDR's `credit` and
    `home_charging_compensation` (absent is `false`)."""
    return member is None or member == [] or (member is False and kind.cls is CDR and name in _FALSE_MEANS_ABSENT)


def respelt(data: st.DataObject, value: Any, kind: mi.Type) -> Any:
    """`value` (a JSON value of `kind`) as the same CDR as OCPI compares it, spelt otherwise."""
    if isinstance(kind, mi.UnionType):
        return None if value is None else respelt(data, value, _member(kind))
    if isinstance(kind, mi.StructType):
        out: dict[str, Any] = {}
        for field in kind.fields:
            name = field.encode_name
            if name == "last_updated":
                out[name] = data.draw(DATETIMES)
            elif not field.required and _absent(kind, name, value.get(name)):
                choices: list[Any] = [None, "absent"]
                if isinstance(_member(field.type), mi.ListType):
                    choices.append([])
                if kind.cls is CDR and name in _FALSE_MEANS_ABSENT:
                    choices.append(False)
                choice = data.draw(st.sampled_from(choices))
                if choice != "absent":
                    out[name] = choice
            else:
                out[name] = respelt(data, value[name], field.type)
        if kind.cls is ChargingPeriod:  # a set of measurements (`ocpi.canonical`)
            out["dimensions"] = data.draw(st.permutations(out["dimensions"]))
        if data.draw(st.booleans()):
            out["x_unknown"] = data.draw(st.sampled_from([1, "x", None, [], {"a": 1}]))
        return out
    if isinstance(kind, mi.ListType):
        return [respelt(data, item, kind.item_type) for item in value]
    if isinstance(kind, mi.StrType) and kind.pattern == ocpi_types.CI_STRING_PATTERN:
        return data.draw(st.sampled_from([value, value.upper(), value.lower(), value.swapcase()]))
    if isinstance(kind, mi.CustomType) and kind.cls is ocpi_types.DateTime:
        return _respelt_datetime(data, value)
    if isinstance(kind, mi.CustomType) and kind.cls in (ocpi_types.Number, ocpi_types.Percentage):
        return _respelt_number(data, value)
    return value


@SETTINGS
@given(body=CDR_BODIES, profile=PROFILES, data=st.data())
def test_the_same_cdr_spelt_otherwise_is_the_same(body: dict[str, Any], profile: CompatProfile,
                                                   data: st.DataObject) -> None:
    """The same CDR from a CPO's Sender list or another serialiser: what OCPI does not distinguish, nor we."""
    first = published(body, profile)
    held = wire.ocpi_json(first.payload)
    respelt_body = respelt(data, body, mi.type_info(CDR))
    again = decoded(respelt_body, profile)
    assert again is not None
    assert judge(msgspec.Raw(held), again.value) is Held.SAME
    pseudonymised = pseudonymise_document(held.decode(), _PSEUDONYM).encode()
    assert judge(msgspec.Raw(pseudonymised), again.value) in (Held.SAME, Held.UNDECIDED)
    assert pipeline_outcome(first, published(respelt_body, profile)) == "DUPLICATE"


# --- the same CDR, as a partner's compatibility profile repairs it ---------------------------------------------

LENIENT: Final = CompatProfile(relaxations=frozenset(Relaxation))
_NUMBER_TEXT: Final = re.compile(r"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?")


def _repairable_datetime(data: st.DataObject, text: str) -> str:
    """The same instant with a numeric offset (DATETIME_OFFSET), or with fraction digits past 25 characters that
    are cut off (DATETIME_EXCESS_PRECISION)."""
    stem, _, fraction = text.rstrip("Z").partition(".")
    if data.draw(st.booleans()):
        moment = datetime.fromisoformat(stem)
        hours = data.draw(st.integers(-12, 14))
        local = moment + timedelta(hours=hours)
        sign = "+" if hours >= 0 else "-"
        return f"{local:%Y-%m-%dT%H:%M:%S}" + (f".{fraction}" if fraction else "") + f"{sign}{abs(hours):02d}:00"
    zone = text.endswith("Z")
    keep = 4 if zone else 5
    if len(fraction) < keep and fraction.rstrip("0") != fraction:
        return text  # zeros past the digits kept would be cut (`.10Z` is `.1Z`): fine, but not this spelling
    extra = data.draw(st.text("0123456789", min_size=1, max_size=3))
    return stem + "." + fraction.ljust(keep, "0") + extra + ("Z" if zone else "")


def repairable(data: st.DataObject, value: Any, kind: mi.Type) -> Any:
    """`value` with some of its values spelt as the LENIENT profile repairs them back to what they were."""
    if isinstance(kind, mi.UnionType):
        return None if value is None else repairable(data, value, _member(kind))
    if isinstance(kind, mi.StructType):
        out = dict(value)
        for field in kind.fields:
            name = field.encode_name
            if out.get(name) is not None:
                out[name] = repairable(data, out[name], field.type)
            elif not field.required and isinstance(_member(field.type), mi.EnumType | mi.CustomType) and \
                    data.draw(st.booleans()):
                out[name] = ""  # EMPTY_STRING_AS_ABSENT
        return out
    if isinstance(kind, mi.ListType):
        items = [repairable(data, item, kind.item_type) for item in value]
        if data.draw(st.booleans()):
            items.insert(data.draw(st.integers(0, len(items))), None)  # NULL_IN_LIST
        return items
    if not data.draw(st.booleans()):
        return value
    if isinstance(kind, mi.StrType) and type(value) is str and _is_number_text(value):
        return Decimal(value) if "." in value else int(value)  # NUMBER_AS_STRING
    if isinstance(kind, mi.CustomType) and kind.cls is ocpi_types.DateTime:
        return _repairable_datetime(data, value)
    if isinstance(kind, mi.CustomType) and kind.cls in (ocpi_types.Number, ocpi_types.Percentage):
        number = Decimal(value)
        if data.draw(st.booleans()):
            return str(value)  # STRING_AS_NUMBER
        extra = Decimal(data.draw(st.sampled_from(["0.00001", "0.000049", "-0.00004", "0.00000001"])))
        return number + extra  # EXCESS_DECIMALS: rounded half-even to 4 places, back to `number`
    return value


def _is_number_text(text: str) -> bool:
    """Whether `text` is what a JSON number is written as (NUMBER_AS_STRING gives back its text as written)."""
    return _NUMBER_TEXT.fullmatch(text) is not None and str(Decimal(text)) == text


@SETTINGS
@given(body=CDR_BODIES, data=st.data(), repaired_first=st.booleans())
def test_the_same_cdr_as_a_profile_repairs_it_is_the_same(body: dict[str, Any], data: st.DataObject,
                                                           repaired_first: bool) -> None:
    """The first POST or the retry needed repairs the partner's profile allows (which may have changed between the
    two): what each was repaired to is what the other sent."""
    sent = repairable(data, body, mi.type_info(CDR))
    assume(decoded(body, CompatProfile()) is not None)
    first, second = (sent, body) if repaired_first else (body, sent)
    stored = published(first, LENIENT)
    profile = LENIENT if not repaired_first else data.draw(PROFILES)
    again = decoded(second, profile)
    assert again is not None
    assert judge(msgspec.Raw(wire.ocpi_json(stored.payload)), again.value) is Held.SAME
    assert pipeline_outcome(stored, published(second, profile)) == "DUPLICATE"


# --- and another CDR is another CDR ------------------------------------------------------------------------------


def _another(data: st.DataObject, body: dict[str, Any]) -> dict[str, Any]:
    """`body` with one value changed as OCPI does not ignore: an amount, a time, a (case-sensitive) string."""
    location = body["cdr_location"]
    edits = [
        {"total_energy": Decimal(body["total_energy"]) + (1 if Decimal(body["total_energy"]) < 0 else -1)},
        {"end_date_time": f"{datetime.fromisoformat(body['end_date_time'][:19]) + timedelta(seconds=1):%FT%T}Z"},
        {"cdr_location": {**location, "city": location["city"] + "x"}},
    ]
    if location["address"].swapcase() != location["address"]:
        edits.append({"cdr_location": {**location, "address": location["address"].swapcase()}})
    return {**body, **data.draw(st.sampled_from(edits))}


@SETTINGS
@given(body=CDR_BODIES, profile=PROFILES, data=st.data())
def test_another_cdr_under_the_id_is_another(body: dict[str, Any], profile: CompatProfile,
                                             data: st.DataObject) -> None:
    """The other side of the property, so that `judge` cannot pass the ones above by finding everything the same;
    the held CDR's pseudonyms do not hide a change elsewhere."""
    first = published(body, profile)
    held = wire.ocpi_json(first.payload)
    other_body = _another(data, body)
    other = decoded(other_body, profile)
    assume(other is not None and other.value != decoded(body, profile).value)
    assert judge(msgspec.Raw(held), other.value) is Held.OTHER
    pseudonymised = pseudonymise_document(held.decode(), _PSEUDONYM).encode()
    assert judge(msgspec.Raw(pseudonymised), other.value) is Held.OTHER
    assert pipeline_outcome(first, published(other_body, profile)) == "CONFLICT"
