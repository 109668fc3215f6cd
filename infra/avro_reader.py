"""A reader for Avro binary generated as Python source from one parsed writer schema.

Why: fastavro's `schemaless_reader` reads every primitive through a file object and interprets the schema per
call; on our small records that costs more than the record's own bytes. The generated functions read straight
from the `bytes` with the schema's shape unrolled, and leave out null record fields as they go (null means
absent on the wire), so the codec's separate null-stripping walk goes too.

The output equals fastavro's (`return_record_name=True`, `return_record_name_override=True`) with null record
fields removed wherever `strip` asks; tests/unit/avro/test_generated_reader.py checks that on valid and damaged
records.
Only records read with no schema resolution take their values from it (the writer is the current revision); a
record of an older revision is checked by the reader of its own writer schema (the spec breaches below refused)
before fastavro reads and resolves it. Anything it cannot compile (a type or logical type we never write) makes
`compile_reader` return None and fastavro is used alone.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from decimal import Context
from typing import Any

Reader = Callable[[bytes, int], tuple[Any, int]]
"""(data, position) → (value, position after it).

Stricter than fastavro where the bytes break the spec: a negative union or enum index (fastavro takes it as a
Python index from the end), a boolean byte other than 0 or 1 (fastavro: true), a decimal of more digits than
its precision (fastavro: rounded to the precision) and a varint of more than 64 bits (fastavro: the bits beyond
the 64th dropped, a wrong long) are refused."""

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


class AvroReadError(ValueError):
    """The bytes are not a valid body of the schema (truncated, a bad index, a negative length)."""


class Unsupported(Exception):
    """The schema uses something the generator (or the writer's builder, `infra.avro_writer`) does not cover; the
    caller falls back to fastavro."""


_SHIFTS = (7, 14, 21, 28, 35, 42, 49, 56)  # of a long's 2nd to 9th byte


def _varint(data: bytes, pos: int, first: int) -> tuple[int, int]:
    """The zigzag-decoded long whose first byte `first` (with its continuation bit set) was at pos - 1."""
    value = first & 0x7F
    # A fixed loop over the 2nd to 9th byte, the 10th apart: no 64-bit test nor shift arithmetic per byte, which
    # cost about an eighth of the time of a timestamp's 8 bytes (an event carries several).
    for shift in _SHIFTS:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return (value >> 1) ^ -(value & 1), pos
    byte = data[pos]
    if byte > 1:  # the 10th byte holds the 64th bit only (fastavro drops the others)
        raise AvroReadError("long of more than 64 bits")
    value |= byte << 63
    return (value >> 1) ^ -(value & 1), pos + 1


def _eof() -> AvroReadError:
    return AvroReadError("unexpected end of data")


def _bad(what: str, value: int) -> AvroReadError:
    return AvroReadError(f"invalid {what} {value}")


def named_types(schema: Any) -> dict[str, Any]:
    """Every named definition (record, enum, fixed) of a fastavro-parsed schema by its full name, so that references
    by name resolve (the writer, `infra.avro_writer`, resolves them so too)."""
    names: dict[str, Any] = {}

    def collect(schema: Any) -> None:
        if isinstance(schema, list):
            for branch in schema:
                collect(branch)
        elif isinstance(schema, dict):
            kind = schema.get("type")
            if kind in ("record", "enum", "fixed"):
                names[schema["name"]] = schema
            if kind == "record":
                for field in schema["fields"]:
                    collect(field["type"])
            elif kind == "array":
                collect(schema["items"])
            elif kind == "map":
                collect(schema["values"])
            elif isinstance(kind, dict | list):
                collect(kind)

    collect(schema)
    return names


def resolve_name(names: dict[str, Any], schema: Any) -> Any:
    """The definition a reference by full name stands for (`names`: `named_types`); any other schema as it is."""
    if isinstance(schema, str) and schema not in _PRIMITIVES:
        try:
            return names[schema]
        except KeyError:
            raise Unsupported(f"unknown named type {schema}") from None
    return schema


class _Generator:
    def __init__(self, strip: Callable[[str], bool]) -> None:
        self.strip = strip
        self.names: dict[str, Any] = {}  # full name → definition
        self.functions: dict[str, str] = {}  # full name → generated function name
        self.source: list[str] = []
        self.namespace: dict[str, Any] = {
            "_varint": _varint, "_eof": _eof, "_bad": _bad, "_EPOCH": _EPOCH, "_timedelta": timedelta,
            "_unpack_double": struct.Struct("<d").unpack_from, "_unpack_float": struct.Struct("<f").unpack_from,
        }
        self.counter = 0
        self.stripping: list[bool] = [False]

    def fresh(self, prefix: str) -> str:
        self.counter += 1
        return f"{prefix}{self.counter}"

    def constant(self, prefix: str, value: Any) -> str:
        name = self.fresh(prefix)
        self.namespace[name] = value
        return name

    def collect(self, schema: Any) -> None:
        """Every named definition, so references by name resolve."""
        self.names.update(named_types(schema))

    def resolve(self, schema: Any) -> Any:
        return resolve_name(self.names, schema)

    # -- code emission: each emitter appends lines that leave the value in `target` and advance `p` ----------

    def long(self, target: str, ind: str) -> list[str]:
        return [
            f"{ind}b = d[p]",
            f"{ind}p += 1",
            f"{ind}if b & 0x80:",
            f"{ind}    {target}, p = _varint(d, p, b)",
            f"{ind}else:",
            f"{ind}    {target} = (b >> 1) ^ -(b & 1)",
        ]

    def sized(self, ind: str) -> list[str]:
        """Length in n, end in e, checked. One byte with its low bit clear is a length below 64: no zigzag."""
        return [f"{ind}b = d[p]", f"{ind}p += 1", f"{ind}if b & 0x81:", f"{ind}    if b & 0x80:",
                f"{ind}        n, p = _varint(d, p, b)", f"{ind}    else:", f"{ind}        n = (b >> 1) ^ -(b & 1)",
                f"{ind}    if n < 0:", f"{ind}        raise _bad('length', n)", f"{ind}else:", f"{ind}    n = b >> 1",
                f"{ind}e = p + n", f"{ind}if e > len(d):", f"{ind}    raise _eof()"]

    def optional(self, schema: Any) -> Any | None:
        """X of a ["null", X] union (X not itself a union), else None."""
        if isinstance(schema, list) and len(schema) == 2 and schema[0] == "null" and not isinstance(schema[1], list):
            return schema[1]
        return None

    def field(self, schema: Any, key: str, strip: bool, local: str | None = None) -> list[str]:
        """Read one record field into o[key], or into the variable `local` (None when null). A ["null", X] field
        is tested on its first byte (0: null, 2: X, anything else a longer or bad index), and left out of a
        stripped record when null."""
        value = local or self.fresh("v")
        inner = self.optional(schema)
        if inner is None:
            lines = self.emit(schema, value, "    ")
            if local:
                return lines
            if strip:
                return [*lines, f"    if {value} is not None:", f"        o[{key}] = {value}"]
            return [*lines, f"    o[{key}] = {value}"]
        present = self.fresh("h")
        if local:
            store, absent = [], [f"        {value} = None"]
        else:
            store, absent = [f"        o[{key}] = {value}"], [] if strip else [f"        o[{key}] = None"]
        return [
            "    b = d[p]",
            "    if b == 2:",
            "        p += 1",
            f"        {present} = True",
            "    elif b == 0:",
            "        p += 1",
            f"        {present} = False",
            "    else:",
            *self.long("u", "        "),
            "        if u != 0 and u != 1:",
            "            raise _bad('union index', u)",
            f"        {present} = u == 1",
            f"    if {present}:",
            *self.emit(inner, value, "        "),
            *store,
            *(["    else:", *absent] if absent else []),
        ]

    def emit(self, schema: Any, target: str, ind: str) -> list[str]:
        schema = self.resolve(schema)
        if isinstance(schema, list):
            return self.union(schema, target, ind)
        if isinstance(schema, str):
            return self.primitive(schema, target, ind)
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical is not None:
            return self.logical(schema, logical, target, ind)
        if kind in _PRIMITIVES:
            return self.primitive(kind, target, ind)
        if kind == "record":
            return [f"{ind}{target}, p = {self.record(schema)}(d, p)"]
        if kind == "enum":
            symbols = self.constant("_symbols", tuple(schema["symbols"]))
            return [*self.long("i", ind), f"{ind}if not 0 <= i < {len(schema['symbols'])}:",
                    f"{ind}    raise _bad('enum index', i)", f"{ind}{target} = {symbols}[i]"]
        if kind == "array":
            return self.blocks(schema["items"], target, ind, keyed=False)
        if kind == "map":
            return self.blocks(schema["values"], target, ind, keyed=True)
        raise Unsupported(f"type {kind}")

    def primitive(self, kind: str, target: str, ind: str) -> list[str]:
        if kind == "null":
            return [f"{ind}{target} = None"]
        if kind == "boolean":  # one byte, 0 or 1 (fastavro takes any other byte as true)
            return [f"{ind}b = d[p]", f"{ind}if b > 1:", f"{ind}    raise _bad('boolean byte', b)",
                    f"{ind}{target} = b == 1", f"{ind}p += 1"]
        if kind in ("int", "long"):
            return self.long(target, ind)
        if kind in ("float", "double"):
            size = 4 if kind == "float" else 8
            return [f"{ind}if p + {size} > len(d):", f"{ind}    raise _eof()",
                    f"{ind}{target} = _unpack_{kind}(d, p)[0]", f"{ind}p += {size}"]
        if kind == "string":
            return [*self.sized(ind), f"{ind}{target} = d[p:e].decode()", f"{ind}p = e"]
        if kind == "bytes":
            return [*self.sized(ind), f"{ind}{target} = d[p:e]", f"{ind}p = e"]
        raise Unsupported(f"primitive {kind}")

    def logical(self, schema: dict[str, Any], logical: str, target: str, ind: str) -> list[str]:
        kind = schema["type"]
        if logical == "timestamp-micros" and kind == "long":
            # timedelta(0, 0, n) is timedelta(microseconds=n) (the same value, the same OverflowError) without the
            # keyword parsing: a third less per timestamp, and an event carries several.
            return [*self.long("n", ind), f"{ind}{target} = _EPOCH + _timedelta(0, 0, n)"]
        if logical == "decimal" and kind == "bytes":
            # As fastavro: the unscaled integer through a context of the schema's precision, then scaled. But an
            # unscaled integer of more digits than the precision is refused: fastavro rounds it to the precision
            # (a wrong value), and converting a huge one to a Decimal takes seconds.
            precision = schema["precision"]
            context = self.constant("_context", Context(prec=precision))
            limit = self.constant("_limit", 10**precision)
            scale = schema.get("scale", 0)
            return [*self.sized(ind),
                    f"{ind}n = int.from_bytes(d[p:e], 'big', signed=True)",
                    f"{ind}if not -{limit} < n < {limit}:",
                    f"{ind}    raise _bad('decimal of more than {precision} digits, length', e - p)",
                    f"{ind}{target} = {context}.create_decimal(n).scaleb({-scale}, {context})",
                    f"{ind}p = e"]
        raise Unsupported(f"logical type {logical} on {kind}")

    def union(self, branches: list[Any], target: str, ind: str) -> list[str]:
        resolved = [self.resolve(b) for b in branches]
        records = [b for b in resolved if isinstance(b, dict) and b.get("type") == "record"]
        named = len(records) > 1  # return_record_name_override: (name, value) only where several records
        lines = self.long("u", ind)
        for index, branch in enumerate(resolved):
            lines.append(f"{ind}{'if' if index == 0 else 'elif'} u == {index}:")
            lines += self.emit(branch, target, ind + "    ")
            if named and branch in records:
                lines.append(f"{ind}    {target} = ({branch['name']!r}, {target})")
        lines += [f"{ind}else:", f"{ind}    raise _bad('union index', u)"]
        return lines

    def blocks(self, items: Any, target: str, ind: str, *, keyed: bool) -> list[str]:
        count, item, key = self.fresh("c"), self.fresh("x"), self.fresh("k")
        inner = ind + "        "
        lines = [f"{ind}{target} = {{}}" if keyed else f"{ind}{target} = []", *self.long(count, ind),
                 f"{ind}while {count}:", f"{ind}    if {count} < 0:  # a block with its size in bytes next",
                 f"{ind}        {count} = -{count}", *self.long("_", ind + "        "),
                 f"{ind}    for _ in range({count}):"]
        if keyed:
            lines += self.primitive("string", key, inner)
        lines += self.emit(items, item, inner)
        if not keyed:
            lines.append(f"{inner}{target}.append({item})")
        elif self.stripping[-1]:
            lines += [f"{inner}if {item} is not None:", f"{inner}    {target}[{key}] = {item}"]
        else:
            lines.append(f"{inner}{target}[{key}] = {item}")
        return [*lines, *self.long(count, ind + "    ")]

    def record(self, schema: dict[str, Any], build: Callable[..., Any] | None = None) -> str:
        """The function reading a record: a dict, or `build` called with the field values in schema order."""
        name = schema["name"]
        function = self.functions.get(name)
        if function is not None:
            return function
        function = self.fresh("_record")
        self.functions[name] = function  # before the body: recursive types refer to themselves
        strip = self.strip(name)
        values = [self.fresh("f") for _ in schema["fields"]] if build is not None else []
        lines = [f"def {function}(d, p):", *([] if values else ["    o = {}"])]
        self.stripping.append(strip)  # maps in this record follow it
        for i, field in enumerate(schema["fields"]):
            lines += self.field(field["type"], repr(field["name"]), strip, values[i] if values else None)
        self.stripping.pop()
        if build is None:
            lines.append("    return o, p")
        else:
            lines.append(f"    return {self.constant('_build', build)}({', '.join(values)}), p")
        self.source.append("\n".join(lines))
        return function


def compile_reader(schema: dict[str, Any], strip: Callable[[str], bool] = lambda name: False,
                   build: Callable[..., Any] | None = None) -> Reader | None:
    """A reader of `schema` (fastavro-parsed, full names), or None when it uses what the generator lacks.

    `strip(name)` says, per record full name, whether that record's null fields (and its maps' null values)
    are left out. `build`: called with the top record's field values (None for a null), in schema order, for the
    value read instead of a dict (the codec builds its `DecodedEvent` so, without a dict to unpack)."""
    generator = _Generator(strip)
    try:
        generator.collect(schema)
        top = generator.record(generator.resolve(schema), build)
    except Unsupported:
        return None
    namespace = dict(generator.namespace)
    exec(compile("\n\n".join(generator.source), f"<avro reader {schema['name']}>", "exec"), namespace)  # noqa: S102
    read: Reader = namespace[top]
    return read
