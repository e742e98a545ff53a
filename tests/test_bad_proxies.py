"""One bad proxy never blocks a release, and a stale proxy is never cut off.

Real control plane process, real Envoy (edge-1) and demo apps, plus raw gRPC ADS clients that
join the same fleet and misbehave the way the control plane sees a broken proxy: one never
ACKs anything, one NACKs every route change after its first."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2
from google.rpc import status_pb2

from controlplane import typeurls
from tests.harness import admin_headers, free_port, run_control_plane, run_upstream, sample_environments, settle_on, wait_for
from tests.test_envoy import Api, envoy_for, wait_proxies

pytestmark = pytest.mark.envoy

GRACE_SECONDS = 2  # convergence.lagging_after_seconds in the test config


class RawProxy:
    """A SotW ADS client on the fleet. ``ack_routes_after_first=False`` makes it NACK every route
    configuration after the first one it accepts; ``silent`` makes it never answer at all."""

    def __init__(self, xds: str, node_id: str, *, silent: bool = False) -> None:
        self.channel = grpc.aio.insecure_channel(xds)
        self.node = base_pb2.Node(id=node_id, cluster="default")
        self.silent = silent
        self.outbox: asyncio.Queue[discovery_pb2.DiscoveryRequest | None] = asyncio.Queue()
        self.names: dict[str, list[str]] = {typeurls.CLUSTER: [], typeurls.LISTENER: [], typeurls.ENDPOINT: [],
                                            typeurls.ROUTE: ["default-routes", "default-preview-routes"]}
        self.accepted: dict[str, str] = {}
        self.nonces: dict[str, str] = {}
        self.routes_accepted = 0
        self.routes_rejected = 0
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(self.channel).StreamAggregatedResources(self._requests())
        self.task = asyncio.create_task(self._run())

    async def _requests(self) -> AsyncIterator[discovery_pb2.DiscoveryRequest]:
        while (request := await self.outbox.get()) is not None:
            yield request

    def _send(self, type_url: str, nonce: str = "", error: str | None = None) -> None:
        request = discovery_pb2.DiscoveryRequest(node=self.node, type_url=type_url, resource_names=self.names[type_url],
                                                 response_nonce=nonce, version_info=self.accepted.get(type_url, ""))
        if error is not None:
            request.error_detail.CopyFrom(status_pb2.Status(code=3, message=error))
        self.outbox.put_nowait(request)

    async def _run(self) -> None:
        self._send(typeurls.CLUSTER)
        self._send(typeurls.LISTENER)
        while True:
            response = await self.call.read()
            if response is grpc.aio.EOF:
                return
            if self.silent:
                continue
            self.nonces[response.type_url] = response.nonce
            if response.type_url == typeurls.ROUTE and self.routes_accepted:
                self.routes_rejected += 1
                self._send(typeurls.ROUTE, response.nonce, error="route rejected by this proxy")
                continue
            self.accepted[response.type_url] = response.version_info
            self.routes_accepted += response.type_url == typeurls.ROUTE
            self._send(response.type_url, response.nonce)
            if response.type_url == typeurls.CLUSTER:
                names = sorted(cluster_pb2.Cluster.FromString(r.value).name for r in response.resources)
                if names != self.names[typeurls.ENDPOINT]:  # follow the clusters, as Envoy does
                    self.names[typeurls.ENDPOINT] = names
                    self._send(typeurls.ENDPOINT, self.nonces.get(typeurls.ENDPOINT, ""))
            if response.type_url == typeurls.LISTENER and typeurls.ROUTE not in self.nonces:
                self._send(typeurls.ROUTE)

    async def close(self) -> None:
        self.task.cancel()
        self.outbox.put_nowait(None)
        self.call.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.channel.close()


@contextlib.asynccontextmanager
async def raw_proxy(cp: Any, node_id: str, *, silent: bool = False) -> AsyncIterator[RawProxy]:
    proxy = RawProxy(cp.xds_address, node_id, silent=silent)
    try:
        yield proxy
    finally:
        await proxy.close()


@contextlib.asynccontextmanager
async def fleet_stack(tmp_path: Path, service: dict[str, Any]) -> AsyncIterator[tuple[Any, Api, int, Any]]:
    """Control plane with a short lagging grace period, service `shop` on blue v1, edge-1 (a real
    Envoy) converged on it, and a green v2 app ready to be deployed."""
    port, preview_port = free_port(), free_port()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "fleets": {"default": {"listeners": [{"name": "http", "address": "127.0.0.1", "port": port, "preview_port": preview_port}]}},
        "convergence": {"lagging_after_seconds": GRACE_SECONDS},
    }))
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
            run_control_plane(state_path=tmp_path / "state.db", config_path=config, log_dir=tmp_path) as cp, \
            aiohttp.ClientSession() as session, envoy_for(cp, "edge-1") as envoy:
        api = Api(session, cp.admin_url)
        await api.call("PUT", "/v1/services/shop", service)
        await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        await wait_proxies(api, 1)
        await envoy.wait_ready()
        yield cp, api, port, green


def deployment(green: Any, **extra: Any) -> dict[str, Any]:
    return {"version": "v2", "endpoints": [green.address], "strategy": {"steps": [100], "bake_seconds": 0},
            "smoke": {"checks": [{"path": "/healthz", "body_contains": "ok"}]}, **extra}


async def proxy_state(api: Api, node_id: str) -> str | None:
    for proxy in await api.proxies():
        if proxy["node_id"] == node_id:
            return str(proxy["state"])
    return None


async def settled(api: Api, deployment_id: str, *statuses: str) -> dict[str, Any]:
    async def done() -> dict[str, Any] | None:
        record = await api.call("GET", f"/v1/deployments/{deployment_id}")
        return record if record["status"] in statuses else None

    return await wait_for(done, timeout=90, message=f"{deployment_id} reaches {statuses}")


async def test_a_proxy_that_never_acks_does_not_block_a_release(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 3600}) as (cp, api, port, green), \
            raw_proxy(cp, "stuck", silent=True):
        await wait_for(lambda: _is(proxy_state(api, "stuck"), "lagging"), timeout=30, message="stuck reported lagging")
        view = await api.call("GET", "/v1/services/shop")
        assert view["convergence"]["lagging"] == ["stuck"] and view["convergence"]["converged"]
        metrics = await (await api.session.get(api.base + "/metrics", headers=admin_headers(api.base))).text()
        assert 'bluegreen_xds_lagging_proxies{fleet="default"} 1.0' in metrics

        # Asking for every proxy: the gate waits for the stuck one and fails, as it always did.
        strict = (await api.call("POST", "/v1/services/shop/deployments",
                                 deployment(green, convergence={"require_all_proxies": True}), expect=202))["id"]
        record = await settled(api, strict, "failed")
        assert "every connected proxy (require_all_proxies) did not ACK" in record["reason"]

        # By default the gate waits for the healthy proxies only, and says whom it went without.
        created = (await api.call("POST", "/v1/services/shop/deployments", deployment(green), expect=202))["id"]
        record = await settled(api, created, "active", "failed", "rolled_back")
        assert record["status"] == "active", record["history"]
        reasons = [e["reason"] for e in record["history"]]
        assert any("smoke tests proceeded without proxies that did not converge (lagging: stuck)" in r for r in reasons), reasons
        await settle_on(f"http://127.0.0.1:{port}/", "green")
        assert await proxy_state(api, "stuck") == "lagging"
        assert await proxy_state(api, "edge-1") == "converged"


async def _is(value: Any, expected: str) -> bool:
    return await value == expected


async def test_a_proxy_that_rejects_the_cutover_keeps_the_old_environment_until_forced(tmp_path: Path) -> None:
    async with fleet_stack(tmp_path, {"drain_seconds": 1, "standby_seconds": 1}) as (cp, api, port, green), \
            raw_proxy(cp, "nacker") as nacker:
        await wait_for(lambda: _is(proxy_state(api, "nacker"), "converged"), timeout=30, message="nacker converged on blue")

        created = (await api.call("POST", "/v1/services/shop/deployments", deployment(green), expect=202))["id"]
        record = await settled(api, created, "active", "failed", "rolled_back")
        assert record["status"] == "active", record["history"]
        # edge-1, a real Envoy, took the cutover; nacker rejected it and still routes to blue.
        await settle_on(f"http://127.0.0.1:{port}/", "green")
        assert nacker.routes_rejected >= 1
        assert await proxy_state(api, "nacker") == "rejecting"

        # The standby ends (1 s), but the decommission waits, and says for what.
        async def old_waiting() -> dict[str, Any] | None:
            old = next(r for r in (await api.call("GET", "/v1/services/shop/deployments"))["deployments"] if r["version"] == "v1")
            return old if old["waiting_for"] else None

        old = await wait_for(old_waiting, timeout=60, message="decommission waits for nacker")
        assert old["status"] == "standby" and old["waiting_for"] == "proxies still routing to blue: nacker"
        assert (await api.call("GET", "/v1/services/shop"))["environments"]["blue"]["endpoints"], "blue must not be removed"

        refused = await api.call("POST", f"/v1/deployments/{old['id']}/decommission", expect=409)
        assert "proxies still routing to blue: nacker" in refused["error"] and "force=true" in refused["error"]

        forced = await api.call("POST", f"/v1/deployments/{old['id']}/decommission", force="true")
        assert forced["status"] == "decommissioned" and forced["waiting_for"] is None
        last = forced["history"][-1]
        assert last["actor"] == "token:admin" and "forced while proxies still routing to blue: nacker" in last["reason"]
        # The driver looked again every second while it waited; the wait is in the history once.
        assert sum("decommission waits" in e["reason"] for e in forced["history"]) == 1
        view = await api.call("GET", "/v1/services/shop")
        assert view["environments"]["blue"]["endpoints"] == []
        assert await sample_environments(f"http://127.0.0.1:{port}/", 20) == {"green": 20}
