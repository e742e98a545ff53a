"""Route tables split into virtual hosts (VHDS) for Delta proxies, in the pure and fleet layers:
the resources, the builder's Delta variant and its caching, the decommission guard, the config
switch. Real Envoy: test_route_split_envoy.py."""

from __future__ import annotations

import pytest
from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2

from controlplane import resources
from controlplane.config import ConfigError, parse_settings
from controlplane.fleet import Convergence, SnapshotBuilder
from controlplane.metrics import Metrics
from controlplane.model import DEFAULT_FLEET, Endpoint, Environment, EnvironmentState, Service, Traffic
from controlplane.typeurls import CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST
from controlplane.xds.server import SnapshotCache
from controlplane.xds.snapshot import Resource
from controlplane.xds.stream import DeltaStream
from tests.test_xds_protocol import NOW, ddecode, delta_req

FLEET = DEFAULT_FLEET
BLUE = EnvironmentState("v1", (Endpoint("127.0.0.1", 9001),))
GREEN = EnvironmentState("v2", (Endpoint("127.0.0.1", 9002),))


def svc(name: str, domains: tuple[str, ...] = ("*",), prefix: str = "/", green: int = 0) -> Service:
    return Service(name, domains=domains, prefix=prefix, blue=BLUE, green=GREEN,
                   traffic=Traffic(active=Environment.GREEN if green == 100 else Environment.BLUE, blue=100 - green, green=green))


SERVICES = (
    svc("api", ("shop.example",), "/api"),
    svc("api-v2", ("shop.example",), "/api/v2"),
    svc("web", ("shop.example", "www.example")),
    svc("fallback"),
)


def unpack(resource: Resource, message: type) -> object:
    packed = any_pb2.Any.FromString(resource.any_bytes)
    out = message()
    packed.Unpack(out)
    return out


def test_virtual_hosts_are_the_whole_tables_hosts_under_their_resource_names() -> None:
    for preview, config in ((False, resources.routes_name(FLEET)), (True, resources.preview_routes_name(FLEET))):
        whole = resources.build_route_configuration(config, SERVICES, preview=preview)
        hosts = {r.name: r for r in resources.fleet_virtual_hosts(FLEET, SERVICES) if r.name.startswith(config + "/")}
        assert sorted(hosts) == sorted(f"{config}/{h.name}" for h in whole.virtual_hosts)
        for host in whole.virtual_hosts:
            split = unpack(hosts[f"{config}/{host.name}"], route_components_pb2.VirtualHost)
            assert split.name == f"{config}/{host.name}"  # Envoy keys VHDS hosts by name
            expected = route_components_pb2.VirtualHost()
            expected.CopyFrom(host)
            expected.name = split.name
            assert split == expected  # same domains, same routes in the same (longest prefix first) order


def test_a_virtual_host_requires_the_clusters_of_the_services_on_its_domain() -> None:
    hosts = {r.name: r for r in resources.fleet_virtual_hosts(FLEET, SERVICES)}
    shop = hosts["default-routes/shop.example"]
    assert {n for t, n in shop.requires if t == CLUSTER} == {f"{s}-{e}" for s in ("api", "api-v2", "web") for e in ("blue", "green")}
    assert {n for t, n in hosts["default-routes/*"].requires if t == CLUSTER} == {"fallback-blue", "fallback-green"}


def test_vhds_route_configurations_name_their_namespace_and_carry_no_hosts() -> None:
    for resource in resources.vhds_route_configurations(FLEET):
        config = unpack(resource, route_pb2.RouteConfiguration)
        assert config.HasField("vhds") and config.vhds.config_source.HasField("ads") and not config.virtual_hosts
        assert resource.warms_with == frozenset({(VIRTUAL_HOST, resource.name)})


def test_builder_gives_delta_streams_virtual_hosts_and_rebuilds_only_the_changed_domain() -> None:
    builder = SnapshotBuilder((FLEET,))
    one = builder.build(1, SERVICES, {})[FLEET.name]
    delta = one.for_delta()
    assert delta is not one and delta.generation == 1
    assert one.of_type(VIRTUAL_HOST) == {}  # SotW: whole tables
    assert unpack(one.of_type(ROUTE)["default-routes"], route_pb2.RouteConfiguration).virtual_hosts
    assert not unpack(delta.of_type(ROUTE)["default-routes"], route_pb2.RouteConfiguration).virtual_hosts
    assert delta.of_type(CLUSTER) is one.of_type(CLUSTER) and delta.of_type(LISTENER) is one.of_type(LISTENER)
    changed = (SERVICES[0], SERVICES[1], SERVICES[2], svc("fallback", green=50))
    two = builder.build(2, changed, {FLEET.name: one})[FLEET.name]
    before, after = delta.of_type(VIRTUAL_HOST), two.for_delta().of_type(VIRTUAL_HOST)
    moved = sorted(n for n in after if after[n] is not before[n])
    assert moved == ["default-preview-routes/*", "default-routes/*"]
    assert after["default-preview-routes/*"].version == before["default-preview-routes/*"].version  # preview unchanged
    for name in ("default-routes", "default-preview-routes"):  # untouched: nothing to send
        assert two.for_delta().of_type(ROUTE)[name] is delta.of_type(ROUTE)[name]


def test_route_split_off_serves_whole_tables_to_every_proxy() -> None:
    snapshot = SnapshotBuilder((FLEET,), vhds=False).build(1, SERVICES, {})[FLEET.name]
    assert snapshot.for_delta() is snapshot and snapshot.delta is None


def test_decommission_guard_sees_the_virtual_hosts_a_delta_proxy_holds() -> None:
    cache = SnapshotCache(lambda node: FLEET.name)
    convergence = Convergence(cache, Metrics(), lambda: NOW, timers=False)
    builder = SnapshotBuilder((FLEET,))
    snapshot = builder.build(1, (svc("shop"),), {})[FLEET.name]
    cache.set(FLEET.name, snapshot)
    stream = DeltaStream(1, "edge-1", FLEET.name, snapshot, NOW)
    convergence.stream_opened(stream)
    view = snapshot.for_delta()
    for type_url, subscribe in ((CLUSTER, []), (ENDPOINT, sorted(view.of_type(ENDPOINT))), (LISTENER, []),
                                (ROUTE, ["default-preview-routes", "default-routes"]), (VIRTUAL_HOST, [])):
        for response in ddecode(stream.on_request(delta_req(type_url, subscribe=subscribe), NOW)):
            stream.on_request(delta_req(response.type_url, nonce=response.nonce), NOW)
    assert stream.types[VIRTUAL_HOST].acked
    assert convergence.routing_to((FLEET.name,), "shop-blue") == ("edge-1",)
    assert convergence.routing_to((FLEET.name,), "shop-green") == ()


@pytest.mark.parametrize("value, expected", [("vhds", "vhds"), ("off", "off"), (False, "off")])
def test_route_split_setting(value: object, expected: str) -> None:
    assert parse_settings({"xds": {"route_split": value}}).xds.route_split == expected
    assert parse_settings({}).xds.route_split == "vhds"


def test_bad_route_split_setting_names_the_key() -> None:
    with pytest.raises(ConfigError, match=r"xds\.route_split: expected one of vhds, off, got 'scoped'"):
        parse_settings({"xds": {"route_split": "scoped"}})


def test_a_fleet_without_services_keeps_its_empty_whole_tables() -> None:
    """VHDS with no virtual host to send would keep Envoy's listeners warming until a timeout."""
    snapshot = SnapshotBuilder((FLEET,)).build(1, (), {})[FLEET.name]
    assert snapshot.delta is None
