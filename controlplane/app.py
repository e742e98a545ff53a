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

import grpc

from . import typeurls
from .config import Settings
from .deploy.driver import Rollouts
from .deploy.operations import Operations
from .fleet.convergence import WaitResult
from .fleet import Convergence, Publisher, SnapshotBuilder, fleet_resolver, service_version  # noqa: F401  (re-exported)
from .fleet.telemetry_auth import telemetry_authorizer
from .metrics import Metrics
from .notify import Notifier
from .store.base import KVStore
from .store.repository import Repository
from .telemetry import MetricsSink, add_metrics_service
from .xds.peer import StreamLimiter, StreamLimits
from .xds.server import AdsServer, SnapshotCache, server_options as xds_server_options

log = logging.getLogger(__name__)


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
        self.convergence = Convergence(self.cache, self.metrics, lagging_after=settings.lagging_after_seconds)
        self.builder = SnapshotBuilder(settings.fleets)
        self.publisher = Publisher(self.repo, self.builder, self.cache, self.convergence, self.metrics)
        limits = StreamLimits(settings.xds.max_streams, settings.xds.max_streams_per_identity)
        # One limiter for ADS and metrics streams: a client's caps count both.
        self.limiter = StreamLimiter(limits, self._count_refused)
        self.ads = AdsServer(self.cache, self.convergence, limiter=self.limiter, on_refused=self._count_refused)
        self.telemetry = MetricsSink(
            authorize=telemetry_authorizer(self.ads, self.cache, mtls=settings.xds.tls is not None),
            on_dropped=lambda reason, n: self.metrics.telemetry_dropped.labels(reason=reason).inc(n),
        )
        self.rollouts = Rollouts(self.repo, settings.fleets, self.metrics, self.wait_converged, self.convergence.routing_to)
        self.grpc_server: grpc.aio.Server | None = None
        self.xds_port: int | None = None
        self._publisher_task: asyncio.Task[None] | None = None
        # Deployment event notifications (the config file's and each service's webhooks): a task
        # of its own, so that with replicas only the leader runs it (start_notifier / stop_notifier).
        self.notifier: Notifier | None = Notifier(kv, self.repo, settings.notifications, self.metrics)
        self._notifier_task: asyncio.Task[None] | None = None

    async def start(self, xds_address: str) -> None:
        await self.publisher.publish_once()  # before the port opens: never serve an empty config
        self._publisher_task = asyncio.create_task(self.publisher.run(), name="publisher")
        xds = self.settings.xds
        self.ads.first_request_timeout = xds.first_request_timeout_seconds
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", self.settings.xds.max_request_bytes),
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
        add_metrics_service(server, self.telemetry, self.limiter)  # Envoy pushes its stats here (analysis)
        self.xds_port = self._listen(server, xds_address)
        if not self.xds_port:
            raise OSError(f"cannot listen for xDS on {xds_address}")
        await server.start()
        self.grpc_server = server
        self.rollouts.telemetry = self.telemetry
        await self.rollouts.start()  # resumes deployments that were under way
        self.start_notifier()

    def start_notifier(self) -> None:
        if self.notifier is not None and self._notifier_task is None:
            self._notifier_task = asyncio.create_task(self.notifier.run(), name="notifier")

    async def stop_notifier(self) -> None:
        task, self._notifier_task = self._notifier_task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def _listen(self, server: grpc.aio.Server, address: str) -> int:
        tls = self.settings.xds.tls
        if tls is None:
            return server.add_insecure_port(address)
        # Read at start: a certificate rotation takes a restart (see docs/security-xds.md).
        credentials = grpc.ssl_server_credentials(
            ((tls.key.read_bytes(), tls.cert.read_bytes()),),
            root_certificates=tls.client_ca.read_bytes(),
            require_client_auth=True,  # no client certificate signed by client_ca: handshake refused
        )
        return server.add_secure_port(address, credentials)

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
            return await asyncio.wait_for(self.convergence.wait(fleets, revision, started, require_all=require_all), remaining)
        except asyncio.TimeoutError:
            return None

    async def stop(self, grace: float = 2.0) -> None:
        errors: list[BaseException] = []
        await self.stop_notifier()
        await self.rollouts.stop()
        self.convergence.close()
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
