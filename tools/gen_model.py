"""Generate ocpi/_generated.py (msgspec Structs and enums) from ocpi-2.2.1-objects.json.

Usage:  python tools/gen_model.py [--spec PATH] [--out PATH] [--check]

Deterministic: the output depends only on the JSON file (same input, same bytes), so the test suite can
check that the committed module is up to date. The generator refuses anything it does not understand
(an unknown type, pattern or bound) instead of guessing.

Mapping (digest 02 §6, §9):
- CiString(n) / string(n) / URL → `Annotated[str, Meta(max_length=n, pattern=...)]` aliases; CiString is
  printable ASCII, string is anything but control characters; a field's own pattern replaces the charset one.
- DateTime / number → the ocpi.types markers (DateTime, Number, Percentage for [0, 100]).
- int → int bounded by max_digits / minimum / maximum, otherwise by int64 (the Avro `long` downstream).
- `1` → required; `?` → `T | None = None` (or the documented default); `*` → `list[T] | None = None`;
  `+` → required `list[T]` with min_length=1.
- Open enums (ModuleID, VersionNumber: the spec says to skip unknown values, not to fail) are decoded as
  CiString fields; their enum classes are still generated for comparisons.
- Post-d2 errata lengths (00-README) are what the Struct accepts; the d2 length goes to D2_MAX_LENGTH and is
  enforced by ocpi.decode unless the ERRATA_MAX_LENGTH relaxation is enabled.
"""

from __future__ import annotations

import argparse
import json
import keyword
import re
import sys
from pathlib import Path
from typing import Any, NoReturn

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPEC = ROOT.parent / "shared" / "ocpi" / "ocpi-2.2.1-objects.json"
DEFAULT_OUT = ROOT / "ocpi" / "_generated.py"

PATCHABLE = ("Location", "EVSE", "Connector", "Session")
OPEN_ENUMS = ("ModuleID", "VersionNumber")
# (object, field) → max_length accepted on receive. Location/SignedValue follow the erratum recorded in the
# field notes; CdrLocation has no erratum but the digest advises treating it like Location.
ERRATA_MAX_LENGTH: dict[tuple[str, str], int] = {
    ("CdrLocation", "address"): 255,
    ("CdrLocation", "state"): 45,
    ("Location", "address"): 255,
    ("Location", "state"): 45,
    ("SignedValue", "plain_data"): 5000,
}
PATTERN_ALIASES = {
    r"^-?[0-9]{1,2}\.[0-9]{5,7}$": "Latitude",
    r"^-?[0-9]{1,3}\.[0-9]{5,7}$": "Longitude",
    r"^([0-1][0-9]|2[0-3]):[0-5][0-9]$": "TimeOfDay",
    r"^([12][0-9]{3})-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])$": "LocalDate",
    r"^[\x21-\x7E]+$": "CredentialsToken",
}
# Patterns whose own matches are longer than the field's declared length: GeoLocation's latitude string(10) and
# longitude string(11) are one short of their regexes for a negative value with 7 decimals (`-33.8688197`,
# `-122.4194155`: Sydney, San Francisco). The regex is the rule (12-receiver-pitfalls #12); such a Location was
# refused whole. The length is the longest the regex matches.
REGEX_MAX_LENGTH = {"Latitude": 11, "Longitude": 12}
INT64 = (-(2**63), 2**63 - 1)
# Repeated on every class: type checkers do not inherit dataclass_transform options from the base.
STRUCT_BASE = "OcpiObject, kw_only=True, frozen=True"


def fail(message: str) -> NoReturn:
    raise SystemExit(f"gen_model: {message}")


def struct_pattern(pattern: str) -> str:
    """Spec patterns end in `$`; msgspec uses re.search, where `$` also matches before a final newline."""
    return pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern


def raw_literal(pattern: str) -> str:
    if '"' in pattern or (pattern.endswith("\\") and not pattern.endswith("\\Z")):
        fail(f"pattern {pattern!r} cannot be written as a raw string literal")
    return f'r"{pattern}"'


def member_name(value: str) -> str:
    name = re.sub(r"[^0-9A-Za-z]+", "_", value).upper().strip("_")
    return f"V{name}" if name[:1].isdigit() else name


class Generator:
    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.objects: dict[str, Any] = spec["objects"]
        self.enums: dict[str, Any] = spec["enums"]
        self.aliases: dict[str, str] = {}  # alias name → definition
        self.patterns: dict[str, str] = {}  # constant name → raw string literal
        self.d2_max_length: dict[str, dict[str, int]] = {}
        self.regex_lengths: dict[str, int] = {}  # pattern -> the longer length its matches have
        self.na_allowed: dict[str, list[str]] = {}
        self.null_defaults: dict[str, dict[str, Any]] = {}
        self.open_enum_fields: dict[str, dict[str, str]] = {}

    # --- field types ----------------------------------------------------------------------------------

    def alias(self, name: str, definition: str) -> str:
        if self.aliases.setdefault(name, definition) != definition:
            fail(f"alias {name} defined twice differently")
        return name

    def string_alias(self, obj: str, field: dict[str, Any]) -> str:
        kind = field["type"]
        max_length = field.get("max_length")
        errata = ERRATA_MAX_LENGTH.get((obj, field["name"]))
        if errata is not None:
            if "erratum" in field.get("notes", "") and f"to {errata}" not in field["notes"]:
                fail(f"{obj}.{field['name']}: errata table disagrees with the notes")
            self.d2_max_length.setdefault(obj, {})[field["name"]] = int(field["max_length"])
            max_length = errata
        pattern = field.get("pattern")
        if pattern is not None:
            if pattern not in PATTERN_ALIASES:
                fail(f"{obj}.{field['name']}: unknown pattern {pattern!r}, add it to PATTERN_ALIASES")
            name = PATTERN_ALIASES[pattern]
            if name in REGEX_MAX_LENGTH:
                self.regex_lengths[struct_pattern(pattern)] = max_length = REGEX_MAX_LENGTH[name]
            constant = re.sub(r"(?<!^)(?=[A-Z])", "_", name).upper() + "_PATTERN"
            self.patterns[constant] = raw_literal(struct_pattern(pattern))
            meta = f"max_length={max_length}, pattern={constant}"
        elif kind == "CiString":
            name, meta = f"CiString{max_length or ''}", "pattern=CI_STRING_PATTERN"
            meta = f"max_length={max_length}, {meta}" if max_length else meta
        elif kind == "URL":
            if max_length != 255:
                fail(f"{obj}.{field['name']}: URL with max_length {max_length}")
            name, meta = "Url", "max_length=255, pattern=STRING_PATTERN"
        elif kind == "string":
            name, meta = f"String{max_length or ''}", "pattern=STRING_PATTERN"
            meta = f"max_length={max_length}, {meta}" if max_length else meta
        else:  # pragma: no cover - callers dispatch on type
            fail(f"not a string type: {kind}")
        return self.alias(name, f"Annotated[str, msgspec.Meta({meta})]")

    def int_alias(self, obj: str, field: dict[str, Any]) -> str:
        low, high = INT64
        digits = field.get("max_digits")
        if digits is not None:
            low, high = -(10**digits - 1), 10**digits - 1
        minimum, maximum = field.get("minimum"), field.get("maximum")
        if minimum is not None or maximum is not None:
            low = max(low, minimum) if minimum is not None else low
            high = min(high, maximum) if maximum is not None else high
            name = f"Int{low}To{high}"
            if low < 0:
                fail(f"{obj}.{field['name']}: negative minimum not supported in alias names")
        elif digits is not None:
            name = f"IntDigits{digits}"
        else:
            name = "Int"
        return self.alias(name, f"Annotated[int, msgspec.Meta(ge={low}, le={high})]")

    def item_type(self, obj: str, field: dict[str, Any]) -> str:
        kind, typ = field["kind"], field["type"]
        if kind == "class":
            if field["class"] not in self.objects:
                fail(f"{obj}.{field['name']}: unknown class {field['class']}")
            return str(field["class"])
        if kind == "enum":
            if field["enum"] not in self.enums:
                fail(f"{obj}.{field['name']}: unknown enum {field['enum']}")
            if field["enum"] in OPEN_ENUMS:
                self.open_enum_fields.setdefault(obj, {})[field["name"]] = field["enum"]
                return self.alias("CiString", "Annotated[str, msgspec.Meta(pattern=CI_STRING_PATTERN)]")
            return str(field["enum"])
        if kind == "any":
            return "Any"
        if kind != "primitive":
            fail(f"{obj}.{field['name']}: unknown kind {kind}")
        if typ in ("CiString", "string", "URL"):
            return self.string_alias(obj, field)
        if typ == "DateTime":
            if field.get("max_length", 25) != 25:
                fail(f"{obj}.{field['name']}: DateTime with max_length {field['max_length']}")
            return "DateTime"
        if typ == "number":
            bounds = (field.get("minimum"), field.get("maximum"))
            if bounds == (0, 100):
                return "Percentage"
            if bounds != (None, None):
                fail(f"{obj}.{field['name']}: number bounds {bounds} have no marker type")
            return "Number"
        if typ == "int":
            return self.int_alias(obj, field)
        if typ == "boolean":
            return "bool"
        fail(f"{obj}.{field['name']}: unknown primitive {typ}")

    def field_types(self, obj: str, field: dict[str, Any]) -> tuple[str, str]:
        """(annotation of the full object's field, value type shared with the PATCH variant)."""
        card = field["cardinality"]
        item = self.item_type(obj, field)
        if card == "+":
            core = f"Annotated[list[{item}], msgspec.Meta(min_length=1)]"
            return core, core
        if card == "*":
            return f"list[{item}] | None = None", f"list[{item}]"
        if card == "?":
            default = field.get("default")
            if default is not None:
                self.null_defaults.setdefault(obj, {})[field["name"]] = default
            return f"{item} | None = {default!r}", item
        if card == "1":
            return item, item
        fail(f"{obj}.{field['name']}: unknown cardinality {card}")

    # --- rendering ------------------------------------------------------------------------------------

    def render_enum(self, name: str, enum: dict[str, Any]) -> list[str]:
        openness = "open list, unknown values are skipped" if name in OPEN_ENUMS else "closed"
        doc = f"{name} ({enum['module']}): {openness}."
        lines = [f"class {name}(enum.StrEnum):", f'    """{doc}"""', ""]
        seen: set[str] = set()
        for value in enum["values"]:
            member = member_name(value)
            if member in seen or not member.isidentifier() or keyword.iskeyword(member):
                fail(f"enum {name}: cannot name member for {value!r}")
            seen.add(member)
            lines.append(f"    {member} = {json.dumps(value)}")
        return lines

    def docstring(self, name: str, obj: dict[str, Any]) -> list[str]:
        head = f"{name}: OCPI {obj['kind']} of the {obj['module']} module ({obj['source']})."
        lines = [f'    """{head}']
        if "key" in obj:
            lines += ["", f"    Identity: {', '.join(obj['key'])}."]
        rules = [c["rule"] for c in obj.get("constraints", [])]
        if rules:
            lines += ["", "    Cross-field rules (checked by ocpi.decode):"] + [f"    - {r}" for r in rules]
        if len(lines) == 1:
            return [lines[0] + '"""']
        return [*lines, '    """']

    def render_struct(self, name: str, obj: dict[str, Any], patch_types: dict[str, list[str]]) -> list[str]:
        lines = [f"class {name}({STRUCT_BASE}):", *self.docstring(name, obj), ""]
        names: list[str] = []
        for field in obj["fields"]:
            fname = field["name"]
            if keyword.iskeyword(fname) or not fname.isidentifier():
                fail(f"{name}.{fname}: not usable as a Python attribute")
            full, core = self.field_types(name, field)
            lines.append(f"    {fname}: {full}")
            names.append(fname)
            patch_types.setdefault(name, []).append(
                wrap_field(fname, f"{core} | msgspec.UnsetType | None", "msgspec.UNSET")
            )
            if field.get("na_allowed"):
                self.na_allowed.setdefault(name, []).append(fname)
        if name in self.null_defaults:  # its JSON keeps a documented default (`true`) that equals the Struct's
            lines[0] = f"class {name}({STRUCT_BASE}, omit_defaults=False):"
        return lines

    def render_patch(self, name: str, lines: list[str]) -> list[str]:
        extra = ""
        if name == "Session":
            extra = (
                "\n    Exception: `charging_periods` in a PATCH are APPENDED to the stored list (09 §3.4);"
                "\n    empty or absent leaves it unchanged."
            )
        return [
            f"class {name}Patch({STRUCT_BASE}):",
            f'    """PATCH body for {name}: only the fields that change.',
            "",
            '    Project policy: an explicit `null` means "unchanged", exactly like an absent field,',
            "    because OCPI says a PATCH cannot remove information (use PUT). ocpi.decode turns null into",
            "    UNSET and rejects a PATCH without `last_updated` as missing field `$.last_updated` (2001).",
            "    Fields replace the stored field as a whole, nested objects and lists included (digest",
            f"    ambiguity #4).{extra}",
            '    """',
            "",
            *lines,
        ]

    def render(self) -> str:
        spec = self.spec["spec"]
        out: list[str] = [
            f'"""OCPI {spec["version"]} objects, classes and enums as msgspec Structs.',
            "",
            f"GENERATED by tools/gen_model.py from ocpi-2.2.1-objects.json ({spec['ref']},",
            f"commit {spec['commit']}).",
            "Do not edit; change the generator and run `python tools/gen_model.py`.",
            '"""',
            "",
            "# ruff: noqa: S105 - names containing TOKEN are enum values and patterns, not secrets",
            "",
            "from __future__ import annotations",
            "",
            "import enum",
            "from typing import Annotated, Any, Final",
            "",
            "import msgspec",
            "",
            "from ocpi.types import (",
            "    CI_STRING_PATTERN,",
            "    STRING_PATTERN,",
            "    DateTime,",
            "    Number,",
            "    OcpiObject,",
            "    Percentage,",
            ")",
            "",
            "__all__ = [",
            "@@ALL@@",
            "]",
            "",
            f'SPEC_VERSION: Final = "{spec["version"]}"',
            f'WIRE_VERSION: Final = "{spec["wire_version"]}"',
            "",
        ]
        exported: list[str] = ["SPEC_VERSION", "WIRE_VERSION"]

        out += ["", "# --- enums " + "-" * 96, ""]
        for name, enum in self.enums.items():
            out += ["", *self.render_enum(name, enum), ""]
            exported.append(name)

        structs: list[str] = []
        patch_fields: dict[str, list[str]] = {}
        for name, obj in self.objects.items():
            structs += ["", "", *self.render_struct(name, obj, patch_fields)]
            exported.append(name)
        for name in PATCHABLE:
            structs += ["", "", *self.render_patch(name, patch_fields[name])]
            exported.append(f"{name}Patch")

        out += ["", "# --- constrained primitives " + "-" * 79, ""]
        for constant in sorted(self.patterns):
            out.append(f"{constant}: Final = {self.patterns[constant]}")
            exported.append(constant)
        for alias in sorted(self.aliases):
            out.append(f"{alias} = {self.aliases[alias]}")
            exported.append(alias)

        out += ["", "", "# --- objects and classes " + "-" * 81, *structs]

        out += ["", "", "# --- tables used by ocpi.decode and the tests " + "-" * 60, ""]
        out.append("OBJECTS: Final[dict[str, type[OcpiObject]]] = {")
        out += [f'    "{name}": {name},' for name in self.objects]
        out += ["}", "PATCHES: Final[dict[str, type[OcpiObject]]] = {"]
        out += [f'    "{name}": {name}Patch,' for name in PATCHABLE]
        out += ["}", "ENUMS: Final[dict[str, type[enum.StrEnum]]] = {"]
        out += [f'    "{name}": {name},' for name in self.enums]
        out += ["}", "# Enum fields decoded as CiString because the spec says to skip unknown values."]
        out.append("OPEN_ENUM_FIELDS: Final[dict[type[OcpiObject], dict[str, type[enum.StrEnum]]]] = {")
        for obj, fields in self.open_enum_fields.items():
            text = ", ".join(f'"{f}": {e}' for f, e in fields.items())
            out.append(f"    {obj}: {{{text}}},")
        out += ["}", "# Required string fields where the spec explicitly allows `#NA`."]
        out.append("NA_ALLOWED: Final[dict[type[OcpiObject], frozenset[str]]] = {")
        for obj, na_fields in self.na_allowed.items():
            text = ", ".join(f'"{f}"' for f in na_fields)
            out.append(f"    {obj}: frozenset({{{text}}}),")
            if obj in PATCHABLE:
                out.append(f"    {obj}Patch: frozenset({{{text}}}),")
        out += ["}", "# d2 max lengths of the fields whose Struct accepts a longer post-d2 erratum length."]
        out.append("D2_MAX_LENGTH: Final[dict[type[OcpiObject], dict[str, int]]] = {")
        for obj, lengths in sorted(self.d2_max_length.items()):
            text = ", ".join(f'"{f}": {n}' for f, n in lengths.items())
            out.append(f"    {obj}: {{{text}}},")
            if obj in PATCHABLE:
                out.append(f"    {obj}Patch: {{{text}}},")
        out += ["}", "# Patterns whose matches are longer than their fields' declared length: the regex's length."]
        out.append("REGEX_MAX_LENGTH: Final[dict[str, int]] = {")
        for pattern, length in sorted(self.regex_lengths.items()):
            out.append(f"    {raw_literal(pattern)}: {length},")
        out += ["}", "# `?` fields with a documented default: null means the default, as absent does."]
        out.append("NULL_MEANS_DEFAULT: Final[dict[type[OcpiObject], dict[str, Any]]] = {")
        for obj, defaults in self.null_defaults.items():
            text = ", ".join(f'"{f}": {v!r}' for f, v in defaults.items())
            out.append(f"    {obj}: {{{text}}},")
        out += ["}", ""]
        exported += ["D2_MAX_LENGTH", "ENUMS", "NA_ALLOWED", "NULL_MEANS_DEFAULT", "OBJECTS"]
        exported += ["OPEN_ENUM_FIELDS", "PATCHES", "REGEX_MAX_LENGTH"]

        text = "\n".join(out)
        text = text.replace("@@ALL@@", "\n".join(f'    "{name}",' for name in sort_all(exported)))
        text = re.sub(r"\n{4,}", "\n\n\n", text)
        for number, line in enumerate(text.splitlines(), 1):
            if len(line) > 110:
                fail(f"generated line {number} is longer than 110 characters")
        return text


def wrap_field(name: str, annotation: str, default: str) -> str:
    """One field line, wrapped the way ruff format would when it exceeds the line length."""
    line = f"    {name}: {annotation} = {default}"
    return line if len(line) <= 110 else f"    {name}: {annotation} = (\n        {default}\n    )"


def sort_all(names: list[str]) -> list[str]:
    """Ruff's RUF022 order: SCREAMING_CASE, then CamelCase, then the rest, each alphabetical."""

    def key(name: str) -> tuple[int, list[tuple[int, str]]]:
        natural = [(int(part), "") if part.isdigit() else (-1, part) for part in re.split(r"(\d+)", name)]
        if name.isupper():
            return 0, natural
        return (1, natural) if name[:1].isupper() else (2, natural)

    return sorted(set(names), key=key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--spec", type=Path, default=DEFAULT_SPEC)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--check", action="store_true", help="exit 1 if --out is not up to date")
    args = parser.parse_args(argv)
    text = Generator(json.loads(args.spec.read_text(encoding="utf-8"))).render()
    if args.check:
        current = args.out.read_text(encoding="utf-8") if args.out.exists() else ""
        if current != text:
            print(f"{args.out} is out of date; run python tools/gen_model.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
