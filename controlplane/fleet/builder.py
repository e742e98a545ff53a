"""Builds each fleet's xDS snapshot from stored services, and maps a proxy to its fleet."""

from __future__ import annotations

import functools
from typing import Callable

from envoy.config.core.v3 import base_pb2

from .. import resources
from ..config import Settings, identity_allowed
from ..model import Fleet, Service
from ..xds.peer import PeerIdentity
from ..xds.server import PermissionDenied, UnknownGroup
from ..xds.snapshot import Resource, Snapshot, content_version


class SnapshotBuilder:
    """Builds each fleet's snapshot from stored state, serializing each resource once: per-service
    resources and routes are cached by the service's value, route tables by the set of services
    they route, and listeners once (they depend on the config only). A weight change therefore
    re-serializes one service's routes and joins the two route tables of the fleets serving it
    from cached bytes.

    With ``vhds`` (the default), each snapshot has a Delta variant (``Snapshot.with_delta``) in
    which the route configurations carry no virtual hosts and each virtual host is a resource of
    its own (VHDS), cached by the services on its domain: Delta proxies then receive only the
    virtual hosts of the changed service's domains."""

    def __init__(self, fleets: tuple[Fleet, ...], *, vhds: bool = True) -> None:
        self.fleets = fleets
        self.vhds = vhds
        # By service name: the Service value they were built from, its clusters and endpoints,
        # and its serialized production and preview routes. Looked up by name and checked by
        # identity first: hashing 1000s of (deep, frozen) Service values per build was a hot spot.
        self._per_service: dict[str, tuple[Service, list[Resource], resources.ServiceRoutes]] = {}
        self._routes: dict[str, tuple[tuple[Service, ...], list[Resource]]] = {}
        self._listeners = {fleet.name: resources.fleet_listeners(fleet) for fleet in fleets}
        self._vhds_routes = {fleet.name: resources.vhds_route_configurations(fleet) for fleet in fleets}
        # By fleet and domain: the services on it (in match order) and its VirtualHost resources.
        self._vhosts: dict[str, dict[str, tuple[tuple[Service, ...], list[Resource]]]] = {}

    def build(self, generation: int, services: tuple[Service, ...], previous: dict[str, Snapshot]) -> dict[str, Snapshot]:
        cache: dict[str, tuple[Service, list[Resource], resources.ServiceRoutes]] = {}
        for service in services:
            known = self._per_service.get(service.name)
            if known is None or not (known[0] is service or known[0] == service):
                known = (service, resources.service_resources(service), resources.service_routes(service))
            cache[service.name] = known
        self._per_service = cache  # drop entries of services that changed or left

        def routes(service: Service) -> resources.ServiceRoutes:
            return cache[service.name][2]

        out = {}
        for fleet in self.fleets:
            served = tuple(sorted((s for s in services if fleet.serves(s.name)), key=lambda s: s.name))
            cached = self._routes.get(fleet.name)
            if cached is None or cached[0] != served:
                cached = self._routes[fleet.name] = (served, resources.fleet_routes(fleet, served, routes))
            shared = [r for s in served for r in cache[s.name][1]] + self._listeners[fleet.name]
            tables = {resources.routes_name(fleet), resources.preview_routes_name(fleet)}
            snapshot = Snapshot.build(generation, shared + cached[1])
            if self.vhds and served:
                # (A fleet with no services keeps its empty whole tables: Envoy's VHDS waits for
                # a first virtual host and would hold its listeners warming until a timeout.)
                grpc = [r for r in cached[1] if r.name not in tables]
                vhosts = self._virtual_hosts(fleet, served, routes)
                snapshot = snapshot.with_delta(Snapshot.build(generation, shared + grpc + self._vhds_routes[fleet.name] + vhosts))
            out[fleet.name] = snapshot.with_generation(generation, previous.get(fleet.name))
        return out

    def _virtual_hosts(self, fleet: Fleet, served: tuple[Service, ...],
                       parts: Callable[[Service], resources.ServiceRoutes]) -> list[Resource]:
        """The fleet's VirtualHost resources, rebuilt only for domains whose services changed."""
        known = self._vhosts.get(fleet.name, {})
        fresh: dict[str, tuple[tuple[Service, ...], list[Resource]]] = {}
        for domain, ordered in resources.services_by_domain(served):
            key = tuple(ordered)
            entry = known.get(domain)
            if entry is None or entry[0] != key:
                entry = (key, resources.domain_virtual_hosts(fleet, domain, ordered, parts))
            fresh[domain] = entry
        self._vhosts[fleet.name] = fresh
        return [r for _, hosts in fresh.values() for r in hosts]


@functools.lru_cache(maxsize=4096)
def service_version(service: Service) -> str:
    """The xDS version of one service: a hash of everything the proxies get for it (clusters,
    endpoints, its production and preview routes). Same state, same version, on every replica
    and after restarts; any change to what the proxies get changes it."""
    parts = resources.service_resources(service)
    for preview in (False, True):
        routes = resources.build_route_configuration(service.name, [service], preview=preview)
        parts.append(Resource.from_message(f"{service.name}/routes/{preview}", routes))
    return content_version(parts)


def fleet_resolver(settings: Settings) -> Callable[[base_pb2.Node, PeerIdentity | None], str]:
    """Maps a proxy to its fleet (``node.cluster``, default ``default``). A fleet with
    ``identities`` admits only peers whose verified certificate names match one of them;
    raises UnknownGroup or PermissionDenied (naming the fleet) otherwise."""
    names = {f.name for f in settings.fleets}
    identities = settings.fleet_identities

    def resolve(node: base_pb2.Node, peer: PeerIdentity | None = None) -> str:
        fleet = node.cluster or "default"
        if fleet not in names:
            raise UnknownGroup(
                f"unknown fleet {fleet!r} (node.cluster of node {node.id!r}); "
                f"fleets in the control plane's config: {', '.join(sorted(names))}"
            )
        allowed = identities.get(fleet)
        if allowed is not None and (peer is None or not identity_allowed(allowed, peer.names)):
            who = peer.describe() if peer is not None else "an unidentified peer"
            raise PermissionDenied(f"{who} may not join fleet {fleet!r} (node {node.id!r}): its certificate "
                                   f"matches none of fleets.{fleet}.identities")
        return fleet

    return resolve
