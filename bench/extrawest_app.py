"""Baseline (b) of bench/receivers.py: the PyPI package `extrawest-ocpi` (imports as `py_ocpi`; FastAPI and
pydantic 1) as an eMSP receiving Sessions and CDRs, on an in-memory store.

Runs in its own virtualenv (bench/.venvs/extrawest, created by bench/receivers.py), served by granian like
ours. Its per-request INFO logging is turned down to WARNING: ours logs nothing per request either.
"""

from __future__ import annotations

import logging
from typing import Any

from py_ocpi import get_application
from py_ocpi.core.authentication.authenticator import Authenticator
from py_ocpi.core.crud import Crud
from py_ocpi.core.enums import ModuleID, RoleEnum
from py_ocpi.modules.versions.enums import VersionNumber

TOKEN = "bench-token"  # noqa: S105 - a benchmark's fixed token, not a secret

logging.getLogger("OCPI-Logger").setLevel(logging.WARNING)


class BenchAuthenticator(Authenticator):
    @classmethod
    async def get_valid_token_c(cls) -> list[str]:
        return [TOKEN]

    @classmethod
    async def get_valid_token_a(cls) -> list[str]:
        return []


class MemoryCrud(Crud):
    """Objects by (module, id) in a dict: the cheapest store py_ocpi can have."""

    store: dict[tuple[str, str], dict[str, Any]] = {}

    @classmethod
    async def get(cls, module: ModuleID, role: RoleEnum, id: str, *args: Any, **kwargs: Any) -> Any:
        return cls.store.get((module.value, id))

    @classmethod
    async def list(cls, module: ModuleID, role: RoleEnum, filters: dict, *args: Any, **kwargs: Any) -> Any:
        items = [v for (m, _id), v in cls.store.items() if m == module.value]
        return items, len(items), True

    @classmethod
    async def create(cls, module: ModuleID, role: RoleEnum, data: dict, *args: Any, **kwargs: Any) -> Any:
        cls.store[(module.value, data["id"])] = data
        return data

    @classmethod
    async def update(cls, module: ModuleID, role: RoleEnum, data: dict, id: str, *args: Any,
                     **kwargs: Any) -> Any:
        cls.store[(module.value, id)] = data
        return data

    @classmethod
    async def delete(cls, module: ModuleID, role: RoleEnum, id: str, *args: Any, **kwargs: Any) -> None:
        cls.store.pop((module.value, id), None)

    @classmethod
    async def do(cls, module: ModuleID, role: RoleEnum, action: Any, *args: Any, data: dict | None = None,
                 **kwargs: Any) -> Any:
        return None


app = get_application(
    version_numbers=[VersionNumber.v_2_2_1],
    roles=[RoleEnum.emsp],
    crud=MemoryCrud,
    modules=[ModuleID.sessions, ModuleID.cdrs],
    authenticator=BenchAuthenticator,
)
