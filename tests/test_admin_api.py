"""The admin HTTP API, in-process: happy paths, every bad input (4xx, nothing changed), auth,
the OpenAPI document kept true against the live app, /metrics, and config-file errors.

Each test runs its own control plane (SQLite state in ``tmp_path``, gRPC on a free port) with
the admin app served by aiohttp's test utilities; everything is stopped also when a test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import grpc
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2
from prometheus_client.parser import text_string_to_metric_families

from controlplane import typeurls
from controlplane.admin.api import MAX_BODY_BYTES, build_admin_app
from controlplane.admin.auth import Authenticator
from controlplane.admin.openapi import OPENAPI
from controlplane.app import ControlPlane
from controlplane.config import Settings, TokenSpec, load_settings, parse_settings
from controlplane.errors import ConfigError
from controlplane.serve import ServeOptions, check_options, running
from controlplane.store.sqlite import open_sqlite_store

pytestmark = pytest.mark.timeout(30)

TOKEN = "s3cret-token-0123456789"
SHOP_DOMAIN = "shop.example.com"


# =============================================================================================
# OpenAPI schema checker (small, recursive: $ref, type, required, properties, items, enum,
# additionalProperties). Undocumented properties are reported too, so the document cannot
# silently fall behind what the server sends.
# =============================================================================================

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def resolve(schema: dict[str, Any]) -> dict[str, Any]:
    seen = set()
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), f"only local $refs are supported, got {ref}"
        assert ref not in seen, f"$ref loop at {ref}"
        seen.add(ref)
        node: Any = OPENAPI
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def schema_errors(value: Any, schema: dict[str, Any], where: str = "$") -> list[str]:
    schema = resolve(schema)
    errors: list[str] = []
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        for t in types:
            assert t in _TYPES, f"schema at {where} uses unknown type {t!r}"
        if not any(_TYPES[t](value) for t in types):
            return [f"{where}: expected type {types}, got {type(value).__name__} {value!r:.80}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in enum {schema['enum']}")
    if isinstance(value, dict):
        for key in schema.get("required", []):
            if key not in value:
                errors.append(f"{where}: required field {key!r} missing")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            if key in props:
                errors += schema_errors(item, props[key], f"{where}.{key}")
            elif isinstance(extra, dict):
                errors += schema_errors(item, extra, f"{where}.{key}")
            elif extra is False or props:
                errors.append(f"{where}: field {key!r} is not documented")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            errors += schema_errors(item, schema["items"], f"{where}[{i}]")
    return errors


def assert_schema(value: Any, schema: dict[str, Any], what: str = "") -> None:
    errors = schema_errors(value, schema)
    assert not errors, f"{what} does not match the OpenAPI schema:\n" + "\n".join(errors)


def component(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def documented_operation(method: str, path: str) -> tuple[str, dict[str, Any]] | None:
    """The OpenAPI operation (template, operation object) serving ``method path``."""
    bare = path.split("?", 1)[0]
    for template, ops in OPENAPI["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, bare) and method.lower() in ops:
            return template, ops[method.lower()]
    return None


def assert_documented_response(method: str, path: str, status: int, body: Any) -> None:
    """The status is documented for the operation, and the body matches its schema."""
    found = documented_operation(method, path)
    assert found is not None, f"{method} {path} is not in the OpenAPI document"
    template, op = found
    responses = op["responses"]
    assert str(status) in responses, f"{method} {template} answered {status}, not documented (has {sorted(responses)})"
    content = responses[str(status)].get("content", {}).get("application/json")
    if content is not None:
        assert_schema(body, content["schema"], f"{method} {path} -> {status}")


def test_schema_checker_is_not_vacuous() -> None:
    assert schema_errors({"error": "x"}, component("Error")) == []
    assert schema_errors({}, component("Error")) == ["$: required field 'error' missing"]
    assert schema_errors({"error": 5}, component("Error"))
    assert schema_errors([], component("Error"))
    assert schema_errors(None, component("Deployment")) == []  # type ["object", "null"]
    assert schema_errors({"blue": 90, "green": True}, component("Weights"))  # bool is no integer
    assert schema_errors({"blue": 90, "green": 10, "red": 0}, component("Weights"))  # additionalProperties false
    assert schema_errors({"blue": 90, "green": 10}, component("Weights")) == []
    conv = {"fleets": [{"fleet": "d", "generation": 1, "proxies": 0, "acked": 0, "lagging": [], "rejecting": []}],
            "proxies": 0, "acked": 0, "lagging": [], "rejecting": [], "converged": True}
    assert schema_errors(conv, component("Convergence")) == ["$.fleets[0]: required field 'converged' missing"]
    conv["seconds"] = "fast"
    assert any("seconds" in e for e in schema_errors(conv, component("Convergence")))


# =============================================================================================
# In-process control plane + admin API
# =============================================================================================

NO_BODY = object()


@dataclass(frozen=True)
class Raw:
    """A request body sent as these exact bytes."""

    data: bytes

    def __repr__(self) -> str:
        return f"Raw({self.data[:30]!r}{'...' if len(self.data) > 30 else ''}, {len(self.data)} bytes)"


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    text: str


@dataclass
class Api:
    client: TestClient
    cp: ControlPlane
    app: web.Application
    token: str | None = None
    log: list[tuple[str, str, Reply]] = field(default_factory=list)

    async def call(self, method: str, path: str, body: Any = NO_BODY, *, headers: dict[str, str] | None = None,
                   auth: bool = True) -> Reply:
        hdrs = dict(headers or {})
        if auth and self.token and "Authorization" not in hdrs:
            hdrs["Authorization"] = f"Bearer {self.token}"
        data: bytes | None = None
        if isinstance(body, Raw):
            data = body.data
            hdrs.setdefault("Content-Type", "application/json")
        elif body is not NO_BODY:
            data = json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        async with self.client.request(method, path, data=data, headers=hdrs) as resp:
            text = await resp.text()
            parsed: Any = None
            if resp.content_type == "application/json":
                parsed = json.loads(text)
            reply = Reply(resp.status, parsed, resp.headers, text)
        self.log.append((method, path, reply))
        return reply

    async def ok(self, method: str, path: str, body: Any = NO_BODY, *, status: int = 200) -> Any:
        reply = await self.call(method, path, body)
        assert reply.status == status, f"{method} {path} {body!r}: {reply.status} {reply.text}"
        assert_documented_response(method, path, reply.status, reply.body)
        return reply.body

    async def snapshot(self, name: str = "shop") -> dict[str, Any]:
        """Everything observable about stored state, for before/after comparisons."""
        listing = await self.call("GET", "/v1/services")
        one = await self.call("GET", f"/v1/services/{name}")
        deployments = await self.call("GET", f"/v1/services/{name}/deployments")
        return {
            "listing": listing.body,
            "store_revision": listing.body["store_revision"],
            "service": (one.status, one.body),
            "deployments": (deployments.status, deployments.body),
            "published": self.cp.publisher.generation,
        }


@contextlib.asynccontextmanager
async def admin_api(tmp_path: Path, token: str | None = None, settings: Settings | None = None) -> AsyncIterator[Api]:
    kv = await open_sqlite_store(tmp_path / "state.db")
    cp = ControlPlane(settings or Settings(admin_token=token), kv)
    try:
        await cp.start("127.0.0.1:0")
        app = build_admin_app(cp, Authenticator.of([TokenSpec("admin", token, "admin")]) if token else None)
        client = TestClient(TestServer(app))
        await client.start_server()
        try:
            yield Api(client, cp, app, token)
        finally:
            await client.close()
    finally:
        await cp.stop(grace=0.1)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with admin_api(tmp_path) as a:
        yield a


# --- named starting states for the bad-input table ---------------------------------------------

BLUE_V1 = {"version": "v1", "endpoints": ["127.0.0.1:8001"]}
GREEN_V2 = {"version": "v2", "endpoints": ["127.0.0.1:8002"]}
SPLIT_90_10 = {"weights": {"blue": 90, "green": 10}}


async def setup_state(api: Api, name: str) -> None:
    """fresh: shop exists, nothing registered (blue 100 %). blue_only: + blue v1.
    seeded: + green v2 (idle). split: + traffic 90/10."""
    order = ["fresh", "blue_only", "seeded", "split"]
    steps = [
        ("PUT", "/v1/services/shop", {"domains": [SHOP_DOMAIN]}),
        ("PUT", "/v1/services/shop/environments/blue", BLUE_V1),
        ("PUT", "/v1/services/shop/environments/green", GREEN_V2),
        ("PUT", "/v1/services/shop/traffic", SPLIT_90_10),
    ]
    for method, path, body in steps[: order.index(name) + 1]:
        await api.ok(method, path, body)


# =============================================================================================
# 1. Happy paths
# =============================================================================================


def _statuses(deployments: dict[str, Any]) -> dict[tuple[str, str], str]:
    return {(d["environment"], d["version"]): d["status"] for d in deployments["deployments"]}


async def test_service_defaults_get_and_list(api: Api) -> None:
    created = await api.ok("PUT", "/v1/services/shop", {})
    assert (created["name"], created["domains"], created["prefix"]) == ("shop", ["*"], "/")
    assert (created["drain_seconds"], created["standby_seconds"]) == (60, 1800)
    assert created["traffic"] == {"weights": {"blue": 100, "green": 0}, "active": "blue", "idle": "green", "previous": None}
    for env in ("blue", "green"):
        assert created["environments"][env]["endpoints"] == [] and created["environments"][env]["version"] is None
    assert isinstance(created["xds_version"], str) and created["xds_version"]
    assert isinstance(created["store_revision"], int) and created["store_revision"] > 0
    assert created["convergence"]["proxies"] == 0 and created["convergence"]["converged"] is True

    got = await api.ok("GET", "/v1/services/shop")
    assert got == created  # same state, same rendering (incl. xds_version and store_revision)

    listing = await api.ok("GET", "/v1/services")
    assert [s["name"] for s in listing["services"]] == ["shop"]
    assert listing["store_revision"] == created["store_revision"]
    assert listing["services"][0]["xds_version"] == created["xds_version"]

    # Explicit settings, then a partial update keeps the fields it does not name.
    spec = {"domains": [SHOP_DOMAIN, "*.shop.example.com"], "prefix": "/api", "drain_seconds": 5, "standby_seconds": 0}
    updated = await api.ok("PUT", "/v1/services/shop", spec)
    assert {k: updated[k] for k in spec} == spec
    assert updated["store_revision"] > created["store_revision"]
    assert updated["xds_version"] != created["xds_version"]  # domains and prefix are routing
    again = await api.ok("PUT", "/v1/services/shop", {"drain_seconds": 7})
    assert {k: again[k] for k in spec} == {**spec, "drain_seconds": 7}

    # A second service on another domain is fine, and listed in name order.
    await api.ok("PUT", "/v1/services/cart", {"domains": ["cart.example.com"]})
    listing = await api.ok("GET", "/v1/services")
    assert [s["name"] for s in listing["services"]] == ["cart", "shop"]

    assert (await api.ok("GET", "/healthz"))["status"] == "ok"


async def test_blue_green_lifecycle(api: Api) -> None:
    await api.ok("PUT", "/v1/services/shop", {})
    # First registration into blue of a brand-new service is allowed although blue has 100 %.
    blue = await api.ok("PUT", "/v1/services/shop/environments/blue",
                        {"version": "v1", "endpoints": ["[0:0::1]:8002", "127.0.0.1:8001"]})
    assert blue["environments"]["blue"]["version"] == "v1"
    assert blue["environments"]["blue"]["endpoints"] == ["127.0.0.1:8001", "[::1]:8002"]  # normalized, sorted
    assert blue["environments"]["blue"]["deployment"]["id"] == "shop-1"
    assert blue["environments"]["blue"]["deployment"]["status"] == "active"  # it takes blue's 100 % at once
    green = await api.ok("PUT", "/v1/services/shop/environments/green", GREEN_V2)
    assert green["environments"]["green"]["deployment"]["status"] == "ready"
    assert green["xds_version"] != blue["xds_version"]

    # Re-putting identical content: same xds_version (content hash), new store revision.
    same = await api.ok("PUT", "/v1/services/shop/environments/green", GREEN_V2)
    assert same["xds_version"] == green["xds_version"]
    assert same["store_revision"] > green["store_revision"]

    split = await api.ok("PUT", "/v1/services/shop/traffic", SPLIT_90_10)
    assert split["traffic"]["weights"] == {"blue": 90, "green": 10}
    assert (split["environments"]["blue"]["weight"], split["environments"]["green"]["weight"]) == (90, 10)
    assert split["traffic"]["active"] == "blue"
    assert split["environments"]["green"]["deployment"]["status"] == "shifting"
    assert split["xds_version"] != green["xds_version"]

    full = await api.ok("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}})
    assert full["xds_version"] != split["xds_version"]
    assert full["xds_version"] == green["xds_version"]  # back to exactly the pre-split routing
    again = await api.ok("PUT", "/v1/services/shop/traffic", SPLIT_90_10)
    assert again["xds_version"] == split["xds_version"]  # identical state, identical version
    assert again["store_revision"] > full["store_revision"] > split["store_revision"]
    assert (await api.ok("GET", "/v1/services/shop"))["xds_version"] == split["xds_version"]

    # Switch with no body: 100 % to the idle environment (green).
    switched = await api.ok("POST", "/v1/services/shop/switch")
    assert switched["traffic"] == {"weights": {"blue": 0, "green": 100}, "active": "green", "idle": "blue", "previous": "blue"}
    assert switched["xds_version"] != again["xds_version"]
    statuses = _statuses(await api.ok("GET", "/v1/services/shop/deployments"))
    assert statuses[("green", "v2")] == "active"

    # Rollback: back to blue; green is marked rolled back.
    rolled = await api.ok("POST", "/v1/services/shop/rollback")
    assert rolled["traffic"]["weights"] == {"blue": 100, "green": 0}
    assert (rolled["traffic"]["active"], rolled["traffic"]["previous"]) == ("blue", "green")
    records = await api.ok("GET", "/v1/services/shop/deployments")
    assert [d["id"] for d in records["deployments"]] == ["shop-2", "shop-1"]  # newest first
    assert _statuses(records) == {("green", "v2"): "rolled_back", ("blue", "v1"): "active"}
    assert records["deployments"][1]["activated_at"] is not None

    # Next release into the idle side, switch with an explicit target: the old side is standby.
    await api.ok("PUT", "/v1/services/shop/environments/green", {"version": "v3", "endpoints": ["127.0.0.1:8003"]})
    to_green = await api.ok("POST", "/v1/services/shop/switch", {"to": "green"})
    assert to_green["traffic"]["weights"] == {"blue": 0, "green": 100}
    assert to_green["environments"]["green"]["version"] == "v3"
    statuses = _statuses(await api.ok("GET", "/v1/services/shop/deployments"))
    assert statuses[("green", "v3")] == "active"
    assert statuses[("blue", "v1")] == "standby"

    # Mutations and reads with wait=converged: 0 proxies connected -> converged at once.
    waited = await api.ok("POST", "/v1/services/shop/rollback?wait=converged&timeout=1")
    conv = waited["convergence"]
    assert conv["converged"] is True and conv["proxies"] == 0
    assert isinstance(conv["seconds"], (int, float)) and 0 <= conv["seconds"] < 1
    assert waited["traffic"]["active"] == "blue"
    read = await api.ok("GET", "/v1/services/shop?wait=converged&timeout=1")
    assert read["convergence"]["converged"] is True and isinstance(read["convergence"]["seconds"], (int, float))
    put = await api.ok("PUT", "/v1/services/shop/traffic?wait=converged", SPLIT_90_10)  # default timeout
    assert put["convergence"]["converged"] is True


async def test_first_switch_leaves_previous_version_standby(api: Api) -> None:
    """The first version of a new service takes blue's 100 % at once: it is recorded active, and
    the first switch away from it leaves it standby (regression: it was recorded 'ready')."""
    await setup_state(api, "blue_only")
    records = await api.ok("GET", "/v1/services/shop/deployments")
    assert _statuses(records) == {("blue", "v1"): "active"}
    assert records["deployments"][0]["activated_at"] is not None
    await api.ok("PUT", "/v1/services/shop/environments/green", GREEN_V2)
    await api.ok("POST", "/v1/services/shop/switch")
    statuses = _statuses(await api.ok("GET", "/v1/services/shop/deployments"))
    assert statuses == {("green", "v2"): "active", ("blue", "v1"): "standby"}


# =============================================================================================
# 2. Bad input: 4xx, JSON error naming the problem, and nothing changed
# =============================================================================================


@dataclass(frozen=True)
class Bad:
    id: str
    method: str
    path: str
    body: Any = NO_BODY
    status: int = 400
    says: tuple[str, ...] = ()  # fragments the error message must contain (case-insensitive)
    setup: str = "seeded"
    documented: bool = True  # the route and status are in the OpenAPI document


def bad(id: str, method: str, path: str, body: Any = NO_BODY, status: int = 400, *says: str, setup: str = "seeded",
        documented: bool = True, marks: Any = ()) -> Any:
    return pytest.param(Bad(id, method, path, body, status, says, setup, documented), id=id, marks=marks)


SVC = "/v1/services/shop"
ENV_G = f"{SVC}/environments/green"
ENV_B = f"{SVC}/environments/blue"
TRAFFIC = f"{SVC}/traffic"
SWITCH = f"{SVC}/switch"
ROLLBACK = f"{SVC}/rollback"


def ep(*endpoints: Any) -> dict[str, Any]:
    return {"version": "v3", "endpoints": list(endpoints)}


def weights(**w: Any) -> dict[str, Any]:
    return {"weights": w}


BAD_CASES = [
    # --- unknown service, every service-scoped route -------------------------------------------
    bad("ghost-get", "GET", "/v1/services/ghost", NO_BODY, 404, "unknown service 'ghost'"),
    bad("ghost-get-wait", "GET", "/v1/services/ghost?wait=converged&timeout=1", NO_BODY, 404, "unknown service 'ghost'"),
    bad("ghost-env", "PUT", "/v1/services/ghost/environments/blue", BLUE_V1, 404, "unknown service 'ghost'"),
    bad("ghost-traffic", "PUT", "/v1/services/ghost/traffic", SPLIT_90_10, 404, "unknown service 'ghost'"),
    bad("ghost-switch", "POST", "/v1/services/ghost/switch", NO_BODY, 404, "unknown service 'ghost'"),
    bad("ghost-deploy", "POST", "/v1/services/ghost/deployments", {"version": "v2", "endpoints": ["127.0.0.1:9"]}, 404, "unknown service 'ghost'"),
    bad("ghost-contract", "POST", "/v1/services/ghost/migrations/contract", {"directory": "/nonexistent", "database": "postgresql://127.0.0.1:1/x"}, 404, "unknown service 'ghost'"),
    bad("ghost-switch-to", "POST", "/v1/services/ghost/switch", {"to": "green"}, 404, "unknown service 'ghost'"),
    bad("ghost-rollback", "POST", "/v1/services/ghost/rollback", NO_BODY, 404, "unknown service 'ghost'"),
    bad("ghost-deployments", "GET", "/v1/services/ghost/deployments", NO_BODY, 404, "unknown service 'ghost'"),
    # --- unknown environment in the path ---------------------------------------------------------
    bad("env-purple", "PUT", f"{SVC}/environments/purple", GREEN_V2, 400, "unknown environment 'purple'", "blue", "green"),
    bad("env-uppercase", "PUT", f"{SVC}/environments/GREEN", GREEN_V2, 400, "unknown environment 'GREEN'"),
    # --- weights -----------------------------------------------------------------------------------
    bad("w-float", "PUT", TRAFFIC, weights(blue=98.5, green=1.5), 400, "weight of blue must be an integer", "98.5"),
    bad("w-string", "PUT", TRAFFIC, weights(blue=90, green="10"), 400, "weight of green must be an integer", "'10'"),
    bad("w-bool", "PUT", TRAFFIC, weights(blue=99, green=True), 400, "weight of green must be an integer", "True"),
    bad("w-null", "PUT", TRAFFIC, weights(blue=100, green=None), 400, "weight of green must be an integer"),
    bad("w-negative", "PUT", TRAFFIC, weights(blue=-10, green=110), 400, "weight of blue", "between 0 and 100", "-10"),
    bad("w-over-100", "PUT", TRAFFIC, weights(green=110, blue=-10), 400, "weight of green", "between 0 and 100", "110"),
    bad("w-sum-90", "PUT", TRAFFIC, weights(blue=50, green=40), 400, "must sum to 100", "90"),
    bad("w-sum-110", "PUT", TRAFFIC, weights(blue=60, green=50), 400, "must sum to 100", "110"),
    bad("w-missing-green", "PUT", TRAFFIC, weights(blue=100), 400, "missing green"),
    bad("w-empty", "PUT", TRAFFIC, weights(), 400, "missing blue, green"),
    bad("w-unknown-env", "PUT", TRAFFIC, weights(blue=90, purple=10), 400, "unknown environment 'purple'"),
    bad("w-not-object", "PUT", TRAFFIC, {"weights": [90, 10]}, 400, '"weights" must be an object'),
    bad("w-no-weights", "PUT", TRAFFIC, {}, 400, '"weights" must be an object'),
    bad("w-unknown-field", "PUT", TRAFFIC, {**SPLIT_90_10, "mode": "canary"}, 400, "unknown field(s) in traffic: mode"),
    bad("w-array-body", "PUT", TRAFFIC, [90, 10], 400, "traffic must be a JSON object", "list"),
    bad("w-string-body", "PUT", TRAFFIC, "90/10", 400, "traffic must be a JSON object", "str"),
    bad("w-null-body", "PUT", TRAFFIC, None, 400, "traffic must be a JSON object", "NoneType"),
    bad("w-empty-body", "PUT", TRAFFIC, NO_BODY, 400, "request body is empty"),
    bad("w-blank-body", "PUT", TRAFFIC, Raw(b"  \n"), 400, "request body is empty"),
    bad("w-invalid-json", "PUT", TRAFFIC, Raw(b'{"weights": {"blue": 90, "green": 10}'), 400, "not valid JSON"),
    bad("w-invalid-utf8", "PUT", TRAFFIC, Raw(b'{"weights": "\xff"}'), 400, "not valid JSON"),
    bad("w-too-large", "PUT", TRAFFIC, Raw(b" " * (MAX_BODY_BYTES + 1)), 413, "too large", str(MAX_BODY_BYTES)),
    bad("w-deeply-nested-json", "PUT", TRAFFIC, Raw(b"[" * 100_000), 400, "JSON", "nested too deeply"),
    # --- traffic into an environment without endpoints ------------------------------------------
    bad("w-to-unregistered", "PUT", TRAFFIC, SPLIT_90_10, 409, "green of shop has no endpoints", setup="blue_only"),
    bad("w-fresh-service", "PUT", TRAFFIC, weights(blue=0, green=100), 409, "has no endpoints", setup="fresh"),
    # --- endpoints -----------------------------------------------------------------------------------
    bad("ep-hostname", "PUT", ENV_G, ep("localhost:80"), 400, "'localhost:80'", "IPv4 or IPv6 address"),
    bad("ep-no-port", "PUT", ENV_G, ep("1.2.3.4"), 400, "'1.2.3.4'", "IP:PORT"),
    bad("ep-port-0", "PUT", ENV_G, ep("1.2.3.4:0"), 400, "'1.2.3.4:0'", "port must be 1-65535"),
    bad("ep-port-70000", "PUT", ENV_G, ep("1.2.3.4:70000"), 400, "'1.2.3.4:70000'", "port must be 1-65535"),
    bad("ep-port-sign", "PUT", ENV_G, ep("1.2.3.4:+80"), 400, "port must be 1-65535"),
    bad("ep-port-superscript", "PUT", ENV_G, ep("1.2.3.4:\u00b2"), 400, "port must be 1-65535"),  # '²'.isdigit()
    bad("ep-port-fullwidth", "PUT", ENV_G, ep("1.2.3.4:\uff18\uff10"), 400, "port must be 1-65535"),
    bad("ep-trailing-newline", "PUT", ENV_G, ep("1.2.3.4:80\n"), 400, "invalid endpoint"),
    bad("ep-ipv6-unbracketed", "PUT", ENV_G, ep("::1:80"), 400, "'::1:80'", "[ADDR]:PORT"),
    bad("ep-ipv6-bracket-no-port", "PUT", ENV_G, ep("[::1]"), 400, "IP:PORT"),
    bad("ep-empty-string", "PUT", ENV_G, ep(""), 400, "invalid endpoint ''"),
    bad("ep-not-string", "PUT", ENV_G, ep(8080), 400, "invalid endpoint 8080", "string"),
    bad("ep-duplicate", "PUT", ENV_G, ep("1.2.3.4:80", "1.2.3.4:80"), 400, "endpoints must not repeat"),
    bad("ep-duplicate-normalized", "PUT", ENV_G, ep("[::1]:80", "[0:0::1]:80"), 400, "endpoints must not repeat"),
    bad("ep-not-list", "PUT", ENV_G, ep("1.2.3.4:80") | {"endpoints": "1.2.3.4:80"}, 400, "endpoints must be a list"),
    bad("ep-too-many", "PUT", ENV_G, ep(*[f"10.0.{i // 250}.{i % 250 + 1}:80" for i in range(1001)]), 400, "at most 1000"),
    bad("env-missing-version", "PUT", ENV_G, {"endpoints": ["1.2.3.4:80"]}, 400, "'version' is required"),
    bad("env-missing-endpoints", "PUT", ENV_G, {"version": "v3"}, 400, "'endpoints' is required"),
    bad("env-bad-version", "PUT", ENV_G, {"version": "v 3", "endpoints": ["1.2.3.4:80"]}, 400, "invalid version 'v 3'"),
    bad("env-empty-version", "PUT", ENV_G, {"version": "", "endpoints": ["1.2.3.4:80"]}, 400, "invalid version ''"),
    bad("env-version-newline", "PUT", ENV_G, {"version": "v3\n", "endpoints": ["1.2.3.4:80"]}, 400, "invalid version"),
    bad("env-int-version", "PUT", ENV_G, {"version": 3, "endpoints": ["1.2.3.4:80"]}, 400, "invalid version 3"),
    bad("env-unknown-field", "PUT", ENV_G, {**GREEN_V2, "replicas": 3}, 400, "unknown field(s) in environment: replicas"),
    bad("env-array-body", "PUT", ENV_G, [GREEN_V2], 400, "environment must be a JSON object", "list"),
    bad("env-string-body", "PUT", ENV_G, "v2", 400, "environment must be a JSON object", "str"),
    bad("env-empty-body", "PUT", ENV_G, NO_BODY, 400, "request body is empty"),
    bad("env-invalid-json", "PUT", ENV_G, Raw(b"{version: v2}"), 400, "not valid JSON"),
    bad("env-too-large", "PUT", ENV_G, Raw(b"[" + b'"1.2.3.4:80",' * 90_000 + b"]"), 413, "too large"),
    # --- a new version into the environment taking traffic ---------------------------------------
    bad("env-new-version-live", "PUT", ENV_B, {"version": "v9", "endpoints": ["127.0.0.1:8001"]}, 409,
        "environment blue of shop takes 100% of traffic", "idle environment green"),
    bad("env-new-version-shifting", "PUT", ENV_G, {"version": "v9", "endpoints": ["127.0.0.1:8002"]}, 409,
        "environment green of shop takes 10% of traffic", setup="split"),
    bad("env-live-no-endpoints", "PUT", ENV_B, {"version": "v1", "endpoints": []}, 409, "cannot have zero endpoints"),
    # --- service settings -------------------------------------------------------------------------
    bad("name-uppercase", "PUT", "/v1/services/Shop", {}, 400, "invalid service name 'Shop'"),
    bad("name-too-long", "PUT", "/v1/services/" + "a" * 49, {}, 400, "invalid service name", "1-48"),
    bad("name-slash", "PUT", "/v1/services/a%2Fb", {}, 400, "invalid service name 'a/b'"),
    bad("name-leading-dash", "PUT", "/v1/services/-shop", {}, 400, "invalid service name '-shop'"),
    bad("name-trailing-dash", "PUT", "/v1/services/shop-", {}, 400, "invalid service name 'shop-'"),
    bad("name-trailing-newline", "PUT", "/v1/services/shop%0A", {}, 400, "invalid service name 'shop\\n'"),
    bad("name-underscore", "PUT", "/v1/services/my_shop", {}, 400, "invalid service name 'my_shop'"),
    bad("domain-empty", "PUT", SVC, {"domains": [""]}, 400, "invalid domain ''"),
    bad("domain-space", "PUT", SVC, {"domains": ["a b"]}, 400, "invalid domain 'a b'"),
    bad("domain-double-wildcard", "PUT", SVC, {"domains": ["*.*"]}, 400, "invalid domain '*.*'"),
    bad("domain-inner-wildcard", "PUT", SVC, {"domains": ["foo*bar"]}, 400, "invalid domain 'foo*bar'"),
    bad("domain-bare-wildcard-suffix", "PUT", SVC, {"domains": ["*."]}, 400, "invalid domain '*.'"),
    bad("domain-bad-port", "PUT", SVC, {"domains": ["shop.example.com:0"]}, 400, "port must be 1-65535"),
    bad("domain-empty-port", "PUT", SVC, {"domains": ["shop.example.com:"]}, 400, "port must be 1-65535"),
    bad("domain-superscript-port", "PUT", SVC, {"domains": ["shop.example.com:\u00b2"]}, 400, "port must be 1-65535"),
    bad("domain-trailing-newline", "PUT", SVC, {"domains": ["shop.example.com\n"]}, 400, "invalid domain"),
    bad("domain-not-string", "PUT", SVC, {"domains": [5]}, 400, "invalid domain 5"),
    bad("domains-empty-list", "PUT", SVC, {"domains": []}, 400, "domains must be a non-empty list"),
    bad("domains-string", "PUT", SVC, {"domains": SHOP_DOMAIN}, 400, "domains must be a non-empty list"),
    bad("domains-repeat", "PUT", SVC, {"domains": ["a.example.com", "A.example.com"]}, 400, "domains must not repeat"),
    bad("prefix-no-slash", "PUT", SVC, {"prefix": "no-slash"}, 400, "invalid prefix 'no-slash'", "start with '/'"),
    bad("prefix-space", "PUT", SVC, {"prefix": "/with space"}, 400, "invalid prefix '/with space'"),
    bad("prefix-trailing-newline", "PUT", SVC, {"prefix": "/api\n"}, 400, "invalid prefix"),
    bad("prefix-empty", "PUT", SVC, {"prefix": ""}, 400, "invalid prefix ''"),
    bad("prefix-not-string", "PUT", SVC, {"prefix": 1}, 400, "invalid prefix 1"),
    bad("drain-negative", "PUT", SVC, {"drain_seconds": -1}, 400, "drain_seconds must be between 0 and", "-1"),
    bad("drain-string", "PUT", SVC, {"drain_seconds": "60"}, 400, "drain_seconds must be an integer", "'60'"),
    bad("drain-bool", "PUT", SVC, {"drain_seconds": True}, 400, "drain_seconds must be an integer", "True"),
    bad("drain-float", "PUT", SVC, {"drain_seconds": 1.5}, 400, "drain_seconds must be an integer"),
    bad("drain-too-big", "PUT", SVC, {"drain_seconds": 86_401}, 400, "drain_seconds must be between 0 and 86400"),
    bad("standby-negative", "PUT", SVC, {"standby_seconds": -5}, 400, "standby_seconds must be between"),
    bad("service-unknown-field", "PUT", SVC, {"domains": ["*"], "tls": True}, 400, "unknown field(s) in service: tls"),
    bad("service-array-body", "PUT", SVC, [], 400, "service must be a JSON object", "list"),
    bad("service-string-body", "PUT", SVC, "shop", 400, "service must be a JSON object", "str"),
    bad("service-empty-body", "PUT", SVC, NO_BODY, 400, "request body is empty"),
    bad("service-invalid-json", "PUT", SVC, Raw(b"{'domains': []}"), 400, "not valid JSON"),
    bad("service-too-large", "PUT", SVC, Raw(b'{"domains": ["' + b"a" * (MAX_BODY_BYTES + 10) + b'"]}'), 413, "too large"),
    bad("new-service-bad-body", "PUT", "/v1/services/cart", {"prefix": "cart"}, 400, "invalid prefix 'cart'"),
    # --- two services claiming the same domain + prefix ------------------------------------------
    bad("route-clash", "PUT", "/v1/services/cart", {"domains": [SHOP_DOMAIN]}, 409,
        "service shop already routes domain 'shop.example.com'", "prefix '/'"),
    bad("route-clash-case", "PUT", "/v1/services/cart", {"domains": ["other.example.com", "SHOP.example.com"]}, 409,
        "service shop already routes"),
    bad("route-clash-wildcard", "PUT", "/v1/services/cart", {"domains": ["*"]}, 409, "service shop already routes domain '*'",
        setup="none-wildcard"),
    # --- switch ----------------------------------------------------------------------------------------
    bad("switch-purple", "POST", SWITCH, {"to": "purple"}, 400, "unknown environment 'purple'"),
    bad("switch-to-int", "POST", SWITCH, {"to": 1}, 400, "unknown environment 1"),
    bad("switch-unknown-field", "POST", SWITCH, {"to": "green", "force": True}, 400, "unknown field(s) in switch: force"),
    bad("switch-array-body", "POST", SWITCH, ["green"], 400, "switch body must be a JSON object"),
    bad("switch-string-body", "POST", SWITCH, "green", 400, "switch body must be a JSON object"),
    bad("switch-invalid-json", "POST", SWITCH, Raw(b"{to: green}"), 400, "not valid JSON"),
    bad("switch-no-endpoints", "POST", SWITCH, NO_BODY, 409, "green of shop has no endpoints", setup="blue_only"),
    bad("switch-to-no-endpoints", "POST", SWITCH, {"to": "green"}, 409, "green of shop has no endpoints", setup="blue_only"),
    bad("switch-fresh", "POST", SWITCH, NO_BODY, 409, "has no endpoints", setup="fresh"),
    bad("switch-to-current", "POST", SWITCH, {"to": "blue"}, 409, "blue already takes 100% of traffic"),
    # --- rollback ------------------------------------------------------------------------------------
    bad("rollback-with-body", "POST", ROLLBACK, {"to": "blue"}, 400, "rollback takes no body", setup="split"),
    bad("rollback-array-body", "POST", ROLLBACK, [], 400, "rollback takes no body", setup="split"),
    bad("rollback-invalid-json", "POST", ROLLBACK, Raw(b"please"), 400, "not valid JSON", setup="split"),
    bad("rollback-fresh", "POST", ROLLBACK, NO_BODY, 409, "nothing to roll back to", setup="fresh"),
    bad("rollback-no-previous", "POST", ROLLBACK, NO_BODY, 409, "nothing to roll back to"),
    # --- bad wait/timeout: refused before anything is applied -----------------------------------
    bad("wait-unknown", "PUT", TRAFFIC + "?wait=soon", SPLIT_90_10, 400, "unknown wait value 'soon'", "converged"),
    bad("wait-empty", "PUT", TRAFFIC + "?wait=", SPLIT_90_10, 400, "unknown wait value ''"),
    bad("timeout-0", "PUT", TRAFFIC + "?wait=converged&timeout=0", SPLIT_90_10, 400, "timeout must be > 0", "got 0"),
    bad("timeout-negative", "POST", SWITCH + "?wait=converged&timeout=-1", NO_BODY, 400, "timeout must be > 0", "got -1"),
    bad("timeout-abc", "PUT", ENV_G + "?wait=converged&timeout=abc", {"version": "v3", "endpoints": ["1.2.3.4:80"]}, 400,
        "timeout must be a number", "'abc'"),
    bad("timeout-1000", "PUT", SVC + "?wait=converged&timeout=1000", {"drain_seconds": 5}, 400, "<= 300", "got 1000"),
    bad("timeout-nan", "PUT", SVC + "?wait=converged&timeout=nan", {"drain_seconds": 5}, 400, "timeout must be > 0"),
    bad("timeout-inf", "PUT", TRAFFIC + "?wait=converged&timeout=inf", SPLIT_90_10, 400, "timeout must be > 0"),
    bad("timeout-without-wait", "POST", ROLLBACK + "?timeout=5", NO_BODY, 400, "only meaningful with wait=converged",
        setup="split"),
    bad("wait-bad-rollback", "POST", ROLLBACK + "?wait=converged&timeout=0", NO_BODY, 400, "timeout must be > 0", setup="split"),
    bad("wait-bad-new-service", "PUT", "/v1/services/cart?wait=yes", {"domains": ["cart.example.com"]}, 400,
        "unknown wait value 'yes'"),
    bad("wait-bad-get", "GET", SVC + "?wait=converged&timeout=abc", NO_BODY, 400, "timeout must be a number"),
    # bad query and bad body together: either error is fine, but nothing changes
    bad("wait-bad-and-bad-body", "PUT", TRAFFIC + "?wait=x", Raw(b"{"), 400, "wait"),
    # --- routing: unknown path / method -----------------------------------------------------------
    bad("no-such-route", "GET", "/v1/nothing", NO_BODY, 404, "not found", documented=False),
    bad("method-not-allowed", "DELETE", SVC, NO_BODY, 405, "method DELETE not allowed", "/v1/services/shop", documented=False),
]


async def _setup_for(api: Api, name: str) -> None:
    if name == "none-wildcard":  # shop on the default '*' domain, blue v1 registered
        await api.ok("PUT", "/v1/services/shop", {})
        await api.ok("PUT", "/v1/services/shop/environments/blue", BLUE_V1)
    else:
        await setup_state(api, name)


@pytest.mark.parametrize("case", BAD_CASES)
async def test_bad_input_is_refused_and_changes_nothing(api: Api, case: Bad) -> None:
    await _setup_for(api, case.setup)
    before = await api.snapshot()
    before_cart = await api.snapshot("cart")

    reply = await api.call(case.method, case.path, case.body)

    assert reply.status == case.status, f"{case.id}: expected {case.status}, got {reply.status}: {reply.text[:500]}"
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.headers
    assert isinstance(reply.body, dict) and set(reply.body) == {"error"}, reply.text[:500]
    message = reply.body["error"]
    assert isinstance(message, str) and message
    for fragment in case.says:
        assert fragment.lower() in message.lower(), f"{case.id}: {fragment!r} not in error message {message!r}"
    assert_schema(reply.body, component("Error"), case.id)
    if case.documented:
        assert_documented_response(case.method, case.path, reply.status, reply.body)

    after = await api.snapshot()
    assert after == before, f"{case.id}: state changed although the request was refused"
    assert await api.snapshot("cart") == before_cart
    assert after["service"][1]["xds_version"] == before["service"][1]["xds_version"]


def test_bad_case_ids_are_unique() -> None:
    ids = [p.id for p in BAD_CASES]
    assert len(ids) == len(set(ids)), [i for i in ids if ids.count(i) > 1]


async def test_unknown_service_404_on_every_service_scoped_route(api: Api) -> None:
    """Guards the table above: every documented route with {name} has a 404 case for 'ghost'
    (PUT /v1/services/{name} creates, so it has none)."""
    covered = {(c.values[0].method, documented_operation(c.values[0].method, c.values[0].path)[0])  # type: ignore[index]
               for c in BAD_CASES if c.values[0].status == 404 and "/ghost" in c.values[0].path}
    scoped = {(m.upper(), p) for p, ops in OPENAPI["paths"].items() if "{name}" in p for m in ops}
    assert scoped - {("PUT", "/v1/services/{name}")} == covered


# =============================================================================================
# 3. Auth
# =============================================================================================


async def test_bearer_token_required_except_healthz(tmp_path: Path) -> None:
    async with admin_api(tmp_path, token=TOKEN) as api:
        for path in ("/v1/services", "/metrics", "/v1/openapi.json", "/v1/proxies", "/v1/services/shop"):
            for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"}, {"Authorization": TOKEN},
                            {"Authorization": f"Basic {TOKEN}"}, {"Authorization": f"Bearer {TOKEN}x"}):
                reply = await api.call("GET", path, headers=headers, auth=False)
                assert reply.status == 401, (path, headers, reply.status, reply.text)
                assert_schema(reply.body, component("Error"), f"401 on {path}")
                assert "bearer token" in reply.body["error"]
                assert reply.headers.get("WWW-Authenticate", "").startswith("Bearer")
        # Mutations without the token change nothing.
        reply = await api.call("PUT", "/v1/services/shop", {}, auth=False)
        assert reply.status == 401
        health = await api.call("GET", "/healthz", auth=False)
        assert health.status == 200 and health.body["status"] == "ok"
        # The right token works.
        listing = await api.ok("GET", "/v1/services")
        assert listing["services"] == []
        await api.ok("PUT", "/v1/services/shop", {})
        assert (await api.call("GET", "/metrics")).status == 200
        assert (await api.ok("GET", "/v1/services/shop"))["name"] == "shop"


async def test_no_token_means_open(api: Api) -> None:
    assert (await api.call("GET", "/v1/services")).status == 200
    assert (await api.call("GET", "/metrics")).status == 200


async def test_serve_running_enforces_the_token(tmp_path: Path) -> None:
    options = ServeOptions(Settings(admin_token=TOKEN), tmp_path / "state.db", xds="127.0.0.1:0", admin="127.0.0.1:0")
    async with running(options) as (cp, port):
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as session:
            async with session.get(f"{base}/healthz") as resp:
                assert resp.status == 200
            async with session.get(f"{base}/v1/services") as resp:
                assert resp.status == 401
                assert "error" in await resp.json()
            async with session.get(f"{base}/v1/services", headers={"Authorization": f"Bearer {TOKEN}"}) as resp:
                assert resp.status == 200


@pytest.mark.parametrize("admin", ["0.0.0.0:18001", "10.1.2.3:18001", "192.168.0.10:0", "[::]:18001", "example.com:18001"])
def test_check_options_refuses_open_admin_without_token(tmp_path: Path, admin: str) -> None:
    options = ServeOptions(Settings(), tmp_path / "s.db", admin=admin)
    with pytest.raises(ConfigError) as info:
        check_options(options)
    message = str(info.value)
    host = admin.rsplit(":", 1)[0].strip("[]")
    assert f"refusing to bind the admin API to {host}" in message
    assert "token" in message
    # With a token it is accepted.
    host_port = check_options(ServeOptions(Settings(admin_token=TOKEN), tmp_path / "s.db", admin=admin))
    assert host_port == (host, int(admin.rsplit(":", 1)[1]))


@pytest.mark.parametrize("admin", ["127.0.0.1:18001", "localhost:18001", "[::1]:18001", "127.0.0.2:0"])
def test_check_options_loopback_needs_no_token(tmp_path: Path, admin: str) -> None:
    host, port = check_options(ServeOptions(Settings(), tmp_path / "s.db", admin=admin))
    assert (host, port) == (admin.rsplit(":", 1)[0].strip("[]"), int(admin.rsplit(":", 1)[1]))


@pytest.mark.parametrize("field_name, value, says", [
    ("admin", "no-port", "--admin"),
    ("admin", "127.0.0.1:99999", "--admin"),
    ("xds", "localhost", "--xds"),
    ("xds", "127.0.0.1", "--xds"),  # no port (was once read as host 127.0.0, port 1)
    ("xds", "[::1]18000", "--xds"),
])
def test_check_options_bad_addresses(tmp_path: Path, field_name: str, value: str, says: str) -> None:
    options = ServeOptions(Settings(), tmp_path / "s.db", **{field_name: value})
    with pytest.raises(ConfigError, match=re.escape(says)):
        check_options(options)


# =============================================================================================
# 4. OpenAPI kept true
# =============================================================================================


async def test_openapi_document_served(api: Api) -> None:
    reply = await api.call("GET", "/v1/openapi.json")
    assert reply.status == 200
    assert reply.body == json.loads(json.dumps(OPENAPI))
    assert reply.body["openapi"].startswith("3.")


async def test_openapi_routes_match_app_routes(api: Api) -> None:
    registered = {
        (route.method, route.resource.canonical)
        for route in api.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    documented = {(method.upper(), path) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert documented == registered, f"only documented: {documented - registered}; only served: {registered - documented}"


def test_openapi_refs_resolve_and_types_known() -> None:
    """Every $ref in the document resolves, and every schema type is one the checker knows."""

    def walk(node: Any, where: str, in_schema: bool) -> None:
        if isinstance(node, dict):
            if "$ref" in node:
                resolve(node)
            if in_schema and isinstance(node.get("type"), (str, list)):
                types = node["type"] if isinstance(node["type"], list) else [node["type"]]
                assert all(t in _TYPES for t in types), f"{where}: unknown type in {types}"
            for key, value in node.items():
                # Under "properties" the keys are field names, not schema keywords.
                walk(value, f"{where}.{key}", in_schema or key in ("schema", "schemas"))
        elif isinstance(node, list):
            for i, value in enumerate(node):
                walk(value, f"{where}[{i}]", in_schema)

    walk(OPENAPI, "$", False)
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            assert method in {"get", "put", "post", "delete", "patch"}, (path, method)
            assert op.get("responses"), f"{method} {path} documents no responses"


async def test_live_responses_match_openapi(api: Api) -> None:
    """Every response of a full happy path matches the schema documented for its status."""
    await api.ok("GET", "/healthz")
    await api.ok("GET", "/v1/services")
    await setup_state(api, "split")
    await api.ok("GET", "/v1/services")
    await api.ok("GET", "/v1/services/shop")
    await api.ok("GET", "/v1/services/shop?wait=converged&timeout=1")
    await api.ok("POST", "/v1/services/shop/switch?wait=converged&timeout=1")
    await api.ok("POST", "/v1/services/shop/rollback")
    await api.ok("GET", "/v1/services/shop/deployments")
    await api.ok("GET", "/v1/proxies")
    await api.ok("PUT", "/v1/services/shop", {"prefix": "/shop"})
    for method, path, reply in api.log:
        if reply.status < 300 and reply.body is not None:
            assert_documented_response(method, path, reply.status, reply.body)
    # The service view in particular, including the environments and deployments it embeds.
    service = (await api.call("GET", "/v1/services/shop")).body
    assert_schema(service, component("Service"), "service")
    assert service["environments"]["blue"]["deployment"] is not None
    assert_schema(service["environments"]["blue"]["deployment"], component("Deployment"), "deployment")
    assert_schema(service["convergence"], component("Convergence"), "convergence")


# --- a minimal ADS client, so /v1/proxies has a Proxy to show ---------------------------------


@contextlib.asynccontextmanager
async def fake_proxy(port: int, node_id: str = "fake-1") -> AsyncIterator[Any]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    queue: asyncio.Queue[Any] = asyncio.Queue()

    async def requests() -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (item := await queue.get()) is not None:
            yield item

    call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources(requests())
    node = base_pb2.Node(id=node_id, cluster="default")

    class Proxy:
        async def request(self, type_url: str, *, nonce: str = "", version: str = "", nack: str | None = None) -> None:
            req = discovery_pb2.DiscoveryRequest(node=node, type_url=type_url, response_nonce=nonce, version_info=version)
            if nack is not None:
                req.error_detail.CopyFrom(status_pb2.Status(code=3, message=nack))
            await queue.put(req)

        async def read(self) -> discovery_pb2.DiscoveryResponse:
            return await asyncio.wait_for(call.read(), 5)

    try:
        yield Proxy()
    finally:
        await queue.put(None)
        call.cancel()
        await channel.close()


async def test_proxies_and_unconverged_wait_match_openapi(api: Api) -> None:
    await setup_state(api, "seeded")
    assert xds_port(api)
    async with fake_proxy(xds_port(api)) as proxy:
        await proxy.request(typeurls.CLUSTER)
        cds = await proxy.read()
        assert cds.type_url == typeurls.CLUSTER
        await proxy.request(typeurls.CLUSTER, nonce=cds.nonce, version=cds.version_info)  # ACK
        await proxy.request(typeurls.LISTENER)
        lds = await proxy.read()
        while lds.type_url != typeurls.LISTENER:
            lds = await proxy.read()
        await proxy.request(typeurls.LISTENER, nonce=lds.nonce, nack="listener rejected by test")  # NACK

        async def one_proxy_with_nack() -> dict[str, Any]:
            for _ in range(200):
                body = (await api.call("GET", "/v1/proxies")).body
                if body["proxies"] and body["proxies"][0]["types"].get("lds", {}).get("nacks"):
                    return body
                await asyncio.sleep(0.01)
            raise AssertionError(f"proxy never showed its NACK: {body}")

        proxies = await one_proxy_with_nack()
        assert_documented_response("GET", "/v1/proxies", 200, proxies)
        (view,) = proxies["proxies"]
        assert (view["node_id"], view["fleet"], view["protocol"]) == ("fake-1", "default", "sotw")
        assert view["types"]["cds"]["acked_version"] == cds.version_info
        assert view["types"]["lds"]["last_nack"]["message"] == "listener rejected by test"
        assert_schema(view, component("Proxy"), "proxy")

        assert view["state"] == "rejecting"
        # The convergence policy does not wait for a rejecting proxy: it is named instead.
        reply = await api.call("PUT", "/v1/services/shop/traffic?wait=converged&timeout=5", {"weights": {"blue": 95, "green": 5}})
        assert reply.status == 200, reply.text
        assert reply.body["convergence"]["converged"] and reply.body["convergence"]["rejecting"] == ["fake-1"]

        # With require_all_proxies, a proxy that never ACKs everything: wait=converged times out -> 202, change stored.
        await api.call("PUT", "/v1/services/shop", {"require_all_proxies": True})
        reply = await api.call("PUT", "/v1/services/shop/traffic?wait=converged&timeout=0.2", SPLIT_90_10)
        assert reply.status == 202, reply.text
        assert_documented_response("PUT", "/v1/services/shop/traffic", 202, reply.body)
        conv = reply.body["convergence"]
        assert conv["converged"] is False and conv["seconds"] is None and conv["timed_out_after"] == 0.2
        assert conv["proxies"] == 1
        assert (await api.ok("GET", "/v1/services/shop"))["traffic"]["weights"] == {"blue": 90, "green": 10}

        metrics = (await api.call("GET", "/metrics")).text
        assert 'bluegreen_xds_connected_proxies{fleet="default"} 1.0' in metrics
        samples = _samples(metrics)
        assert samples[("bluegreen_xds_nacks_total", (("type_url", typeurls.LISTENER),))] == 1.0
        assert samples[("bluegreen_xds_responses_total", (("type_url", typeurls.CLUSTER),))] >= 1.0


def xds_port(api: Api) -> int:
    assert api.cp.xds_port
    return api.cp.xds_port


# =============================================================================================
# 5. /metrics
# =============================================================================================


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_after_split(api: Api) -> None:
    await setup_state(api, "split")
    reply = await api.call("GET", "/metrics")
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    text = reply.text
    assert 'bluegreen_traffic_weight{environment="green",service="shop"} 10.0' in text
    samples = _samples(text)
    assert samples[("bluegreen_traffic_weight", (("environment", "blue"), ("service", "shop")))] == 90.0
    assert samples[("bluegreen_traffic_weight", (("environment", "green"), ("service", "shop")))] == 10.0
    for name, kind in [
        ("bluegreen_traffic_weight", "gauge"),
        ("bluegreen_xds_connected_proxies", "gauge"),
        ("bluegreen_xds_responses_total", "counter"),
        ("bluegreen_xds_nacks_total", "counter"),
        ("bluegreen_convergence_seconds", "histogram"),
    ]:
        assert re.search(rf"^# HELP {name} \S", text, re.M), f"no HELP line for {name}"
        assert re.search(rf"^# TYPE {name} {kind}$", text, re.M), f"no TYPE {kind} line for {name}"

    # The gauge follows every published change, straight from the mutating call's answer.
    await api.ok("POST", "/v1/services/shop/switch")
    samples = _samples((await api.call("GET", "/metrics")).text)
    assert samples[("bluegreen_traffic_weight", (("environment", "green"), ("service", "shop")))] == 100.0
    assert samples[("bluegreen_traffic_weight", (("environment", "blue"), ("service", "shop")))] == 0.0


# =============================================================================================
# 6. Config file errors
# =============================================================================================


def _fleet(**listener: Any) -> dict[str, Any]:
    return {"fleets": {"edge": {"listeners": [{"name": "http", "port": 10000, **listener}]}}}


def _two_listeners(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {"fleets": {"edge": {"listeners": [a, b]}}}


CONFIG_ERRORS = [
    pytest.param({"bogus": 1}, ["config: unknown key(s) bogus", "allowed: admin, analysis, convergence, endpoint_sources, fleets"], id="unknown-top-key"),
    pytest.param({"convergence": {"lagging_after_seconds": 0}}, ["convergence.lagging_after_seconds", "got 0"], id="lagging-zero"),
    pytest.param({"convergence": {"lagging_after": 5}}, ["convergence: unknown key(s) lagging_after"], id="convergence-unknown-key"),
    pytest.param({"admin": {"token": TOKEN, "user": "x"}}, ["admin: unknown key(s) user"], id="unknown-admin-key"),
    pytest.param({"fleets": {"edge": {"listeners": [{"name": "http", "port": 1}], "colour": "x"}}},
                 ["fleets.edge: unknown key(s) colour"], id="unknown-fleet-key"),
    pytest.param(_fleet(tls=True), ["fleets.edge.listeners[0]: unknown key(s) tls"], id="unknown-listener-key"),
    pytest.param(_two_listeners({"name": "http", "port": 10000}, {"name": "http", "port": 10002}),
                 ["fleets.edge.listeners", "names must be unique"], id="duplicate-listener-names"),
    pytest.param(_two_listeners({"name": "a", "port": 10000}, {"name": "b", "port": 10000}),
                 ["fleets.edge.listeners", "must be distinct", "10000"], id="duplicate-ports"),
    pytest.param(_two_listeners({"name": "a", "port": 10000, "preview_port": 10001}, {"name": "b", "port": 10001}),
                 ["must be distinct"], id="port-equals-other-preview-port"),
    pytest.param(_fleet(preview_port=10000), ["must be distinct"], id="preview-port-equals-port"),
    pytest.param(_fleet(port=0), ["fleets.edge.listeners[0].port", "1-65535", "0"], id="port-0"),
    pytest.param(_fleet(port=70000), ["fleets.edge.listeners[0].port", "70000"], id="port-70000"),
    pytest.param(_fleet(port="80"), ["fleets.edge.listeners[0].port", "'80'"], id="port-string"),
    pytest.param(_fleet(port=True), ["fleets.edge.listeners[0].port", "True"], id="port-bool"),
    pytest.param(_fleet(port=None), ["fleets.edge.listeners[0].port"], id="port-missing"),
    pytest.param(_fleet(preview_port=-1), ["fleets.edge.listeners[0].preview_port"], id="preview-port-negative"),
    pytest.param(_fleet(address="localhost"), ["listeners[0].address", "expected an IP address"], id="listener-hostname"),
    pytest.param(_fleet(name="web-preview"), ["listeners[0].name", "-preview"], id="listener-name-preview"),
    pytest.param({"fleets": {"edge": {"listeners": []}}}, ["fleets.edge.listeners", "non-empty list"], id="no-listeners"),
    pytest.param({"fleets": {}}, ["at least one fleet"], id="no-fleets"),
    pytest.param({"fleets": {"bad name": {"listeners": [{"name": "a", "port": 1}]}}}, ["invalid fleet name"], id="fleet-name"),
    pytest.param({"fleets": {"edge": {"listeners": [{"name": "a", "port": 1}], "services": ["Shop"]}}},
                 ["fleets.edge.services", "invalid service name 'Shop'"], id="fleet-service-name"),
    pytest.param({"fleets": {"edge": {"listeners": [{"name": "a", "port": 1}], "services": "shop"}}},
                 ["fleets.edge.services"], id="fleet-services-not-list"),
    pytest.param({"admin": {"token": "short"}}, ["admin token", "at least 16 characters"], id="token-short"),
    pytest.param({"admin": {"token": "x" * 15}}, ["at least 16 characters"], id="token-15"),
    pytest.param({"admin": {"token": 12345678901234567890}}, ["at least 16 characters"], id="token-not-string"),
    pytest.param({"admin": {"token": TOKEN, "token_file": "/x"}}, ["token or token_file, not both"], id="token-and-file"),
    pytest.param({"admin": {"token_file": "/nonexistent/bluegreen-token"}}, ["admin.token_file"], id="token-file-missing"),
    pytest.param(["fleets"], ["config: expected a mapping", "list"], id="not-a-mapping"),
    pytest.param({"admin": "secret"}, ["admin: expected a mapping"], id="admin-not-mapping"),
]


@pytest.mark.parametrize("data, says", CONFIG_ERRORS)
def test_parse_settings_rejects(data: Any, says: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(data)
    for fragment in says:
        assert fragment in str(info.value), f"{fragment!r} not in {str(info.value)!r}"


def test_parse_settings_accepts_a_full_config(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    settings = parse_settings({
        "admin": {"token_file": str(token_file)},
        "fleets": {
            "edge": {"listeners": [{"name": "http", "address": "0.0.0.0", "port": 10000, "preview_port": 10001},
                                   {"name": "alt", "port": 10002}],
                     "services": ["shop", "search"]},
            "internal": {"listeners": [{"name": "http", "port": 11000}]},
        },
    })
    assert settings.admin_token == TOKEN
    assert [f.name for f in settings.fleets] == ["edge", "internal"]
    edge = settings.fleet("edge")
    assert edge is not None and edge.services == ("shop", "search")
    assert edge.listeners[0].preview_port == 10001 and edge.listeners[1].address == "127.0.0.1"
    assert settings.fleet("internal").services is None  # type: ignore[union-attr]
    assert parse_settings(None) == Settings()


def test_token_file_too_short(tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("short\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        parse_settings({"admin": {"token_file": str(token_file)}})


def test_load_settings_files(tmp_path: Path) -> None:
    assert load_settings(None) == Settings()

    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("fleets:\n  edge: [unclosed\n    listeners: {\n")
    with pytest.raises(ConfigError) as info:
        load_settings(bad_yaml)
    assert "not valid YAML" in str(info.value) and str(bad_yaml) in str(info.value)

    tabs = tmp_path / "tabs.yaml"
    tabs.write_text("admin:\n\ttoken: x\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(tabs)

    missing = tmp_path / "missing.yaml"
    with pytest.raises(ConfigError, match="cannot read config"):
        load_settings(missing)

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("admin:\n  token: " + TOKEN + "\nlisteners: []\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) listeners"):
        load_settings(unknown)

    short = tmp_path / "short.yaml"
    short.write_text("admin:\n  token: abc\n")
    with pytest.raises(ConfigError, match="at least 16 characters"):
        load_settings(short)

    good = tmp_path / "good.yaml"
    good.write_text(
        "admin:\n  token: " + TOKEN + "\n"
        "fleets:\n  edge:\n    listeners:\n      - name: http\n        address: 0.0.0.0\n        port: 10000\n"
    )
    settings = load_settings(good)
    assert settings.admin_token == TOKEN and settings.fleets[0].listeners[0].port == 10000

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_settings(empty) == Settings()


def test_blue_registered_without_endpoints_is_not_recorded_active(tmp_path: Path) -> None:
    """Nothing serves an environment with no endpoints, whatever its weight."""
    from controlplane.model import DeploymentStatus, Environment, Service, parse_environment_spec, set_environment

    change = set_environment(Service(name="shop"), Environment.BLUE, parse_environment_spec({"version": "v1", "endpoints": []}),
                             {Environment.BLUE: None, Environment.GREEN: None}, 1.0)
    [record] = change.deployments
    assert record.status is DeploymentStatus.READY and record.activated_at is None


def test_duplicate_keys_in_the_config_file_are_refused(tmp_path: Path) -> None:
    from controlplane.config import load_settings
    from controlplane.errors import ConfigError

    path = tmp_path / "dup.yaml"
    path.write_text("fleets:\n  edge:\n    listeners: [{name: a, port: 1000}]\n  edge:\n    listeners: [{name: b, port: 2000}]\n")
    with pytest.raises(ConfigError, match="duplicate key 'edge'"):
        load_settings(path)
