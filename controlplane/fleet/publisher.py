"""Follows the store and publishes one snapshot per fleet after every committed change."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from dataclasses import dataclass
from typing import Awaitable, Callable

from ..metrics import Metrics
from ..model import Environment, Service
from ..store.repository import Repository
from ..xds.server import SnapshotCache
from .builder import SnapshotBuilder
from .convergence import Convergence

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Backoff:
    """Capped exponential backoff with full jitter: attempt ``n`` (0-based) waits a uniformly
    random time in ``[0, min(cap, initial * 2**n)]``. Jitter keeps replicas that failed
    together (a store outage) from retrying in lockstep."""

    initial: float = 0.1
    cap: float = 30.0

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return rand() * min(self.cap, self.initial * 2 ** min(attempt, 63))


class Publisher:
    """Follows the store and publishes a snapshot per fleet after every committed change.

    Changes that land while a build runs are coalesced into the next build: no fixed debounce
    delay, so a single cutover is pushed as soon as it is committed.

    A failed publication (store read or snapshot build) is retried with :class:`Backoff` until
    it succeeds, without waiting for another write; ``last_error`` names the failure meanwhile,
    and the proxies keep the last published config. ``sleep`` and ``rand`` are injectable so
    tests need no real waiting. (A ten-line loop rather than ``tenacity``/``backoff``: the retry
    never stops and resets on success, which is all those libraries would add here.)
    """

    def __init__(self, repo: Repository, builder: SnapshotBuilder, cache: SnapshotCache, convergence: Convergence,
                 metrics: Metrics, clock: Callable[[], float] = time.monotonic, *, backoff: Backoff = Backoff(),
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.repo = repo
        self.builder = builder
        self.cache = cache
        self.convergence = convergence
        self.metrics = metrics
        self.clock = clock
        self.backoff = backoff
        self._sleep = sleep
        self._rand = rand
        self.failures = 0  # consecutive failed attempts; 0 once the newest state is published
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
        if self.generation >= 0 and _same_services(state.services, self.state_services):
            await self._advance(state.revision)
            return state.revision
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

    async def _advance(self, revision: int) -> None:
        """A store write that changes nothing the proxies get (a deployment record, its history,
        the notification outbox, ...): the revision counts as published, and the fleets'
        convergence moves to it, with no new snapshot and no work per stream. Every such write
        used to rebuild and hand every stream a snapshot of the same content."""
        self._accepted = {r: t for r, t in self._accepted.items() if r > revision}
        for fleet in self.cache.groups():
            self.convergence.advanced(fleet, revision)
        self.generation = revision
        async with self._published:
            self._published.notify_all()

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
        """Publish after every committed change until cancelled; retry failures (see class doc)."""
        async for revision in self.repo.kv.watch():
            if revision > self.generation:
                await self._publish_until_done(revision)

    async def _publish_until_done(self, revision: int) -> None:
        self.failures = 0
        while True:
            try:
                await self.publish_once()
            except Exception as exc:
                delay = self.backoff.delay(self.failures, self._rand)
                self.failures += 1
                self.last_error = f"publishing store revision {revision} failed: {exc!r}"
                log.exception("publishing revision %s failed (attempt %d); proxies keep the last published config; "
                              "retrying in %.2fs", revision, self.failures, delay)
                await self._sleep(delay)
            else:
                self.last_error = None
                self.failures = 0
                return


def _same_services(a: tuple[Service, ...], b: tuple[Service, ...]) -> bool:
    """The same Service objects: the repository hands out the object it decoded for a key
    until that key is written again, so identity means no service was written."""
    return len(a) == len(b) and all(x is y for x, y in zip(a, b))
