"""Which proxies hold their fleet's current snapshot: the xDS server's callbacks, the
convergence metrics, and the waiters behind ``?wait=converged`` and the deployment gates.

Convergence policy (README, "Convergence policy"): a gate waits for the *healthy* proxies of its
fleets. A proxy that has not converged within ``lagging_after`` seconds of falling behind is
**lagging**; a proxy whose last answer was a NACK is **rejecting**. Neither holds a gate, unless
the gate asks for every proxy (``require_all``). A proxy that is simply slow, within the grace
period, is waited for. A proxy that stops answering keepalives is disconnected by gRPC and so
leaves the fleet.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import typeurls
from ..metrics import Metrics
from ..xds.server import SnapshotCache
from ..xds.snapshot import Snapshot
from ..xds.stream import Nack, Outgoing, StreamState
from .routing import may_route_to

log = logging.getLogger(__name__)

DEFAULT_LAGGING_AFTER_SECONDS = 10.0


class ProxyState(str, enum.Enum):
    CONVERGED = "converged"  # holds the fleet's current snapshot
    PENDING = "pending"  # behind, within the grace period: gates wait for it
    LAGGING = "lagging"  # behind for longer than the grace period: gates do not wait for it
    REJECTING = "rejecting"  # NACKed the latest config of some type: gates do not wait for it


@dataclass(frozen=True)
class WaitResult:
    """A resolved wait: seconds since the change was accepted, and the proxies it did not wait
    for (node ids, sorted)."""

    seconds: float
    lagging: tuple[str, ...] = ()
    rejecting: tuple[str, ...] = ()

    @property
    def skipped(self) -> tuple[str, ...]:
        return self.lagging + self.rejecting


class _Children(dict):  # type: ignore[type-arg]
    """A metric's labelled children by (single) label value, created on first use."""

    def __init__(self, metric: Any) -> None:
        super().__init__()
        self._metric = metric

    def __missing__(self, label: str) -> Any:
        child = self[label] = self._metric.labels(label)
        return child


@dataclass(eq=False)
class _Waiter:
    fleets: tuple[str, ...]
    generation: int
    future: asyncio.Future[WaitResult]
    since: float
    require_all: bool


@dataclass
class FleetProgress:
    streams: dict[int, StreamState] = field(default_factory=dict)
    converged: set[int] = field(default_factory=set)
    # Streams not converged, with the time (tracker clock) they fell behind or last made progress
    # (ACKed something), whichever is later: a proxy that keeps applying is slow, not stuck.
    behind_since: dict[int, float] = field(default_factory=dict)
    # How many responses each stream not converged had ACKed when last classified
    # (StreamState.applied): when it grows, the proxy has made progress.
    marks: dict[int, int] = field(default_factory=dict)
    # Streams not converged that gates do not wait for: lagging or rejecting.
    excused: set[int] = field(default_factory=set)
    lagging: set[int] = field(default_factory=set)  # the excused ones that are lagging, not rejecting
    generation: int = 0
    pending_since: float | None = None  # accepted time of the oldest change not yet converged
    reported_converged: int = -1  # the value last set on the converged-proxies gauge
    reported_lagging: int = -1


class Convergence:
    """Tracks which proxies hold their fleet's current snapshot; implements the xDS callbacks.

    A proxy counts as converged when it has ACKed the current snapshot's content for every
    type it needs. Waiters resolve when every connected proxy of their fleets that is neither
    lagging nor rejecting (or, with ``require_all``, every connected proxy) has converged on a
    generation at least as new as theirs.

    Lagging is decided against ``clock``. With ``timers`` on, a timer on the running loop
    re-evaluates it when the grace period of a proxy ends; tests with an injected clock turn
    timers off and call :meth:`tick` after moving the clock.
    """

    def __init__(self, cache: SnapshotCache, metrics: Metrics, clock: Callable[[], float] = time.monotonic, *,
                 lagging_after: float = DEFAULT_LAGGING_AFTER_SECONDS, timers: bool = True) -> None:
        self.cache = cache
        self.metrics = metrics
        self.clock = clock
        self.lagging_after = lagging_after
        self.fleets: dict[str, FleetProgress] = {}
        self._waiters: set[_Waiter] = set()
        self._timers = timers
        self._timer: asyncio.TimerHandle | None = None
        # Labelled metric children, looked up once: these callbacks run per stream per push.
        self._responses = _Children(metrics.responses)
        self._response_bytes = _Children(metrics.response_bytes)
        self._converged_gauge = _Children(metrics.converged_proxies)
        self._lagging_gauge = _Children(metrics.lagging_proxies)
        # Called (no arguments, on the loop) whenever what this tracker reports may have
        # changed: the admin API's live feed debounces these into one event (admin/ui/).
        self.listeners: list[Callable[[], None]] = []

    def fleet(self, name: str) -> FleetProgress:
        progress = self.fleets.get(name)
        if progress is None:
            progress = self.fleets[name] = FleetProgress()
        return progress

    def close(self) -> None:
        """Cancel the re-evaluation timer and every waiter (at shutdown)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for waiter in list(self._waiters):
            waiter.future.cancel()

    # -- publishing ------------------------------------------------------------------------

    def published(self, fleet: str, snapshot: Snapshot, content_changed: bool, accepted_at: float) -> None:
        """``snapshot`` was just set in the cache for ``fleet`` (call it in the same step, before
        any stream can have been handed the snapshot). O(1) per stream, in bulk, for a newer
        generation."""
        progress = self.fleet(fleet)
        newer = snapshot.generation > progress.generation
        progress.generation = snapshot.generation
        now = self.clock()
        if newer:
            # Called right after the cache took the snapshot, before any stream was handed it:
            # no stream holds it, and the ones converged until now fell behind now. That is all
            # that changes (the others were classified at their last event; lagging is
            # re-evaluated by tick()), and it is recorded in bulk: each of these streams is
            # handed the snapshot next and classified then (stream_changed), keeping this time
            # as the start of its grace period. Before, every stream was re-classified here,
            # O(proxies) of Python on the publication's path (the admin call waits for it).
            fell_behind, progress.converged = progress.converged, set()
            progress.behind_since.update(dict.fromkeys(fell_behind, now))
            if fell_behind:
                self._schedule(now + self.lagging_after)
        else:
            progress.converged = {sid for sid, s in progress.streams.items() if self._is_converged(s)}
            for sid, stream in progress.streams.items():
                self._classify(progress, stream, now)
        if content_changed and progress.pending_since is None and progress.streams:
            progress.pending_since = accepted_at
        self.metrics.generation.labels(fleet).set(snapshot.generation)
        self._update(fleet)

    def advanced(self, fleet: str, generation: int) -> None:
        """The fleet's content at ``generation`` is that of its current snapshot (the store
        moved on without changing what proxies get): waiters for ``generation`` resolve on
        the proxies that hold the current snapshot. O(1), no stream is re-classified."""
        progress = self.fleet(fleet)
        if generation <= progress.generation:
            return
        progress.generation = generation
        self.metrics.generation.labels(fleet).set(generation)
        self._update(fleet)

    # -- xDS callbacks ---------------------------------------------------------------------

    def stream_opened(self, stream: StreamState) -> None:
        log.info("proxy %s connected (fleet %s, %s, stream %s)", stream.node_id, stream.fleet, stream.protocol.value, stream.stream_id)
        progress = self.fleet(stream.fleet)
        progress.streams[stream.stream_id] = stream
        self._classify(progress, stream, self.clock())
        self.metrics.connected_proxies.labels(stream.fleet).set(len(progress.streams))
        self._update(stream.fleet)

    def stream_closed(self, stream: StreamState) -> None:
        log.info("proxy %s disconnected (fleet %s, stream %s)", stream.node_id, stream.fleet, stream.stream_id)
        progress = self.fleet(stream.fleet)
        progress.streams.pop(stream.stream_id, None)
        progress.converged.discard(stream.stream_id)
        progress.behind_since.pop(stream.stream_id, None)
        progress.marks.pop(stream.stream_id, None)
        progress.excused.discard(stream.stream_id)
        progress.lagging.discard(stream.stream_id)
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
        self._notify()
        log.warning("proxy %s (fleet %s) rejected %s version %s: %s", stream.node_id, stream.fleet,
                    typeurls.SHORT_NAMES.get(type_url, type_url), nack.version, nack.message)

    def stream_changed(self, stream: StreamState) -> None:
        progress = self.fleet(stream.fleet)
        if stream.stream_id not in progress.streams:
            return
        for type_url, state in stream.types.items():
            if state.last_nack is not None and not state.rejecting:
                self.metrics.proxy_rejecting.labels(stream.node_id, stream.fleet, type_url).set(0)
        sid = stream.stream_id
        was_converged, was_excused = sid in progress.converged, sid in progress.excused
        if self._is_converged(stream):
            progress.converged.add(sid)
        else:
            progress.converged.discard(sid)
        self._classify(progress, stream, self.clock())
        if was_converged == (sid in progress.converged) and was_excused == (sid in progress.excused):
            return  # nothing this tracker reports changed
        self._update(stream.fleet)

    # -- classification --------------------------------------------------------------------

    def _classify(self, progress: FleetProgress, stream: StreamState, now: float) -> None:
        """Bring ``stream``'s behind-since time, excused and lagging flags up to date (converged
        set first). O(types): this runs per stream per event."""
        sid = stream.stream_id
        if sid in progress.converged:
            progress.behind_since.pop(sid, None)
            progress.marks.pop(sid, None)
            progress.excused.discard(sid)
            progress.lagging.discard(sid)
            return
        mark = stream.applied  # an int, not the ACKed versions: this runs per stream per event
        previous = progress.marks.get(sid)
        if previous != mark:
            progress.marks[sid] = mark
            if previous is not None or sid not in progress.behind_since:
                # First seen behind, or it applied something since: the grace period starts
                # again, so back-to-back changes never make a proxy that keeps up look lagging.
                # (A stream that fell behind at a publication has a time and no mark yet.)
                progress.behind_since[sid] = now
        since = progress.behind_since[sid]
        rejecting = _rejecting(stream)
        lagging = not rejecting and now - since >= self.lagging_after
        if lagging:
            progress.lagging.add(sid)
        else:
            progress.lagging.discard(sid)
        if rejecting or lagging:
            progress.excused.add(sid)
        else:
            progress.excused.discard(sid)
            self._schedule(since + self.lagging_after)

    def tick(self) -> None:
        """Re-evaluate lagging at the tracker's clock: proxies whose grace period ended stop
        holding waiters, and the lagging gauge follows."""
        self._timer = None
        now = self.clock()
        for name, progress in self.fleets.items():
            before = set(progress.excused)
            for sid, stream in progress.streams.items():
                if sid not in progress.converged:
                    self._classify(progress, stream, now)
            for sid in progress.excused - before:
                stream = progress.streams[sid]
                log.warning("proxy %s (fleet %s) has not converged on generation %s within %gs: lagging; gates no longer wait for it",
                            stream.node_id, name, progress.generation, self.lagging_after)
            self._update(name)

    def _schedule(self, at: float) -> None:
        if not self._timers or self._timer is not None:
            return  # an earlier (or equal) deadline is already scheduled: ticks reschedule
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._timer = loop.call_later(max(0.0, at - self.clock()) + 0.001, self.tick)

    def state(self, stream: StreamState) -> ProxyState:
        progress = self.fleet(stream.fleet)
        sid = stream.stream_id
        if self._is_converged(stream):
            return ProxyState.CONVERGED
        if _rejecting(stream):
            return ProxyState.REJECTING
        since = progress.behind_since.get(sid)
        if since is not None and self.clock() - since >= self.lagging_after:
            return ProxyState.LAGGING
        return ProxyState.PENDING

    # -- queries and waiting ---------------------------------------------------------------

    def _is_converged(self, stream: StreamState) -> bool:
        return stream.snapshot.generation == self.cache.get(stream.fleet).generation and stream.converged()

    def _node_ids(self, fleets: tuple[str, ...], wanted: ProxyState) -> tuple[str, ...]:
        # Over the excused streams only: status() runs on every service view (polled by
        # dashboards and benchmarks), and walking every stream was O(proxies) per call.
        return tuple(sorted(
            progress.streams[sid].node_id
            for progress in (self.fleet(fleet) for fleet in fleets)
            for sid in progress.excused
            if self.state(progress.streams[sid]) is wanted
        ))

    def status(self, fleet: str, *, require_all: bool = False) -> dict[str, Any]:
        """``converged`` is True when every proxy the policy waits for holds the current
        generation; ``lagging`` and ``rejecting`` name the proxies it does not wait for."""
        progress = self.fleet(fleet)
        return {
            "generation": progress.generation,
            "proxies": len(progress.streams),
            "acked": len(progress.converged),
            "lagging": list(self._node_ids((fleet,), ProxyState.LAGGING)),
            "rejecting": list(self._node_ids((fleet,), ProxyState.REJECTING)),
            "converged": self._fleet_converged(fleet, progress.generation, require_all),
        }

    def _fleet_converged(self, fleet: str, generation: int, require_all: bool) -> bool:
        progress = self.fleet(fleet)
        if progress.generation < generation:
            return False
        excused = 0 if require_all else len(progress.excused)
        return len(progress.converged) + excused >= len(progress.streams)

    def routing_to(self, fleets: tuple[str, ...], cluster: str) -> tuple[str, ...]:
        """Node ids of connected proxies of ``fleets`` whose route configurations, held or
        being sent, may send production traffic to ``cluster``."""
        holders = set()
        for fleet in fleets:
            for stream in self.fleet(fleet).streams.values():
                # Route configurations, and the virtual hosts Delta proxies get over VHDS.
                for type_url in (typeurls.ROUTE, typeurls.VIRTUAL_HOST):
                    routes = stream.types.get(type_url)
                    if routes is not None and (may_route_to(routes.acked, cluster) or may_route_to(routes.sent, cluster)):
                        holders.add(stream.node_id)
        return tuple(sorted(holders))

    def wait(self, fleets: tuple[str, ...], generation: int, accepted_at: float, *,
             require_all: bool = False) -> asyncio.Future[WaitResult]:
        """A future resolving when every proxy of ``fleets`` that the policy waits for holds
        generation ``generation`` or newer, to the seconds from ``accepted_at`` (this tracker's
        clock) and the proxies not waited for. Cancel it (``asyncio.wait_for`` does, on
        timeout) and the waiter is dropped at once."""
        future: asyncio.Future[WaitResult] = asyncio.get_running_loop().create_future()
        waiter = _Waiter(fleets, generation, future, accepted_at, require_all)
        if not self._try_resolve(waiter):
            self._waiters.add(waiter)
            future.add_done_callback(lambda _: self._waiters.discard(waiter))
        return future

    @property
    def waiting(self) -> int:
        """Waiters not resolved or cancelled yet."""
        return len(self._waiters)

    def _try_resolve(self, waiter: _Waiter) -> bool:
        if waiter.future.done():
            return True
        if all(self._fleet_converged(f, waiter.generation, waiter.require_all) for f in waiter.fleets):
            waiter.future.set_result(WaitResult(
                max(0.0, self.clock() - waiter.since),
                lagging=self._node_ids(waiter.fleets, ProxyState.LAGGING),
                rejecting=self._node_ids(waiter.fleets, ProxyState.REJECTING),
            ))
            return True
        return False

    def _notify(self) -> None:
        for listener in self.listeners:
            listener()

    def _update(self, fleet: str) -> None:
        self._notify()
        progress = self.fleet(fleet)
        converged = len(progress.converged)
        if converged != progress.reported_converged:
            self._converged_gauge[fleet].set(converged)
            progress.reported_converged = converged
        lagging = len(progress.lagging)  # kept by _classify: counting here was O(proxies) per event
        if lagging != progress.reported_lagging:
            self._lagging_gauge[fleet].set(lagging)
            progress.reported_lagging = lagging
        if converged + len(progress.excused) < len(progress.streams):
            return  # no waiter can resolve while a proxy of this fleet is pending
        if converged and progress.pending_since is not None:
            # Every proxy the policy waits for holds the change (lagging ones are reported apart).
            self.metrics.convergence.labels(fleet).observe(max(0.0, self.clock() - progress.pending_since))
            progress.pending_since = None
        for waiter in list(self._waiters):
            if self._try_resolve(waiter):
                self._waiters.discard(waiter)


def _rejecting(stream: StreamState) -> bool:
    """The proxy's answer to our latest response of some type was a NACK."""
    return any(state.rejecting for state in stream.types.values())
