"""A decommissioned environment leaves Envoy: route first, then its cluster, with no failed request."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any


from tests.harness import sample_environments, wait_for
from tests.test_analysis import steady_load
from tests.test_envoy import blue_only_stack


def _dynamic_clusters(dump: dict[str, Any]) -> set[str]:
    """Names in a config dump filtered with resource=dynamic_active_clusters (one entry each)."""
    return {entry["cluster"]["name"] for entry in dump.get("configs", [])}


async def test_decommission_removes_the_old_cluster_without_errors(tmp_path: Path) -> None:
    async with blue_only_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 1}) as (cp, api, envoy, port, blue, green):
        session = api.session
        assert _dynamic_clusters(await envoy.config_dump(resource="dynamic_active_clusters")) == {"shop-blue"}

        stop = asyncio.Event()
        async with steady_load(f"http://127.0.0.1:{port}/", stop) as statuses:
            created = await api.call("POST", "/v1/services/shop/deployments", {
                "version": "v2", "endpoints": [green.address], "strategy": {"steps": [100], "bake_seconds": 0},
            }, expect=202)
            # Green is added (cluster before route), takes 100 %, blue drains, stands by, and leaves.

            async def decommissioned() -> dict[str, Any] | None:
                records = (await api.call("GET", "/v1/services/shop/deployments"))["deployments"]
                old = next(r for r in records if r["version"] == "v1")
                return old if old["status"] == "decommissioned" and not old["hooks_pending"] else None

            await wait_for(decommissioned, timeout=60, message="blue decommissioned")
            view = await api.call("GET", "/v1/services/shop", wait="converged", timeout="15")
            assert view["environments"]["blue"]["endpoints"] == []

            async def blue_gone() -> bool:
                return _dynamic_clusters(await envoy.config_dump(resource="dynamic_active_clusters")) == {"shop-green"}

            await wait_for(blue_gone, timeout=30, message="shop-blue removed from Envoy")
        assert statuses and all(s == 200 for s in statuses), sorted(set(statuses))
        deployment = await api.call("GET", f"/v1/deployments/{created['id']}")
        assert deployment["status"] == "active"
        assert await sample_environments(f"http://127.0.0.1:{port}/", 50) == {"green": 50}
        # The preview entry now says nothing is deployed in the idle environment.
        async with session.get(f"http://127.0.0.1:{port}/", headers={"x-bluegreen-preview": "1"}) as response:
            assert response.status == 503
            assert "no version is deployed in the idle environment of shop" in await response.text()
