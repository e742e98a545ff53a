"""Wires the layers together and owns their lifecycle.

    store ──watch──► Publisher ──snapshots──► SnapshotCache ──► AdsServer ──► proxies
                                                    ▲                │ callbacks
    admin API ──► Operations ──► Repository ──► store                ▼
         └──────────── waits on ───────────────────────────── Convergence (+ metrics)

The publisher, snapshot builder and convergence tracking live in ``fleet/``; the deployment
workflow in ``deploy/``. This module only wires them.

Start order matters: the first snapshot is published *before* the gRPC port opens, so a proxy
reconnecting after a restart never sees an empty configuration (which would delete its
clusters and listeners).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

import grpc

from . import typeurls
from .cluster import Coordinator, Standalone
from .cluster.etcd import EtcdCoordinator
from .cluster.shared import FleetTelemetry, RemoteViews, SharedState
from .config import Settings
from .deploy.driver import Rollouts
from .deploy.operations import Operations
from .fleet.convergence import WaitResult
from .fleet import Convergence, Publisher, SnapshotBuilder, fleet_resolver, service_version  # noqa: F401  (re-exported)
from .fleet.telemetry_auth import telemetry_authorizer
from .metrics import Metrics
from .notify import Notifier
from .model import Environment
from .sources import EndpointSources, Endpoints, build_sources
from .sources.base import endpoints_json
from .store.base import KVStore
from .store.etcd import EtcdStore
from .store.repository import Repository
from .telemetry import MetricsSink, add_metrics_service
from .xds.peer import StreamLimiter, StreamLimits
from .xds.server import AdsServer, SnapshotCache
from .xds.snapshot import Snapshot
from .workers.pool import WorkerPool
from .workers.serving import grpc_server, listen

log = logging.getLogger(__name__)


class ControlPlane:
    """The running control plane: store, publisher, ADS server. The admin API is attached by
    the caller (see ``serve.py``)."""

    def __init__(self, settings: Settings, kv: KVStore, *, replica_id: str = "local", lease_ttl: int = 5,
                 admin_address: str = "", workers: int = 1) -> None:
        """``workers``: xDS worker processes (docs/workers.md); 1 serves xDS in this process."""
        self.settings = settings
        self.kv = kv
        self.admin_address = admin_address
        self.metrics = Metrics()
        self.repo = Repository(kv)
        self.operations = Operations(self.repo, settings.fleets)
        self.cache = SnapshotCache(fleet_resolver(settings))
        self.convergence = Convergence(self.cache, self.metrics, lagging_after=settings.lagging_after_seconds)
        self.builder = SnapshotBuilder(settings.fleets, vhds=settings.xds.route_split == "vhds")
        # With workers, the proxies are theirs: this process builds each snapshot once and ships it.
        self.workers: WorkerPool | None = (
            WorkerPool(settings, workers, self.metrics, share_rows=isinstance(kv, EtcdStore),
                       on_change=self.convergence._notify) if workers > 1 else None)
        self.publisher = Publisher(self.repo, self.builder, self.cache,
                                   _ShipToo(self.convergence, self.workers) if self.workers else self.convergence,  # type: ignore[arg-type]
                                   self.metrics)
        limits = StreamLimits(settings.xds.max_streams, settings.xds.max_streams_per_identity)
        # One limiter for ADS and metrics streams: a client's caps count both.
        self.limiter = StreamLimiter(limits, self._count_refused)
        self.ads = AdsServer(self.cache, self.convergence, limiter=self.limiter, on_refused=self._count_refused)
        self.telemetry = MetricsSink(
            authorize=telemetry_authorizer(self.ads, self.cache, mtls=settings.xds.tls is not None),
            on_dropped=lambda reason, n: self.metrics.telemetry_dropped.labels(reason=reason).inc(n),
        )
        self.sources = self._endpoint_sources()
        self.rollouts = Rollouts(self.repo, settings.fleets, self.metrics, self.wait_converged, self.routing_to)
        self.grpc_server: grpc.aio.Server | None = None
        self.xds_port: int | None = None
        self.xds_address = ""
        self._publisher_task: asyncio.Task[None] | None = None
        # One process on SQLite leads by itself; replicas on etcd elect a leader (cluster/).
        self.cluster: Coordinator = (
            EtcdCoordinator(kv, replica_id, self.replica_info, ttl=lease_ttl) if isinstance(kv, EtcdStore)
            else Standalone(replica_id, self.replica_info))
        self.shared: SharedState | None = None
        if isinstance(self.cluster, EtcdCoordinator):
            self.rollouts.leadership = self.cluster
            coordinator = self.cluster
            self.shared = SharedState(kv, replica_id, tuple(f.name for f in settings.fleets), lambda: coordinator.lease,
                                      lambda fleet, require_all: self.local_status(fleet, require_all=require_all),
                                      FleetTelemetry(self.telemetry, self.workers) if self.workers else self.telemetry)  # type: ignore[arg-type]
        self._cluster_tasks: list[asyncio.Task[None]] = []
        # Deployment event notifications (the config file's and each service's webhooks): a task
        # of its own, so that with replicas only the leader runs it (start_notifier / stop_notifier).
        self.notifier: Notifier | None = Notifier(kv, self.repo, settings.notifications, self.metrics)
        self._notifier_task: asyncio.Task[None] | None = None

    def _endpoint_sources(self) -> EndpointSources:
        """The config's endpoint sources; their writes take the put_environment path, leader only."""
        sources = EndpointSources(
            build_sources(self.settings.endpoint_sources), apply=self._apply_source, stored=self.repo.service,
            is_leader=lambda: self.cluster.is_leader, changes=self.kv.watch,
            count_error=lambda source: self.metrics.endpoint_source_errors.labels(source).inc())
        for spec in self.settings.endpoint_sources:
            self.metrics.endpoint_source_errors.labels(spec.name)
            self.metrics.endpoint_source_updates.labels(spec.name)
        self.operations.check_not_owned = sources.check_not_owned
        return sources

    async def _apply_source(self, service: str, env: Environment, endpoints: Endpoints, version: str, source: str) -> None:
        committed = await self.operations.put_environment(
            service, env.value, {"version": version, "endpoints": endpoints_json(endpoints)},
            actor=f"source:{source}", source=source)
        self.rollouts.committed(committed)
        self.publisher.accepted(committed.revision, time.monotonic())
        self.metrics.endpoint_source_updates.labels(source).inc()

    def replica_info(self) -> dict[str, object]:
        """This replica's row of GET /v1/cluster (the coordinator adds id and last_seen)."""
        return {"xds": self.xds_address, "admin": self.admin_address,
                "connected_proxies": sum(self.local_status(f.name)["proxies"] for f in self.settings.fleets),
                "store_revision": self.publisher.generation,
                "workers": self.workers.workers() if self.workers else []}

    def routing_to(self, fleets: tuple[str, ...], cluster: str) -> tuple[str, ...] | Awaitable[tuple[str, ...]]:
        """Node ids of this replica's proxies of ``fleets`` that may still route to ``cluster``
        (the decommission guard); with workers, each is asked (awaitable)."""
        if self.workers is None:
            return self.convergence.routing_to(fleets, cluster)
        return self.workers.routing_to(fleets, cluster)

    @property
    def views(self) -> list[RemoteViews]:
        """Where proxies other than this process's own report: its xDS workers, other replicas."""
        return [v for v in (self.workers, self.shared) if v is not None]

    def local_status(self, fleet: str, *, require_all: bool = False) -> dict[str, object]:
        """Convergence.status of ``fleet`` over this replica's proxies (its workers' too)."""
        status = self.convergence.status(fleet, require_all=require_all)
        return self.workers.status(fleet, status, require_all=require_all) if self.workers else status

    async def start(self, xds_address: str) -> None:
        await self.publisher.publish_once()  # before the port opens: never serve an empty config
        self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        if self.workers is not None:
            self.workers.seed({fleet: self.cache.get(fleet) for fleet in self.cache.groups()})
            await self.workers.start(xds_address)
            self.xds_port = self.workers.port
        else:
            self.ads.first_request_timeout = self.settings.xds.first_request_timeout_seconds
            server = grpc_server(self.settings, reuseport=False)
            self.ads.add_to_server(server)
            add_metrics_service(server, self.telemetry, self.limiter)  # Envoy pushes its stats here (analysis)
            self.xds_port = listen(server, self.settings, xds_address)
            if not self.xds_port:
                raise OSError(f"cannot listen for xDS on {xds_address}")
            await server.start()
            self.grpc_server = server
        self.xds_address = f"{xds_address.rpartition(':')[0]}:{self.xds_port}"
        # With replicas, the leader's analysis adds up what every replica's proxies report.
        self.rollouts.telemetry = FleetTelemetry(self.telemetry, *self.views) if self.views else self.telemetry
        if self.shared is not None:
            await self.shared.start()
        await self.rollouts.start()  # standalone: resumes deployments that were under way
        await self.sources.start()  # every replica reads; only the leader writes
        await self.cluster.start(self._elected, self._deposed)
        if isinstance(self.cluster, EtcdCoordinator):
            self._cluster_tasks = [asyncio.create_task(self._follow_deployments(), name="leader-follows-store"),
                                   asyncio.create_task(self._cluster_metrics(), name="cluster-metrics")]
        else:
            self.metrics.leader.set(1)
            self.metrics.replicas.set(1)
            self.start_notifier()  # standalone: this process is the leader

    async def _elected(self) -> None:
        self.metrics.leader.set(1)
        self.sources.wake()  # apply what the sources reported while another replica led
        if isinstance(self.cluster, EtcdCoordinator):
            await self.rollouts.activate()  # resume every deployment from its stored deadlines
            self.start_notifier()  # only the leader delivers notifications

    async def _deposed(self) -> None:
        self.metrics.leader.set(0)
        await self.rollouts.deactivate()
        await self.stop_notifier()

    async def _follow_deployments(self) -> None:
        """The leader's driver must notice deployments created or commanded through any replica:
        after every config change, poke the services whose deployment records changed (one
        range read per change; unchanged records are not decoded)."""
        known: dict[str, int] = {}
        async for _ in self.kv.watch():
            try:
                listing = await self.kv.list("deployments/", unchanged=known)
            except Exception as exc:  # etcd away: the watch resumes when it is back
                log.warning("reading deployment records failed: %s", exc)
                continue
            current = {key: known[key] for key in listing.kept}
            changed = set()
            for entry in listing.entries:
                current[entry.key] = entry.mod_revision
                changed.add(entry.key.split("/")[1])
            changed |= {key.split("/")[1] for key in set(known) - set(current)}
            known = current
            if self.cluster.is_leader:
                for service in changed:
                    self.rollouts.poke(service)

    async def _cluster_metrics(self) -> None:
        assert isinstance(self.cluster, EtcdCoordinator)
        while True:
            try:
                self.metrics.replicas.set(await self.cluster.replica_count())
            except Exception as exc:
                log.debug("counting replicas failed: %s", exc)
            if self.shared is not None:
                for fleet in self.settings.fleets:
                    local = self.local_status(fleet.name)
                    remote = self.shared.remote(fleet.name).values()
                    self.metrics.fleet_proxies.labels(fleet.name).set(local["proxies"] + sum(s["connected"] for s in remote))
                    self.metrics.fleet_converged_proxies.labels(fleet.name).set(local["acked"] + sum(s["acked"] for s in remote))
            await asyncio.sleep(self.cluster.heartbeat)

    def start_notifier(self) -> None:
        if self.notifier is not None and self._notifier_task is None:
            self._notifier_task = asyncio.create_task(self.notifier.run(), name="notifier")

    async def stop_notifier(self) -> None:
        task, self._notifier_task = self._notifier_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _count_refused(self, reason: str) -> None:
        self.metrics.streams_refused.labels(reason=reason).inc()

    async def wait_converged(self, fleets: tuple[str, ...], revision: int, timeout: float, *,
                             require_all: bool = False) -> WaitResult | None:
        """Wait until ``revision`` is published and every proxy of ``fleets`` the convergence
        policy waits for holds it (every connected proxy with ``require_all``). None on timeout;
        the result names the lagging and rejecting proxies that were not waited for."""
        started = time.monotonic()
        try:
            await asyncio.wait_for(self.publisher.wait_published(revision), timeout)
            remaining = max(0.0, timeout - (time.monotonic() - started))
            result = await asyncio.wait_for(self.convergence.wait(fleets, revision, started, require_all=require_all), remaining)
            # Workers and replicas: their proxies, as they report through pipes and etcd.
            return await self._wait_views(result, fleets, revision, started, started + timeout, require_all)
        except asyncio.TimeoutError:
            return None

    async def wait_fleet_converged(self, fleets: tuple[str, ...], revision: int, since: float, timeout: float, *,
                                   require_all: bool = False) -> WaitResult | None:
        """Wait (up to ``timeout``) until ``revision``, already published here, is held by the
        proxies of ``fleets`` the policy waits for, on this replica and, with etcd, on every
        other replica. Seconds are measured from ``since`` (this tracker's monotonic clock)."""
        started = time.monotonic()
        try:
            result = await asyncio.wait_for(self.convergence.wait(fleets, revision, since, require_all=require_all), timeout)
            return await self._wait_views(result, fleets, revision, since, started + timeout, require_all)
        except asyncio.TimeoutError:
            return None

    async def _wait_views(self, result: WaitResult, fleets: tuple[str, ...], revision: int, since: float,
                          deadline: float, require_all: bool) -> WaitResult:
        """``result`` (this process's proxies) once every view's proxies converged too; raises
        asyncio.TimeoutError at ``deadline`` (monotonic)."""
        lagging, rejecting = set(result.lagging), set(result.rejecting)
        for view in self.views:
            remaining = max(0.0, deadline - time.monotonic())
            more_lagging, more_rejecting = await asyncio.wait_for(view.wait_converged(fleets, revision, require_all), remaining)
            lagging.update(more_lagging)
            rejecting.update(more_rejecting)
        if not self.views:
            return result
        return WaitResult(time.monotonic() - since, tuple(sorted(lagging)), tuple(sorted(rejecting)))

    async def stop(self, grace: float = 2.0) -> None:
        errors: list[BaseException] = []
        await self.stop_notifier()
        if self.shared is not None:
            await self.shared.stop()
        for task in self._cluster_tasks:
            task.cancel()
        await asyncio.gather(*self._cluster_tasks, return_exceptions=True)
        try:
            await self.cluster.stop()  # steps down first: no election can restart the driver after this
        except Exception as exc:
            errors.append(exc)
        await self.sources.stop()
        await self.rollouts.stop()
        self.convergence.close()
        if self.workers is not None:
            try:
                await self.workers.stop(grace)
            except Exception as exc:
                errors.append(exc)
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


class _ShipToo:
    """What the publisher tells about each published snapshot: the convergence tracker, and the
    xDS workers, which get it shipped (one message per publication, see workers/pool.py)."""

    def __init__(self, convergence: Convergence, workers: WorkerPool) -> None:
        self.convergence = convergence
        self.workers = workers

    def published(self, fleet: str, snapshot: Snapshot, content_changed: bool, accepted_at: float) -> None:
        self.convergence.published(fleet, snapshot, content_changed, accepted_at)
        self.workers.published(fleet, snapshot, content_changed, accepted_at)

    def advanced(self, fleet: str, generation: int) -> None:
        self.convergence.advanced(fleet, generation)
        self.workers.advanced(fleet, generation)
