"""Shared paths and helpers of the ocpi tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from ocpi import OcpiValidationError, decode
from ocpi.compat import CompatProfile

REPO = Path(__file__).resolve().parents[3]
SPEC_DIR = REPO.parent / "shared" / "ocpi"
SPEC_FILE = SPEC_DIR / "ocpi-2.2.1-objects.json"
EXAMPLES = SPEC_DIR / "examples"


def spec() -> dict[str, Any]:
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text(encoding="utf-8"))


def dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


def assert_invalid(
    body: Any, model: type, path: str, reason: str | None = None, profile: CompatProfile | None = None
) -> OcpiValidationError:
    """Decode must fail with exactly `path` (and, if given, a reason containing `reason`)."""
    raw = body if isinstance(body, bytes) else dumps(body)
    with pytest.raises(OcpiValidationError) as info:
        decode(raw, model, profile=profile)
    assert info.value.path == path, f"{info.value.path}: {info.value.reason}"
    if reason is not None:
        assert reason in info.value.reason, info.value.reason
    return info.value
