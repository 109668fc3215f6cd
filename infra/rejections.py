"""The record of a refused push on the rejections topic (JSON), shared by the receivers and the pipeline.

One record per push the receivers answered with a 2xxx or 3xxx status (receivers.rejections), keyed by the
partner id; `pipeline.rejections` writes it to the `rejections` table. JSON rather than Avro: the record is
operational telemetry read by our own agent only, and its schema is this Struct.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final

import msgspec


class Rejection(msgspec.Struct, frozen=True):
    """One refused push. `rejected_at` is UTC; `field_path` is the JSON path of a 2001's field, or empty."""

    rejection_id: str
    partner_id: str
    module: str
    method: str
    path: str
    ocpi_status: int
    http_status: int
    reason: str
    field_path: str
    request_id: str
    correlation_id: str
    rejected_at: datetime


COLUMNS: Final = tuple(Rejection.__struct_fields__)  # the `rejections` table's columns, in this order

_encoder: Final = msgspec.json.Encoder()
_decoder: Final = msgspec.json.Decoder(Rejection)


def encode_rejection(rejection: Rejection) -> bytes:
    return _encoder.encode(rejection)


def decode_rejection(value: bytes) -> Rejection:
    """Raises msgspec.DecodeError (a ValidationError for a wrong shape) for anything but a record."""
    return _decoder.decode(value)
