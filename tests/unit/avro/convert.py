"""Turn OCPI JSON into what the receivers hand to the codec (the shape of ``msgspec.to_builtins(obj,
builtin_types=(datetime, Decimal))`` with UNSET dropped): DateTime → tz-aware UTC datetime, number → Decimal,
absent/null → key left out. Driven by the Avro schema so it needs nothing from ``ocpi/``."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from infra.codec import EVENT_SCHEMA, schema_root

EXAMPLES = Path(__file__).resolve().parents[4] / "shared" / "ocpi" / "examples"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def current_schema() -> dict[str, Any]:
    root = schema_root()
    latest = max((d for d in root.iterdir() if d.name.startswith("v")), key=lambda d: int(d.name[1:]))
    return json.loads((latest / f"{EVENT_SCHEMA}.avsc").read_text(encoding="utf-8"))


def _named_types(schema: Any, out: dict[str, Any], namespace: str = "") -> dict[str, Any]:
    if isinstance(schema, list):
        for s in schema:
            _named_types(s, out, namespace)
    elif isinstance(schema, dict):
        if schema.get("type") in ("record", "enum"):
            namespace = schema.get("namespace", namespace)
            out[f"{namespace}.{schema['name']}"] = schema
        for key in ("fields", "items"):
            if key in schema:
                _named_types(schema[key], out, namespace)
        if "type" in schema and isinstance(schema["type"], list | dict):
            _named_types(schema["type"], out, namespace)
    return out


_NAMED = _named_types(current_schema(), {})


def parse_datetime(text: str) -> datetime:
    value = datetime.fromisoformat(text)
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def convert(value: Any, schema: Any) -> Any:
    if isinstance(schema, str):
        schema = _NAMED.get(schema, schema)
    if isinstance(schema, list):  # ["null", T]
        return convert(value, schema[1])
    if isinstance(schema, dict):
        kind = schema["type"]
        if kind == "record":
            return {
                f["name"]: convert(value[f["name"]], f["type"])
                for f in schema["fields"]
                if value.get(f["name"]) is not None
            }
        if kind == "array":
            return [convert(v, schema["items"]) for v in value]
        if schema.get("logicalType") == "decimal":
            return Decimal(str(value))
        if schema.get("logicalType") == "timestamp-micros":
            return parse_datetime(value)
    return value


def ocpi_object(name: str, data: dict[str, Any]) -> dict[str, Any]:
    """OCPI JSON object (already json-loaded) → payload dict for ``ocpi.v2_2_1.<name>``."""
    return convert(data, f"ocpi.v2_2_1.{name}")


def load_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"), parse_float=Decimal)
