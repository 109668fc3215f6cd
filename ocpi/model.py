"""The OCPI 2.2.1-d2 Structs and enums (generated into ocpi._generated; this is the public import path)."""

from functools import cache

import msgspec

from ocpi import _generated
from ocpi._generated import *  # noqa: F403

__all__ = [*_generated.__all__, "max_length"]


@cache
def max_length(struct: type[msgspec.Struct], field: str) -> int:
    """The most characters OCPI allows in the string field `field` of `struct`, as the generated model holds it (from
    ocpi-2.2.1-objects.json): other modules size their checks from here rather than restating the spec's numbers."""
    info = msgspec.inspect.type_info(struct)
    assert isinstance(info, msgspec.inspect.StructType)
    for candidate in info.fields:
        if candidate.name == field:
            kind = candidate.type
            if isinstance(kind, msgspec.inspect.UnionType):  # an optional field: its one string member
                kind = next(member for member in kind.types if isinstance(member, msgspec.inspect.StrType))
            if isinstance(kind, msgspec.inspect.StrType) and kind.max_length is not None:
                return kind.max_length
            raise TypeError(f"{struct.__name__}.{field} is not a string of bounded length")
    raise KeyError(f"{struct.__name__} has no field {field!r}")
