"""Which proxies hold their fleet's current snapshot: the xDS server's callbacks, the
convergence metrics, and the waiters behind ``?wait=converged``."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from .. import typeurls
from ..metrics import Metrics
from ..xds.server import SnapshotCache
from ..xds.snapshot import Snapshot
from ..xds.stream import Nack, Outgoing, StreamState

log = logging.getLogger(__name__)


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
