"""Which clusters a route configuration sends production traffic to, read from the resource a
proxy holds. Used by the decommission guard: an environment is not removed while a connected
proxy still routes to it (DESIGN.md, "Convergence policy")."""

from __future__ import annotations

from envoy.config.route.v3 import route_components_pb2, route_pb2
from google.protobuf import any_pb2

from .. import typeurls
from ..xds.snapshot import Resource

_CACHE_LIMIT = 1024
# Keyed by the resource's version, a hash of its bytes: the same content always gives the same
# answer, and every proxy of a fleet holds the same few route configurations.
_weighted_by_version: dict[str, frozenset[str]] = {}


def weighted_targets(resource: Resource) -> frozenset[str]:
    """Names of the clusters ``resource`` (a RouteConfiguration or a VirtualHost) gives a weight above 0 in a
    ``weighted_clusters`` action: where its production traffic goes. Preview routes (a single
    ``cluster`` action) do not count: they carry test traffic only."""
    cached = _weighted_by_version.get(resource.version)
    if cached is not None:
        return cached
    packed = any_pb2.Any.FromString(resource.any_bytes)
    if resource.type_url == typeurls.VIRTUAL_HOST:
        hosts = [route_components_pb2.VirtualHost.FromString(packed.value)]
    else:
        hosts = list(route_pb2.RouteConfiguration.FromString(packed.value).virtual_hosts)
    targets = frozenset(
        weighted.name
        for host in hosts
        for route in host.routes
        if route.HasField("route") and route.route.HasField("weighted_clusters")
        for weighted in route.route.weighted_clusters.clusters
        if weighted.weight.value > 0
    )
    if len(_weighted_by_version) >= _CACHE_LIMIT:
        _weighted_by_version.clear()
    _weighted_by_version[resource.version] = targets
    return targets


def may_route_to(held: dict[str, Resource | None], cluster: str) -> bool:
    """Whether route configurations (or virtual hosts) a proxy holds (or is being sent) may send production traffic
    to ``cluster``. A configuration whose content we do not know (a Delta proxy reporting a
    version we never served) counts: it might."""
    return any(resource is None or cluster in weighted_targets(resource) for resource in held.values())
