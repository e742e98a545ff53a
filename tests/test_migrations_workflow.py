"""Expand/contract tied to deployments, against a real PostgreSQL: the expand runs with the
deployment, and contract is refused while the old version's environment can still take traffic."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import psycopg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from controlplane.admin.api import build_admin_app
from controlplane.app import ControlPlane
from controlplane.config import Settings
from controlplane.migrations.apply import applied, apply_phase
from controlplane.migrations.files import Phase, load_migration_set
from controlplane.store.sqlite import open_sqlite_store
from tests.fixtures.app_versions import V1, V2
from tests.harness import wait_for
from tests.pg import pg_url, postgres_server  # noqa: F401  (pytest fixtures)

RENAME = Path(__file__).parents[1] / "examples" / "migrations" / "rename_email"


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[TestClient]:
    cp = ControlPlane(Settings(), await open_sqlite_store(tmp_path / "state.db"))
    await cp.start("127.0.0.1:0")
    client = TestClient(TestServer(build_admin_app(cp, None)))
    await client.start_server()
    try:
        yield client
    finally:
        await client.close()
        await cp.stop()


async def call(client: TestClient, method: str, path: str, body: Any = None, expect: int = 200) -> Any:
    response = await client.request(method, path, json=body)
    data = await response.json()
    assert response.status == expect, (method, path, response.status, data)
    return data


def v1_schema(tmp_path: Path, url: str) -> None:
    """The database as v1 left it: only the first expand file, recorded like any other."""
    v1_dir = tmp_path / "v1-set"
    v1_dir.mkdir()
    shutil.copy(RENAME / "0001_create_users.expand.sql", v1_dir)
    apply_phase(load_migration_set(v1_dir), Phase.EXPAND, url, deployment_id="shop-1")


async def test_contract_waits_until_the_old_version_is_decommissioned(tmp_path: Path, api: TestClient, pg_url: str) -> None:  # noqa: F811
    await asyncio.to_thread(v1_schema, tmp_path, pg_url)
    await call(api, "PUT", "/v1/services/shop", {"drain_seconds": 0, "standby_seconds": 3600})
    await call(api, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9"]})

    created = await call(api, "POST", "/v1/services/shop/deployments", {
        "version": "v2", "endpoints": ["127.0.0.1:10"], "strategy": {"steps": [100], "bake_seconds": 0},
        "migrations": {"directory": str(RENAME), "database": pg_url},
    }, expect=202)
    assert created["id"] == "shop-2"

    async def standby() -> list[dict[str, Any]] | None:
        records = (await call(api, "GET", "/v1/services/shop/deployments"))["deployments"]
        status = {r["id"]: (r["status"], r["baking"]) for r in records}
        return records if status.get("shop-2") == ("active", False) and status.get("shop-1", ("",))[0] == "standby" else None

    records = await wait_for(standby, timeout=30, message="v2 active and v1 on standby")
    v2_history = next(r for r in records if r["id"] == "shop-2")["history"]
    assert any(e["reason"].startswith("expand migrations applied: 1 applied, 1 already there") for e in v2_history), v2_history
    rows = await asyncio.to_thread(applied, pg_url)
    assert {(r["name"], r["deployment_id"]) for r in rows} == {
        ("0001_create_users.expand.sql", "shop-1"), ("0002_add_email.expand.sql", "shop-2")}

    # After expand both versions read and write, and see each other's writes.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        a = V1.create_user(conn, "ada", "ada@v1.example")
        b = V2.create_user(conn, "bob", "bob@v2.example")
        assert V2.get_address(conn, a) == "ada@v1.example"
        assert V1.get_address(conn, b) == "bob@v2.example"

    # Contract is refused while v1 can still take traffic again (standby), through the API...
    refused = await call(api, "POST", "/v1/services/shop/migrations/contract",
                         {"directory": str(RENAME), "database": pg_url}, expect=409)
    assert "environment blue runs shop-1 (v1, standby, standby_until" in refused["error"], refused
    # ...and through the CLI, which asks the control plane for the same facts.
    admin = f"http://127.0.0.1:{api.port}"
    cli = await asyncio.to_thread(subprocess.run, [
        sys.executable, "-m", "controlplane", "migrate", "contract", str(RENAME),
        "--database", pg_url, "--service", "shop", "--admin", admin], capture_output=True, text=True, timeout=60)
    assert cli.returncode == 1, (cli.stdout, cli.stderr)
    assert "standby_until" in cli.stderr and "shop-1" in cli.stderr, cli.stderr
    assert not [r for r in await asyncio.to_thread(applied, pg_url) if r["phase"] == "contract"]

    # Once v1 is decommissioned, contract runs.
    await call(api, "POST", "/v1/deployments/shop-1/decommission")
    done = await call(api, "POST", "/v1/services/shop/migrations/contract", {"directory": str(RENAME), "database": pg_url})
    assert done["applied"] == ["0003_drop_mail.contract.sql"] and done["expanded_by"] == "shop-2"
    again = await call(api, "POST", "/v1/services/shop/migrations/contract", {"directory": str(RENAME), "database": pg_url})
    assert again["applied"] == [] and again["skipped"] == ["0003_drop_mail.contract.sql"]

    # After contract, v1 fails: exactly why the gate exists. v2 keeps working.
    with psycopg.connect(pg_url, autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedColumn):
            V1.get_address(conn, a)
        assert V2.get_address(conn, a) == "ada@v1.example"


async def test_an_expand_that_breaks_the_old_version_is_refused_and_nothing_changes(tmp_path: Path, api: TestClient, pg_url: str) -> None:  # noqa: F811
    await call(api, "PUT", "/v1/services/shop", {})
    await call(api, "PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9"]})
    before = await call(api, "GET", "/v1/services/shop")
    bad = tmp_path / "bad-set"
    bad.mkdir()
    (bad / "0001_drop_mail.expand.sql").write_text("SET lock_timeout = '1s';\nALTER TABLE users DROP COLUMN mail;\n")
    refused = await call(api, "POST", "/v1/services/shop/deployments", {
        "version": "v2", "endpoints": ["127.0.0.1:10"], "migrations": {"directory": str(bad), "database": pg_url},
    }, expect=400)
    assert "0001_drop_mail.expand.sql:2" in refused["error"] and "lint found errors" in refused["error"], refused
    after = await call(api, "GET", "/v1/services/shop")
    assert after == before
    assert (await call(api, "GET", "/v1/services/shop/deployments"))["deployments"] == before_deployments(before)
    assert await asyncio.to_thread(applied, pg_url) == []


def before_deployments(view: dict[str, Any]) -> list[dict[str, Any]]:
    return [view["environments"]["blue"]["deployment"]]
