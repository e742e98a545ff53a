"""Replicas on a real 3-member etcd, real Envoys, real upstream apps, under keep-alive load.

1. Three replicas, two Envoys (one per fleet, each bootstrapped with every replica): a stepped
   deployment created through a follower runs on the leader; the leader is SIGKILLed mid-way; a
   follower takes over and completes it with each step applied once; then a follower that holds
   an Envoy is SIGKILLed and its Envoy reconnects to another replica. 0 failed requests
   throughout, long requests included. Every replica answers xDS requests byte-identically.
2. etcd: one member of three stopped changes nothing; all stopped: Envoy keeps serving, writes
   answer 503 naming etcd, /readyz fails; members restarted: a traffic change goes through.
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest
import yaml
from envoy.config.core.v3 import base_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane import typeurls
from controlplane.bootstrap import render_bootstrap
from tests.etcd import EtcdCluster, fresh_prefix
from tests.harness import ControlPlane, cluster_view, free_port, run_envoy, run_replicas, run_upstream, sample_environments, settle_on, wait_for
from tests.test_envoy import Api
from tests.test_workflow import no_retry_session, steady_load

pytestmark = [pytest.mark.envoy, pytest.mark.timeout(400)]


def write_fleets(path: Path, ports: dict[str, tuple[int, int]]) -> Path:
    path.write_text(yaml.safe_dump({"fleets": {
        fleet: {"listeners": [{"name": "http", "address": "127.0.0.1", "port": port, "preview_port": preview}]}
        for fleet, (port, preview) in ports.items()}}))
    return path


def bootstrap(node_id: str, fleet: str, replicas: list[ControlPlane], admin_port: int) -> str:
    return render_bootstrap(node_id=node_id, fleet=fleet, xds=[r.xds_address for r in replicas], admin_port=admin_port)


async def xds_response(address: str, fleet: str, type_url: str) -> bytes:
    """The first response of a fresh ADS stream for ``type_url``, nonce cleared, deterministic bytes."""
    async with grpc.aio.insecure_channel(address) as channel:
        call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(channel).StreamAggregatedResources()
        await call.write(discovery_pb2.DiscoveryRequest(node=base_pb2.Node(id="probe", cluster=fleet), type_url=type_url))
        response = await asyncio.wait_for(call.read(), 10)
        call.cancel()
    response.nonce = ""
    return response.SerializeToString(deterministic=True)


async def leader_of(replicas: list[ControlPlane]) -> ControlPlane:
    async def one() -> ControlPlane | None:
        for r in replicas:
            if r.process.returncode is None:
                view = await cluster_view(r)
                if view["leader"]:
                    return next(x for x in replicas if view["leader"] == _name(replicas, x))
        return None

    return await wait_for(one, timeout=30, message="a leader")


async def proxies_by_replica(api: Api) -> dict[str, str]:
    return {p["node_id"]: p["replica"] for p in await api.proxies()}


async def test_leader_sigkill_mid_deployment_and_follower_sigkill_fail_no_request(tmp_path: Path, etcd: EtcdCluster) -> None:
    ports = {"a": (free_port(), free_port()), "b": (free_port(), free_port())}
    config = write_fleets(tmp_path / "config.yaml", ports)
    async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
            run_replicas(3, store_url=etcd.url(fresh_prefix()), config_path=config, log_dir=tmp_path) as replicas, \
            aiohttp.ClientSession() as session:
        apis = [Api(session, r.admin_url) for r in replicas]
        await apis[0].call("PUT", "/v1/services/shop", {"drain_seconds": 1, "standby_seconds": 300})
        await apis[1].call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
        envoy_ports = [free_port(), free_port()]
        async with run_envoy(bootstrap("edge-a", "a", replicas, envoy_ports[0]), admin_port=envoy_ports[0]) as envoy_a, \
                run_envoy(bootstrap("edge-b", "b", replicas[::-1], envoy_ports[1]), admin_port=envoy_ports[1]) as envoy_b:
            await envoy_a.wait_ready()
            await envoy_b.wait_ready()
            # Every replica sees both proxies (its own live, the others' through etcd).
            for api in apis:
                await wait_for(lambda api=api: _both(api), timeout=30, message="both proxies in every replica's view")

            # Versions: the same state gives byte-identical xDS responses from every replica.
            for type_url in (typeurls.CLUSTER, typeurls.LISTENER, typeurls.ROUTE):
                answers = {await xds_response(r.xds_address, "a", type_url) for r in replicas}
                assert len(answers) == 1, f"{type_url}: replicas answer differently"

            urls = [f"http://127.0.0.1:{ports[f][0]}/" for f in ("a", "b")]
            leader = await leader_of(replicas)
            placed = await proxies_by_replica(apis[0])
            victim = next((r for r in replicas if r is not leader and _name(replicas, r) in placed.values()), None)
            # Commands go through a follower that stays up (the victim goes down for a while).
            follower = next(r for r in replicas if r is not leader and r is not victim)
            api = apis[replicas.index(follower)]
            async with steady_load(urls[0]) as load_a, steady_load(urls[1]) as load_b, no_retry_session(8) as slow_session:
                slow = [asyncio.create_task(_slow(slow_session, url)) for url in urls for _ in range(2)]
                # A follower holding an Envoy dies (SIGKILL): its Envoy reconnects to another
                # replica, and the follower comes back. (The two Envoys list the replicas in
                # opposite orders, so they nearly always start on different replicas; if both
                # sit on the leader, the leader's death below covers the reconnection.)
                print(f"leader r{replicas.index(leader)}; proxies on {placed}; killing follower "
                      f"{_name(replicas, victim) if victim else '(none holds an Envoy)'}")
                if victim is not None:
                    victim.process.kill(signal.SIGKILL)
                    await victim.process.wait()
                    live = {_name(replicas, r) for r in replicas if r is not victim}
                    await wait_for(lambda: _placed_on(api, live), timeout=60, message="the Envoy moved to a live replica")
                    await victim.start()
                    await wait_for(lambda: _registered(api, 3), timeout=30, message="the follower rejoined")
                assert (await leader_of(replicas)) is leader, "a follower's death does not move the leadership"
                created = await api.call("POST", "/v1/services/shop/deployments", {
                    "version": "v2", "endpoints": [green.address],
                    "strategy": {"steps": [10, 50, 100], "step_seconds": 3},
                    "smoke": {"checks": [{"path": "/healthz", "body_contains": "ok"}]}}, expect=202)
                did = created["id"]
                await wait_for(lambda: _deployment(api, did, status="shifting", step=0), timeout=60, message="step 0 (run by the leader)")

                leader.process.kill(signal.SIGKILL)
                await leader.process.wait()
                survivors = [r for r in replicas if r is not leader]
                new_leader = await leader_of(survivors)
                assert new_leader is not leader
                done = await wait_for(lambda: _deployment(api, did, status="active", step=2), timeout=90,
                                      message="completed by the new leader")
                steps = [e["reason"] for e in done["history"] if e["reason"].startswith("step ")]
                assert len(steps) == len(set(steps)) and any(s.startswith("step 2:") for s in steps), done["history"]
                for url in urls:
                    counts = await sample_environments(url, 50)
                    assert counts == {"green": 50}, counts

                live = {_name(replicas, r) for r in survivors}
                await wait_for(lambda: _placed_on(api, live), timeout=60, message="both Envoys on live replicas")
                # And the workflow still answers: a rollback through the new leader reaches both Envoys.
                view = await apis[replicas.index(new_leader)].call("POST", "/v1/services/shop/rollback")
                assert view["traffic"]["weights"] == {"blue": 100, "green": 0}
                for url in urls:
                    await settle_on(url, "blue", timeout=30)
                # ?wait=converged through any replica waits for the proxies of every replica.
                for r in survivors:
                    view = await apis[replicas.index(r)].call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}},
                                                              wait="converged", timeout="30")
                    assert view["convergence"]["converged"] and view["convergence"]["proxies"] == 2, view["convergence"]
                results = await asyncio.gather(*slow)
            for load in (load_a, load_b):
                assert load.total > 100 and set(load.statuses) == {200}, (dict(load.statuses), load.errors[:5])
            assert all(r.startswith("200") for r in results), results


def _name(replicas: list[ControlPlane], replica: ControlPlane | None) -> str:
    return f"r{replicas.index(replica)}" if replica is not None else "-"


async def _registered(api: Api, count: int) -> bool:
    return len((await api.call("GET", "/v1/cluster"))["replicas"]) == count


async def _both(api: Api) -> bool:
    nodes = {p["node_id"] for p in await api.proxies()}
    return nodes == {"edge-a", "edge-b"}


async def _placed_on(api: Api, live: set[str]) -> bool:
    placed = await proxies_by_replica(api)
    return set(placed) == {"edge-a", "edge-b"} and set(placed.values()) <= live


async def _deployment(api: Api, did: str, **expected: Any) -> dict[str, Any] | None:
    d = await api.call("GET", f"/v1/deployments/{did}")
    if d["status"] in ("failed", "rolled_back"):
        raise AssertionError(f"{did} ended {d['status']}: {d['reason']}")
    return d if all(d[k] == v for k, v in expected.items()) else None  # type: ignore[no-any-return]


async def _slow(session: aiohttp.ClientSession, url: str) -> str:
    try:
        async with session.get(f"{url}slow?seconds=4", timeout=aiohttp.ClientTimeout(total=60)) as response:
            await response.read()
            return f"{response.status} {response.headers.get('x-bluegreen-environment')}"
    except (aiohttp.ClientError, TimeoutError) as exc:
        return f"error {type(exc).__name__}: {exc}"


async def test_etcd_member_loss_and_total_outage(tmp_path: Path, etcd: EtcdCluster) -> None:
    ports = {"a": (free_port(), free_port())}
    config = write_fleets(tmp_path / "config.yaml", ports)
    try:
        async with run_upstream("blue", "v1") as blue, run_upstream("green", "v2") as green, \
                run_replicas(1, store_url=etcd.url(fresh_prefix()), config_path=config, log_dir=tmp_path) as [cp], \
                aiohttp.ClientSession() as session:
            api = Api(session, cp.admin_url)
            await api.call("PUT", "/v1/services/shop", {})
            await api.call("PUT", "/v1/services/shop/environments/blue", {"version": "v1", "endpoints": [blue.address]})
            await api.call("PUT", "/v1/services/shop/environments/green", {"version": "v2", "endpoints": [green.address]})
            admin = free_port()
            url = f"http://127.0.0.1:{ports['a'][0]}/"
            async with run_envoy(bootstrap("edge-a", "a", [cp], admin), admin_port=admin) as envoy:
                await envoy.wait_ready()
                etcd.stop_member(0)
                etcd.wait_healthy()
                view = await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 0, "green": 100}}, wait="converged", timeout="30")
                assert view["convergence"]["converged"]
                assert await sample_environments(url, 30) == {"green": 30}

                for i in range(3):
                    etcd.stop_member(i)
                refused = await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}}, expect=503)
                assert "state store unavailable: etcd at 127.0.0.1:" in refused["error"], refused
                ready = await api.call("GET", "/readyz", expect=503)
                assert "etcd at" in ready["error"], ready
                assert await sample_environments(url, 30) == {"green": 30}  # Envoy keeps serving

                etcd.ensure_all_running()
                await wait_for(lambda: _ready(session, cp), timeout=60, message="/readyz after etcd is back")
                view = await api.call("PUT", "/v1/services/shop/traffic", {"weights": {"blue": 100, "green": 0}}, wait="converged", timeout="30")
                assert view["convergence"]["converged"]
                assert await sample_environments(url, 30) == {"blue": 30}
    finally:
        etcd.ensure_all_running()


async def _ready(session: aiohttp.ClientSession, cp: ControlPlane) -> bool:
    async with session.get(f"{cp.admin_url}/readyz") as response:
        return response.status == 200
