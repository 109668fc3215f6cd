"""Exceptions of the OCPI domain. Receivers map them to the envelope: see each class's `status`."""

from __future__ import annotations

from typing import ClassVar

from ocpi.status import OcpiStatus

__all__ = ["OcpiError", "OcpiJsonError", "OcpiValidationError", "UnknownObjectError"]


class OcpiError(Exception):
    """Base class; `status` is the OCPI code the situation calls for."""

    status: ClassVar[OcpiStatus] = OcpiStatus.CLIENT_ERROR


class OcpiJsonError(OcpiError):
    """The body is not JSON at all (or nests deeper than the parser allows): HTTP 400 per the spec.

    A sibling of OcpiValidationError, not a subclass, so that `except OcpiValidationError` never swallows it.
    """

    status: ClassVar[OcpiStatus] = OcpiStatus.INVALID_PARAMETERS

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OcpiValidationError(OcpiError):
    """Valid JSON that is not a valid OCPI object: answer 2001 naming `path` (e.g. `$.cdr_token.uid`)."""

    status: ClassVar[OcpiStatus] = OcpiStatus.INVALID_PARAMETERS

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class UnknownObjectError(OcpiError, LookupError):
    """A sub-object PUT/PATCH names a parent (or a PATCH a target) that is not stored.

    The spec gives no code (ambiguity #6); 2003 is the closest for Locations, and the client's documented
    reaction (GET, then a full PUT) works with any error.
    """

    status: ClassVar[OcpiStatus] = OcpiStatus.UNKNOWN_LOCATION

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what
