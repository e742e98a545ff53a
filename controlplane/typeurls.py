"""xDS type URLs and the order in which a change must reach a proxy (a leaf: imports nothing).

Make-before-break order for one proxy: clusters, then their endpoints (a new cluster warms
until its EDS answer arrives), then listeners, then routes. A route naming a cluster Envoy does
not have yet answers 503, because routes are not warmed.
"""

from __future__ import annotations

CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
ENDPOINT = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
ROUTE = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"

PUSH_ORDER: tuple[str, ...] = (CLUSTER, ENDPOINT, LISTENER, ROUTE)

# In SotW a response for these types is the whole set, and the client subscribes by wildcard.
WILDCARD_TYPES = frozenset({CLUSTER, LISTENER})

SHORT_NAMES = {CLUSTER: "cds", ENDPOINT: "eds", LISTENER: "lds", ROUTE: "rds"}
