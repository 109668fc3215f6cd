"""The OCPI 2.2.1-d2 Structs and enums (generated into ocpi._generated; this is the public import path)."""

from ocpi import _generated
from ocpi._generated import *  # noqa: F403

__all__ = list(_generated.__all__)
