"""OCPI status codes (digest 05 §4): the 4-digit `status_code` of every response envelope."""

from __future__ import annotations

from enum import IntEnum

__all__ = ["OcpiStatus"]


class OcpiStatus(IntEnum):
    """Every code OCPI 2.2.1-d2 defines. Custom ranges (x900-x999) are deliberately not members."""

    SUCCESS = 1000

    CLIENT_ERROR = 2000
    INVALID_PARAMETERS = 2001
    NOT_ENOUGH_INFORMATION = 2002
    UNKNOWN_LOCATION = 2003
    UNKNOWN_TOKEN = 2004

    SERVER_ERROR = 3000
    UNABLE_TO_USE_CLIENT_API = 3001
    UNSUPPORTED_VERSION = 3002
    NO_MATCHING_ENDPOINTS = 3003

    HUB_ERROR = 4000
    UNKNOWN_RECEIVER = 4001
    TIMEOUT_ON_FORWARDED_REQUEST = 4002
    CONNECTION_PROBLEM = 4003

    @property
    def description(self) -> str:
        """The spec's meaning of the code, suitable for `status_message`."""
        return _DESCRIPTIONS[self]

    @property
    def is_success(self) -> bool:
        return 1000 <= self < 2000


_DESCRIPTIONS: dict[OcpiStatus, str] = {
    OcpiStatus.SUCCESS: "Generic success",
    OcpiStatus.CLIENT_ERROR: "Generic client error",
    OcpiStatus.INVALID_PARAMETERS: "Invalid or missing parameters",
    OcpiStatus.NOT_ENOUGH_INFORMATION: "Not enough information",
    OcpiStatus.UNKNOWN_LOCATION: "Unknown Location",
    OcpiStatus.UNKNOWN_TOKEN: "Unknown Token",
    OcpiStatus.SERVER_ERROR: "Generic server error",
    OcpiStatus.UNABLE_TO_USE_CLIENT_API: "Unable to use the client's API",
    OcpiStatus.UNSUPPORTED_VERSION: "Unsupported version",
    OcpiStatus.NO_MATCHING_ENDPOINTS: "No matching endpoints or expected endpoints missing",
    OcpiStatus.HUB_ERROR: "Generic Hub error",
    OcpiStatus.UNKNOWN_RECEIVER: "Unknown receiver",
    OcpiStatus.TIMEOUT_ON_FORWARDED_REQUEST: "Timeout on forwarded request",
    OcpiStatus.CONNECTION_PROBLEM: "Connection problem",
}
