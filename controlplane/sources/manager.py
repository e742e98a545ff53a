"""Runs the configured endpoint sources and applies what they report (docs/endpoint-sources.md).

    source.run ──report──► last good endpoints ──reconcile──► Operations.put_environment ──► store

Contracts:

* A source owns its (service, environment) pairs: API writes of their endpoints are refused
  (409 naming the source, :meth:`EndpointSources.owner_of`).
* What a source reports is applied through the same operation as ``PUT
  .../environments/{env}`` with the version stored there, so the model's rules, the capacity
  guard and make-before-break apply unchanged. Only the leader writes (every replica runs the
  sources, so each can answer with the last good endpoints, e.g. for a new deployment).
* A failed round (bad file, DNS failure) changes nothing: the last good endpoints stay, the
  error is logged, counted (``bluegreen_endpoint_source_errors_total{source}``) and shown in
  ``GET /v1/endpoint-sources``.
* A write the workflow refuses now (a deployment is running its smoke tests, a live
  environment may not become empty ...) is retried after every store change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping

from ..errors import BlueGreenError, ConflictError, NotFoundError
from ..model import Environment
from .base import EndpointSource, Endpoints, Owned, endpoints_json

log = logging.getLogger(__name__)

RESTART_SECONDS = 5.0  # after a source's run() raised


@dataclass
class PairStatus:
    """What the manager knows of one owned (service, environment)."""

    endpoints: Endpoints | None = None  # last good; None: never reported
    reported_at: float | None = None
    applied_at: float | None = None
    pending: str | None = None  # why the last good set is not (yet) in the store


@dataclass
class SourceStatus:
    source: EndpointSource
    describe: dict[str, Any]
    pairs: dict[Owned, PairStatus] = field(default_factory=dict)
    last_update: float | None = None
    last_error: str | None = None
    last_error_at: float | None = None
    errors: int = 0


class SourceReporter:
    """The :class:`~controlplane.sources.base.Reporter` handed to one source."""

    def __init__(self, manager: EndpointSources, status: SourceStatus) -> None:
        self.manager = manager
        self.status = status

    def endpoints(self, found: Mapping[Owned, Endpoints]) -> None:
        now = self.manager.clock()
        for pair, endpoints in found.items():
            if pair in self.status.pairs:
                self.status.pairs[pair].endpoints = endpoints
                self.status.pairs[pair].reported_at = now
        self.status.last_update = now
        self.status.last_error = None
        self.manager.wake()

    def error(self, message: str) -> None:
        self.status.errors += 1
        self.status.last_error = message
        self.status.last_error_at = self.manager.clock()
        self.manager.count_error(self.status.source.name)
        log.warning("endpoint source %s: %s (keeping the last good endpoints)", self.status.source.name, message)


Apply = Callable[[str, Environment, Endpoints, str, str], Awaitable[None]]  # service, env, endpoints, version, source


class EndpointSources:
    def __init__(self, sources: list[tuple[EndpointSource, dict[str, Any]]], *, apply: Apply,
                 stored: Callable[[str], Awaitable[Any]], is_leader: Callable[[], bool],
                 count_error: Callable[[str], None], changes: Callable[[], Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``apply`` writes one environment (the put_environment path); ``stored(service)``
        reads a service (NotFoundError if unknown); ``changes()`` yields after every store commit."""
        self.clock = clock
        self.count_error = count_error
        self._apply = apply
        self._stored = stored
        self._is_leader = is_leader
        self._changes = changes
        self.statuses = {source.name: SourceStatus(source, describe, {pair: PairStatus() for pair in source.owns})
                         for source, describe in sources}
        self._owners = {pair: source.name for source, _ in sources for pair in source.owns}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    # -- read side -------------------------------------------------------------------------

    def owner_of(self, service: str, env: Environment) -> str | None:
        return self._owners.get(Owned(service, env))

    def check_not_owned(self, service: str, env: Environment) -> None:
        """ConflictError (409) naming the source if one owns the pair."""
        owner = self.owner_of(service, env)
        if owner is not None:
            raise ConflictError(f"the endpoints of {service}/{env.value} come from endpoint source {owner!r} "
                                f"(config endpoint_sources); change them there, not through the API")

    def endpoints_of(self, service: str, env: Environment) -> Endpoints | None:
        owner = self.owner_of(service, env)
        return self.statuses[owner].pairs[Owned(service, env)].endpoints if owner else None

    def deployment_body(self, service: str, target: Environment, body: object) -> object:
        """A deployment to an owned environment takes its endpoints from the source: the body
        must not give any (409 naming the source), and they are filled in from the last good
        set (409 if the source has none yet)."""
        owner = self.owner_of(service, target)
        if owner is None or not isinstance(body, dict):
            return body
        if "endpoints" in body:
            raise ConflictError(f"the endpoints of {service}/{target.value} come from endpoint source {owner!r} "
                                f"(config endpoint_sources): leave endpoints out of the deployment")
        endpoints = self.endpoints_of(service, target)
        if not endpoints:
            error = self.statuses[owner].last_error
            raise ConflictError(f"endpoint source {owner!r} has no endpoints for {service}/{target.value} yet"
                                + (f"; its last error: {error}" if error else ""))
        return {**body, "endpoints": endpoints_json(endpoints)}

    def view(self) -> list[dict[str, Any]]:
        return [self._source_view(status) for status in self.statuses.values()]

    def _source_view(self, status: SourceStatus) -> dict[str, Any]:
        return {
            "name": status.source.name,
            **status.describe,
            "last_update": status.last_update,
            "last_error": status.last_error,
            "last_error_at": status.last_error_at,
            "errors": status.errors,
            "owns": [{
                "service": pair.service,
                "environment": pair.environment.value,
                "endpoints": endpoints_json(p.endpoints) if p.endpoints is not None else None,
                "reported_at": p.reported_at,
                "applied_at": p.applied_at,
                "pending": p.pending,
            } for pair, p in sorted(status.pairs.items())],
        }

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        for status in self.statuses.values():
            self._tasks.append(asyncio.create_task(self._run(status), name=f"endpoint-source-{status.source.name}"))
        self._tasks.append(asyncio.create_task(self._reconcile_loop(), name="endpoint-sources-reconcile"))
        if self._changes is not None:
            self._tasks.append(asyncio.create_task(self._follow_store(), name="endpoint-sources-follow-store"))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    def wake(self) -> None:
        self._wake.set()

    async def _run(self, status: SourceStatus) -> None:
        reporter = SourceReporter(self, status)
        while True:
            try:
                await status.source.run(reporter)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.exception("endpoint source %s stopped; restarting in %ss", status.source.name, RESTART_SECONDS)
                reporter.error(f"the source stopped: {exc!r}")
            await asyncio.sleep(RESTART_SECONDS)

    async def _follow_store(self) -> None:
        assert self._changes is not None
        async for _ in self._changes():
            self.wake()

    async def _reconcile_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.reconcile()
            except Exception:
                log.exception("applying endpoint sources failed")

    async def reconcile(self) -> None:
        """Write every owned pair whose last good endpoints differ from the stored ones (leader only)."""
        if not self._is_leader():
            return
        for status in self.statuses.values():
            for pair, pair_status in status.pairs.items():
                if pair_status.endpoints is not None:
                    await self._reconcile_pair(status.source.name, pair, pair_status)

    async def _reconcile_pair(self, source: str, pair: Owned, status: PairStatus) -> None:
        assert status.endpoints is not None
        try:
            service = await self._stored(pair.service)
        except NotFoundError:
            status.pending = f"service {pair.service!r} does not exist yet"
            return
        stored = service.environment(pair.environment)
        if endpoints_json(stored.endpoints) == endpoints_json(status.endpoints):
            status.pending = None
            return
        if not stored.version:
            status.pending = (f"no version in {pair} yet: a deployment to it takes these endpoints "
                              f"(or give the environment a version)")
            return
        try:
            await self._apply(pair.service, pair.environment, status.endpoints, stored.version, source)
        except BlueGreenError as exc:
            if status.pending != str(exc):
                log.info("endpoint source %s: %s not applied yet: %s", source, pair, exc)
            status.pending = str(exc)
            return
        status.pending = None
        status.applied_at = self.clock()
        log.info("endpoint source %s: %s now has %d endpoint(s)", source, pair, len(status.endpoints))
