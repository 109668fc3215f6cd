"""OCPI 2.2.1-d2 domain model shared by the receivers and the pipeline.

Import paths: ocpi.model (Structs, enums), ocpi.types (the spec's value types and number rules), ocpi.decode,
ocpi.compat, ocpi.canonical, ocpi.identity, ocpi.patch, ocpi.status, ocpi.errors, ocpi.datetime. The model and
the names in `__all__` below are also re-exported here; the rest (`ocpi.identity.owner_key_part`,
`ocpi.canonical.canonical_json`, ...) only from their modules.
"""

from ocpi import model as _model
from ocpi.canonical import content_hash, to_builtins, to_ocpi_json
from ocpi.compat import STRICT, CompatProfile, Relaxation
from ocpi.datetime import InvalidDateTime, format_datetime, parse_datetime
from ocpi.decode import Decoded, decode, decode_list
from ocpi.errors import OcpiError, OcpiJsonError, OcpiValidationError, UnknownObjectError
from ocpi.identity import ObjectKey, ci_equal, ci_normalize
from ocpi.model import *  # noqa: F403
from ocpi.patch import (
    merge_connector,
    merge_evse,
    merge_location,
    merge_session,
    patch_connector,
    patch_evse,
    put_connector,
    put_evse,
)
from ocpi.status import OcpiStatus

__all__ = [
    "STRICT",
    "CompatProfile",
    "Decoded",
    "InvalidDateTime",
    "ObjectKey",
    "OcpiError",
    "OcpiJsonError",
    "OcpiStatus",
    "OcpiValidationError",
    "Relaxation",
    "UnknownObjectError",
    "ci_equal",
    "ci_normalize",
    "content_hash",
    "decode",
    "decode_list",
    "format_datetime",
    "merge_connector",
    "merge_evse",
    "merge_location",
    "merge_session",
    "parse_datetime",
    "patch_connector",
    "patch_evse",
    "put_connector",
    "put_evse",
    "to_builtins",
    "to_ocpi_json",
]
__all__ += _model.__all__
