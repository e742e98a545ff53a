"""xDS type URLs and the order in which a change must reach a proxy (a leaf: imports nothing).

Make-before-break order for one proxy: clusters, then their endpoints (a new cluster warms
until its EDS answer arrives), then listeners, then routes, then the virtual hosts of route
configurations that use VHDS (Envoy asks for those once it has the route configuration). A route
naming a cluster Envoy does not have yet answers 503, because routes are not warmed.
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
VIRTUAL_HOST = "type.googleapis.com/envoy.config.route.v3.VirtualHost"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE, VIRTUAL_HOST)

# In SotW a response for these types is the whole set, and the client subscribes by wildcard.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

# A subscribed name N of these types is a namespace: it covers every resource named "N/<rest>"
# (<rest> without "/"). Envoy's VHDS subscribes to the route configuration's name this way and
# takes every virtual host "<route config>/<domain>" the server sends (Delta xDS only).
NAMESPACED_TYPES = frozenset({VIRTUAL_HOST})

# Changes of these types reach a proxy all in one response or not at all: if one changed
# resource must wait (for its clusters), the others wait with it. Several services whose
# weights change in one snapshot (a release group) then switch together on every proxy,
# as they did when they shared one route configuration.
ALL_OR_NOTHING_TYPES = frozenset({VIRTUAL_HOST})

SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds", VIRTUAL_HOST: "vhds"}


def namespace_of(name: str) -> str:
    """The namespace of a resource name of a namespaced type: all before its last "/"."""
    return name.rpartition("/")[0]
