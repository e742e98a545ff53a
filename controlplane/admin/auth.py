"""Who may call what on the admin API: bearer tokens with roles, one route → role table, and
the request hygiene (Host, Content-Type) that closes browser-driven attacks.

Order of checks for every request: Host (421), then authentication (401, except the open
probes), then authorization by the route table (403 naming the role needed; a route without a
rule is denied), then Content-Type of bodies (415). Mutating calls are logged with the token's
name after they finish. Token values never reach a log line, a response or an exception.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import logging
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Iterable

from aiohttp import web

from ..config import TokenSpec

log = logging.getLogger("bluegreen.audit")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Role(enum.IntEnum):
    """Each role can do everything the ones below it can."""

    VIEWER = 1
    OPERATOR = 2
    ADMIN = 3

    @property
    def label(self) -> str:
        return self.name.lower()


OPEN = None  # no token needed: the liveness and readiness probes, the dashboard's static files

# The one table: (method, route template) → the role it needs. Routes missing here are denied.
ROUTE_ROLES: dict[tuple[str, str], Role | None] = {
    ("GET", "/healthz"): OPEN,
    ("GET", "/readyz"): OPEN,
    # The dashboard's page and static files carry no data; the page calls the API with a token.
    ("GET", "/ui"): OPEN,
    ("GET", "/ui/{file}"): OPEN,
    ("GET", "/v1/whoami"): Role.VIEWER,
    ("GET", "/v1/events"): Role.VIEWER,
    ("GET", "/metrics"): Role.VIEWER,
    ("GET", "/v1/openapi.json"): Role.VIEWER,
    ("GET", "/v1/services"): Role.VIEWER,
    ("GET", "/v1/services/{name}"): Role.VIEWER,
    ("GET", "/v1/services/{name}/deployments"): Role.VIEWER,
    ("GET", "/v1/deployments/{id}"): Role.VIEWER,
    ("GET", "/v1/releases"): Role.VIEWER,
    ("GET", "/v1/releases/{id}"): Role.VIEWER,
    ("GET", "/v1/proxies"): Role.VIEWER,
    ("GET", "/v1/cluster"): Role.VIEWER,
    ("GET", "/v1/endpoint-sources"): Role.VIEWER,
    ("PUT", "/v1/services/{name}/traffic"): Role.OPERATOR,
    ("POST", "/v1/services/{name}/switch"): Role.OPERATOR,
    ("POST", "/v1/services/{name}/rollback"): Role.OPERATOR,
    ("POST", "/v1/services/{name}/deployments"): Role.OPERATOR,
    ("POST", "/v1/releases"): Role.OPERATOR,
    **{("POST", f"/v1/releases/{{id}}/{action}"): Role.OPERATOR for action in ("promote", "pause", "resume", "rollback", "abort")},
    **{("POST", f"/v1/deployments/{{id}}/{action}"): Role.OPERATOR
       for action in ("promote", "pause", "resume", "rollback", "abort", "decommission")},
    ("PUT", "/v1/services/{name}"): Role.ADMIN,
    ("PUT", "/v1/services/{name}/environments/{env}"): Role.ADMIN,
    ("POST", "/v1/services/{name}/migrations/contract"): Role.ADMIN,
}

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
UNAUTHENTICATED_ACTOR = "api"  # build_admin_app(cp, None): in-process unit tests only


@dataclass(frozen=True)
class Principal:
    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How history events and logs name this caller."""
        return f"token:{self.name}"


@dataclass(frozen=True)
class Authenticator:
    """Bearer tokens → principals. Comparison is constant-time per token, and every token is
    compared, so timing tells nothing about which one (or how much of one) matched."""

    tokens: tuple[TokenSpec, ...]
    _encoded: tuple[tuple[bytes, Principal], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.tokens:
            raise ValueError("an Authenticator needs at least one token")
        encoded = tuple((t.token.encode(), Principal(t.name, Role[t.role.upper()])) for t in self.tokens)
        object.__setattr__(self, "_encoded", encoded)

    @classmethod
    def of(cls, tokens: Iterable[TokenSpec]) -> "Authenticator":
        return cls(tuple(tokens))

    def authenticate(self, authorization: str) -> Principal | None:
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given:
            return None
        candidate = given.strip().encode()
        found = None
        for expected, principal in self._encoded:
            if hmac.compare_digest(candidate, expected):
                found = principal
        return found


PRINCIPAL = web.RequestKey("principal", Principal)


def actor_of(request: web.Request) -> str:
    principal = request.get(PRINCIPAL)
    return principal.actor if principal is not None else UNAUTHENTICATED_ACTOR


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


def _route_key(request: web.Request) -> tuple[str, str] | None:
    """(method, template) of the matched route, or None when nothing matched (404/405)."""
    if request.match_info.http_exception is not None:
        return None
    resource = request.match_info.route.resource
    return (request.method, resource.canonical) if resource is not None else None


def host_allowed(host: str | None, names: frozenset[str]) -> bool:
    if not host:
        return True  # HTTP/1.0 without Host: no name for a rebinding attack to carry
    if host.lower() in names:
        return True
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False


def security_middleware(auth: Authenticator, hosts: Iterable[str]) -> Any:
    names = frozenset({"localhost", *(h.lower() for h in hosts)})

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        host = request.url.host
        if not host_allowed(host, names):
            return _error(421, f"Host {host!r} is not one this admin API answers to; "
                               "add it to admin.hosts in the config, or use an IP address or localhost")
        key = _route_key(request)
        if key is not None and key in ROUTE_ROLES and ROUTE_ROLES[key] is OPEN:
            return await handler(request)
        principal = auth.authenticate(request.headers.get("Authorization", ""))
        if principal is None:
            return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                          **{"WWW-Authenticate": 'Bearer realm="bluegreen"'})
        if key is not None:  # unmatched paths fall through to the router's 404/405, for any token
            rule = ROUTE_ROLES.get(key)
            if rule is None:
                return _error(403, f"{request.method} {key[1]} has no access rule; denied by default")
            if principal.role < rule:
                return _error(403, f"{request.method} {request.path} needs role {rule.label}; "
                                   f"token {principal.name!r} has role {principal.role.label}")
        request[PRINCIPAL] = principal
        response = await handler(request)
        if request.method in MUTATING:
            log.info("audit: %s %s by %s -> %s", request.method, request.path, principal.actor, response.status)
        return response

    return check


@web.middleware
async def content_type_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Bodies must be JSON (any charset parameter is fine), which refuses what an HTML form can
    send cross-site. A body-less POST (rollback, promote) needs no Content-Type: clients such as
    aiohttp label an empty body application/octet-stream, and an empty body carries no data."""
    if request.method in MUTATING:
        if request.body_exists and request.content_type != "application/json":
            return _error(415, f"Content-Type must be application/json, got {request.headers.get('Content-Type', 'none')!r}")
    return await handler(request)
