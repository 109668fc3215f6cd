#!/usr/bin/env python3
"""Generate the Avro schemas of the Kafka wire contract from the machine-readable OCPI spec.

Usage::

    python tools/gen_avro.py            # (re)write avro/v<N>/ocpi.pipeline.OcpiEvent.avsc
    python tools/gen_avro.py --check    # exit 1 if the committed file differs from a fresh generation
    python tools/gen_avro.py --spec PATH --out DIR

Output is committed; generation is deterministic (field order = spec order, fixed JSON layout), and a unit
test checks that regenerating gives byte-identical files.

Layout: one self-contained ``.avsc`` per record on the wire, ``avro/v<N>/<full name>.avsc``. Every nested
named type is defined inline at its first use and referenced by full name afterwards, so a file parses on its
own (one ``fastavro.parse_schema`` call) and its fingerprint covers everything the record needs.

Names: the envelope keeps the name fixed by ARCHITECTURE.md (``ocpi.pipeline.OcpiEvent``); the OCPI objects
live in ``ocpi.v2_2_1`` (the OCPI protocol version). The *schema revision* is the ``v<N>`` directory, not
part of the Avro names, because Avro schema resolution matches records by name: renaming on every revision
would need aliases everywhere.

Only the current revision is generated. Older ``v<N>`` directories are frozen history that the codec still
needs to read old records; never regenerate or edit them. To change the schema, bump ``SCHEMA_VERSION``,
regenerate, and follow the evolution rules in ``infra/codec.py``.

Type mapping (OCPI → Avro):
  CiString, string, URL, "HH:MM" times, dates → string
  DateTime → long, logicalType timestamp-micros (tz-aware UTC datetimes)
  number   → bytes, logicalType decimal(18, 4) (money and energy stay exact)
  int      → long (same varint bytes as int for small values, no 2^31 overflow surprises)
  boolean  → boolean;  enum → Avro enum (or string if a value is not a valid Avro symbol)
  card. 1  → T;  ? → ["null", T] default null;  * → ["null", array] default null (absent stays distinct
  from []);  + → array
  PATCH variants (LocationPatch, EVSEPatch, ConnectorPatch, SessionPatch): every top-level field
  ["null", T] default null; null = absent (project policy: an explicit null in a PATCH means unchanged).
  Nested objects of a PATCH are whole objects, so they reuse the full records.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = REPO_ROOT.parent / "shared" / "ocpi" / "ocpi-2.2.1-objects.json"
DEFAULT_OUT = REPO_ROOT / "avro"

PIPELINE_NS = "ocpi.pipeline"
OCPI_NS = "ocpi.v2_2_1"
EVENT_NAME = "OcpiEvent"

# Union branches of OcpiEvent.payload, in wire order. Append only: the branch index is on the wire.
FULL_PAYLOADS = ("Location", "EVSE", "Connector", "Session", "CDR")
PATCH_PAYLOADS = ("Location", "EVSE", "Connector", "Session")
PATCH_SUFFIX = "Patch"

DECIMAL: dict[str, Any] = {"type": "bytes", "logicalType": "decimal", "precision": 18, "scale": 4}
TIMESTAMP: dict[str, Any] = {"type": "long", "logicalType": "timestamp-micros"}
PRIMITIVES: dict[str, Any] = {
    "CiString": "string",
    "string": "string",
    "URL": "string",
    "DateTime": TIMESTAMP,
    "number": DECIMAL,
    "int": "long",
    "boolean": "boolean",
}

# Enum default symbols (used by Avro resolution when a reader lacks the writer's symbol). Only where OCPI
# itself has a catch-all value; elsewhere any default would silently turn an unknown value into a wrong one.
ENUM_DEFAULTS = {"Status": "UNKNOWN", "ImageCategory": "OTHER", "TokenType": "OTHER", "Role": "OTHER"}

AVRO_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

# The envelope, per the wire contract table in ARCHITECTURE.md (field order = table order).
_OPT_STRING: list[Any] = ["null", "string"]
ENVELOPE_ENUMS: dict[str, tuple[str, list[str]]] = {
    "module": ("Module", ["LOCATIONS", "SESSIONS", "CDRS"]),
    "operation": ("Operation", ["PUT", "PATCH", "POST", "UNLIST"]),  # UNLIST: v2, full sync of a Location
    "level": ("Level", ["LOCATION", "EVSE", "CONNECTOR", "SESSION", "CDR"]),
    "source": ("Source", ["PUSH", "PULL", "REPLAY"]),
}
ENVELOPE_FIELDS: list[tuple[str, Any, str]] = [
    ("event_id", "string", "uuid4 assigned by the receiver"),
    ("partner_id", "string", "registry id of the partner that pushed it"),
    ("module", "enum", "OCPI module"),
    ("operation", "enum", "HTTP method of the push (POST for CDRs); UNLIST (v2): a complete pulled Locations list "
                          "no longer holds the Location"),
    ("level", "enum", "object level addressed by the URL"),
    ("country_code", "string", "owner country code as sent (case preserved; compare case-insensitively)"),
    ("party_id", "string", "owner party id as sent (case preserved; compare case-insensitively)"),
    ("object_id", "string", "Location/Session/CDR id as sent (case preserved; compare case-insensitively)"),
    ("evse_uid", _OPT_STRING, "EVSE uid for EVSE/connector level, else null"),
    ("connector_id", _OPT_STRING, "connector id for connector level, else null"),
    ("received_at", TIMESTAMP, "when the receiver accepted the push (UTC)"),
    ("request_id", "string", "X-Request-ID"),
    ("correlation_id", "string", "X-Correlation-ID"),
    ("from_country_code", _OPT_STRING, "OCPI-from-country-code routing header"),
    ("from_party_id", _OPT_STRING, "OCPI-from-party-id routing header"),
    ("to_country_code", _OPT_STRING, "OCPI-to-country-code routing header"),
    ("to_party_id", _OPT_STRING, "OCPI-to-party-id routing header"),
    ("source", "enum", "how the object reached us"),
    ("content_hash", "string", "sha256 hex of the canonical payload without any last_updated"),
    ("relaxations", {"type": "array", "items": "string"}, "compatibility relaxations applied to this push"),
    ("payload", "payload", "full object for PUT/POST, partial (*Patch) for PATCH, a LocationPatch of last_updated "
                           "only for UNLIST (the list's date_to); null = absent"),
]


class SpecError(Exception):
    """The OCPI spec JSON contains something this generator cannot map."""


class _Builder:
    """Builds schemas; each named type is defined at its first use and referenced by full name afterwards."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.objects: dict[str, Any] = spec["objects"]
        self.enums: dict[str, Any] = spec["enums"]
        self.defined: set[str] = set()

    def _named(self, namespace: str, name: str) -> str | None:
        """Return the full-name reference if already defined, else mark it defined and return None."""
        full = f"{namespace}.{name}"
        if full in self.defined:
            return full
        self.defined.add(full)
        return None

    def enum(self, name: str) -> Any:
        spec = self.enums[name]
        values: list[str] = spec["values"]
        if not all(AVRO_NAME.match(v) for v in values):
            # e.g. VersionNumber "2.2.1": not an Avro symbol, so carry the OCPI value verbatim.
            return "string"
        ref = self._named(OCPI_NS, name)
        if ref is not None:
            return ref
        doc = f"OCPI {name} ({spec['source']})."
        if spec.get("notes"):
            doc += f" {spec['notes']}"
        schema: dict[str, Any] = {
            "type": "enum",
            "name": name,
            "namespace": OCPI_NS,
            "doc": doc,
            "symbols": values,
        }
        default = ENUM_DEFAULTS.get(name)
        if default is not None:
            if default not in values:
                raise SpecError(f"enum default {default} is not a value of {name}")
            schema["default"] = default
        return schema

    def value_type(self, field: dict[str, Any]) -> Any:
        kind = field["kind"]
        if kind == "primitive":
            try:
                return PRIMITIVES[field["type"]]
            except KeyError:
                raise SpecError(f"unmapped OCPI primitive {field['type']!r}") from None
        if kind == "enum":
            return self.enum(field["enum"])
        if kind == "class":
            return self.record(field["class"])
        raise SpecError(f"unmapped field kind {kind!r} ({field['name']})")

    def field(self, field: dict[str, Any], *, patch: bool = False) -> dict[str, Any]:
        value = self.value_type(field)
        card = field["cardinality"]
        if field["list"]:
            value = {"type": "array", "items": value}
        out: dict[str, Any] = {"name": field["name"]}
        doc = _field_doc(field)
        if doc:
            out["doc"] = doc
        if patch or card in ("?", "*"):
            out["type"] = ["null", value]
            out["default"] = None
        elif card in ("1", "+"):
            out["type"] = value
        else:
            raise SpecError(f"unknown cardinality {card!r} ({field['name']})")
        return out

    def record(self, name: str, *, patch: bool = False) -> Any:
        record_name = name + PATCH_SUFFIX if patch else name
        ref = self._named(OCPI_NS, record_name)
        if ref is not None:
            return ref
        spec = self.objects[name]
        if patch:
            doc = (
                f"Partial OCPI {name} of a PATCH: every field nullable, null = absent"
                " (an explicit null in a PATCH means unchanged)."
            )
        else:
            doc = f"OCPI {name} ({spec['source']})."
            rules = [c["rule"] for c in spec.get("constraints", [])]
            if rules:
                doc += " Constraints: " + "; ".join(rules) + "."
        return {
            "type": "record",
            "name": record_name,
            "namespace": OCPI_NS,
            "doc": doc,
            "fields": [self.field(f, patch=patch) for f in spec["fields"]],
        }

    def event(self) -> dict[str, Any]:
        payload = [self.record(n) for n in FULL_PAYLOADS]
        payload += [self.record(n, patch=True) for n in PATCH_PAYLOADS]
        fields: list[dict[str, Any]] = []
        for name, typ, doc in ENVELOPE_FIELDS:
            if typ == "enum":
                enum_name, symbols = ENVELOPE_ENUMS[name]
                typ = {"type": "enum", "name": enum_name, "namespace": PIPELINE_NS, "symbols": symbols}
            elif typ == "payload":
                typ = payload
            field: dict[str, Any] = {"name": name, "doc": doc, "type": typ}
            if isinstance(typ, list) and typ[0] == "null":
                field["default"] = None
            elif name == "relaxations":
                field["default"] = []
            fields.append(field)
        return {
            "type": "record",
            "name": EVENT_NAME,
            "namespace": PIPELINE_NS,
            "doc": (
                f"Kafka value of every OCPI push (schema revision v{SCHEMA_VERSION}); see ARCHITECTURE.md,"
                " wire contract. Generated by tools/gen_avro.py; do not edit."
            ),
            "fields": fields,
        }


def _field_doc(field: dict[str, Any]) -> str:
    parts: list[str] = []
    if field["kind"] == "primitive":
        typ = field["type"]
        if "max_length" in field and typ != "DateTime":
            typ += f"({field['max_length']})"
        elif "max_digits" in field:
            typ += f"({field['max_digits']})"
        parts.append(typ)
    if field.get("unit"):
        parts.append(f"unit {field['unit']}")
    if "default" in field:
        parts.append(f"OCPI default {json.dumps(field['default'])}")
    if field.get("na_allowed"):
        parts.append("'#NA' allowed")
    if field.get("notes"):
        parts.append(field["notes"])
    return "; ".join(parts)


def build_schemas(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Full name → schema of every record on the wire (current revision)."""
    return {f"{PIPELINE_NS}.{EVENT_NAME}": _Builder(spec).event()}


# A JSON array whose items are all plain strings, as json.dumps(indent=2) lays it out over several lines.
_STRING_ARRAY = re.compile(r'\[\n\s*"[^"\n]*"(?:,\n\s*"[^"\n]*")*\n\s*\]')


def render(schema: dict[str, Any]) -> str:
    """Indented JSON, with string-only arrays (enum symbols, ["null", "string"]) kept on one line."""
    text = json.dumps(schema, indent=2, ensure_ascii=False)
    return _STRING_ARRAY.sub(lambda m: json.dumps(json.loads(m.group(0)), ensure_ascii=False), text) + "\n"


def generate(spec_path: Path, out_dir: Path) -> dict[Path, str]:
    """Path → file text of every generated file (nothing is written)."""
    spec = json.loads(spec_path.read_text(encoding="utf-8"))
    version_dir = out_dir / f"v{SCHEMA_VERSION}"
    return {version_dir / f"{name}.avsc": render(schema) for name, schema in build_schemas(spec).items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC, help="ocpi-2.2.1-objects.json")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="avro/ directory")
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a file differs")
    args = parser.parse_args(argv)

    stale = 0
    for path, text in generate(args.spec, args.out).items():
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale += 1
        if args.check:
            print(f"stale: {path}", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
