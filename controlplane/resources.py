"""Pure functions from model state to Envoy v3 resources. No I/O, no clock.

Per service ``S`` a fleet gets:

* clusters ``S-blue`` and ``S-green`` (EDS over ADS) and their ClusterLoadAssignments, both
  while both environments are deployed, so that moving traffic only ever changes a route
  (DESIGN.md, fact 1). An environment with no endpoints and no traffic (never deployed, or
  decommissioned) has no cluster: it leaves the route first, then the cluster set;
* in the fleet's RouteConfiguration ``<fleet>-routes`` (served over RDS, never inline): for each
  of the service's domains, a route for ``x-bluegreen-preview: 1`` to the idle environment,
  then the production route with ``weighted_clusters`` listing the deployed environments
  (weights sum to 100); with nothing in the idle environment the preview routes answer 503;
* in ``<fleet>-preview-routes``: every request to the idle environment, for preview listeners;
* for proxyless gRPC clients dialling ``xds:///S``: an API listener ``S`` and its route
  configuration ``grpc/S`` (weighted like the production route), both named-only resources
  that Envoy's wildcard subscriptions never receive.

Services sharing a domain share one virtual host per domain; their routes are ordered longest
prefix first, so the most specific service wins.

Delta clients get the same route tables in pieces (see docs/route-tables.md): the route
configurations carry no virtual hosts but a VHDS config source, and each virtual host is a
VirtualHost resource ``<route configuration>/<domain>`` of its own, so a change to one service
re-sends only the virtual hosts of its domains. SotW clients cannot use VHDS and get the whole
tables. Every route requires (make-before-break) the
clusters it names and their endpoints; every cluster warms with its endpoints and every
listener with its route configuration.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from envoy.config.cluster.v3 import circuit_breaker_pb2, cluster_pb2
from envoy.config.core.v3 import address_pb2, base_pb2, config_source_pb2
from envoy.config.endpoint.v3 import endpoint_components_pb2, endpoint_pb2
from envoy.config.listener.v3 import api_listener_pb2, listener_components_pb2, listener_pb2
from envoy.config.route.v3 import route_components_pb2, route_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from . import typeurls
from .model import Environment, Fleet, Release, Service
from .xds.snapshot import Resource, length_delimited

PREVIEW_HEADER = "x-bluegreen-preview"
PREVIEW_VALUE = "1"

# Envoy's default circuit breakers allow 1024 pending and 1024 active requests per cluster and
# priority; past that it answers 503 at once. A switch must survive 10,000 requests in flight
# (DESIGN.md), so the limits sit well above that.
CIRCUIT_BREAKER_LIMIT = 100_000


def _ads() -> config_source_pb2.ConfigSource:
    return config_source_pb2.ConfigSource(
        ads=config_source_pb2.AggregatedConfigSource(),
        resource_api_version=config_source_pb2.V3,
    )


def cluster_name(service: str, env: Environment) -> str:
    return f"{service}-{env.value}"


def routes_name(fleet: Fleet) -> str:
    return f"{fleet.name}-routes"


def preview_routes_name(fleet: Fleet) -> str:
    return f"{fleet.name}-preview-routes"


def _socket_address(host: str, port: int) -> address_pb2.Address:
    return address_pb2.Address(socket_address=address_pb2.SocketAddress(address=host, port_value=port))


def build_cluster(service: Service, env: Environment) -> cluster_pb2.Cluster:
    limit = wrappers_pb2.UInt32Value(value=CIRCUIT_BREAKER_LIMIT)
    thresholds = [
        circuit_breaker_pb2.CircuitBreakers.Thresholds(
            priority=priority, max_connections=limit, max_pending_requests=limit, max_requests=limit
        )
        for priority in (base_pb2.DEFAULT, base_pb2.HIGH)
    ]
    return cluster_pb2.Cluster(
        name=cluster_name(service.name, env),
        type=cluster_pb2.Cluster.EDS,
        eds_cluster_config=cluster_pb2.Cluster.EdsClusterConfig(eds_config=_ads()),
        connect_timeout=duration_pb2.Duration(seconds=2),
        lb_policy=cluster_pb2.Cluster.ROUND_ROBIN,
        circuit_breakers=circuit_breaker_pb2.CircuitBreakers(thresholds=thresholds),
        # A host that leaves EDS stops receiving requests at once, even if it still passes
        # active health checks (DESIGN.md, fact 9).
        ignore_health_on_host_removal=True,
    )


def build_load_assignment(service: Service, env: Environment) -> endpoint_pb2.ClusterLoadAssignment:
    state = service.environment(env)
    lb_endpoints = [
        endpoint_components_pb2.LbEndpoint(
            endpoint=endpoint_components_pb2.Endpoint(address=_socket_address(e.host, e.port)),
            # Only when not 1 (Envoy's default), so resources of unweighted endpoints keep their bytes and versions.
            load_balancing_weight=wrappers_pb2.UInt32Value(value=e.weight) if e.weight != 1 else None,
        )
        for e in state.endpoints
    ]
    # The locality and its weight are for proxyless gRPC clients, which refuse a locality entry
    # without a locality and skip one without a weight (gRFC A27); Envoy ignores the weight
    # unless a cluster asks for locality-weighted balancing.
    localities = [
        endpoint_components_pb2.LocalityLbEndpoints(
            locality=base_pb2.Locality(), lb_endpoints=lb_endpoints, load_balancing_weight=wrappers_pb2.UInt32Value(value=1)
        )
    ] if lb_endpoints else []
    return endpoint_pb2.ClusterLoadAssignment(cluster_name=cluster_name(service.name, env), endpoints=localities)


_RETRY = route_components_pb2.RetryPolicy(
    # Only failures where the request provably never reached the application: safe for any method.
    retry_on="connect-failure,refused-stream",
    num_retries=wrappers_pb2.UInt32Value(value=2),
)


# No upstream timeout on our routes: Envoy's default (15 s) would cut every longer request and
# stream with a 504, including those that must outlive a switch and its drain. The connection
# manager's stream idle timeout (5 min by default) still ends streams that go silent.
_NO_TIMEOUT = duration_pb2.Duration(seconds=0)


def _route_to(service: Service, env: Environment) -> route_components_pb2.RouteAction:
    return route_components_pb2.RouteAction(cluster=cluster_name(service.name, env), retry_policy=_RETRY, timeout=_NO_TIMEOUT)


# Preview routes mark the request for the application (the preview port adds no header of its
# own), so an application and its smoke tests can tell preview traffic from production.
_MARK_PREVIEW = [
    base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=PREVIEW_HEADER, value=PREVIEW_VALUE),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )
]


def in_fleet(service: Service, env: Environment) -> bool:
    """Whether the environment has a cluster in Envoy: it has endpoints or takes traffic. A
    decommissioned (or never deployed) environment leaves the route and cluster set."""
    return service.environment(env).registered or service.traffic.weight(env) > 0


def _weighted_clusters(service: Service) -> route_components_pb2.WeightedCluster:
    # Both environments are listed while both are in the fleet, the idle one at weight 0, so a
    # switch only changes this route (DESIGN.md, fact 1).
    return route_components_pb2.WeightedCluster(
        clusters=[
            route_components_pb2.WeightedCluster.ClusterWeight(
                name=cluster_name(service.name, env),
                weight=wrappers_pb2.UInt32Value(value=service.traffic.weight(env)),
            )
            for env in Environment
            if in_fleet(service, env)
        ]
    )


def _weighted(service: Service) -> route_components_pb2.RouteAction:
    release = service.release
    weights = {env: service.traffic.weight(env) for env in Environment if in_fleet(service, env)}
    action = route_components_pb2.RouteAction(weighted_clusters=_split(service, weights, _pinning(service)),
                                              retry_policy=_RETRY, timeout=_NO_TIMEOUT)
    if release is not None and release.mirror_percent > 0 and in_fleet(service, release.environment):
        action.request_mirror_policies.append(_mirror(service, release.environment, release.mirror_percent))
    return action


def _split(service: Service, weights: dict[Environment, int], pin: Callable[[Environment], list[base_pb2.HeaderValueOption]] | None
           ) -> route_components_pb2.WeightedCluster:
    """Weighted clusters (Envoy sums the weights); with ``pin``, each entry sets the cookie that
    pins a client to the environment it was drawn for."""
    return route_components_pb2.WeightedCluster(clusters=[
        route_components_pb2.WeightedCluster.ClusterWeight(
            name=cluster_name(service.name, env),
            weight=wrappers_pb2.UInt32Value(value=weight),
            response_headers_to_add=pin(env) if pin is not None else [],
        )
        for env, weight in weights.items()
    ])


# ---------------------------------------------------------------------------------------------
# Release features: session affinity, targeting and mirroring (docs/affinity.md, targeting.md,
# mirroring.md). They exist while the workflow sets ``service.release`` and need the new
# environment in the fleet.

def _active_release(service: Service) -> Release | None:
    release = service.release
    return release if release is not None and in_fleet(service, release.environment) else None


def _affinity_active(service: Service) -> bool:
    """Pins matter only while traffic is split: at 0 % or 100 % every client goes one way."""
    release = _active_release(service)
    return release is not None and release.affinity is not None and 0 < service.traffic.weight(release.environment) < 100


def pin_value(env: Environment, deployment: str, weight: int) -> str:
    """The affinity cookie's value: the environment, the deployment (a rollback or the next
    deployment invalidates the pin) and the new environment's weight when it was drawn. The
    ':' after each part keeps one part from matching a longer one (``shop-3`` vs ``shop-30``)."""
    return f"{env.value}:{deployment}:{weight}:"


def _pinning(service: Service) -> Callable[[Environment], list[base_pb2.HeaderValueOption]] | None:
    if not _affinity_active(service):
        return None
    release = service.release
    assert release is not None and release.affinity is not None
    affinity, weight = release.affinity, service.traffic.weight(release.environment)

    def set_cookie(env: Environment) -> list[base_pb2.HeaderValueOption]:
        value = f"{affinity.cookie}={pin_value(env, release.deployment, weight)}; Max-Age={affinity.ttl_seconds}; Path=/; HttpOnly; SameSite=Lax"
        return [base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="set-cookie", value=value),
                                           append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD)]

    return set_cookie


def _cookie_matchers(name: str, value: str, *, whole: bool) -> list[route_components_pb2.HeaderMatcher]:
    """Matchers of the Cookie header, any one of which means: the cookie ``name`` has a value
    that starts with ``value`` (``whole``: equals it). One route per matcher: a route's header
    matchers all have to match, and regular expressions would hit Envoy's RE2 program size
    limit (100) with long names. Cookies are separated by "; " (RFC 6265; Envoy joins HTTP/2
    cookie headers so too)."""
    pair = f"{name}={value}"

    def matcher(**kind: str) -> route_components_pb2.HeaderMatcher:
        return route_components_pb2.HeaderMatcher(name="cookie", string_match=string_pb2.StringMatcher(**kind))

    if not whole:
        return [matcher(prefix=pair), matcher(contains=f"; {pair}")]
    return [matcher(exact=pair), matcher(prefix=f"{pair};"), matcher(suffix=f"; {pair}"), matcher(contains=f"; {pair};")]


def _affinity_routes(service: Service) -> list[route_components_pb2.Route]:
    """Before the production route, in this order (N the new environment at p %, O the old one):

    * a pin to N of this deployment: N (N's share only grows during a shift);
    * a pin to O of this deployment drawn at p: O;
    * a pin to O drawn at an earlier step's w < p: drawn again, N with probability
      (p - w) / (100 - w), so that with the clients already on N the share on N is p;
    * anything else (no pin, or a pin of another deployment, e.g. one rolled back) falls through
      to the production route, which draws with p. Every draw sets the pin."""
    if not _affinity_active(service):
        return []
    release = service.release
    assert release is not None and release.affinity is not None
    new, old = release.environment, release.environment.other
    p = service.traffic.weight(new)
    cookie = release.affinity.cookie
    pin = _pinning(service)

    def routes_for(name: str, value: str, action: route_components_pb2.RouteAction) -> list[route_components_pb2.Route]:
        return [route_components_pb2.Route(name=name, match=route_components_pb2.RouteMatch(prefix=service.prefix, headers=[m]), route=action)
                for m in _cookie_matchers(cookie, value, whole=False)]

    # The value of a pin to N of this deployment, at any weight: "green:shop-3:" + weight + ":".
    routes = routes_for(f"{service.name}-pinned-{new.value}", f"{new.value}:{release.deployment}:", _route_to(service, new))
    if in_fleet(service, old):
        routes += routes_for(f"{service.name}-pinned-{old.value}", pin_value(old, release.deployment, p), _route_to(service, old))
        for w in sorted(set(release.earlier)):
            if not 0 <= w < p:
                continue
            action = route_components_pb2.RouteAction(weighted_clusters=_split(service, {new: p - w, old: 100 - p}, pin),
                                                      retry_policy=_RETRY, timeout=_NO_TIMEOUT)
            routes += routes_for(f"{service.name}-redraw-{w}", pin_value(old, release.deployment, w), action)
    return routes


def _target_route(service: Service) -> list[route_components_pb2.Route]:
    """During a targeting phase: requests matching the rule go to the new environment."""
    release = _active_release(service)
    if release is None or release.target is None:
        return []
    target = release.target
    headers = [route_components_pb2.HeaderMatcher(name=name, string_match=string_pb2.StringMatcher(exact=value))
               for name, value in target.headers]
    cookies: list[route_components_pb2.HeaderMatcher | None] = [None]
    if target.cookie is not None:
        cookies = list(_cookie_matchers(target.cookie[0], target.cookie[1], whole=True))
    return [
        route_components_pb2.Route(
            name=f"{service.name}-target",
            match=route_components_pb2.RouteMatch(prefix=service.prefix, headers=headers + ([cookie] if cookie is not None else [])),
            route=_route_to(service, release.environment),
        )
        for cookie in cookies
    ]


def _mirror(service: Service, env: Environment, percent: float) -> route_components_pb2.RouteAction.RequestMirrorPolicy:
    """Copy ``percent`` % of the route's requests to ``env``: Envoy sends the copy without
    waiting for it and discards the answer (its Host gets a ``-shadow`` suffix)."""
    fraction = percent_pb2.FractionalPercent(numerator=round(percent * 10_000), denominator=percent_pb2.FractionalPercent.MILLION)
    return route_components_pb2.RouteAction.RequestMirrorPolicy(
        cluster=cluster_name(service.name, env),
        runtime_fraction=base_pb2.RuntimeFractionalPercent(default_value=fraction),
    )


def _no_idle(service: Service) -> route_components_pb2.DirectResponseAction:
    return route_components_pb2.DirectResponseAction(
        status=503,
        body=base_pb2.DataSource(inline_string=f"bluegreen: no version is deployed in the idle environment of {service.name}\n"),
    )


def _preview_route(service: Service, match: route_components_pb2.RouteMatch) -> route_components_pb2.Route:
    idle = service.traffic.idle
    if not in_fleet(service, idle):
        return route_components_pb2.Route(name=f"{service.name}-preview", match=match, direct_response=_no_idle(service))
    return route_components_pb2.Route(name=f"{service.name}-preview", match=match, route=_route_to(service, idle),
                                      request_headers_to_add=_MARK_PREVIEW)


def _preview_match(service: Service) -> route_components_pb2.RouteMatch:
    return route_components_pb2.RouteMatch(
        prefix=service.prefix,
        headers=[
            route_components_pb2.HeaderMatcher(
                name=PREVIEW_HEADER, string_match=string_pb2.StringMatcher(exact=PREVIEW_VALUE)
            )
        ],
    )


def production_routes(service: Service) -> list[route_components_pb2.Route]:
    """The preview route first, then the release's targeting and affinity routes, if any, then
    the weighted production route."""
    return [
        _preview_route(service, _preview_match(service)),
        *_target_route(service),
        *_affinity_routes(service),
        route_components_pb2.Route(
            name=service.name, match=route_components_pb2.RouteMatch(prefix=service.prefix), route=_weighted(service)
        ),
    ]


def preview_routes(service: Service) -> list[route_components_pb2.Route]:
    return [_preview_route(service, route_components_pb2.RouteMatch(prefix=service.prefix))]


def services_by_domain(services: Sequence[Service]) -> list[tuple[str, list[Service]]]:
    """Services grouped into virtual hosts by domain, each host's services in match order:
    longest prefix first, so ``/api/v2`` wins over ``/api``."""
    by_domain: dict[str, list[Service]] = defaultdict(list)
    for service in services:
        for domain in service.domains:
            by_domain[domain.lower()].append(service)
    return [(domain, sorted(by_domain[domain], key=lambda s: (-len(s.prefix), s.prefix, s.name))) for domain in sorted(by_domain)]


def _virtual_hosts(services: Sequence[Service], preview: bool) -> list[route_components_pb2.VirtualHost]:
    hosts = []
    for domain, ordered in services_by_domain(services):
        routes = [r for s in ordered for r in (preview_routes(s) if preview else production_routes(s))]
        hosts.append(route_components_pb2.VirtualHost(name=domain, domains=[domain], routes=routes))
    return hosts


def build_route_configuration(name: str, services: Sequence[Service], *, preview: bool) -> route_pb2.RouteConfiguration:
    return route_pb2.RouteConfiguration(name=name, virtual_hosts=_virtual_hosts(services, preview))


# Field numbers for assembling route configurations from serialized parts.
_VHOST_NAME = route_components_pb2.VirtualHost.DESCRIPTOR.fields_by_name["name"].number
_VHOST_DOMAINS = route_components_pb2.VirtualHost.DESCRIPTOR.fields_by_name["domains"].number
_VHOST_ROUTES = route_components_pb2.VirtualHost.DESCRIPTOR.fields_by_name["routes"].number
_CONFIG_NAME = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name["name"].number
_CONFIG_VHOSTS = route_pb2.RouteConfiguration.DESCRIPTOR.fields_by_name["virtual_hosts"].number


@dataclass(frozen=True)
class ServiceRoutes:
    """One service's part of the fleet's route tables: its production and preview routes,
    serialized as ``VirtualHost.routes`` fields, and the clusters (with their endpoints) they
    route to. Route tables are assembled from these (``assemble_route_configuration``), so a
    change to one service re-serializes that service's routes only."""

    production: bytes
    preview: bytes
    requires: tuple[tuple[str, str], ...]
    grpc: tuple[Resource, ...] = ()  # the service's proxyless gRPC listener and route configuration


def service_routes(service: Service) -> ServiceRoutes:
    def fields(routes: list[route_components_pb2.Route]) -> bytes:
        return b"".join(length_delimited(_VHOST_ROUTES, r.SerializeToString(deterministic=True)) for r in routes)

    return ServiceRoutes(fields(production_routes(service)), fields(preview_routes(service)), tuple(_requires_clusters([service])),
                         tuple(grpc_resources(service)))


def assemble_route_configuration(name: str, services: Sequence[Service], *, preview: bool,
                                 parts: Callable[[Service], ServiceRoutes] = service_routes) -> bytes:
    """The serialized ``build_route_configuration(name, services, preview=preview)``, byte for
    byte (fields in number order, as deterministic serialization writes them), joined from each
    service's serialized routes."""
    hosts = []
    for domain, ordered in services_by_domain(services):
        encoded = domain.encode()
        host = b"".join((
            length_delimited(_VHOST_NAME, encoded),
            length_delimited(_VHOST_DOMAINS, encoded),
            *((parts(s).preview if preview else parts(s).production) for s in ordered),
        ))
        hosts.append(length_delimited(_CONFIG_VHOSTS, host))
    return length_delimited(_CONFIG_NAME, name.encode()) + b"".join(hosts)


def virtual_host_name(route_config: str, domain: str) -> str:
    """The VHDS resource name of a route configuration's virtual host for ``domain``: Envoy's
    VHDS subscribes to the route configuration's name as a namespace and takes every resource
    "<route configuration>/<anything>"; it also keys the virtual host by its ``name``, and
    removals name the resource, so the virtual host is named the same."""
    return f"{route_config}/{domain}"


def build_vhds_route_configuration(name: str) -> route_pb2.RouteConfiguration:
    """A route configuration whose virtual hosts all come over VHDS, on the ADS stream (Envoy
    accepts that only when ADS is Delta)."""
    return route_pb2.RouteConfiguration(name=name, vhds=route_pb2.Vhds(config_source=_ads()))


def vhds_route_configurations(fleet: Fleet) -> list[Resource]:
    """The fleet's route configurations as Delta clients get them (no virtual hosts; they warm
    with their VHDS namespace). They depend on the fleet's name only, never on services."""
    return [
        Resource.from_message(name, build_vhds_route_configuration(name), warms_with=[(typeurls.VIRTUAL_HOST, name)])
        for name in (routes_name(fleet), preview_routes_name(fleet))
    ]


def domain_virtual_hosts(fleet: Fleet, domain: str, ordered: Sequence[Service],
                         parts: Callable[[Service], ServiceRoutes] = service_routes) -> list[Resource]:
    """The production and preview VirtualHost resources of one domain of the fleet, for the
    services on it in match order (``services_by_domain``); each requires the clusters (and
    endpoints) of those services. Byte for byte the virtual host of the whole route table, but
    for its name."""
    requires = [ref for s in ordered for ref in parts(s).requires]
    out = []
    for config, preview in ((routes_name(fleet), False), (preview_routes_name(fleet), True)):
        name = virtual_host_name(config, domain)
        host = b"".join((
            length_delimited(_VHOST_NAME, name.encode()),
            length_delimited(_VHOST_DOMAINS, domain.encode()),
            *((parts(s).preview if preview else parts(s).production) for s in ordered),
        ))
        out.append(Resource.from_serialized(name, typeurls.VIRTUAL_HOST, host, requires=requires))
    return out


def fleet_virtual_hosts(fleet: Fleet, services: Sequence[Service],
                        parts: Callable[[Service], ServiceRoutes] = service_routes) -> list[Resource]:
    """Every VirtualHost resource of the fleet's route tables, for the services it serves."""
    served = [s for s in services if fleet.serves(s.name)]
    return [r for domain, ordered in services_by_domain(served) for r in domain_virtual_hosts(fleet, domain, ordered, parts)]


def _http_connection_manager(stat_prefix: str, route_config: str) -> any_pb2.Any:
    router = any_pb2.Any()
    router.Pack(router_pb2.Router())
    manager = hcm_pb2.HttpConnectionManager(
        stat_prefix=stat_prefix,
        codec_type=hcm_pb2.HttpConnectionManager.AUTO,
        rds=hcm_pb2.Rds(config_source=_ads(), route_config_name=route_config),
        http_filters=[hcm_pb2.HttpFilter(name="envoy.filters.http.router", typed_config=router)],
    )
    packed = any_pb2.Any()
    packed.Pack(manager)
    return packed


# ---------------------------------------------------------------------------------------------
# Proxyless gRPC (gRFC A27, A28): a gRPC client with an xDS bootstrap dials ``xds:///SERVICE``
# and asks, by name, for the Listener ``SERVICE`` (an API listener: no address, only an HTTP
# connection manager), the RouteConfiguration it names (over RDS via ADS), the clusters the
# route names and their endpoints. The clusters and endpoints are the ones Envoy gets; the
# listener and route are named-only resources, so Envoy's wildcard LDS never sees them.


def grpc_listener_name(service: Service) -> str:
    """The Listener a gRPC client asks for when it dials ``xds:///<service>``."""
    return service.name


def grpc_routes_name(service: Service) -> str:
    return f"grpc/{service.name}"


def build_grpc_route_configuration(service: Service) -> route_pb2.RouteConfiguration:
    """One virtual host whose domain is the target's authority (the service name), routing every
    method to the weighted environments. No retry policy or timeout: gRPC retries by status code
    (gRFC A44) and bounds RPCs with their deadlines. The preview route (the preview header, as
    request metadata, to the idle environment) is present only while the idle environment is in
    the fleet: gRPC clients support no direct responses."""
    routes = []
    idle = service.traffic.idle
    if in_fleet(service, idle):
        routes.append(route_components_pb2.Route(
            name=f"{service.name}-grpc-preview",
            match=route_components_pb2.RouteMatch(prefix="/", headers=_preview_match(service).headers),
            route=route_components_pb2.RouteAction(cluster=cluster_name(service.name, idle)),
        ))
    routes.append(route_components_pb2.Route(
        name=f"{service.name}-grpc",
        match=route_components_pb2.RouteMatch(prefix="/"),
        route=route_components_pb2.RouteAction(weighted_clusters=_weighted_clusters(service)),
    ))
    host = route_components_pb2.VirtualHost(name=service.name, domains=[service.name], routes=routes)
    return route_pb2.RouteConfiguration(name=grpc_routes_name(service), virtual_hosts=[host])


def build_grpc_listener(service: Service) -> listener_pb2.Listener:
    name = grpc_listener_name(service)
    return listener_pb2.Listener(
        name=name,
        api_listener=api_listener_pb2.ApiListener(api_listener=_http_connection_manager(name, grpc_routes_name(service))),
    )


def grpc_resources(service: Service) -> list[Resource]:
    """The service's API listener and gRPC route configuration: named-only resources (sent only
    to clients naming them), with the same make-before-break relations as Envoy's."""
    routes = grpc_routes_name(service)
    return [
        Resource.from_message(grpc_listener_name(service), build_grpc_listener(service), warms_with=[(typeurls.ROUTE, routes)],
                              wildcard=False),
        Resource.from_message(routes, build_grpc_route_configuration(service), requires=_requires_clusters([service]),
                              wildcard=False),
    ]


def build_listener(name: str, address: str, port: int, route_config: str) -> listener_pb2.Listener:
    return listener_pb2.Listener(
        name=name,
        address=_socket_address(address, port),
        filter_chains=[
            listener_components_pb2.FilterChain(
                filters=[
                    listener_components_pb2.Filter(
                        name="envoy.filters.network.http_connection_manager",
                        typed_config=_http_connection_manager(name, route_config),
                    )
                ]
            )
        ],
    )


# ---------------------------------------------------------------------------------------------
# Serialized resources with their make-before-break relations.

def service_resources(service: Service) -> list[Resource]:
    """Clusters and load assignments of one service; independent of the fleet, so a caller can
    cache them by service value."""
    out: list[Resource] = []
    for env in Environment:
        if not in_fleet(service, env):
            continue
        name = cluster_name(service.name, env)
        out.append(Resource.from_message(name, build_cluster(service, env), warms_with=[(typeurls.ENDPOINT, name)]))
        out.append(Resource.from_message(name, build_load_assignment(service, env)))
    return out


def _requires_clusters(services: Iterable[Service]) -> list[tuple[str, str]]:
    refs = []
    for service in services:
        for env in Environment:
            if not in_fleet(service, env):
                continue
            name = cluster_name(service.name, env)
            refs += [(typeurls.CLUSTER, name), (typeurls.ENDPOINT, name)]
    return refs


def fleet_routes(fleet: Fleet, services: Sequence[Service],
                 parts: Callable[[Service], ServiceRoutes] = service_routes) -> list[Resource]:
    """The fleet's production and preview route configurations, for the services it serves,
    and each served service's proxyless gRPC listener and route configuration.
    ``parts`` may serve each service's ``ServiceRoutes`` from a cache."""
    served = sorted((s for s in services if fleet.serves(s.name)), key=lambda s: s.name)
    requires = [ref for s in served for ref in parts(s).requires]
    out = []
    for name, preview in ((routes_name(fleet), False), (preview_routes_name(fleet), True)):
        message = assemble_route_configuration(name, served, preview=preview, parts=parts)
        out.append(Resource.from_serialized(name, typeurls.ROUTE, message, requires=requires))
    # A service whose name is also one of the fleet's listener names has no gRPC listener there
    # (one name, one listener); config validation cannot see service names, so skip, not fail.
    taken = set(fleet_listener_names(fleet))
    out += [r for s in served if grpc_listener_name(s) not in taken for r in parts(s).grpc]
    return out


def fleet_listener_names(fleet: Fleet) -> list[str]:
    names = []
    for spec in fleet.listeners:
        names.append(spec.name)
        if spec.preview_port is not None:
            names.append(f"{spec.name}-preview")
    return names


def fleet_listeners(fleet: Fleet) -> list[Resource]:
    """The fleet's listeners: they depend on the fleet's config only, never on services."""
    main, preview = routes_name(fleet), preview_routes_name(fleet)
    out = []
    for spec in fleet.listeners:
        out.append(
            Resource.from_message(
                spec.name, build_listener(spec.name, spec.address, spec.port, main), warms_with=[(typeurls.ROUTE, main)]
            )
        )
        if spec.preview_port is not None:
            name = f"{spec.name}-preview"
            out.append(
                Resource.from_message(
                    name, build_listener(name, spec.address, spec.preview_port, preview), warms_with=[(typeurls.ROUTE, preview)]
                )
            )
    return out


def fleet_resources(fleet: Fleet, services: Sequence[Service]) -> list[Resource]:
    """Listeners and route configurations of a fleet, for the services it serves."""
    return fleet_routes(fleet, services) + fleet_listeners(fleet)


def all_resources(fleet: Fleet, services: Sequence[Service]) -> list[Resource]:
    """Every resource a fleet's proxies get. (The control plane caches the per-service part.)"""
    served = [s for s in services if fleet.serves(s.name)]
    return [r for s in served for r in service_resources(s)] + fleet_resources(fleet, services)
