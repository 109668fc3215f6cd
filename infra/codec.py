"""Avro single-object codec of the Kafka wire contract (ARCHITECTURE.md, "Wire contract").

A Kafka value is ``b"\\xc3\\x01"`` + the 8-byte CRC-64-AVRO fingerprint of the writer schema's Parsing
Canonical Form (little endian, exactly as ``fastavro.schema.fingerprint`` returns it) + the schemaless Avro
body. The ``.avsc`` files under ``avro/v<N>/`` (shipped in the wheel as ``infra/avro_schemas/``) are the
registry: every file of every revision is parsed once, lazily on first use, and indexed by fingerprint, so a
record written with an older revision is read with its own writer schema and resolved to the current one.

API
---
``encode_event(event: Mapping[str, Any]) -> bytes``
    Single-object encoding of an ``ocpi.pipeline.OcpiEvent`` with the current schema. ``event`` holds the
    envelope fields of ARCHITECTURE.md; ``event["payload"]`` is ``(payload_type, payload_dict)`` with
    ``payload_type`` one of ``PAYLOAD_TYPES`` (the union branch is chosen by that name, never guessed).
    ``payload_dict`` is what ``msgspec.to_builtins(obj, builtin_types=(datetime, Decimal))`` gives with UNSET
    fields dropped: nested dicts and lists, enum values as str, tz-aware datetimes, ``Decimal`` numbers.
    Absent optional keys encode as null; unknown keys and missing required keys are errors. Numbers are
    ``decimal(18, 4)``: more than 4 decimal places is an error unless the extra digits are zeros
    (``Decimal("8.50000")`` is accepted as 8.5); floats, ints and strings in a number field are errors. Not
    checked (fastavro only counts the digits of the given Decimal): magnitudes of 10^14 and more, which do not
    fit decimal(18, 4): they are written, but ``decode_event`` refuses them (more digits than the precision), so
    such a record would be a dead letter; bounding numbers (``ocpi.types``: 14 integer digits) is the domain
    validation's job, before anything is encoded.
``decode_event(data: bytes) -> DecodedEvent``
    Checks the marker, looks the fingerprint up among all known revisions, decodes and resolves to the
    current schema (records of the current revision through ``infra.avro_reader``'s generated reader, which
    gives what fastavro gives, several times faster; a record of an older revision through fastavro, after the
    reader generated from its own writer schema checked it: fastavro reads some spec breaches as other values, a
    decimal of more digits than its precision rounded, and those are refused whatever the revision). The payload
    dict has null (= absent) fields left out at every level, so it has the same shape as the dict that was
    encoded; datetimes come back tz-aware UTC, numbers as ``Decimal`` with exponent -4 (``Decimal("8.5000")``:
    equal to, but not the same digits as, ``Decimal("8.5")``).
``encode_record(schema_name: str, datum: Mapping[str, Any]) -> bytes``
``decode_record(data: bytes, schema_name: str | None = None) -> dict[str, Any]``
    Generic single-object helpers for any record in the registry (current revision on write). Values of a
    union with several records use fastavro's tuple notation ``(full record name, value)`` both ways, so
    ``encode_record(name, decode_record(data))`` round-trips; nulls are kept.
``fingerprint(schema_name: str) -> bytes``
    The 8-byte fingerprint of the current revision of ``schema_name``.
``AvroCodecError``
    The only exception raised for bad data, unknown schemas and unusable schema files; fastavro's own
    exceptions never escape.
``AvroCodec``
    The same operations bound to one schema directory (``AvroCodec.from_directory``); the module functions use
    a default instance on the packaged/repo schemas.

Encoding needs no per-message schema work: parsed schemas, fingerprints, headers and the writers built from the
schemas (``infra.avro_writer``: fastavro's bytes, fastavro itself for what they are not sure of) are made once.

Schema evolution rules
----------------------
- Never edit a committed ``avro/v<N>/`` file. A change is a new revision: bump ``SCHEMA_VERSION`` in
  ``tools/gen_avro.py`` and regenerate; older revisions stay in the tree so their records remain readable.
- Add fields only with a default (``["null", T]`` with default null, arrays with a default, ...).
- Never remove or rename a field, record or enum (Avro resolution matches by name; a reader would lose data
  or fail). Never change a field's type except by Avro promotion (int → long, ...).
- Enum symbols and union branches may only be appended (never removed, renamed or reordered). A new symbol
  is always readable by a newer reader; an *older* reader schema can only resolve it through the enum's
  ``default``, so a new symbol needs the enum default. Defaults are set where OCPI has a catch-all
  (``Status.UNKNOWN``, ``ImageCategory.OTHER``, ``TokenType.OTHER``); elsewhere any default would turn an
  unknown value into a wrong real one, so those enums have none. In this registry an older consumer does not
  even know a newer writer's fingerprint (``AvroCodecError``), hence: deploy consumers before producers.
- Encoding rejects values outside an enum's symbols. If OCPI relaxations ever admit out-of-spec enum values,
  map them before encoding or carry that field as a string in a new revision.
- A new revision must change the Parsing Canonical Form: two revisions with the same fingerprint are
  rejected when the registry loads. Changes the PCF ignores (docs, defaults, logical-type attributes) cannot
  be a revision of their own; fold them into the next revision that changes the PCF.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.resources
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal, DecimalException, InvalidOperation
from importlib.resources.abc import Traversable
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import fastavro
import msgspec
from fastavro.read import SchemaResolutionError
from fastavro.schema import SchemaParseException, to_parsing_canonical_form
from fastavro.schema import fingerprint as _crc64_hex

from infra.avro_reader import AvroReadError, Reader, compile_reader
from infra.avro_writer import compile_writer

__all__ = [
    "EVENT_SCHEMA",
    "MARKER",
    "PAYLOAD_TYPES",
    "AvroCodec",
    "AvroCodecError",
    "DecodedEvent",
    "decode_event",
    "decode_record",
    "encode_event",
    "encode_record",
    "fingerprint",
    "schema_root",
]

MARKER = b"\xc3\x01"
HEADER_SIZE = len(MARKER) + 8
EVENT_SCHEMA = "ocpi.pipeline.OcpiEvent"
PAYLOAD_TYPES = (
    "Location",
    "EVSE",
    "Connector",
    "Session",
    "CDR",
    "LocationPatch",
    "EVSEPatch",
    "ConnectorPatch",
    "SessionPatch",
)

# What fastavro raises for data that does not fit the schema or bytes that are not a valid body (truncated
# input → EOFError, bad decimals → InvalidOperation, wrong Python types → TypeError/AttributeError). A decimal
# whose unscaled value has more digits than the decimal context's exponent range allows (a huge byte string)
# raises decimal.Overflow, which is a DecimalException but not an InvalidOperation.
_FASTAVRO_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    TypeError,
    KeyError,
    IndexError,
    AttributeError,
    EOFError,
    OverflowError,
    DecimalException,
    SchemaResolutionError,
    SchemaParseException,
)
# What the generated reader raises for bytes that are not a valid body (IndexError: truncated input).
_GENERATED_ERRORS: tuple[type[BaseException], ...] = (AvroReadError, IndexError, UnicodeDecodeError, OverflowError,
                                                      DecimalException)
_LOAD_ERRORS: tuple[type[BaseException], ...] = (OSError, *_FASTAVRO_ERRORS)  # JSONDecodeError: ValueError
_SCALE = 4  # decimal(18, 4), as generated by tools/gen_avro.py
_QUANTUM = Decimal(1).scaleb(-_SCALE)
_VERSION_DIR = re.compile(r"^v(\d+)$")
_SUFFIX = ".avsc"


class AvroCodecError(Exception):
    """Data cannot be encoded/decoded with the registry's schemas, or the registry itself is unusable."""


class DecodedEvent(msgspec.Struct, frozen=True):
    """An ``OcpiEvent`` read from the wire, resolved to the current schema revision."""

    # A Struct, not a frozen dataclass: built once per record read, and a frozen dataclass's __init__ (one
    # object.__setattr__ per field) cost a fifth of the whole decode.

    event_id: str
    partner_id: str
    module: str
    operation: str
    level: str
    country_code: str
    party_id: str
    object_id: str
    evse_uid: str | None
    connector_id: str | None
    received_at: datetime
    request_id: str
    correlation_id: str
    from_country_code: str | None
    from_party_id: str | None
    to_country_code: str | None
    to_party_id: str | None
    source: str
    content_hash: str
    relaxations: list[str]
    payload_type: str
    payload: dict[str, Any]
    schema_version: int
    """Revision (``avro/v<N>``) the record was written with."""

    def to_event(self) -> dict[str, Any]:
        """The mapping ``encode_event`` takes (for re-publishing, e.g. a replay)."""
        event = {name: getattr(self, name) for name in self.__struct_fields__}
        del event["schema_version"]
        event["payload"] = (event.pop("payload_type"), event["payload"])
        return event


@dataclass(frozen=True, slots=True)
class _Schema:
    name: str
    version: int
    parsed: Any
    fingerprint: bytes
    header: bytes
    source: str


def _strip_nulls(value: Any) -> Any:
    """Leave out null record fields at every level: null means absent on the wire."""
    # fastavro builds plain dicts and lists; scalars are not recursed into (most of a payload's values).
    if type(value) is dict:
        return {k: _strip_nulls(v) if type(v) in _CONTAINERS else v for k, v in value.items() if v is not None}
    if type(value) is list:
        return [_strip_nulls(v) if type(v) in _CONTAINERS else v for v in value]
    return value


_CONTAINERS: Final = (dict, list)


def _fit_decimals(value: Any) -> Any:
    """``value`` with every Decimal that has more than 4 places but equals its 4-place rounding (trailing
    zeros) replaced by that rounding; the same object when nothing changed."""
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -_SCALE:
            try:
                fitted = value.quantize(_QUANTUM)
            except InvalidOperation:
                return value
            return fitted if fitted == value else value
        return value
    if isinstance(value, Mapping):
        items = {k: _fit_decimals(v) for k, v in value.items()}
        return items if any(items[k] is not v for k, v in value.items()) else value
    if isinstance(value, list | tuple):
        seq = [_fit_decimals(v) for v in value]
        if all(a is b for a, b in zip(seq, value, strict=True)):
            return value
        return tuple(seq) if isinstance(value, tuple) else seq
    return value


def _inexact_decimals(value: Any, path: str = "") -> Iterator[str]:
    """``path=value`` of every Decimal that does not fit the schema's scale (for error messages)."""
    if isinstance(value, Decimal):
        exponent = value.as_tuple().exponent
        if isinstance(exponent, int) and exponent < -_SCALE:
            yield f"{path}={value}"
    elif isinstance(value, Mapping):
        for key, item in value.items():
            yield from _inexact_decimals(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from _inexact_decimals(item, f"{path}[{index}]")


def _describe(exc: BaseException) -> str:
    # fastavro may put whole schemas into its messages; keep ours readable.
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def _short_name(full_name: str) -> str:
    return full_name.rpartition(".")[2]


_AFTER_ENVELOPE: Final = ("payload_type", "payload", "schema_version")  # DecodedEvent's fields after the envelope's


def _event_builder(event: _Schema) -> Callable[..., DecodedEvent] | None:
    """What the generated reader builds a current `OcpiEvent` with: its DecodedEvent from the envelope's values in
    schema order (no dict unpacked by keyword: a tenth of the decode). None when the envelope's fields are not
    DecodedEvent's in the same order (the reader returns a dict then, taken by name)."""
    names = [field["name"] for field in event.parsed["fields"]]
    if names[-1:] != ["payload"] or [*names[:-1], *_AFTER_ENVELOPE] != list(DecodedEvent.__struct_fields__):
        return None
    version = event.version

    def build(*values: Any) -> DecodedEvent:
        branch, payload = values[-1]
        return DecodedEvent(*values[:-1], _short_name(branch), payload, version)  # type: ignore[call-arg]

    return build


class AvroCodec:
    """Encoder/decoder over every revision of the schemas below one directory (``v<N>/<full name>.avsc``)."""

    def __init__(self, schemas: list[_Schema], *, generated_reader: bool = True,
                 generated_writer: bool = True) -> None:
        self._by_fingerprint: dict[bytes, _Schema] = {}
        self._current: dict[str, _Schema] = {}
        for schema in sorted(schemas, key=lambda s: (s.name, s.version)):
            clash = self._by_fingerprint.get(schema.fingerprint)
            if clash is not None:
                raise AvroCodecError(
                    f"{schema.source} has the same fingerprint as {clash.source}: a new revision must change"
                    " the schema's canonical form"
                )
            self._by_fingerprint[schema.fingerprint] = schema
            self._current[schema.name] = schema  # sorted: the last one wins, i.e. the highest revision
        event = self._current.get(EVENT_SCHEMA)
        if event is None:
            raise AvroCodecError(f"no {EVENT_SCHEMA} schema among {[s.source for s in schemas]}")
        self._event = event
        names = [self._record_name(b) for b in self._payload_union(event)]
        branches = {_short_name(n): n for n in names}
        missing = set(PAYLOAD_TYPES) - set(branches)
        if missing:
            raise AvroCodecError(f"{event.source}: payload union lacks {sorted(missing)}")
        self._payload_branch: dict[str, str] = {t: branches[t] for t in PAYLOAD_TYPES}
        # Every record below the envelope is payload: null fields left out there, kept in the envelope.
        self._event_built = _event_builder(event)
        self._event_reader = (compile_reader(event.parsed, strip=lambda name: name != EVENT_SCHEMA,
                                             build=self._event_built) if generated_reader else None)
        # Per writer fingerprint, the generated reader `_check` runs before fastavro reads a record (None: fastavro
        # alone, what the generator lacks); none without `generated_reader`, the reference that is fastavro alone.
        self._checkers: dict[bytes, Reader | None] = {}
        self._checked = generated_reader
        # Per schema fingerprint, the writer `infra.avro_writer` built (None: fastavro alone), built on first use;
        # none without `generated_writer`, the reference that is fastavro alone.
        self._writers: dict[bytes, Callable[[bytes, Any], bytes] | None] = {}
        self._generated_writer = generated_writer

    @classmethod
    def from_directory(cls, root: Traversable, *, generated_reader: bool = True,
                       generated_writer: bool = True) -> AvroCodec:
        """Parse every ``v<N>/*.avsc`` below ``root`` (a path or an ``importlib.resources`` traversable).
        ``generated_reader=False`` decodes every record with fastavro alone, unchecked, and
        ``generated_writer=False`` encodes every record with fastavro alone (the references the generated ones are
        tested against)."""
        return cls(list(_load_schemas(root)), generated_reader=generated_reader, generated_writer=generated_writer)

    @staticmethod
    def _payload_union(event: _Schema) -> list[Any]:
        for field in event.parsed["fields"]:
            if field["name"] == "payload":
                return list(field["type"])
        raise AvroCodecError(f"{event.source}: no payload field")

    @staticmethod
    def _record_name(branch: Any) -> str:
        # An unnamed branch (an array, a map) has its type instead: no payload type, reported as missing ones.
        return str(branch.get("name", branch.get("type")) if isinstance(branch, dict) else branch)

    def _schema(self, schema_name: str) -> _Schema:
        try:
            return self._current[schema_name]
        except KeyError:
            raise AvroCodecError(f"unknown schema {schema_name!r}") from None

    def fingerprint(self, schema_name: str) -> bytes:
        return self._schema(schema_name).fingerprint

    def _encode(self, schema: _Schema, datum: Mapping[str, Any], what: str) -> bytes:
        try:
            return self._write(schema, datum)
        except _FASTAVRO_ERRORS as exc:
            # Rare path: Decimal("8.50000") (JSON keeps trailing zeros) has 4 places of value but 5 digits
            # after the point, which fastavro rejects. Drop such zeros and retry once; real extra places fail.
            fitted = _fit_decimals(datum)
            if fitted is not datum:
                try:
                    return self._write(schema, fitted)
                except _FASTAVRO_ERRORS:
                    pass
            inexact = ", ".join(_inexact_decimals(fitted))
            hint = f" (more than {_SCALE} decimal places: {inexact})" if inexact else ""
            raise AvroCodecError(f"cannot encode {what}: {_describe(exc)}{hint}") from exc

    def _write(self, schema: _Schema, datum: Mapping[str, Any]) -> bytes:
        if schema.fingerprint not in self._writers:
            self._writers[schema.fingerprint] = compile_writer(schema.parsed) if self._generated_writer else None
        write = self._writers[schema.fingerprint]
        if write is not None:
            # `Unwritable`, or a value it cannot take: fastavro writes it, or refuses it, as it always did.
            with contextlib.suppress(Exception):
                return write(schema.header, datum)
        out = BytesIO()
        out.write(schema.header)
        # strict_allow_default: unknown keys and missing required fields fail instead of being dropped or
        # guessed; absent keys with a default (every nullable field) encode as the default.
        fastavro.schemaless_writer(out, schema.parsed, datum, strict_allow_default=True)
        return out.getvalue()

    def encode_record(self, schema_name: str, datum: Mapping[str, Any]) -> bytes:
        return self._encode(self._schema(schema_name), datum, schema_name)

    def encode_event(self, event: Mapping[str, Any]) -> bytes:
        try:
            payload_type, payload = event["payload"]
        except (KeyError, TypeError, ValueError):
            raise AvroCodecError("event['payload'] must be a (payload_type, payload_dict) tuple") from None
        branch = self._payload_branch.get(payload_type)
        if branch is None:
            raise AvroCodecError(f"unknown payload_type {payload_type!r}; expected one of {PAYLOAD_TYPES}")
        datum = dict(event)
        datum["payload"] = (branch, payload)  # fastavro tuple notation: explicit union branch
        return self._encode(self._event, datum, f"OcpiEvent {event.get('event_id')!r} ({payload_type})")

    def _writer(self, data: bytes, schema_name: str | None) -> _Schema:
        """The writer schema named by the single-object header (checked to be ``schema_name`` if given)."""
        if not isinstance(data, bytes | bytearray | memoryview):
            raise AvroCodecError(f"expected bytes, got {type(data).__name__}")
        if len(data) < HEADER_SIZE or data[:2] != MARKER:
            raise AvroCodecError("not an Avro single-object encoding (missing C3 01 marker)")
        fp = bytes(data[2:HEADER_SIZE])
        writer = self._by_fingerprint.get(fp)
        if writer is None:
            raise AvroCodecError(f"unknown schema fingerprint {fp.hex()} (a newer or foreign writer?)")
        if schema_name is not None and writer.name != schema_name:
            raise AvroCodecError(f"expected a {schema_name} record, got {writer.name}")
        return writer

    def _check(self, data: bytes, writer: _Schema) -> None:
        """Refuse the body where the reader generated from `writer` refuses it (`infra.avro_reader.Reader`: a decimal
        of more digits than its precision, a long of more than 64 bits, a negative union or enum index, a boolean byte
        other than 0 or 1), which fastavro reads as another value (the decimal rounded, the long wrapped, the index
        taken from the end): a record of an older revision, or one `decode_record` reads, is refused as a record of
        the current revision is by `decode_event`, not read as something its writer never wrote."""
        if not self._checked:
            return
        if writer.fingerprint not in self._checkers:
            self._checkers[writer.fingerprint] = compile_reader(writer.parsed)  # lazily: older revisions are rare
        check = self._checkers[writer.fingerprint]
        if check is None:  # what the generator lacks: fastavro alone
            return
        try:
            check(bytes(data), HEADER_SIZE)
        except _GENERATED_ERRORS as exc:
            raise AvroCodecError(f"cannot decode {writer.name} (v{writer.version}): {_describe(exc)}") from exc

    def _read(self, data: bytes, writer: _Schema) -> dict[str, Any]:
        """The body after the header, checked (`_check`), read by fastavro with `writer` and resolved to the current
        revision."""
        name = writer.name
        reader = self._current[name]
        self._check(data, writer)
        buf = BytesIO(data)
        buf.seek(HEADER_SIZE)
        try:
            record = fastavro.schemaless_reader(
                buf,
                writer.parsed,
                None if reader is writer else reader.parsed,  # no resolution work for current records
                return_record_name=True,
                return_record_name_override=True,  # tuples only where a union has several records
            )
        except _FASTAVRO_ERRORS as exc:
            raise AvroCodecError(f"cannot decode {name} (v{writer.version}): {_describe(exc)}") from exc
        if buf.tell() != len(data):
            raise AvroCodecError(f"{len(data) - buf.tell()} trailing bytes after the {name} record")
        if not isinstance(record, dict):
            raise AvroCodecError(f"{name} did not decode to a record")
        return record

    def decode_record(self, data: bytes, schema_name: str | None = None) -> dict[str, Any]:
        return self._read(data, self._writer(data, schema_name))

    def decode_event(self, data: bytes) -> DecodedEvent:
        writer = self._writer(data, EVENT_SCHEMA)
        if writer is self._event and self._event_reader is not None:
            # The current revision: the generated reader, which leaves the payload's nulls out as it reads.
            body = bytes(data)
            try:
                record, end = self._event_reader(body, HEADER_SIZE)
            except _GENERATED_ERRORS as exc:
                raise AvroCodecError(f"cannot decode {EVENT_SCHEMA} (v{writer.version}): {_describe(exc)}") from exc
            if end != len(body):
                raise AvroCodecError(f"{len(body) - end} trailing bytes after the {EVENT_SCHEMA} record")
            if self._event_built is not None:
                return record  # the DecodedEvent `_event_builder` made
            branch, payload = record.pop("payload")
        else:
            record = self._read(data, writer)
            branch, payload = record.pop("payload")
            payload = _strip_nulls(payload)
        return DecodedEvent(
            **record,
            payload_type=_short_name(branch),
            payload=payload,
            schema_version=writer.version,
        )


def _load_schemas(root: Traversable) -> Iterator[_Schema]:
    if not root.is_dir():
        raise AvroCodecError(f"schema directory {root} not found")
    for version_dir in root.iterdir():
        match = _VERSION_DIR.match(version_dir.name)
        if match is None or not version_dir.is_dir():
            continue
        version = int(match.group(1))
        for file in version_dir.iterdir():
            if file.name.endswith(_SUFFIX):
                yield _load_schema(file, version)


def _load_schema(file: Traversable, version: int) -> _Schema:
    source = f"v{version}/{file.name}"
    name = file.name.removesuffix(_SUFFIX)
    try:
        # A fresh named-types table per file: every revision defines the same names differently.
        parsed = fastavro.parse_schema(json.loads(file.read_text(encoding="utf-8")), named_schemas={})
    except _LOAD_ERRORS as exc:
        raise AvroCodecError(f"cannot load schema {source}: {_describe(exc)}") from exc
    if not isinstance(parsed, dict) or parsed.get("name") != name:
        raise AvroCodecError(f"{source} must define the record {name}")
    fp = bytes.fromhex(_crc64_hex(to_parsing_canonical_form(parsed), "CRC-64-AVRO"))
    return _Schema(name, version, parsed, fingerprint=fp, header=MARKER + fp, source=source)


def schema_root() -> Traversable:
    """Where the schemas are: ``infra/avro_schemas`` in an installed wheel, else the repo's ``avro/``."""
    packaged = importlib.resources.files(__package__ or "infra") / "avro_schemas"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "avro"


@functools.cache
def _codec() -> AvroCodec:
    return AvroCodec.from_directory(schema_root())


def encode_event(event: Mapping[str, Any]) -> bytes:
    return _codec().encode_event(event)


def decode_event(data: bytes) -> DecodedEvent:
    return _codec().decode_event(data)


def encode_record(schema_name: str, datum: Mapping[str, Any]) -> bytes:
    return _codec().encode_record(schema_name, datum)


def decode_record(data: bytes, schema_name: str | None = None) -> dict[str, Any]:
    return _codec().decode_record(data, schema_name)


def fingerprint(schema_name: str) -> bytes:
    return _codec().fingerprint(schema_name)
