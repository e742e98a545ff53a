"""Every resource ``resources.py`` can emit is accepted by a real Envoy (``envoy --mode validate``).

Hypothesis generates fleets and services that our model accepts (built through the model's and the
config's own parsers and validators), turns ``all_resources(fleet, services)`` into one bootstrap
and asks the real Envoy binary to validate it. Validate mode parses and fully validates a bootstrap,
static resources included, without connecting anywhere or binding ports. The layout:

* the project's own bootstrap (``render_bootstrap``): ``ads_config`` over the static
  ``bluegreen_xds`` cluster, so the ADS config sources of the generated resources are legal;
* every generated Cluster (EDS over ADS) as-is in ``static_resources.clusters``;
* every generated ClusterLoadAssignment as the ``load_assignment`` of an extra STATIC cluster
  ``<name>-static`` (Envoy resolves and checks its addresses);
* every generated Listener as-is in ``static_resources.listeners`` (their HCM uses RDS over ADS,
  which validate mode does not fetch). Validate mode does not bind, but it does reject two
  listeners on the same address:port; the config forbids that within a fleet;
* every generated RouteConfiguration inline in the HCM of an extra listener on its own port.
  Inline route tables default to ``validate_clusters: true``, so Envoy also checks that every
  cluster a route names exists among the generated clusters.

Per example the test also checks the structural invariants the design relies on (snapshot
consistency, weighted clusters of both environments summing to 100, RDS only, preview routes to
the idle environment, no route shadowed by an earlier one). Explicitly broken resources, one per
resource type, go through the same helper and must be rejected: proof the harness can fail.
"""

from __future__ import annotations

import json
import subprocess
import tempfile
from dataclasses import replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Sequence

import pytest
import yaml
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import address_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.config.listener.v3 import listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import (
    http_connection_manager_pb2 as hcm_pb2,
)
from google.protobuf import any_pb2, duration_pb2, json_format
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, assume, event, given, note, settings
from hypothesis import strategies as st

from controlplane import model, resources, typeurls
from controlplane.bootstrap import render_bootstrap
from controlplane.config import parse_settings
from controlplane.errors import ConfigError, ValidationError
from controlplane.model import Environment, Fleet, Service
from controlplane.xds.snapshot import Resource, Snapshot
from tests.harness import envoy_binary

# A passing run takes seconds; a failing one shrinks its example, running Envoy at every step.
pytestmark = pytest.mark.timeout(600)

BLUE, GREEN = Environment.BLUE, Environment.GREEN

MESSAGE_TYPES: dict[str, type[Message]] = {
    typeurls.CLUSTER: cluster_pb2.Cluster,
    typeurls.ENDPOINT: endpoint_pb2.ClusterLoadAssignment,
    typeurls.LISTENER: listener_pb2.Listener,
    typeurls.ROUTE: route_pb2.RouteConfiguration,
}
HCM_TYPE_URL = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
FIRST_CHECK_PORT = 20000  # extra listeners carrying inline route tables take free ports from here


# =============================================================================================
# The harness: resources -> bootstrap -> `envoy --mode validate`
# =============================================================================================


def unpack(resource: Resource) -> Message:
    packed = any_pb2.Any.FromString(resource.any_bytes)
    assert packed.type_url == resource.type_url, (packed.type_url, resource.type_url)
    message = MESSAGE_TYPES[packed.type_url]()
    assert packed.Unpack(message)
    return message


def to_json(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def _socket_address(address: address_pb2.Address) -> tuple[str, int]:
    return address.socket_address.address, address.socket_address.port_value


def _inline_route_listener(name: str, port: int, route_config: route_pb2.RouteConfiguration) -> listener_pb2.Listener:
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=name,
        route_config=route_config,
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=router)],
    )
    packed = any_pb2.Any()
    packed.Pack(manager)
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=packed)
                ]
            )
        ],
    )


def validation_bootstrap(fleet_name: str, generated: Sequence[Resource]) -> dict[str, Any]:
    """One bootstrap in which Envoy validates every resource of ``generated`` (see module doc)."""
    bootstrap: dict[str, Any] = yaml.safe_load(render_bootstrap(node_id="validate", fleet=fleet_name))
    static = bootstrap.setdefault("static_resources", {})
    clusters: list[dict[str, Any]] = static.setdefault("clusters", [])
    listeners: list[dict[str, Any]] = static.setdefault("listeners", [])
    messages = [(r, unpack(r)) for r in generated]
    used_ports = {
        _socket_address(m.address)[1] for r, m in messages if r.type_url == typeurls.LISTENER and m.HasField("address")  # type: ignore[attr-defined]
    }
    free_ports = (p for p in range(FIRST_CHECK_PORT, 65536) if p not in used_ports)
    for resource, message in messages:
        if resource.type_url == typeurls.CLUSTER:
            clusters.append(to_json(message))
        elif resource.type_url == typeurls.ENDPOINT:
            assignment = endpoint_pb2.ClusterLoadAssignment()
            assignment.CopyFrom(message)
            assignment.cluster_name = f"{resource.name}-static"
            clusters.append(
                {
                    "name": assignment.cluster_name,
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": to_json(assignment),
                }
            )
        elif resource.type_url == typeurls.LISTENER and message.HasField("api_listener"):  # type: ignore[attr-defined]
            # A proxyless gRPC client's API listener: Envoy checks its connection manager in a
            # listener of its own (an API listener is not a dynamic listener to Envoy).
            listeners.append(to_json(_hcm_listener(f"validate:api:{resource.name}", next(free_ports),
                                                   message.api_listener.api_listener)))  # type: ignore[attr-defined]
        elif resource.type_url == typeurls.LISTENER:
            listeners.append(to_json(message))
        elif resource.type_url == typeurls.ROUTE:
            # ':' keeps these names apart from every listener name the config allows.
            name = f"validate:rds:{resource.name}"
            listeners.append(to_json(_inline_route_listener(name, next(free_ports), message)))  # type: ignore[arg-type]
        else:
            raise AssertionError(f"unexpected resource type {resource.type_url}")
    return bootstrap


def _hcm_listener(name: str, port: int, manager: any_pb2.Any) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=address_pb2.Address(socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=port)),
        filter_chains=[listener_components_pb2.FilterChain(filters=[
            listener_components_pb2.Filter(name="envoy.filters.network.http_connection_manager", typed_config=manager)])],
    )


@lru_cache(maxsize=1)
def _envoy() -> str:
    return envoy_binary()


def envoy_validate(bootstrap: dict[str, Any]) -> tuple[bool, str, str]:
    """Run ``envoy --mode validate`` on ``bootstrap``; (accepted, Envoy's output, the JSON given)."""
    text = json.dumps(bootstrap, indent=1)
    with tempfile.TemporaryDirectory(prefix="bluegreen-validate-") as directory:
        path = Path(directory) / "bootstrap.json"
        path.write_text(text)
        proc = subprocess.run(
            [_envoy(), "--mode", "validate", "-c", str(path), "--log-level", "warn", "--concurrency", "1"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    output = (proc.stdout + proc.stderr).strip()
    accepted = proc.returncode == 0 and "OK" in proc.stdout
    return accepted, f"exit status {proc.returncode}:\n{output}", text


def assert_envoy_accepts(fleet_name: str, generated: Sequence[Resource]) -> None:
    accepted, output, text = envoy_validate(validation_bootstrap(fleet_name, generated))
    if not accepted:
        pytest.fail(f"Envoy rejected the generated resources ({output})\n--- bootstrap given to Envoy ---\n{text}")


def assert_envoy_rejects(fleet_name: str, generated: Sequence[Resource], expected: str) -> None:
    accepted, output, text = envoy_validate(validation_bootstrap(fleet_name, generated))
    assert not accepted, f"Envoy accepted a deliberately broken bootstrap:\n{text}"
    assert expected in output, f"Envoy rejected it, but not with {expected!r}: {output}"


# =============================================================================================
# Structural invariants of the generated resources
# =============================================================================================


def _hcm(listener: listener_pb2.Listener) -> hcm_pb2.HttpConnectionManager:
    assert len(listener.filter_chains) == 1 and len(listener.filter_chains[0].filters) == 1, listener
    typed = listener.filter_chains[0].filters[0].typed_config
    assert typed.type_url == HCM_TYPE_URL, typed.type_url
    manager = hcm_pb2.HttpConnectionManager()
    assert typed.Unpack(manager)
    return manager


def _headers(route: route_components_pb2.Route) -> set[tuple[str, str]]:
    return {(h.name, h.string_match.exact) for h in route.match.headers}


def _matchers(route: route_components_pb2.Route) -> set[tuple[str, str]]:
    return {(h.name, h.string_match.SerializeToString(deterministic=True).hex()) for h in route.match.headers}


RELEASE_ROUTES = ("-target", "-pinned-blue", "-pinned-green", "-redraw-")


def _check_release_route(route: route_components_pb2.Route, service: Service) -> None:
    """A targeting or affinity route (resources._target_route, _affinity_routes): only while the
    service's release asks for it, matching on headers, to the service's own clusters."""
    release = service.release
    assert release is not None and resources.in_fleet(service, release.environment), route
    assert route.match.prefix == service.prefix and route.match.headers, route
    owned = {resources.cluster_name(service.name, env) for env in Environment}
    action = route.route
    if route.name.endswith("-target"):
        assert release.target is not None and action.cluster == resources.cluster_name(service.name, release.environment), route
        return
    assert release.affinity is not None and 0 < service.traffic.weight(release.environment) < 100, route
    assert all(h.name == "cookie" for h in route.match.headers), route
    if "-redraw-" in route.name:
        entries = action.weighted_clusters.clusters
        assert {c.name for c in entries} <= owned and all(
            any(h.header.key == "set-cookie" for h in c.response_headers_to_add) for c in entries), route
    else:
        assert action.cluster in owned, route


def _check_no_shadowing(vhost: route_components_pb2.VirtualHost) -> None:
    """No route is unreachable because an earlier one always matches first: an earlier route whose
    prefix is a prefix of a later one's must require a header the later one does not."""
    routes = list(vhost.routes)
    for j, later in enumerate(routes):
        for earlier in routes[:j]:
            if later.match.prefix.startswith(earlier.match.prefix):
                assert not _matchers(earlier) <= _matchers(later), (
                    f"virtual host {vhost.name!r}: route {later.name!r} (prefix {later.match.prefix!r}) is shadowed "
                    f"by the earlier route {earlier.name!r} (prefix {earlier.match.prefix!r})"
                )


def _check_route_configuration(
    rc: route_pb2.RouteConfiguration, served: Sequence[Service], *, preview: bool
) -> None:
    owners = {resources.cluster_name(s.name, env): (s, env) for s in served for env in Environment if resources.in_fleet(s, env)}
    by_name = {s.name: s for s in served}
    expected_domains = {d.lower() for s in served for d in s.domains}
    vhost_names = [vh.name for vh in rc.virtual_hosts]
    assert sorted(vhost_names) == sorted(expected_domains), (vhost_names, expected_domains)
    all_domains = [d for vh in rc.virtual_hosts for d in vh.domains]
    assert len(all_domains) == len(set(all_domains)), f"{rc.name}: a domain is in two virtual hosts: {all_domains}"
    for vh in rc.virtual_hosts:
        assert list(vh.domains) == [vh.name], vh
        _check_no_shadowing(vh)
        seen: dict[tuple[str, str], int] = {}  # (service, kind) -> index of its route
        for index, route in enumerate(vh.routes):
            action = route.route
            release_route = next((s for s in served if route.name.startswith(s.name) and
                                  any(route.name == s.name + k or route.name.startswith(s.name + k) and k == "-redraw-"
                                      for k in RELEASE_ROUTES)), None)
            if release_route is not None and not preview:
                _check_release_route(route, release_route)
                continue
            if action.HasField("weighted_clusters"):
                assert not preview, f"{rc.name}: the preview table must not split traffic: {route}"
                entries = action.weighted_clusters.clusters
                owner_names = {owners[c.name][0].name for c in entries}
                assert len(owner_names) == 1, f"{route.name}: weighted clusters of several services {owner_names}"
                service = by_name[owner_names.pop()]
                assert sorted(c.name for c in entries) == sorted(
                    resources.cluster_name(service.name, env) for env in Environment if resources.in_fleet(service, env)
                ), f"{route.name}: weighted_clusters must list every deployed environment: {entries}"
                for entry in entries:
                    assert entry.weight.value == service.traffic.weight(owners[entry.name][1]), entry
                assert sum(c.weight.value for c in entries) == 100, entries
                assert not route.match.headers, route
                kind = "production"
            elif route.HasField("direct_response"):
                # Nothing deployed in the idle environment: the preview entry says so with a 503.
                service = by_name[route.name.removesuffix("-preview")]
                assert not resources.in_fleet(service, service.traffic.idle), route
                assert route.direct_response.status == 503, route
                if preview:
                    assert not route.match.headers, route
                else:
                    assert _headers(route) == {(resources.PREVIEW_HEADER, resources.PREVIEW_VALUE)}, route
                kind = "preview"
            else:
                assert action.WhichOneof("cluster_specifier") == "cluster", route
                service, env = owners[action.cluster]
                assert env is service.traffic.idle, (
                    f"{rc.name}: preview route {route.name!r} goes to {env.value}, "
                    f"but the idle environment of {service.name} is {service.traffic.idle.value}"
                )
                if preview:
                    assert not route.match.headers, route
                else:
                    assert _headers(route) == {(resources.PREVIEW_HEADER, resources.PREVIEW_VALUE)}, route
                kind = "preview"
            assert route.match.prefix == service.prefix, (route, service.prefix)
            assert vh.name in {d.lower() for d in service.domains}, (vh.name, service.name)
            assert (service.name, kind) not in seen, f"{vh.name}: two {kind} routes for {service.name}"
            seen[(service.name, kind)] = index
        expected_services = {s.name for s in served if vh.name in {d.lower() for d in s.domains}}
        for name in expected_services:
            assert (name, "preview") in seen, f"{rc.name}/{vh.name}: no preview route for {name}"
            if not preview:
                assert (name, "production") in seen, f"{rc.name}/{vh.name}: no production route for {name}"
                # The header route must come first, or the production route would take its requests.
                assert seen[(name, "preview")] < seen[(name, "production")], (vh.name, name)
        assert {name for name, _ in seen} == expected_services, (vh.name, seen, expected_services)


def check_structure(fleet: Fleet, services: Sequence[Service], generated: Sequence[Resource]) -> None:
    snapshot = Snapshot.build(1, generated)  # raises on duplicate names
    snapshot.check_consistent()
    served = [s for s in services if fleet.serves(s.name)]

    names = {t: sorted(snapshot.of_type(t)) for t in typeurls.PUSH_ORDER}
    expected_clusters = sorted(resources.cluster_name(s.name, env) for s in served for env in Environment if resources.in_fleet(s, env))
    assert names[typeurls.CLUSTER] == expected_clusters
    assert names[typeurls.ENDPOINT] == expected_clusters
    main, preview = resources.routes_name(fleet), resources.preview_routes_name(fleet)
    taken = set(resources.fleet_listener_names(fleet))
    grpc_served = [s for s in served if resources.grpc_listener_name(s) not in taken]
    grpc_routes = [resources.grpc_routes_name(s) for s in grpc_served]
    assert names[typeurls.ROUTE] == sorted([main, preview, *grpc_routes])
    _check_grpc(snapshot, grpc_served)

    for name, resource in snapshot.of_type(typeurls.ENDPOINT).items():
        assignment = unpack(resource)
        service, env = next((s, e) for s in served for e in Environment if resources.cluster_name(s.name, e) == name)
        addresses = sorted(_socket_address(lb.endpoint.address) for loc in assignment.endpoints for lb in loc.lb_endpoints)  # type: ignore[attr-defined]
        assert addresses == sorted((e.host, e.port) for e in service.environment(env).endpoints), name
        weights = sorted((_socket_address(lb.endpoint.address), lb.load_balancing_weight.value or 1)  # type: ignore[attr-defined]
                         for loc in assignment.endpoints for lb in loc.lb_endpoints)  # type: ignore[attr-defined]
        assert weights == sorted(((e.host, e.port), e.weight) for e in service.environment(env).endpoints), name

    for name, resource in snapshot.of_type(typeurls.CLUSTER).items():
        cluster = unpack(resource)
        assert cluster.type == cluster_pb2.Cluster.EDS and cluster.eds_cluster_config.eds_config.HasField("ads"), cluster  # type: ignore[attr-defined]
        assert resource.warms_with == {(typeurls.ENDPOINT, name)}

    routes = snapshot.of_type(typeurls.ROUTE)
    _check_route_configuration(unpack(routes[main]), served, preview=False)  # type: ignore[arg-type]
    _check_route_configuration(unpack(routes[preview]), served, preview=True)  # type: ignore[arg-type]
    for resource in (routes[main], routes[preview]):
        assert resource.requires == {
            (t, n) for n in expected_clusters for t in (typeurls.CLUSTER, typeurls.ENDPOINT)
        }, resource.name

    expected_listeners: dict[str, tuple[str, int, str]] = {}
    for spec in fleet.listeners:
        expected_listeners[spec.name] = (spec.address, spec.port, main)
        if spec.preview_port is not None:
            expected_listeners[f"{spec.name}-preview"] = (spec.address, spec.preview_port, preview)
    listeners = snapshot.wildcard_pool(typeurls.LISTENER)
    assert sorted(listeners) == sorted(expected_listeners)
    for name, resource in listeners.items():
        listener = unpack(resource)
        address, port, table = expected_listeners[name]
        assert _socket_address(listener.address) == (address, port), listener  # type: ignore[attr-defined]
        manager = _hcm(listener)  # type: ignore[arg-type]
        assert manager.WhichOneof("route_specifier") == "rds", f"listener {name} must use RDS, not an inline table"
        assert manager.rds.route_config_name == table, (name, manager.rds.route_config_name)
        assert manager.rds.config_source.HasField("ads"), manager.rds
        assert resource.warms_with == {(typeurls.ROUTE, table)}


def _check_grpc(snapshot: Snapshot, served: Sequence[Service]) -> None:
    """Each served service has an API listener named after it (RDS over ADS, router last) and a
    route table for its name's authority with every method weighted like its production route:
    both named-only, so Envoy's wildcard LDS never gets an API listener."""
    for service in served:
        listener_resource = snapshot.of_type(typeurls.LISTENER)[service.name]
        listener = unpack(listener_resource)
        assert not listener_resource.wildcard and not listener.HasField("address"), listener  # type: ignore[attr-defined]
        manager = hcm_pb2.HttpConnectionManager()
        assert listener.api_listener.api_listener.Unpack(manager)  # type: ignore[attr-defined]
        assert manager.rds.route_config_name == resources.grpc_routes_name(service) and manager.rds.config_source.HasField("ads")
        assert manager.http_filters[-1].name == "envoy.filters.http.router" and manager.http_filters[-1].HasField("typed_config")
        assert listener_resource.warms_with == {(typeurls.ROUTE, manager.rds.route_config_name)}
        route_resource = snapshot.of_type(typeurls.ROUTE)[manager.rds.route_config_name]
        assert not route_resource.wildcard
        clusters = [resources.cluster_name(service.name, env) for env in Environment if resources.in_fleet(service, env)]
        assert route_resource.requires == {(t, c) for c in clusters for t in (typeurls.CLUSTER, typeurls.ENDPOINT)}
        [vhost] = unpack(route_resource).virtual_hosts  # type: ignore[attr-defined]
        assert list(vhost.domains) == [service.name]
        production = vhost.routes[-1]
        assert production.match.prefix == "/" and not production.match.headers
        weights = {c.name: c.weight.value for c in production.route.weighted_clusters.clusters}
        assert weights == {resources.cluster_name(service.name, env): service.traffic.weight(env)
                           for env in Environment if resources.in_fleet(service, env)}
        for route in vhost.routes[:-1]:  # the preview route, only with an idle environment to go to
            assert route.route.cluster == resources.cluster_name(service.name, service.traffic.idle), route
    for name, resource in snapshot.of_type(typeurls.ENDPOINT).items():
        for locality in unpack(resource).endpoints:  # type: ignore[attr-defined]
            # gRPC refuses a locality entry without a locality, and skips one without a weight.
            assert locality.HasField("locality") and locality.load_balancing_weight.value > 0, name


# =============================================================================================
# Strategies: states our model and config accept
# =============================================================================================


def _accepts(validator: Any, value: object) -> bool:
    try:
        validator(value)
    except ValidationError:
        return False
    return True


def model_accepted(candidates: st.SearchStrategy[Any], validator: Any, fallback: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Values of ``candidates`` that ``validator`` (one of the model's parsers) accepts; a refused
    candidate is replaced by a draw from ``fallback`` (plain valid values). So the test covers
    exactly what the model lets through, also after its rules change, and near-valid candidates
    probe the edges of those rules. (No ``.filter``: mostly-refused candidates would make
    Hypothesis give up on whole examples.)"""

    @st.composite
    def draw_accepted(draw: st.DrawFn) -> Any:
        value = draw(candidates)
        return value if _accepts(validator, value) else draw(fallback)

    return draw_accepted()


SERVICE_NAMES = st.one_of(
    st.from_regex(r"[a-z0-9]([a-z0-9-]{0,46}[a-z0-9])?", fullmatch=True),
    # Awkward on purpose: names that look like cluster names or route names of other services.
    st.sampled_from(["a", "0", "shop", "shop-blue", "shop-green", "shop-preview", "blue", "green", "x" * 48]),
)

_LABEL = st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9-]{0,10}[A-Za-z0-9])?", fullmatch=True)
_HOST = st.lists(_LABEL, min_size=1, max_size=4).map(".".join)


@st.composite
def _random_domain(draw: st.DrawFn) -> str:
    host = draw(_HOST)
    kind = draw(st.sampled_from(["exact", "leading", "trailing"]))
    if kind == "leading":
        host = draw(st.sampled_from(["*.", "*-", "*"])) + host
    elif kind == "trailing":
        host = host + draw(st.sampled_from([".*", "-*", "*"]))
    if kind != "trailing" and draw(st.booleans()):  # the model refuses 'x.*:port' (Envoy never matches it)
        host += f":{draw(st.integers(1, 65535))}"
    return host


# A small shared pool makes services meet on the same virtual hosts (and in different case).
SHARED_DOMAINS = [
    "*",
    "shop.example.com",
    "SHOP.Example.COM",
    "*.example.com",
    "*.EXAMPLE.com",
    "example.*",
    "shop.example.com:8080",
    "localhost:10000",
    "10.0.0.1",
]
# Near-valid text: whatever of it the model accepts must be fine for Envoy too.
_DOMAIN_FUZZ = st.text(alphabet="aZ9-.*:_ \n\u00b2\uff11[]", min_size=1, max_size=10)
DOMAINS = model_accepted(
    st.one_of(st.just("*"), st.sampled_from(SHARED_DOMAINS), _random_domain(), _random_domain(), _DOMAIN_FUZZ),
    model.validate_domain,
    fallback=_random_domain(),
)

_PATH_CHARS = "ABCXYZabcxyz0189-._~!$&'()*+,;=:@/%"
SHARED_PREFIXES = ["/", "/api", "/api/", "/api/v1", "/API", "/api/v1/users", "/static/", "/%20"]
_RANDOM_PREFIX = st.text(alphabet=_PATH_CHARS, max_size=40).map(lambda s: "/" + s)
PREFIXES = model_accepted(
    st.one_of(
        st.sampled_from(SHARED_PREFIXES),
        _RANDOM_PREFIX,
        _RANDOM_PREFIX,
        # Long ones, up to and past the model's 1024 characters, cheaply: a segment repeated.
        st.builds(
            lambda seg, n: (("/" + seg) * n)[:n], st.text(alphabet=_PATH_CHARS, min_size=1, max_size=9), st.integers(500, 1100)
        ),
        st.text(alphabet="/a%?#\\ \n\t\u00e9\x00", max_size=8),  # near-valid
    ),
    model.validate_prefix,
    fallback=_RANDOM_PREFIX,
)


@st.composite
def service_specs(draw: st.DrawFn, domain_pool: Sequence[str], prefix_pool: Sequence[str]) -> dict[str, Any]:
    """A request body for ``apply_service_spec``; a missing field keeps the model's default
    (domains ['*'], prefix '/'). Domains and prefixes often come from per-example pools, so that
    services meet on one virtual host, with domains in other letter case and nested prefixes."""
    shared_domain = st.sampled_from(domain_pool).flatmap(
        lambda d: st.sampled_from([d, d.upper(), d.lower(), d.swapcase()])
    )
    shared_prefix = st.sampled_from(prefix_pool).flatmap(
        lambda p: st.one_of(st.just(p), _RANDOM_PREFIX.map(lambda q: p.rstrip("/") + q))  # p, or one below p
    )
    spec: dict[str, Any] = {}
    if draw(st.integers(0, 4)):
        domains = st.one_of(shared_domain, shared_domain, DOMAINS)
        spec["domains"] = draw(st.lists(model_accepted(domains, model.validate_domain, fallback=DOMAINS), min_size=1, max_size=4, unique_by=str.lower))
    if draw(st.integers(0, 5)):
        spec["prefix"] = draw(model_accepted(st.one_of(shared_prefix, PREFIXES), model.validate_prefix, fallback=PREFIXES))
    if draw(st.booleans()):
        spec["drain_seconds"] = draw(st.integers(0, model.MAX_DRAIN_SECONDS))
    if draw(st.booleans()):
        spec["standby_seconds"] = draw(st.integers(0, model.MAX_STANDBY_SECONDS))
    return spec


VERSIONS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._+\-]{0,30}", fullmatch=True)
_PORTS = st.one_of(st.sampled_from([1, 80, 8080, 65535]), st.integers(1, 65535))


@st.composite
def _ip_endpoint(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        return f"{draw(st.ip_addresses(v=4))}:{draw(_PORTS)}"
    return f"[{draw(st.ip_addresses(v=6))}]:{draw(_PORTS)}"


@st.composite
def _near_valid_endpoint(draw: st.DrawFn) -> str:
    """Spellings the model may or may not accept: IPv6 zone ids (Envoy resolves zone names on
    the proxy's host), IPv4-mapped and long-form IPv6, leading zeros, odd digits."""
    host = draw(
        st.sampled_from(
            [
                "[fe80::1%eth0]",
                "[fe80::1%nosuchif0]",
                "[::1%1]",
                "[::ffff:10.0.0.1]",
                "[0:0:0:0:0:0:0:1]",
                "[::]",
                "0.0.0.0",
                "255.255.255.255",
                "010.0.0.1",
                "[224.0.0.1]",
                "::1",
            ]
        )
    )
    port = draw(st.sampled_from(["80", "080", "65535", "65536", "0", "\u00b9", "8080 "]))
    return f"{host}:{port}"


ENDPOINT_TEXTS = model_accepted(
    st.one_of(_ip_endpoint(), _ip_endpoint(), _ip_endpoint(), _near_valid_endpoint()), model.Endpoint.parse, fallback=_ip_endpoint()
)


@st.composite
def environment_states(draw: st.DrawFn) -> model.EnvironmentState:
    if draw(st.integers(0, 4)) == 0:
        return model.EnvironmentState()  # never registered
    count = draw(st.integers(0, 5))
    endpoints: list[Any] = draw(st.lists(ENDPOINT_TEXTS, min_size=count, max_size=count, unique_by=model.Endpoint.parse))
    # Some endpoints carry a capacity weight (docs/capacity.md), which becomes their EDS weight.
    weights = draw(st.lists(st.sampled_from([1, 1, 2, 3, model.MAX_ENDPOINT_WEIGHT]), min_size=count, max_size=count))
    endpoints = [e if w == 1 else {"address": e, "weight": w} for e, w in zip(endpoints, weights)]
    return model.parse_environment_spec({"version": draw(VERSIONS), "endpoints": endpoints})


@st.composite
def traffic_rules(draw: st.DrawFn) -> model.Traffic:
    blue = draw(st.one_of(st.sampled_from([0, 100, 1, 99, 50]), st.integers(0, 100)))
    weights = model.parse_weights({"weights": {"blue": blue, "green": 100 - blue}})
    # An environment at 100 % is the active one (set_weights makes it so); a split may have
    # either environment as its stable side.
    if weights[BLUE] == 100:
        active = BLUE
    elif weights[GREEN] == 100:
        active = GREEN
    else:
        active = draw(st.sampled_from(list(Environment)))
    previous = draw(st.sampled_from([None, active.other]))
    return model.Traffic(active=active, previous=previous, blue=weights[BLUE], green=weights[GREEN])


@st.composite
def services(draw: st.DrawFn, name: str, domain_pool: Sequence[str] = ("*",), prefix_pool: Sequence[str] = ("/",)) -> Service:
    service = model.apply_service_spec(None, name, draw(service_specs(domain_pool, prefix_pool)))
    service = service.with_environment(BLUE, draw(environment_states()))
    service = service.with_environment(GREEN, draw(environment_states()))
    seq = draw(st.integers(0, 1000))
    return replace(service, traffic=draw(traffic_rules()), deployment_seq=seq, release=draw(st.none() | releases(name, seq)))


COOKIE_NAMES = model_accepted(st.one_of(st.just("bluegreen-env"), st.text(min_size=1, max_size=70)),
                              lambda name: model.parse_affinity("a", {"cookie": name}), fallback=st.just("c"))


@st.composite
def releases(draw: st.DrawFn, name: str, seq: int) -> model.Release:
    """What the workflow may set on a service in a deployment: affinity, mirroring, targeting."""
    affinity = draw(st.none() | st.builds(lambda c, t: model.parse_affinity("a", {"cookie": c, "ttl_seconds": t}),
                                          COOKIE_NAMES, st.integers(1, 86400)))
    target = None
    if draw(st.booleans()):
        headers = draw(st.dictionaries(st.sampled_from(["x-user-group", "x-beta", "x-canary.v2"]),
                                       st.sampled_from(["beta", "1", "a b", "v" * 256]), max_size=2))
        cookie = draw(st.none() | st.fixed_dictionaries({"name": COOKIE_NAMES, "value": st.sampled_from(["yes", "v" * 256, "a:b/c"])}))
        if headers or cookie:
            target = model.parse_target_rule("target", {"headers": headers, "cookie": cookie})
    earlier = tuple(sorted(draw(st.sets(st.integers(0, 100), max_size=5))))
    return model.Release(f"{name}-{seq}", draw(st.sampled_from(list(Environment))), affinity=affinity, earlier=earlier,
                         mirror_percent=draw(st.sampled_from([0.0, 0.0001, 10.0, 100.0])), target=target)


_CONFIG_NAME = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_\-]{0,20}", fullmatch=True)
LISTENER_ADDRESSES = ["127.0.0.1", "0.0.0.0", "::1", "::"]


@st.composite
def fleets(draw: st.DrawFn, service_names: Sequence[str]) -> Fleet:
    """A fleet as the config file defines it, parsed by the config's own parser."""
    count = draw(st.integers(1, 3))
    names = draw(
        st.lists(_CONFIG_NAME.filter(lambda n: not n.endswith("-preview")), min_size=count, max_size=count, unique=True)
    )
    previews = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    ports: list[int] = []
    for _ in range(count * 2):
        port = draw(_PORTS)
        while port in ports:  # distinct without filtering
            port = port % 65535 + 1
        ports.append(port)
    listeners = []
    for name, with_preview in zip(names, previews):
        raw: dict[str, Any] = {"name": name, "address": draw(st.sampled_from(LISTENER_ADDRESSES)), "port": ports.pop()}
        if with_preview:
            raw["preview_port"] = ports.pop()
        listeners.append(raw)
    body: dict[str, Any] = {"listeners": listeners}
    choice = draw(st.sampled_from(["all", "star", "subset"]))
    if choice == "star":
        body["services"] = ["*"]
    elif choice == "subset":
        chosen = [name for name in service_names if draw(st.integers(0, 3))]
        body["services"] = chosen + draw(st.sampled_from([[], ["not-deployed-yet"]]))
    (fleet,) = parse_settings({"fleets": {draw(_CONFIG_NAME): body}}).fleets
    return fleet


@st.composite
def fleet_states(draw: st.DrawFn) -> tuple[Fleet, list[Service]]:
    """A fleet and the services the control plane holds. Services are created one by one, as
    through the API: one that claims a (domain, prefix) an earlier one routes on the fleet is
    refused (``route_conflict``), so it is not part of the state."""
    count = draw(st.integers(2, 8))
    names = draw(st.lists(SERVICE_NAMES, min_size=count, max_size=count, unique=True))
    fleet = draw(fleets(names))
    domain_pool = draw(st.lists(DOMAINS, min_size=1, max_size=3))
    prefix_pool = draw(st.lists(PREFIXES, min_size=1, max_size=3))
    accepted: list[Service] = []
    for name in names:
        candidate = draw(services(name, domain_pool, prefix_pool))
        if model.route_conflict((fleet,), accepted, candidate) is None:
            accepted.append(candidate)
    return fleet, accepted


def _describe(fleet: Fleet, services: Sequence[Service]) -> None:
    served = [s for s in services if fleet.serves(s.name)]
    endpoints = [e for s in served for env in Environment for e in s.environment(env).endpoints]
    domains = [d for s in served for d in s.domains]
    event(f"served services: {len(served)}")
    event(f"listeners: {len(fleet.listeners)}")
    if fleet.services is not None:
        event("fleet serves a subset")
    if sum(d == "*" for d in domains) > 1:
        event("several services share '*'")
    if any(d != d.lower() for d in domains):
        event("uppercase domain")
    if len({d for d in domains}) > len({d.lower() for d in domains}):
        event("services share a domain in different letter case")
    prefixes = {s.prefix for s in served}
    if any(a != b and b.startswith(a) for a in prefixes for b in prefixes):
        event("nested prefixes")
    if any(":" in d for d in domains if d != "*"):
        event("domain with port")
    if any(":" in e.host for e in endpoints):
        event("IPv6 endpoint")
    if any("%" in e.host for e in endpoints):
        event("IPv6 endpoint with zone")
    if any(not s.environment(env).endpoints for s in served for env in Environment):
        event("empty environment")
    if any(0 < s.traffic.blue < 100 for s in served):
        event("split traffic")
    if any(s.traffic.green == 100 for s in served):
        event("green at 100%")
    if any(r.name.endswith("-redraw-") or "-redraw-" in r.name for s in served for r in resources.production_routes(s)):
        event("affinity redraw routes")
    if any(r.name.endswith("-target") for s in served for r in resources.production_routes(s)):
        event("targeting route")
    if any(r.route.request_mirror_policies for s in served for r in resources.production_routes(s)):
        event("mirroring")
    note(f"fleet: {fleet}")
    for service in services:
        note(f"service: {model.service_to_dict(service)}")


# =============================================================================================
# Tests
# =============================================================================================


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    # Every shrink step runs Envoy; the explain phase would run it many more times.
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@given(state=fleet_states())
def test_envoy_accepts_every_generated_resource(state: tuple[Fleet, list[Service]]) -> None:
    fleet, services = state
    for service in services:  # the API refuses these (fleet_states never makes them)
        assume(model.route_conflict((fleet,), services, service) is None)
    _describe(fleet, services)
    generated = resources.all_resources(fleet, services)
    check_structure(fleet, services, generated)
    assert_envoy_accepts(fleet.name, generated)


def _example() -> tuple[Fleet, list[Service]]:
    """A small valid state: two services on '*' and one on its own domain, mixed endpoints."""
    fleet = model.DEFAULT_FLEET
    shop = model.apply_service_spec(None, "shop", {"domains": ["*", "Shop.Example.com:8080"], "prefix": "/shop"})
    shop = shop.with_environment(BLUE, model.parse_environment_spec({"version": "1.0", "endpoints": ["10.0.0.1:8080"]}))
    shop = shop.with_environment(GREEN, model.parse_environment_spec({"version": "1.1", "endpoints": ["[::1]:8081"]}))
    shop = replace(shop, traffic=model.Traffic(active=BLUE, blue=90, green=10))
    root = model.apply_service_spec(None, "root", {})
    api = model.apply_service_spec(None, "api", {"domains": ["*.example.com", "api.*"], "prefix": "/"})
    return fleet, [shop, root, api]


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(state=fleet_states())
def test_route_tables_assembled_from_cached_parts_equal_the_protobuf_serialization(state: tuple[Fleet, list[Service]]) -> None:
    """The control plane joins route tables from each service's serialized routes; the bytes,
    and so the content-hash versions, must be exactly those of serializing the message."""
    fleet, services = state
    served = sorted((s for s in services if fleet.serves(s.name)), key=lambda s: s.name)
    generated = {r.name: r for r in resources.fleet_routes(fleet, services)}
    for name, preview in ((resources.routes_name(fleet), False), (resources.preview_routes_name(fleet), True)):
        expected = Resource.from_message(name, resources.build_route_configuration(name, served, preview=preview))
        assert generated[name].any_bytes == expected.any_bytes
        assert generated[name].version == expected.version
        assert route_pb2.RouteConfiguration.FromString(unpack(generated[name]).SerializeToString()).name == name


def test_envoy_accepts_a_small_known_good_state() -> None:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    check_structure(fleet, services, generated)
    assert_envoy_accepts(fleet.name, generated)


def _replace_resource(generated: list[Resource], broken: Resource) -> list[Resource]:
    out = [r for r in generated if (r.type_url, r.name) != (broken.type_url, broken.name)]
    assert len(out) == len(generated) - 1, f"no {broken.type_url} {broken.name} to replace"
    return out + [broken]


def _broken_two_catch_alls() -> tuple[list[Resource], str]:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    name = resources.routes_name(fleet)
    rc = resources.build_route_configuration(name, services, preview=False)
    rc.virtual_hosts.append(route_components_pb2.VirtualHost(name="second", domains=["*"], routes=rc.virtual_hosts[0].routes))
    return _replace_resource(generated, Resource.from_message(name, rc)), "Only a single wildcard domain"


def _broken_zero_weights() -> tuple[list[Resource], str]:
    fleet, services = _example()
    services[0] = replace(services[0], traffic=model.Traffic(active=BLUE, blue=0, green=0))  # parse_weights forbids
    return resources.all_resources(fleet, services), "Sum of weights in the weighted_cluster must be greater than 0"


def _broken_route_to_unknown_cluster() -> tuple[list[Resource], str]:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    # Routes of a service the fleet has no clusters for: only inline validate_clusters catches it.
    ghost = model.apply_service_spec(None, "ghost", {"domains": ["ghost.example.com"]})
    name = resources.routes_name(fleet)
    rc = resources.build_route_configuration(name, [*services, ghost], preview=False)
    return _replace_resource(generated, Resource.from_message(name, rc)), "unknown weighted cluster 'ghost-"


def _broken_endpoint_address() -> tuple[list[Resource], str]:
    fleet, services = _example()
    # Endpoint.parse would refuse this address; the dataclass itself does not check.
    services[0] = services[0].with_environment(BLUE, model.EnvironmentState("1.0", (model.Endpoint("10.0.0", 80),)))
    return resources.all_resources(fleet, services), "malformed IP address: 10.0.0"


def _broken_cluster() -> tuple[list[Resource], str]:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    cluster = resources.build_cluster(services[0], BLUE)
    cluster.connect_timeout.CopyFrom(duration_pb2.Duration(seconds=-1))
    return _replace_resource(generated, Resource.from_message(cluster.name, cluster)), "Expected positive duration"


def _broken_listeners_same_port() -> tuple[list[Resource], str]:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    spec = fleet.listeners[0]
    twin = resources.build_listener("twin", spec.address, spec.port, resources.routes_name(fleet))
    return [*generated, Resource.from_message("twin", twin)], "duplicate address"


def _broken_listener_address() -> tuple[list[Resource], str]:
    fleet, services = _example()
    generated = resources.all_resources(fleet, services)
    spec = fleet.listeners[0]
    bad = resources.build_listener(spec.name, "localhost", spec.port, resources.routes_name(fleet))
    return _replace_resource(generated, Resource.from_message(spec.name, bad)), "malformed IP address: localhost"


@pytest.mark.parametrize(
    "make",
    [
        _broken_two_catch_alls,
        _broken_zero_weights,
        _broken_route_to_unknown_cluster,
        _broken_endpoint_address,
        _broken_cluster,
        _broken_listeners_same_port,
        _broken_listener_address,
    ],
    ids=lambda f: f.__name__.removeprefix("_broken_"),
)
def test_harness_detects_broken_resources(make: Any) -> None:
    """The harness can fail: a deliberately broken resource of each kind, fed through the same
    helper, is rejected by Envoy with the expected message."""
    generated, expected = make()
    assert_envoy_rejects(model.DEFAULT_FLEET.name, generated, expected)


def test_envoy_accepts_ipv6_zone_endpoints_the_model_accepts() -> None:
    """An IPv6 zone id ('%eth0') in an endpoint: Envoy resolves a zone name to an interface of the
    proxy's host (getaddrinfo) and rejects the whole ClusterLoadAssignment if there is none.
    Pinned, so this does not rest on the generator drawing a zone."""
    fleet, services = _example()
    try:
        endpoint = model.Endpoint.parse("[fe80::1%nosuchif0]:8080")
    except ValidationError:
        return  # refused by the model: nothing reaches Envoy
    services[0] = services[0].with_environment(BLUE, model.EnvironmentState("1.0", (endpoint,)))
    assert_envoy_accepts(fleet.name, resources.all_resources(fleet, services))


@pytest.mark.parametrize("address", ["fe80::1%nosuchif0", "::1%lo", "fe80::1%1", "::ffff:127.0.0.1", "0:0:0:0:0:0:0:1"])
def test_envoy_accepts_listener_addresses_the_config_accepts(address: str) -> None:
    """Listener addresses come from the config file. ``ipaddress.ip_address`` also takes IPv6 zone
    ids; Envoy (getaddrinfo) rejects a zone name that is not an interface of the proxy's host, and
    any zone name on a non-link-local address ('::1%lo'); numeric zones pass."""
    try:
        (fleet,) = parse_settings({"fleets": {"edge": {"listeners": [{"name": "http", "address": address, "port": 10000}]}}}).fleets
    except ConfigError:
        return  # refused by the config: nothing reaches Envoy
    _, services = _example()
    assert_envoy_accepts(fleet.name, resources.all_resources(fleet, services))
