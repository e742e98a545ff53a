"""Route tables over VHDS with real Envoy (docs/route-tables.md): a Delta Envoy receives one
domain's virtual host for a weight change, however many services the fleet has; several
services changed in one snapshot switch together; a SotW Envoy still gets whole tables.

The xDS server runs in this process (the real AdsServer, SnapshotBuilder and grpc.aio server of
the control plane) so the test sets snapshots built from Service values directly and counts
the bytes of every response the server writes to each proxy."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from controlplane.bootstrap import render_bootstrap
from controlplane.config import Settings
from controlplane.fleet import SnapshotBuilder, fleet_resolver
from controlplane.model import Endpoint, Environment, EnvironmentState, Fleet, ListenerSpec, Service, Traffic
from controlplane.typeurls import ROUTE, VIRTUAL_HOST
from controlplane.xds.server import AdsServer, NoCallbacks, SnapshotCache
from controlplane.xds.snapshot import Snapshot
from controlplane.xds.stream import Outgoing, Protocol, StreamState
from tests.harness import Envoy, free_port, run_envoy, run_upstream, sample_environments, settle_on, wait_for

pytestmark = pytest.mark.envoy

TARGET_BYTES = 8 * 1024  # issue 12: bytes to a proxy for one service's weight change


class Recorder(NoCallbacks):
    """Every response the server writes, by stream."""

    def __init__(self) -> None:
        self.sent: list[tuple[StreamState, Outgoing]] = []
        self.streams: dict[str, StreamState] = {}

    def stream_opened(self, stream: StreamState) -> None:
        self.streams[stream.node_id] = stream

    def response_sent(self, stream: StreamState, response: Outgoing) -> None:
        self.sent.append((stream, response))

    def since(self, mark: int, node_id: str) -> list[Outgoing]:
        return [out for stream, out in self.sent[mark:] if stream.node_id == node_id]


@dataclasses.dataclass
class Plane:
    """An in-process xDS server for one fleet, serving what ``publish`` builds."""

    fleet: Fleet
    port: int
    recorder: Recorder
    builder: SnapshotBuilder
    cache: SnapshotCache
    generation: int = 0

    def publish(self, services: list[Service]) -> None:
        self.generation += 1
        previous = {self.fleet.name: self.cache.get(self.fleet.name)}
        snapshots = self.builder.build(self.generation, tuple(services), previous)
        self.cache.set(self.fleet.name, snapshots[self.fleet.name])

    async def converged(self, *node_ids: str, timeout: float = 60) -> None:
        def done() -> bool:
            streams = [self.recorder.streams.get(n) for n in node_ids]
            return all(s is not None and s.snapshot.generation == self.generation and s.converged() for s in streams)

        await wait_for(done, timeout=timeout, message=f"{node_ids} converged on generation {self.generation}")


@contextlib.asynccontextmanager
async def xds_plane(fleet: Fleet, port: int | None = None, services: list[Service] | None = None) -> AsyncIterator[Plane]:
    recorder = Recorder()
    cache = SnapshotCache(fleet_resolver(Settings(fleets=(fleet,))))
    server = grpc.aio.server()
    AdsServer(cache, recorder).add_to_server(server)
    bound = server.add_insecure_port(f"127.0.0.1:{port or 0}")
    plane = Plane(fleet, bound, recorder, SnapshotBuilder((fleet,)), cache)
    if services is not None:
        plane.publish(services)  # before serving: a restart serves the stored state at once
    await server.start()
    try:
        yield plane
    finally:
        await server.stop(grace=None)


@contextlib.asynccontextmanager
async def envoy(plane: Plane, node_id: str, *, delta: bool) -> AsyncIterator[Envoy]:
    admin_port = free_port()
    bootstrap = render_bootstrap(node_id=node_id, fleet=plane.fleet.name, xds=f"127.0.0.1:{plane.port}",
                                 admin_port=admin_port, delta=delta)
    async with run_envoy(bootstrap, admin_port=admin_port) as proxy:
        yield proxy


def make_fleet() -> Fleet:
    return Fleet("edge", (ListenerSpec("http", "127.0.0.1", free_port(), preview_port=free_port()),))


def service(i: int, blue: Endpoint, green: Endpoint, green_weight: int = 0) -> Service:
    return Service(
        name=f"svc-{i}", domains=(f"svc-{i}.test",), prefix="/",
        blue=EnvironmentState("v1", (blue,)), green=EnvironmentState("v2", (green,)),
        traffic=Traffic(active=Environment.GREEN if green_weight == 100 else Environment.BLUE,
                        blue=100 - green_weight, green=green_weight),
    )


def endpoint(address: str) -> Endpoint:
    host, port = address.rsplit(":", 1)
    return Endpoint(host, int(port))


async def vhost_weights(proxy: Envoy, *domains: str) -> dict[str, dict[str, int]]:
    """The production weights Envoy holds per domain, from its config dump (with VHDS, Envoy
    dumps the route configuration with the virtual hosts it merged in)."""
    dump = await proxy.config_dump(resource="dynamic_route_configs")
    weights: dict[str, dict[str, int]] = {}
    for config in dump.get("configs", []):
        if config["route_config"]["name"] != "edge-routes":
            continue
        for host in config["route_config"].get("virtual_hosts", []):
            for domain in host["domains"]:
                if domain not in domains:
                    continue
                for route in host.get("routes", []):
                    clusters = route.get("route", {}).get("weighted_clusters", {}).get("clusters")
                    if clusters:
                        weights[domain] = {c["name"]: int(c.get("weight", 0)) for c in clusters}
    return weights


def payload_bytes(outs: list[Outgoing]) -> int:
    return sum(len(o.payload) for o in outs)


async def one_weight_change(plane: Plane, services: list[Service], blue: Endpoint, green: Endpoint) -> dict[str, int]:
    """Bytes sent to each proxy for svc-0 going to 50 % green."""
    mark = len(plane.recorder.sent)
    services[0] = service(0, blue, green, 50)
    plane.publish(services)
    await plane.converged("delta", "sotw")
    return {node: payload_bytes(plane.recorder.since(mark, node)) for node in ("delta", "sotw")}


async def test_bytes_for_one_weight_change_do_not_grow_with_the_fleet_and_envoy_routes_it(tmp_path: Path) -> None:
    sent: dict[int, dict[str, int]] = {}
    async with run_upstream("blue", "v1") as blue_app, run_upstream("green", "v2") as green_app:
        blue, green = endpoint(blue_app.address), endpoint(green_app.address)
        for count in (20, 400):
            fleet = make_fleet()
            services = [service(i, blue, green) for i in range(count)]
            async with xds_plane(fleet, services=services) as plane, \
                    envoy(plane, "delta", delta=True) as delta, envoy(plane, "sotw", delta=False) as sotw:
                await plane.converged("delta", "sotw")
                await delta.wait_ready()
                await sotw.wait_ready()
                sent[count] = await one_weight_change(plane, services, blue, green)
                if count == 400:
                    await routes_follow_the_change(plane, services, blue, green, delta, sotw, fleet)
    small, large = sent[20], sent[400]
    print(f"bytes sent for one weight change: {sent}")
    assert large["delta"] <= TARGET_BYTES, sent
    # Only svc-0's virtual hosts travel: the same bytes at 20 and 400 services (a nonce and a
    # version string may differ by a digit or two).
    assert abs(large["delta"] - small["delta"]) <= 16, sent
    # SotW clients cannot use VHDS: they get the whole table, which grows with the fleet.
    assert large["sotw"] > 10 * small["sotw"] > 0, sent


async def routes_follow_the_change(plane: Plane, services: list[Service], blue: Endpoint, green: Endpoint,
                                   delta: Envoy, sotw: Envoy, fleet: Fleet) -> None:
    listener = fleet.listeners[0]
    url, preview = f"http://127.0.0.1:{listener.port}/", f"http://127.0.0.1:{listener.preview_port}/"
    assert (await vhost_weights(delta, "svc-0.test"))["svc-0.test"] == {"svc-0-blue": 50, "svc-0-green": 50}
    services[0] = service(0, blue, green, 100)
    plane.publish(services)
    await plane.converged("delta", "sotw")
    # Both Envoys bind the listener port (SO_REUSEPORT): requests reach either.
    await settle_on(url, "green", headers={"Host": "svc-0.test"}, timeout=30)
    counts = await sample_environments(url, 40, headers={"Host": "svc-0.test"})
    assert counts == {"green": 40}, counts
    counts = await sample_environments(preview, 20, headers={"Host": "svc-0.test"})  # the idle side
    assert counts == {"blue": 20}, counts
    counts = await sample_environments(url, 20, headers={"Host": "svc-7.test"})  # untouched
    assert counts == {"blue": 20}, counts
    for proxy in (delta, sotw):
        stats = await proxy.stats()
        assert not any(v for k, v in stats.items() if k.endswith("update_rejected")), {k: v for k, v in stats.items() if "rejected" in k}


async def test_services_changed_in_one_snapshot_reach_a_delta_envoy_in_one_response_and_switch_together(tmp_path: Path) -> None:
    async with run_upstream("blue", "v1") as blue_app, run_upstream("green", "v2") as green_app:
        blue, green = endpoint(blue_app.address), endpoint(green_app.address)
        fleet = make_fleet()
        services = [service(i, blue, green) for i in range(50)]
        async with xds_plane(fleet, services=services) as plane, envoy(plane, "delta", delta=True) as delta:
            await plane.converged("delta")
            await delta.wait_ready()
            pair = ("svc-1.test", "svc-2.test")
            before = {"svc-1-blue": 100, "svc-1-green": 0}
            assert (await vhost_weights(delta, *pair))["svc-1.test"] == before
            mark = len(plane.recorder.sent)
            services[1] = service(1, blue, green, 100)
            services[2] = service(2, blue, green, 100)
            plane.publish(services)  # one snapshot: a release group
            seen: list[tuple[int, int]] = []
            while True:
                weights = await vhost_weights(delta, *pair)
                state = (weights["svc-1.test"]["svc-1-green"], weights["svc-2.test"]["svc-2-green"])
                seen.append(state)
                assert state[0] == state[1], f"the two services disagree in Envoy's config: {state}"
                if state == (100, 100):
                    break
                await asyncio.sleep(0.01)  # polling Envoy's view, not synchronising on it
            await plane.converged("delta")
            vhds = [o for o in plane.recorder.since(mark, "delta") if o.type_url == VIRTUAL_HOST]
            assert [(o.resources, o.removed) for o in vhds] == [(4, 0)]  # production + preview of both
            assert not [o for o in plane.recorder.since(mark, "delta") if o.type_url == ROUTE]
            await settle_on(f"http://127.0.0.1:{fleet.listeners[0].port}/", "green", headers={"Host": "svc-2.test"}, timeout=30)


async def test_a_restarted_control_plane_serves_a_reconnecting_delta_envoy_without_resending_virtual_hosts(tmp_path: Path) -> None:
    async with run_upstream("blue", "v1") as blue_app, run_upstream("green", "v2") as green_app:
        blue, green = endpoint(blue_app.address), endpoint(green_app.address)
        fleet = make_fleet()
        url = f"http://127.0.0.1:{fleet.listeners[0].port}/"
        services = [service(i, blue, green, 100 if i == 3 else 0) for i in range(30)]
        async with contextlib.AsyncExitStack() as first_plane:
            first = await first_plane.enter_async_context(xds_plane(fleet, services=services))
            async with envoy(first, "delta", delta=True) as proxy:
                await first.converged("delta")
                await proxy.wait_ready()
                await first_plane.aclose()  # the control plane goes away; Envoy keeps its config
                async with xds_plane(fleet, first.port, services) as second:  # same state, same port
                    await second.converged("delta")
                    resent = [o for o in second.recorder.since(0, "delta") if o.type_url == VIRTUAL_HOST]
                    # Versions are content hashes: what Envoy reports holding is current.
                    assert sum(o.resources for o in resent) == 0, [(o.resources, o.removed) for o in resent]
                    assert len(second.recorder.streams["delta"].types[VIRTUAL_HOST].acked) == 2 * len(services)
                    assert (await vhost_weights(proxy, "svc-3.test"))["svc-3.test"] == {"svc-3-blue": 0, "svc-3-green": 100}
                    await settle_on(url, "green", headers={"Host": "svc-3.test"}, timeout=30)
                    services[4] = service(4, blue, green, 100)
                    second.publish(services)
                    await second.converged("delta")
                    await settle_on(url, "green", headers={"Host": "svc-4.test"}, timeout=30)


async def test_a_delta_envoy_of_a_fleet_without_services_gets_ready_at_once_and_switches_to_vhds_with_the_first(tmp_path: Path) -> None:
    """Envoy's listeners warm until each subscription gets a first response: an empty fleet
    keeps its (empty) whole tables, since a VHDS subscription with no virtual host to send
    would wait out Envoy's initial fetch timeout (15 s); CDS with no cluster is answered empty."""
    fleet = make_fleet()
    async with run_upstream("blue", "v1") as blue_app, run_upstream("green", "v2") as green_app, \
            xds_plane(fleet, services=[]) as plane, envoy(plane, "delta", delta=True) as proxy:
        await plane.converged("delta")
        await proxy.wait_ready(timeout=60)
        assert "initial fetch timed out" not in proxy.log_text()
        services = [service(0, endpoint(blue_app.address), endpoint(green_app.address), 100)]
        plane.publish(services)
        await plane.converged("delta")
        assert plane.recorder.streams["delta"].types[VIRTUAL_HOST].acked
        await settle_on(f"http://127.0.0.1:{fleet.listeners[0].port}/", "green", headers={"Host": "svc-0.test"}, timeout=30)
        stats = await proxy.stats()
        assert not any(v for k, v in stats.items() if k.endswith("update_rejected"))


async def test_switching_route_split_moves_a_connected_delta_envoy_between_the_forms(tmp_path: Path) -> None:
    """xds.route_split changed and the control plane restarted: a connected Delta Envoy starts or
    drops its VHDS subscription, rejects nothing and routes by the newest weights each time."""
    async with run_upstream("blue", "v1") as blue_app, run_upstream("green", "v2") as green_app:
        blue, green = endpoint(blue_app.address), endpoint(green_app.address)
        fleet = make_fleet()
        url = f"http://127.0.0.1:{fleet.listeners[0].port}/"
        services = [service(i, blue, green) for i in range(5)]
        async with xds_plane(fleet) as plane:
            plane.builder = SnapshotBuilder((fleet,), vhds=False)
            plane.publish(services)
            async with envoy(plane, "delta", delta=True) as proxy:
                await plane.converged("delta")
                await proxy.wait_ready()
                for vhds, env in ((True, "green"), (False, "blue"), (True, "green")):
                    plane.builder = SnapshotBuilder((fleet,), vhds=vhds)
                    services[1] = service(1, blue, green, 100 if env == "green" else 0)
                    plane.publish(services)
                    await plane.converged("delta")
                    stream = plane.recorder.streams["delta"]
                    assert all(state.nacks == 0 for state in stream.types.values())
                    assert bool(stream.types.get(VIRTUAL_HOST) and stream.types[VIRTUAL_HOST].acked) == vhds
                    await settle_on(url, env, headers={"Host": "svc-1.test"}, timeout=30)
                    assert (await sample_environments(url, 10, headers={"Host": "svc-2.test"})) == {"blue": 10}
