"""Wires the layers together and owns their lifecycle.

    store ──watch──► Publisher ──snapshots──► SnapshotCache ──► AdsServer ──► proxies
                                                    ▲                │ callbacks
    admin API ──► Operations ──► Repository ──► store                ▼
         └──────────── waits on ───────────────────────────── Convergence (+ metrics)

Start order matters: the first snapshot is published *before* the gRPC port opens, so a proxy
reconnecting after a restart never sees an empty configuration (which would delete its
clusters and listeners).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import grpc
from envoy.config.core.v3 import base_pb2

from . import resources, typeurls
from .config import Settings
from .metrics import Metrics
from .model import Environment, Fleet, Service
from .rollout_driver import Rollouts
from .telemetry import MetricsSink, add_metrics_service
from .store.base import KVStore
from .store.repository import Repository
from .workflow import Operations
from .xds.server import AdsServer, SnapshotCache, UnknownGroup, server_options as xds_server_options
from .xds.snapshot import Resource, Snapshot, content_version
from .xds.stream import Nack, Outgoing, StreamState

log = logging.getLogger(__name__)


class SnapshotBuilder:
    """Builds each fleet's snapshot from stored state, serializing each resource once: per-service
    resources and routes are cached by the service's value, route tables by the set of services
    they route, and listeners once (they depend on the config only). A weight change therefore
    re-serializes one service's routes and joins the two route tables of the fleets serving it
    from cached bytes."""

    def __init__(self, fleets: tuple[Fleet, ...]) -> None:
        self.fleets = fleets
        # By service name: the Service value they were built from, its clusters and endpoints,
        # and its serialized production and preview routes. Looked up by name and checked by
        # identity first: hashing 1000s of (deep, frozen) Service values per build was a hot spot.
        self._per_service: dict[str, tuple[Service, list[Resource], resources.ServiceRoutes]] = {}
        self._routes: dict[str, tuple[tuple[Service, ...], list[Resource]]] = {}
        self._listeners = {fleet.name: resources.fleet_listeners(fleet) for fleet in fleets}

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
            fleet_resources = [r for s in served for r in cache[s.name][1]] + cached[1] + self._listeners[fleet.name]
            snapshot = Snapshot.build(generation, fleet_resources)
            out[fleet.name] = snapshot.with_generation(generation, previous.get(fleet.name))
        return out


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


class _Children(dict):  # type: ignore[type-arg]
    """A metric's labelled children by (single) label value, created on first use."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self._metric = metric

    def __missing__(self, label: str) -> Any:
        child = self[label] = self._metric.labels(label)
        return child


@dataclass
class _Waiter:
    fleets: tuple[str, ...]
    generation: int
    future: asyncio.Future[float]
    since: float


@dataclass
class FleetProgress:
    streams: dict[int, StreamState] = field(default_factory=dict)
    converged: set[int] = field(default_factory=set)
    generation: int = 0
    pending_since: float | None = None  # accepted time of the oldest change not yet converged
    reported_converged: int = -1  # the value last set on the converged-proxies gauge


class Convergence:
    """Tracks which proxies hold their fleet's current snapshot; implements the xDS callbacks.

    A proxy counts as converged when it has ACKed the current snapshot's content for every
    type it needs. Waiters resolve when every connected proxy of their fleets has converged on a
    generation at least as new as theirs, with the seconds since the change was accepted.
    """

    def __init__(self, cache: SnapshotCache, metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.fleets: dict[str, FleetProgress] = {}
        self._waiters: list[_Waiter] = []
        # Labelled metric children, looked up once: these callbacks run per stream per push.
        self._responses = _Children(metrics.responses)
        self._response_bytes = _Children(metrics.response_bytes)
        self._converged_gauge = _Children(metrics.converged_proxies)

    def fleet(self, name: str) -> FleetProgress:
        progress = self.fleets.get(name)
        if progress is None:
            progress = self.fleets[name] = FleetProgress()
        return progress

    # -- publishing ------------------------------------------------------------------------

    def published(self, fleet: str, snapshot: Snapshot, content_changed: bool, accepted_at: float) -> None:
        progress = self.fleet(fleet)
        progress.generation = snapshot.generation
        progress.converged = {sid for sid, s in progress.streams.items() if self._is_converged(s)}
        if content_changed and progress.pending_since is None and progress.streams:
            progress.pending_since = accepted_at
        self.metrics.generation.labels(fleet).set(snapshot.generation)
        self._update(fleet)

    # -- xDS callbacks ---------------------------------------------------------------------

    def stream_opened(self, stream: StreamState) -> None:
        log.info("proxy %s connected (fleet %s, %s, stream %s)", stream.node_id, stream.fleet, stream.protocol.value, stream.stream_id)
        progress = self.fleet(stream.fleet)
        progress.streams[stream.stream_id] = stream
        self.metrics.connected_proxies.labels(stream.fleet).set(len(progress.streams))
        self._update(stream.fleet)

    def stream_closed(self, stream: StreamState) -> None:
        log.info("proxy %s disconnected (fleet %s, stream %s)", stream.node_id, stream.fleet, stream.stream_id)
        progress = self.fleet(stream.fleet)
        progress.streams.pop(stream.stream_id, None)
        progress.converged.discard(stream.stream_id)
        self.metrics.connected_proxies.labels(stream.fleet).set(len(progress.streams))
        for type_url in stream.types:
            try:
                self.metrics.proxy_rejecting.remove(stream.node_id, stream.fleet, type_url)
            except KeyError:
                pass
        self._update(stream.fleet)

    def response_sent(self, stream: StreamState, response: Outgoing) -> None:
        self._responses[response.type_url].inc()
        self._response_bytes[response.type_url].inc(len(response.payload))

    def nack_received(self, stream: StreamState, type_url: str, nack: Nack) -> None:
        self.metrics.nacks.labels(type_url).inc()
        self.metrics.proxy_rejecting.labels(stream.node_id, stream.fleet, type_url).set(1)
        log.warning("proxy %s (fleet %s) rejected %s version %s: %s", stream.node_id, stream.fleet,
                    typeurls.SHORT_NAMES.get(type_url, type_url), nack.version, nack.message)

    def stream_changed(self, stream: StreamState) -> None:
        progress = self.fleet(stream.fleet)
        if stream.stream_id not in progress.streams:
            return
        for type_url, state in stream.types.items():
            if state.last_nack is not None and not state.rejecting:
                self.metrics.proxy_rejecting.labels(stream.node_id, stream.fleet, type_url).set(0)
        converged = self._is_converged(stream)
        if converged == (stream.stream_id in progress.converged):
            return  # nothing this tracker reports changed
        if converged:
            progress.converged.add(stream.stream_id)
        else:
            progress.converged.discard(stream.stream_id)
        self._update(stream.fleet)

    # -- queries and waiting ---------------------------------------------------------------

    def _is_converged(self, stream: StreamState) -> bool:
        return stream.snapshot.generation == self.cache.get(stream.fleet).generation and stream.converged()

    def status(self, fleet: str) -> dict[str, int | bool]:
        progress = self.fleet(fleet)
        return {
            "generation": progress.generation,
            "proxies": len(progress.streams),
            "acked": len(progress.converged),
            "converged": self._fleet_converged(fleet, progress.generation),
        }

    def _fleet_converged(self, fleet: str, generation: int) -> bool:
        progress = self.fleet(fleet)
        return progress.generation >= generation and len(progress.converged) == len(progress.streams)

    def wait(self, fleets: tuple[str, ...], generation: int, accepted_at: float) -> asyncio.Future[float]:
        """A future resolving to the seconds from ``accepted_at`` (this tracker's clock) until
        every proxy of ``fleets`` holds generation ``generation`` or newer."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fleets, generation, future, accepted_at)
        if not self._try_resolve(waiter):
            self._waiters.append(waiter)
        return future

    def _try_resolve(self, waiter: _Waiter) -> bool:
        if waiter.future.done():
            return True
        if all(self._fleet_converged(f, waiter.generation) for f in waiter.fleets):
            waiter.future.set_result(max(0.0, self.clock() - waiter.since))
            return True
        return False

    def _update(self, fleet: str) -> None:
        progress = self.fleet(fleet)
        converged = len(progress.converged)
        if converged != progress.reported_converged:
            self._converged_gauge[fleet].set(converged)
            progress.reported_converged = converged
        if converged < len(progress.streams):
            return  # no waiter can resolve while a proxy of this fleet lags
        if progress.streams and progress.pending_since is not None:
            self.metrics.convergence.labels(fleet).observe(max(0.0, self.clock() - progress.pending_since))
            progress.pending_since = None
        if self._waiters:
            self._waiters = [w for w in self._waiters if not self._try_resolve(w)]


class Publisher:
    """Follows the store and publishes a snapshot per fleet after every committed change.

    Changes that land while a build runs are coalesced into the next build: no fixed debounce
    delay, so a single cutover is pushed as soon as it is committed.
    """

    def __init__(self, repo: Repository, builder: SnapshotBuilder, cache: SnapshotCache, convergence: Convergence,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic) -> None:
        self.repo = repo
        self.builder = builder
        self.cache = cache
        self.convergence = convergence
        self.metrics = metrics
        self.clock = clock
        self.generation = -1
        self.state_services: tuple[Service, ...] = ()
        self.last_error: str | None = None  # set while the newest stored state could not be published
        self._accepted: dict[int, float] = {}
        self._published = asyncio.Condition()

    def accepted(self, revision: int, at: float) -> None:
        """Record when the change that produced ``revision`` was accepted (for the histogram)."""
        self._accepted[revision] = at

    async def publish_once(self) -> int:
        started = self.clock()
        state = await self.repo.state()
        if state.revision <= self.generation:
            return self.generation
        previous = {f: self.cache.get(f) for f in self.cache.groups()}
        snapshots = self.builder.build(state.revision, state.services, previous)
        self.metrics.snapshot_build.observe(self.clock() - started)
        accepted = min((t for r, t in self._accepted.items() if self.generation < r <= state.revision), default=started)
        self._accepted = {r: t for r, t in self._accepted.items() if r > state.revision}
        for fleet, snapshot in snapshots.items():
            old = previous.get(fleet)
            changed = old is None or any(snapshot.resources[t] is not old.resources.get(t) for t in snapshot.resources)
            self.cache.set(fleet, snapshot)
            self.convergence.published(fleet, snapshot, changed, accepted)
        self._update_weights(state.services)
        self.generation = state.revision
        self.state_services = state.services
        async with self._published:
            self._published.notify_all()
        return state.revision

    def _update_weights(self, services: tuple[Service, ...]) -> None:
        gauge = self.metrics.traffic_weight
        gone = {s.name for s in self.state_services} - {s.name for s in services}
        for name in gone:
            for env in Environment:
                try:
                    gauge.remove(name, env.value)
                except KeyError:
                    pass
        before = {s.name: s.traffic for s in self.state_services}
        for service in services:
            if before.get(service.name) == service.traffic:
                continue  # unchanged: 2 gauge updates per service per publish add up at 1000s
            for env in Environment:
                gauge.labels(service.name, env.value).set(service.traffic.weight(env))

    async def wait_published(self, revision: int) -> None:
        async with self._published:
            await self._published.wait_for(lambda: self.generation >= revision)

    async def run(self) -> None:
        async for revision in self.repo.kv.watch():
            if revision > self.generation:
                try:
                    await self.publish_once()
                    self.last_error = None
                except Exception as exc:
                    self.last_error = f"publishing store revision {revision} failed: {exc!r}"
                    log.exception("publishing revision %s failed; proxies keep the last published config", revision)


def fleet_resolver(settings: Settings) -> Callable[[base_pb2.Node], str]:
    names = {f.name for f in settings.fleets}

    def resolve(node: base_pb2.Node) -> str:
        fleet = node.cluster or "default"
        if fleet not in names:
            raise UnknownGroup(
                f"unknown fleet {fleet!r} (node.cluster of node {node.id!r}); "
                f"fleets in the control plane's config: {', '.join(sorted(names))}"
            )
        return fleet

    return resolve


class ControlPlane:
    """The running control plane: store, publisher, ADS server. The admin API is attached by
    the caller (see ``serve.py``)."""

    def __init__(self, settings: Settings, kv: KVStore) -> None:
        self.settings = settings
        self.kv = kv
        self.metrics = Metrics()
        self.repo = Repository(kv)
        self.operations = Operations(self.repo, settings.fleets)
        self.cache = SnapshotCache(fleet_resolver(settings))
        self.convergence = Convergence(self.cache, self.metrics)
        self.builder = SnapshotBuilder(settings.fleets)
        self.publisher = Publisher(self.repo, self.builder, self.cache, self.convergence, self.metrics)
        self.ads = AdsServer(self.cache, self.convergence)
        self.telemetry = MetricsSink()
        self.rollouts = Rollouts(self.repo, settings.fleets, self.metrics, self.wait_converged)
        self.grpc_server: grpc.aio.Server | None = None
        self.xds_port: int | None = None
        self._publisher_task: asyncio.Task[None] | None = None

    async def start(self, xds_address: str) -> None:
        await self.publisher.publish_once()  # before the port opens: never serve an empty config
        self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        xds = self.settings.xds
        self.ads.first_request_timeout = xds.first_request_timeout_seconds
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", 16 * 1024 * 1024),
                ("grpc.max_send_message_length", 64 * 1024 * 1024),
                # grpcio sets SO_REUSEPORT by default: a second control plane could then bind
                # the same port silently and split the fleet between two processes.
                ("grpc.so_reuseport", 0),
                # Keepalive, ping policy and connection age (the config file's xds: section).
                *xds_server_options(
                    keepalive_seconds=xds.keepalive_seconds,
                    keepalive_timeout_seconds=xds.keepalive_timeout_seconds,
                    max_connection_age_seconds=xds.max_connection_age_seconds,
                    max_connection_age_grace_seconds=xds.max_connection_age_grace_seconds,
                ),
                # No bandwidth-delay-product pings: they size the window for data we receive,
                # and ADS requests are small. With them on, every ACK costs an extra PING round
                # trip: bench/grpc_floor.py measured about a third more server CPU per push.
                ("grpc.http2.bdp_probe", 0),
            ]
        )
        self.ads.add_to_server(server)
        add_metrics_service(server, self.telemetry)  # Envoy pushes its stats here (analysis)
        self.xds_port = server.add_insecure_port(xds_address)
        if not self.xds_port:
            raise OSError(f"cannot listen for xDS on {xds_address}")
        await server.start()
        self.grpc_server = server
        self.rollouts.telemetry = self.telemetry
        await self.rollouts.start()  # resumes deployments that were under way

    async def wait_converged(self, fleets: tuple[str, ...], revision: int, timeout: float) -> bool:
        """Wait until ``revision`` is published and every connected proxy of ``fleets`` holds it."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.publisher.wait_published(revision), timeout)
            remaining = max(0.0, timeout - (time.monotonic() - started))
            await asyncio.wait_for(self.convergence.wait(fleets, revision, started), remaining)
            return True
        except asyncio.TimeoutError:
            return False

    async def stop(self, grace: float = 2.0) -> None:
        errors: list[BaseException] = []
        await self.rollouts.stop()
        if self.grpc_server is not None:
            try:
                await self.grpc_server.stop(grace)
            except Exception as exc:  # collect, keep closing the rest
                errors.append(exc)
        if self._publisher_task is not None:
            self._publisher_task.cancel()
            try:
                await self._publisher_task
            except (asyncio.CancelledError, Exception):
                pass
        try:
            await self.kv.close()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]

    def fleets_serving(self, service: str) -> tuple[str, ...]:
        return tuple(f.name for f in self.settings.fleets if f.serves(service))

    def type_short(self, type_url: str) -> str:
        return typeurls.SHORT_NAMES.get(type_url, type_url)
