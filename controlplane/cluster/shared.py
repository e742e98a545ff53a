"""Fleet-wide views across replicas: proxy state and telemetry shared through etcd.

Each replica writes, attached to its lease (so a dead replica's entries vanish with it):

    cluster/proxies/<fleet>/<replica>   its proxies of that fleet: counts at the generation it
                                        published, the policy verdict, lagging and rejecting node
                                        ids, and the /v1/proxies rows (at most ``MAX_ROWS``)
    cluster/telemetry/<replica>         per Envoy cluster, monotonic sums of what its proxies
                                        reported (requests, 5xx, latency histogram)

**Write load.** The writer looks every ``interval`` seconds and writes, in one transaction, only
the keys whose content changed: at most (fleets + 1) keys per replica per interval, however many
proxies there are. Readers follow the ``cluster/`` sub-prefix with one watch and re-list it.

**Telemetry.** A replica turns what its proxies report into monotonic per-cluster sums (the
increments since its previous look, added up), so a proxy that moves to another replica or
disconnects never makes a sum go backwards. The leader's analysis sees each other replica as one
pseudo-proxy ``replica:<id>`` in :class:`FleetTelemetry`, whose snapshots the driver's existing
window arithmetic (``MetricsSink.since``) works on unchanged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Callable, Iterable, Mapping

from ..errors import StoreError
from ..store.base import Txn
from ..store.etcd import EtcdStore
from ..telemetry import EMPTY_HISTOGRAM, Histogram, MetricsSink, Snapshot, Totals, WindowStats

log = logging.getLogger(__name__)

PROXIES = "cluster/proxies/"
TELEMETRY = "cluster/telemetry/"
MAX_ROWS = 200  # /v1/proxies rows per replica and fleet kept in etcd (the counts stay exact)

Rows = Callable[[], list[dict[str, Any]]]
Status = Callable[[str, bool], dict[str, Any]]  # (fleet, require_all) -> Convergence.status


class RemoteViews:
    """What other processes serving proxies last reported: per fleet, one summary each (the
    shape :class:`SharedState` writes: generation, connected, acked, converged, all_converged,
    lagging, rejecting, rows), and per Envoy cluster their telemetry sums as pseudo-proxies.
    Filled by :class:`SharedState` (other replicas, through etcd) and by the xDS worker pool
    (this replica's workers, through their pipes: ``workers/pool.py``)."""

    def __init__(self) -> None:
        self._remote_proxies: dict[str, dict[str, dict[str, Any]]] = {}  # fleet -> process -> summary
        self._remote_telemetry: dict[str, dict[str, Totals]] = {}  # cluster -> "replica:<id>" -> totals
        self.telemetry_revision = 0  # increases whenever _remote_telemetry may have changed
        self._changed = asyncio.Condition()

    def remote(self, fleet: str) -> dict[str, dict[str, Any]]:
        """Other processes' summaries of ``fleet``, by process id."""
        return self._remote_proxies.get(fleet, {})

    def remote_rows(self) -> list[dict[str, Any]]:
        return [row for fleet in sorted(self._remote_proxies) for replica, s in sorted(self._remote_proxies[fleet].items())
                for row in s["rows"]]

    def remote_totals(self) -> dict[str, dict[str, Totals]]:
        return self._remote_telemetry

    def _remote_converged(self, fleets: Iterable[str], generation: int, require_all: bool) -> bool:
        flag = "all_converged" if require_all else "converged"
        return all(s["generation"] >= generation and s[flag] for f in fleets for s in self.remote(f).values())

    async def _changed_now(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_converged(self, fleets: tuple[str, ...], generation: int, require_all: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Until every other process reports ``fleets`` converged at ``generation`` or later (its
        policy, or every proxy with ``require_all``); returns their (lagging, rejecting) node
        ids. Cancel it (asyncio.wait_for) to give up."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._remote_converged(fleets, generation, require_all))
        lagging = tuple(sorted(n for f in fleets for s in self.remote(f).values() for n in s["lagging"]))
        rejecting = tuple(sorted(n for f in fleets for s in self.remote(f).values() for n in s["rejecting"]))
        return lagging, rejecting


class MonotonicSums:
    """Per Envoy cluster, monotonic sums of what a sink's proxies reported: each look adds the
    increments since the previous look, so a proxy that moves away or disconnects never makes
    a sum go backwards."""

    def __init__(self, sink: Any) -> None:
        self.sink = sink  # a MetricsSink, or anything with its snapshot() and since(..., until=)
        self._sums: dict[str, Totals] = {}
        # From construction on: what arrives before the first look counts too.
        self._seen: Snapshot | None = sink.snapshot()
        self._seq = 0

    def look(self) -> dict[str, Any]:
        """Add what the proxies reported since the last look; the sums as plain data."""
        now = self.sink.snapshot()
        if self._seen is not None and now.seq != self._seen.seq:
            self._seq += 1
            for cluster in now.totals:
                window = self.sink.since(self._seen, cluster, until=now)
                if not window.requests and not window.errors and not window.latency.count:
                    continue
                old = self._sums.get(cluster, Totals())
                self._sums[cluster] = Totals(old.requests + window.requests, old.errors + window.errors,
                                             old.latency + window.latency, self._seq, now.taken_at)
        self._seen = now
        return {cluster: totals_to_dict(t) for cluster, t in sorted(self._sums.items())}


class SharedState(RemoteViews):
    """Writes this replica's summaries, keeps the other replicas' in memory."""

    def __init__(self, store: EtcdStore, replica_id: str, fleets: tuple[str, ...], lease: Callable[[], int],
                 status: Status, sink: MetricsSink, *, interval: float = 0.1) -> None:
        super().__init__()
        self.store = store
        self.replica_id = replica_id
        self.fleets = fleets
        self._lease = lease
        self._status = status
        self.sink = sink
        self.interval = interval
        self.rows: Rows = lambda: []
        self._written: dict[str, dict[str, Any]] = {}
        self._written_lease = 0
        self._sums = MonotonicSums(sink)
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._write_loop(), name="shared-state-writer"),
                       asyncio.create_task(self._follow(), name="shared-state-reader")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- writing ---------------------------------------------------------------------------------

    def _summaries(self) -> dict[str, dict[str, Any]]:
        rows = self.rows()
        out: dict[str, dict[str, Any]] = {}
        for fleet in self.fleets:
            policy, strict = self._status(fleet, False), self._status(fleet, True)
            fleet_rows = [r for r in rows if r.get("fleet") == fleet]
            out[f"{PROXIES}{fleet}/{self.replica_id}"] = {
                "replica": self.replica_id, "generation": policy["generation"], "connected": policy["proxies"],
                "acked": policy["acked"], "converged": policy["converged"], "all_converged": strict["converged"],
                "lagging": policy["lagging"], "rejecting": policy["rejecting"],
                "rows": fleet_rows[:MAX_ROWS], "rows_truncated": max(0, len(fleet_rows) - MAX_ROWS),
            }
        out[f"{TELEMETRY}{self.replica_id}"] = self._telemetry_sums()
        return out

    def _telemetry_sums(self) -> dict[str, Any]:
        return self._sums.look()

    async def _write_loop(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            lease = self._lease()
            if not lease:
                continue
            try:
                await self.write_once(lease)
            except StoreError as exc:
                log.debug("sharing proxy state failed (etcd away?): %s", exc)

    async def write_once(self, lease: int) -> None:
        if lease != self._written_lease:
            self._written, self._written_lease = {}, lease  # a new lease: every key is gone
        summaries = self._summaries()
        changed = {k: v for k, v in summaries.items() if self._written.get(k) != v}
        if not changed:
            return
        txn = Txn()
        for key, value in changed.items():
            txn.put(key, value, lease=lease)
        await self.store.commit(txn)
        self._written.update(changed)

    # -- reading ---------------------------------------------------------------------------------

    async def _follow(self) -> None:
        while True:
            try:
                async for _ in self.store.watch_prefix("cluster/"):
                    await self.refresh()
            except StoreError as exc:
                log.debug("following shared state failed: %s", exc)
                await asyncio.sleep(0.5)

    async def refresh(self) -> None:
        proxies: dict[str, dict[str, dict[str, Any]]] = {}
        for entry in (await self.store.list(PROXIES)).entries:
            fleet, _, replica = entry.key[len(PROXIES):].rpartition("/")
            if replica != self.replica_id:
                proxies.setdefault(fleet, {})[replica] = entry.value
        telemetry: dict[str, dict[str, Totals]] = {}
        for entry in (await self.store.list(TELEMETRY)).entries:
            replica = entry.key[len(TELEMETRY):]
            if replica == self.replica_id:
                continue
            for cluster, value in entry.value.items():
                telemetry.setdefault(cluster, {})[f"replica:{replica}"] = totals_from_dict(value)
        async with self._changed:
            self._remote_proxies, self._remote_telemetry = proxies, telemetry
            self.telemetry_revision += 1
            self._changed.notify_all()


class FleetTelemetry:
    """The driver's telemetry: its own sink plus what other processes report (other replicas
    through etcd, this replica's xDS workers through their pipes), each as pseudo-proxies."""

    def __init__(self, sink: MetricsSink, *views: RemoteViews) -> None:
        self.sink = sink
        self.views = views

    def snapshot(self) -> Snapshot:
        local = self.sink.snapshot()
        totals: dict[str, dict[str, Totals]] = {c: dict(n) for c, n in local.totals.items()}
        for view in self.views:
            for cluster, per_process in view.remote_totals().items():
                totals.setdefault(cluster, {}).update(per_process)
        # The sequence moves when any source reports, so MonotonicSums notices remote reports too.
        return Snapshot(local.seq + sum(v.telemetry_revision for v in self.views), local.taken_at, totals)

    def since(self, start: Snapshot, cluster: str, *, until: Snapshot | None = None) -> WindowStats:
        return self.sink.since(start, cluster, until=until if until is not None else self.snapshot())


def totals_to_dict(t: Totals) -> dict[str, Any]:
    h = t.latency
    return {"requests": t.requests, "errors": t.errors, "seq": t.last_seq, "at": t.last_at,
            "latency": {"bounds": list(h.bounds), "cumulative": list(h.cumulative), "count": h.count, "total": h.total}}


def totals_from_dict(value: Mapping[str, Any]) -> Totals:
    latency = value.get("latency") or {}
    histogram = Histogram(tuple(latency.get("bounds", ())), tuple(latency.get("cumulative", ())),
                          int(latency.get("count", 0)), float(latency.get("total", 0.0))) if latency else EMPTY_HISTOGRAM
    return Totals(int(value["requests"]), int(value["errors"]), histogram, int(value["seq"]), float(value["at"]))
