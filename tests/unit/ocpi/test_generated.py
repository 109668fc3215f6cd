"""The generated Structs match ocpi-2.2.1-objects.json field by field, and the generator is reproducible."""

from __future__ import annotations

import copy
import importlib.util
from collections.abc import Iterator
from typing import Any

import msgspec
import msgspec.inspect as mi
import pytest

from ocpi import _generated, _validate
from ocpi.model import max_length
from ocpi.types import CI_STRING_PATTERN, STRING_PATTERN, DateTime, Number, Percentage

from .support import REPO, SPEC_FILE, spec

OPEN_ENUMS = {"ModuleID", "VersionNumber"}  # decoded as strings: the spec says to skip unknown values


def _unwrap(kind: mi.Type) -> tuple[mi.Type, bool]:
    """(inner type, nullable)."""
    if isinstance(kind, mi.UnionType):
        members = [k for k in kind.types if not isinstance(k, mi.NoneType)]
        assert len(members) == 1, kind
        return members[0], True
    return kind, False


def _check_item(
    where: str, field: dict[str, Any], kind: mi.Type, owner: type, data: dict[str, Any]
) -> Iterator[str]:
    typ = field["type"]
    if field["kind"] == "class":
        if not (isinstance(kind, mi.StructType) and kind.cls is _generated.OBJECTS.get(field["class"])):
            yield f"{where}: expected class {field['class']}, got {kind}"
    elif field["kind"] == "enum":
        enum_name = field["enum"]
        if enum_name in OPEN_ENUMS:
            if not (isinstance(kind, mi.StrType) and kind.pattern == CI_STRING_PATTERN):
                yield f"{where}: open enum {enum_name} should decode as CiString, got {kind}"
            if (
                _generated.OPEN_ENUM_FIELDS.get(owner, {}).get(field["name"])
                is not _generated.ENUMS[enum_name]
            ):
                yield f"{where}: not listed in OPEN_ENUM_FIELDS"
        elif not (isinstance(kind, mi.EnumType) and kind.cls is _generated.ENUMS.get(enum_name)):
            yield f"{where}: expected enum {enum_name}, got {kind}"
    elif field["kind"] == "any":
        if not isinstance(kind, mi.AnyType):
            yield f"{where}: expected any, got {kind}"
    elif typ in ("CiString", "string", "URL"):
        if not isinstance(kind, mi.StrType):
            yield f"{where}: expected a string, got {kind}"
            return
        expected_length = field.get("max_length")
        d2 = _generated.D2_MAX_LENGTH.get(owner, {}).get(field["name"])
        if d2 is not None:  # errata field: the Struct takes the longer length, decode enforces the d2 one
            if d2 != expected_length or kind.max_length is None or kind.max_length <= d2:
                yield f"{where}: errata lengths (d2 {d2}, struct {kind.max_length}, spec {expected_length})"
        elif kind.max_length != _generated.REGEX_MAX_LENGTH.get(kind.pattern or "", expected_length):
            yield f"{where}: max_length {kind.max_length} != {expected_length}"
        if "pattern" in field:
            pattern = field["pattern"][:-1] + r"\Z" if field["pattern"].endswith("$") else field["pattern"]
        else:
            pattern = CI_STRING_PATTERN if typ == "CiString" else STRING_PATTERN
        if kind.pattern != pattern:
            yield f"{where}: pattern {kind.pattern!r} != {pattern!r}"
    elif typ == "DateTime":
        if not (isinstance(kind, mi.CustomType) and kind.cls is DateTime):
            yield f"{where}: expected DateTime, got {kind}"
    elif typ == "number":
        marker = Percentage if (field.get("minimum"), field.get("maximum")) == (0, 100) else Number
        if not (isinstance(kind, mi.CustomType) and kind.cls is marker):
            yield f"{where}: expected {marker.__name__}, got {kind}"
    elif typ == "int":
        if not isinstance(kind, mi.IntType):
            yield f"{where}: expected int, got {kind}"
            return
        digits = field.get("max_digits")
        high = 10**digits - 1 if digits else 2**63 - 1
        high = min(high, field.get("maximum", high))
        low = -(10**digits - 1) if digits else -(2**63)
        low = max(low, field.get("minimum", low))
        if (kind.ge, kind.le) != (low, high):
            yield f"{where}: bounds {(kind.ge, kind.le)} != {(low, high)}"
    elif typ == "boolean":
        if not isinstance(kind, mi.BoolType):
            yield f"{where}: expected bool, got {kind}"
    else:
        yield f"{where}: unknown spec type {typ}"


def mismatches(data: dict[str, Any]) -> list[str]:
    """Every difference between the spec JSON and the generated module (empty = in sync)."""
    problems: list[str] = []
    if set(_generated.OBJECTS) != set(data["objects"]):
        problems.append(f"objects differ: {set(_generated.OBJECTS) ^ set(data['objects'])}")
    for name, enum in data["enums"].items():
        enum_cls = _generated.ENUMS.get(name)
        values = None if enum_cls is None else [m.value for m in enum_cls]
        if values != enum["values"]:
            problems.append(f"enum {name}: {values} != {enum['values']}")
    for name, obj in data["objects"].items():
        cls = _generated.OBJECTS.get(name)
        if cls is None:
            continue
        info = mi.type_info(cls)
        assert isinstance(info, mi.StructType)
        if [f.name for f in info.fields] != [f["name"] for f in obj["fields"]]:
            problems.append(f"{name}: fields/order {[f.name for f in info.fields]} != spec")
            continue
        for spec_field, field in zip(obj["fields"], info.fields, strict=True):
            where = f"{name}.{spec_field['name']}"
            card = spec_field["cardinality"]
            if field.required != (card in ("1", "+")):
                problems.append(f"{where}: required={field.required} but cardinality {card}")
            kind, nullable = _unwrap(field.type)
            if nullable != (card in ("?", "*")):
                problems.append(f"{where}: nullable={nullable} but cardinality {card}")
            if card in ("?", "*") and field.default != spec_field.get("default"):
                problems.append(f"{where}: default {field.default!r} != {spec_field.get('default')!r}")
            if card in ("*", "+"):
                if not isinstance(kind, mi.ListType):
                    problems.append(f"{where}: not a list")
                    continue
                if kind.min_length != (1 if card == "+" else None):
                    problems.append(f"{where}: min_length {kind.min_length} for cardinality {card}")
                kind = kind.item_type
            elif isinstance(kind, mi.ListType):
                problems.append(f"{where}: a list for cardinality {card}")
                continue
            problems += _check_item(where, spec_field, kind, cls, data)
            if bool(spec_field.get("na_allowed")) != (
                spec_field["name"] in _generated.NA_ALLOWED.get(cls, ())
            ):
                problems.append(f"{where}: na_allowed differs")
        for constraint in obj.get("constraints", []):
            if (name, constraint["rule"]) not in _validate.CONSTRAINTS:
                problems.append(f"{name}: no check for constraint {constraint['rule']!r}")
    return problems


def test_generated_module_matches_spec() -> None:
    assert mismatches(spec()) == []


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda d: d["objects"]["Session"]["fields"].pop(5), id="missing-field"),
        pytest.param(lambda d: d["objects"]["CDR"]["fields"][2].update(max_length=40), id="wrong-length"),
        pytest.param(
            lambda d: d["enums"]["PowerType"]["values"].append("AC_4_PHASE"), id="missing-enum-value"
        ),
        pytest.param(lambda d: d["objects"]["EVSE"]["fields"][5].update(cardinality="*"), id="cardinality"),
        pytest.param(
            lambda d: d["objects"]["Session"]["fields"][6].update({"class": "Price"}), id="class-ref"
        ),
        pytest.param(lambda d: d["objects"]["Image"]["fields"][4].update(max_digits=6), id="int-digits"),
        pytest.param(lambda d: d["objects"]["Session"]["fields"][11].pop("na_allowed"), id="na-allowed"),
        pytest.param(
            lambda d: d["objects"]["Hours"]["constraints"][0].update(rule="new rule"), id="constraint"
        ),
        pytest.param(lambda d: d["objects"].update(Token={"fields": []}), id="missing-object"),
    ],
)
def test_spec_walk_detects_drift(mutate: Any) -> None:
    """The walk above is strict enough: each kind of drift in the spec is reported."""
    data = copy.deepcopy(spec())
    mutate(data)
    assert mismatches(data)


def test_patch_variants_share_constraints() -> None:
    for name, patch_cls in _generated.PATCHES.items():
        full = mi.type_info(_generated.OBJECTS[name])
        patch = mi.type_info(patch_cls)
        assert isinstance(full, mi.StructType) and isinstance(patch, mi.StructType)
        assert [f.name for f in patch.fields] == [f.name for f in full.fields]
        for full_field, patch_field in zip(full.fields, patch.fields, strict=True):
            assert not patch_field.required
            assert patch_cls.__struct_defaults__  # every field defaults to UNSET
            assert _unwrap(patch_field.type)[0] == _unwrap(full_field.type)[0], patch_field.name
        assert all(default is msgspec.UNSET for default in patch_cls.__struct_defaults__)


def _gen_model() -> Any:
    loader = importlib.util.spec_from_file_location("gen_model", REPO / "tools" / "gen_model.py")
    assert loader is not None and loader.loader is not None
    gen_model = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(gen_model)
    return gen_model


def test_generator_reproduces_the_committed_module() -> None:
    gen_model = _gen_model()
    rendered = gen_model.Generator(spec()).render()
    committed = (REPO / "ocpi" / "_generated.py").read_text(encoding="utf-8")
    assert rendered == committed, "ocpi/_generated.py is stale: run python tools/gen_model.py"
    assert gen_model.Generator(spec()).render() == rendered  # deterministic
    assert SPEC_FILE.exists()


def _structs_held_by(cls: type) -> set[type]:
    """Every Struct class a value of `cls` can hold, at any depth (itself excluded)."""
    found: set[type] = set()

    def visit(kind: Any) -> None:
        if isinstance(kind, mi.StructType):
            if kind.cls in found:
                return
            found.add(kind.cls)
            for field in kind.fields:
                visit(field.type)
        elif isinstance(kind, mi.UnionType):
            for member in kind.types:
                visit(member)
        elif isinstance(kind, mi.Metadata):
            visit(kind.type)
        elif isinstance(kind, mi.ListType | mi.SetType | mi.FrozenSetType
                           | mi.VarTupleType):
            visit(kind.item_type)
        elif isinstance(kind, mi.DictType):
            visit(kind.value_type)

    info = mi.type_info(cls)
    assert isinstance(info, mi.StructType)
    for field in info.fields:
        visit(field.type)
    return found


def _keeps_defaults(cls: Any) -> bool:
    return not cls.__struct_config__.omit_defaults


def test_only_objects_with_a_documented_default_write_their_defaults() -> None:
    # msgspec leaves None fields out of the JSON it writes (omit_defaults); an object whose documented default is
    # not null keeps all its fields, and pipeline.wire removes its own None fields, trusting what it holds to
    # leave theirs out: so none of them may hold another object that keeps its defaults.
    keeping = {cls for cls in [*_generated.OBJECTS.values(), *_generated.PATCHES.values()] if _keeps_defaults(cls)}
    assert keeping == set(_generated.NULL_MEANS_DEFAULT)
    for cls in keeping:
        held = {held for held in _structs_held_by(cls) if _keeps_defaults(held)}
        assert not held, f"{cls.__name__} holds {held}"


def test_max_length_reads_the_spec_through_the_model() -> None:
    """Checks elsewhere (the receivers' GET ids, the longest CDR URL we hand out) size themselves from `max_length`,
    so it must give the objects file's number for every bounded string field, optional ones too."""
    objects, errata = spec()["objects"], _gen_model().ERRATA_MAX_LENGTH
    for name in ("CDR", "Session", "Location", "EVSE", "Connector", "Tariff"):
        struct = _generated.OBJECTS[name]
        for field in objects[name]["fields"]:
            if field["kind"] == "primitive" and field["type"] in {"CiString", "string"} and not field["list"]:
                expected = errata.get((name, field["name"]), field["max_length"])  # Location.address: 255
                assert max_length(struct, field["name"]) == expected, (name, field["name"])
    with pytest.raises(TypeError):
        max_length(_generated.OBJECTS["CDR"], "charging_periods")
    with pytest.raises(KeyError):
        max_length(_generated.OBJECTS["CDR"], "no_such_field")
