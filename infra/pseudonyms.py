"""What a pseudonym looks like: the form the retention pass (`pipeline.retention.Pseudonymizer`) writes personal
identifiers in, known here so that a reader of stored objects (a receiver comparing a CDR POSTed again with the
held one) can tell a pseudonymised value from a clear one without the key."""

from __future__ import annotations

import re
from typing import Final

PREFIX: Final = "psn:"
DIGITS: Final = 32  # hex digits of the HMAC a pseudonym keeps
PSEUDONYM_LENGTH: Final = len(PREFIX) + DIGITS
_PSEUDONYM: Final = re.compile(rf"{PREFIX}[0-9a-f]{{{DIGITS}}}")


def is_pseudonym(value: str) -> bool:
    """Whether `value` is a pseudonym (`psn:` + 32 lower-case hex digits), not a clear value that merely starts
    with `psn:` (a CiString a CPO may well send), which would otherwise stay in clear for ever."""
    return len(value) == PSEUDONYM_LENGTH and _PSEUDONYM.fullmatch(value) is not None
