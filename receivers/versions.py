"""Versions module (`06-versions.md`): GET versions and GET version details for 2.2.1.

Any valid token may call both, Token A included. The version details list every endpoint this app actually
serves: every router that declares `opt={"ocpi_module": <ModuleID>}` (and optionally `"ocpi_role"`, default
RECEIVER; credentials is published as SENDER, as 06 §2 advises), read from the app's routes, so a module
router added to `create_app` shows up here without a second list to maintain. URLs are absolute, on our
public base URL (`OCPI_PUBLIC_URL`, `settings.http.base_url`).
"""

from __future__ import annotations

from typing import Any, Final

from litestar import Litestar, Request, Response, Router, get

from infra.settings import Settings
from ocpi.model import Endpoint, InterfaceRole, ModuleID, Version, VersionDetails
from receivers.auth import MODULE_OPT, TOKEN_A_ALLOWED
from receivers.outbound import SUPPORTED_VERSIONS
from receivers.transport import ocpi_data, ocpi_response

VERSIONS_PATH: Final = "/ocpi/versions"
VERSION: Final = SUPPORTED_VERSIONS[0]
DETAILS_PATH: Final = f"/ocpi/{VERSION}"
ROLE_OPT: Final = "ocpi_role"
_MODULES: Final = frozenset(m.value for m in ModuleID)


def versions_url(settings: Settings) -> str:
    return settings.http.base_url + VERSIONS_PATH


def details_url(settings: Settings) -> str:
    return settings.http.base_url + DETAILS_PATH


def served_endpoints(app: Litestar, base_url: str) -> list[Endpoint]:
    """(module, role, URL) of every OCPI module router of `app`, each once, in a stable order."""
    found: dict[tuple[str, str], str] = {}
    for route in app.routes:
        for handler in getattr(route, "route_handlers", ()):
            module = handler.opt.get(MODULE_OPT)
            if module not in _MODULES:
                continue  # versions itself, and anything that is not an OCPI module
            default = InterfaceRole.SENDER if module == ModuleID.CREDENTIALS else InterfaceRole.RECEIVER
            role = InterfaceRole(handler.opt.get(ROLE_OPT, default))
            found.setdefault((module, role), base_url + _module_path(handler, route.path))
    return [Endpoint(identifier=module, role=InterfaceRole(role), url=url)
            for (module, role), url in sorted(found.items())]


def _module_path(handler: Any, route_path: str) -> str:
    """The path of the router that declared the module: the endpoint URL, without per-object segments."""
    prefix = ""
    for layer in handler.ownership_layers[1:]:  # [0] is the app
        if isinstance(layer, Router):
            prefix = prefix.rstrip("/") + "/" + layer.path.strip("/")
            if MODULE_OPT in layer.opt:
                return prefix.rstrip("/") or "/"
    return route_path  # a handler that declares the module itself: its own path


def our_version_details(app: Litestar, settings: Settings) -> VersionDetails:
    return VersionDetails(version=VERSION, endpoints=served_endpoints(app, settings.http.base_url))


@get("/versions")
async def get_versions(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The versions we speak, each with its details URL (`versions_info_example.json` shape)."""
    settings: Settings = request.app.state.settings
    return ocpi_response(ocpi_data([Version(version=VERSION, url=details_url(settings))]))


@get(f"/{VERSION}")
async def get_version_details(request: Request[Any, Any, Any]) -> Response[bytes]:
    """The endpoints of 2.2.1 (`version_details_example.json` shape)."""
    return ocpi_response(ocpi_data(our_version_details(request.app, request.app.state.settings)))


router = Router(path="/ocpi", route_handlers=[get_versions, get_version_details],
                opt={MODULE_OPT: "versions", TOKEN_A_ALLOWED: True})
