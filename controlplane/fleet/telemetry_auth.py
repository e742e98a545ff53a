"""Which metrics-service reports to believe: those of a node that is connected over ADS with the
same certificate identity, and only for the clusters of that node's fleet."""

from __future__ import annotations

from typing import Callable, Container

from ..bootstrap import XDS_CLUSTER
from ..typeurls import CLUSTER
from ..xds.peer import PeerIdentity
from ..xds.server import AdsServer, SnapshotCache

# (drop reason or None, the clusters the node may report or None for any): see telemetry.Authorizer.
Verdict = tuple[str | None, Container[str] | None]
ANY: Verdict = (None, None)


def telemetry_authorizer(ads: AdsServer, cache: SnapshotCache, *, mtls: bool) -> Callable[[str, PeerIdentity | None], Verdict]:
    """Without mTLS there is no identity to check: every report is believed (as before). With
    it, a report for ``node_id`` is believed only on a stream whose verified certificate names
    equal those of one of ``node_id``'s open ADS streams (``unauthenticated`` without a
    certificate, ``node_mismatch`` otherwise), and only for the clusters in that stream's fleet
    snapshot (the clusters the proxy was given) plus the bootstrap's own ``bluegreen_xds``
    (Envoy reports it like any cluster; no analysis reads it)."""

    def authorize(node_id: str, peer: PeerIdentity | None) -> Verdict:
        if not mtls:
            return ANY
        if peer is None or not peer.authenticated:
            return ("unauthenticated", None)
        fleets = {stream.fleet for stream, ads_peer in ads.streams_of(node_id) if ads_peer.names == peer.names}
        if not fleets:
            return ("node_mismatch", None)
        return (None, _FleetClusters(tuple(cache.get(fleet).of_type(CLUSTER) for fleet in fleets)))

    return authorize


class _FleetClusters:
    """Cluster names in any of some fleet snapshots' CDS, or the xDS cluster; O(fleets) lookups."""

    __slots__ = ("_pools",)

    def __init__(self, pools: tuple[Container[str], ...]) -> None:
        self._pools = pools

    def __contains__(self, name: object) -> bool:
        return name == XDS_CLUSTER or any(name in pool for pool in self._pools)
