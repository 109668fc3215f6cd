"""The committed .avsc files: they parse, tools/gen_avro.py regenerates them exactly, they cover the spec."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path
from types import ModuleType
from typing import Any

import fastavro
import pytest

from infra.codec import EVENT_SCHEMA, PAYLOAD_TYPES, DecodedEvent, schema_root

from .convert import current_schema

REPO = Path(__file__).resolve().parents[3]
AVRO_DIR = REPO / "avro"


def _load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_avro", REPO / "tools" / "gen_avro.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen_avro = _load_generator()
needs_spec = pytest.mark.skipif(
    not gen_avro.DEFAULT_SPEC.exists(), reason="shared OCPI spec JSON not present"
)


def _ocpi_spec() -> dict[str, Any]:
    return json.loads(gen_avro.DEFAULT_SPEC.read_text(encoding="utf-8"))


def _named_types(schema: Any) -> dict[str, dict[str, Any]]:
    """Full name → definition of every record/enum defined in ``schema``."""
    out: dict[str, dict[str, Any]] = {}

    def walk(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            if node.get("type") in ("record", "enum"):
                out[f"{node['namespace']}.{node['name']}"] = node
            for key in ("type", "items", "fields"):
                if isinstance(node.get(key), list | dict):
                    walk(node[key])

    walk(schema)
    return out


def test_schema_root_is_the_repo_avro_dir_in_a_checkout() -> None:
    assert Path(str(schema_root())).resolve() == AVRO_DIR


def test_every_avsc_parses_and_is_named_after_its_record() -> None:
    files = sorted(AVRO_DIR.glob("v*/*.avsc"))
    assert files, "no schemas committed"
    for path in files:
        assert re.fullmatch(r"v\d+", path.parent.name), path
        parsed = fastavro.parse_schema(json.loads(path.read_text(encoding="utf-8")), named_schemas={})
        assert isinstance(parsed, dict)
        assert parsed["name"] == path.name.removesuffix(".avsc")


@needs_spec
def test_regeneration_is_byte_identical() -> None:
    generated = gen_avro.generate(gen_avro.DEFAULT_SPEC, AVRO_DIR)
    assert generated, "generator produced nothing"
    for path, text in generated.items():
        assert path.exists(), f"{path} not committed; run tools/gen_avro.py"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale; run tools/gen_avro.py"
    current = AVRO_DIR / f"v{gen_avro.SCHEMA_VERSION}"
    assert set(current.glob("*.avsc")) == set(generated), "files in the current revision not made by the tool"


@needs_spec
def test_check_mode_reports_stale_files(tmp_path: Path) -> None:
    assert gen_avro.main(["--out", str(tmp_path), "--check"]) == 1
    assert gen_avro.main(["--out", str(tmp_path)]) == 0
    assert gen_avro.main(["--out", str(tmp_path), "--check"]) == 0


def test_envelope_matches_architecture() -> None:
    schema = current_schema()
    assert f"{schema['namespace']}.{schema['name']}" == EVENT_SCHEMA
    names = [f["name"] for f in schema["fields"]]
    assert names == [
        "event_id", "partner_id", "module", "operation", "level", "country_code", "party_id", "object_id",
        "evse_uid", "connector_id", "received_at", "request_id", "correlation_id", "from_country_code",
        "from_party_id", "to_country_code", "to_party_id", "source", "content_hash", "relaxations", "payload",
    ]  # fmt: skip
    by_name = {f["name"]: f for f in schema["fields"]}
    assert by_name["module"]["type"]["symbols"] == ["LOCATIONS", "SESSIONS", "CDRS"]
    assert by_name["operation"]["type"]["symbols"] == ["PUT", "PATCH", "POST", "UNLIST"]
    assert by_name["level"]["type"]["symbols"] == ["LOCATION", "EVSE", "CONNECTOR", "SESSION", "CDR"]
    assert by_name["source"]["type"]["symbols"] == ["PUSH", "PULL", "REPLAY"]
    assert by_name["received_at"]["type"] == {"type": "long", "logicalType": "timestamp-micros"}
    for name in ("evse_uid", "connector_id", "from_country_code", "from_party_id", "to_country_code"):
        assert by_name[name]["type"] == ["null", "string"] and by_name[name]["default"] is None
    branches = [
        b if isinstance(b, str) else f"{b['namespace']}.{b['name']}" for b in by_name["payload"]["type"]
    ]
    assert [b.rpartition(".")[2] for b in branches] == list(PAYLOAD_TYPES)


def test_decoded_event_has_every_envelope_field() -> None:
    envelope = [f["name"] for f in current_schema()["fields"] if f["name"] != "payload"]
    assert list(DecodedEvent.__struct_fields__) == [*envelope, "payload_type", "payload", "schema_version"]


@needs_spec
def test_records_cover_every_ocpi_field_with_the_right_cardinality() -> None:
    objects = _ocpi_spec()["objects"]
    named = _named_types(current_schema())
    ocpi_records = {n: d for n, d in named.items() if n.startswith("ocpi.v2_2_1.") and d["type"] == "record"}
    assert {n.rpartition(".")[2] for n in ocpi_records} == {
        "Location", "PublishTokenType", "GeoLocation", "AdditionalGeoLocation", "DisplayText", "EVSE",
        "StatusSchedule", "Connector", "Image", "BusinessDetails", "Hours", "RegularHours",
        "ExceptionalPeriod", "EnergyMix", "EnergySource", "EnvironmentalImpact", "Session", "CdrToken",
        "ChargingPeriod", "CdrDimension", "Price", "CDR", "CdrLocation", "Tariff", "TariffElement",
        "PriceComponent", "TariffRestrictions", "SignedData", "SignedValue",
        "LocationPatch", "EVSEPatch", "ConnectorPatch", "SessionPatch",
    }  # fmt: skip
    for full_name, record in ocpi_records.items():
        name = full_name.rpartition(".")[2]
        patch = name.endswith("Patch")
        spec_fields = objects[name.removesuffix("Patch") if patch else name]["fields"]
        assert [f["name"] for f in record["fields"]] == [f["name"] for f in spec_fields], name
        for field, spec in zip(record["fields"], spec_fields, strict=True):
            nullable = isinstance(field["type"], list)
            assert nullable == (patch or spec["cardinality"] in ("?", "*")), (name, spec["name"])
            if nullable:
                assert field["type"][0] == "null" and field["default"] is None, (name, spec["name"])
            value = field["type"][1] if nullable else field["type"]
            if spec["list"]:
                assert isinstance(value, dict) and value["type"] == "array", (name, spec["name"])
                value = value["items"]
            expected = {
                "DateTime": {"type": "long", "logicalType": "timestamp-micros"},
                "number": {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 4},
                "int": "long",
                "boolean": "boolean",
            }.get(spec["type"], "string")
            if spec["kind"] == "primitive":
                assert value == expected, (name, spec["name"])
            else:
                target = spec.get("class") or spec.get("enum")
                value_name = value if isinstance(value, str) else f"{value['namespace']}.{value['name']}"
                assert value_name == f"ocpi.v2_2_1.{target}", (name, spec["name"])


@needs_spec
def test_every_ocpi_enum_value_is_a_symbol_or_the_enum_is_carried_as_string() -> None:
    enums = _ocpi_spec()["enums"]
    named = _named_types(current_schema())
    avro_enums = {n.rpartition(".")[2]: d for n, d in named.items() if n.startswith("ocpi.v2_2_1.")}
    avro_enums = {n: d for n, d in avro_enums.items() if d["type"] == "enum"}
    for name, definition in avro_enums.items():
        assert definition["symbols"] == enums[name]["values"], name
        if "default" in definition:
            assert definition["default"] in definition["symbols"], name
    # Every spec enum either is a valid Avro enum or would be mapped to a plain string by the generator.
    symbol = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
    invalid = sorted(n for n, e in enums.items() if not all(symbol.match(v) for v in e["values"]))
    assert invalid == ["VersionNumber"]  # "2.2.1" etc.; not on the wire
    builder = gen_avro._Builder(_ocpi_spec())
    assert builder.enum("VersionNumber") == "string"
    assert {n: d.get("default") for n, d in avro_enums.items() if "default" in d} == {
        "Status": "UNKNOWN",
        "ImageCategory": "OTHER",
        "TokenType": "OTHER",
    }
