"""The main process's side of the xDS workers: starts them, ships them every snapshot, restarts
the ones that die, and folds what they report into this replica's views.

What lives where (docs/workers.md):

- main process: store, publisher, snapshot builder, admin API, deployment driver, and this
  pool. It builds each snapshot once and ships the changed resources (already serialized) to
  every worker: one pickle per publication, written to N pipes. It never writes to a proxy, so
  accepting a change does not get slower as the fleet grows.
- each worker (``child.py``): its own SnapshotCache, ADS server, convergence tracking, stream
  caps and telemetry sink, on the shared xDS port (SO_REUSEPORT: the kernel spreads
  connections).

The workers report the way replicas do through etcd (``cluster/shared.py``): one summary per
worker and fleet (counts at the generation it holds, the policy verdict, lagging and rejecting
node ids), and monotonic telemetry sums as one pseudo-proxy ``worker:<n>.<start>``. This pool *is*
a :class:`RemoteViews`, so ``?wait=converged``, the convergence views and the driver's analysis
treat workers exactly like other replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import itertools
import logging
import os
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from prometheus_client.metrics_core import Metric

from ..cluster.shared import RemoteViews, totals_from_dict
from ..config import Settings
from ..fleet.publisher import Backoff
from ..metrics import Metrics
from ..xds.snapshot import Snapshot
from . import ipc
from .serving import FORWARDED_METRICS

log = logging.getLogger(__name__)

READY_TIMEOUT = 60.0  # seconds a starting worker may take to open the port
STABLE_AFTER = 10.0  # a worker that ran this long restarts without accumulated backoff
RESERVE_ATTEMPTS = 30  # x 0.1 s: how long a port held by dying workers is waited for
# Bytes queued for a worker that does not read its pipe (hung, or far behind) before it is killed
# and restarted with the current snapshots: the main process must not buffer without bound.
MAX_BACKLOG = 256 * 1024 * 1024


def _child_env() -> dict[str, str]:
    """This environment, with the directory holding this ``controlplane`` package first on the
    path: the worker runs the same code however the main process was started."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH", "")) if p)
    return env


@dataclass(eq=False)
class _Slot:
    index: int
    started: int = 0  # how many times it was started (the telemetry pseudo-proxy's suffix)
    process: asyncio.subprocess.Process | None = None
    writer: asyncio.StreamWriter | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pid: int | None = None
    metrics: list[Any] = field(default_factory=list)  # its latest metric samples

    @property
    def name(self) -> str:
        return f"worker-{self.index}"


class WorkerPool(RemoteViews):
    """``count`` xDS worker processes on one port, fed by :meth:`published`."""

    def __init__(self, settings: Settings, count: int, metrics: Metrics, *, share_rows: bool = False,
                 backoff: Backoff = Backoff(initial=0.2, cap=10.0), on_change: Callable[[], None] = lambda: None) -> None:
        super().__init__()
        self.settings = settings
        self.count = count
        self.metrics = metrics
        self.share_rows = share_rows
        self.backoff = backoff
        self.on_change = on_change
        self.max_backlog = MAX_BACKLOG
        self.address = ""
        self.port = 0
        self.restarts = 0
        self._slots = [_Slot(i) for i in range(count)]
        self._shipped: dict[str, Snapshot] = {}  # what every running worker holds (or was sent)
        self._pending: dict[str, tuple[Snapshot, bool, float]] = {}
        self._flush_handle: asyncio.Handle | None = None
        # Per fleet, the latest store revision that changed nothing the proxies get (see
        # Convergence.advanced): sent after the snapshots, and to every (re)started worker.
        self._advanced: dict[str, int] = {}
        self._advanced_pending: dict[str, int] = {}
        self._supervisors: list[asyncio.Task[None]] = []
        self._stopping = False
        self._placeholder: socket.socket | None = None
        self._asks: dict[int, tuple[int, asyncio.Future[Any]]] = {}  # request id -> (worker, its answer)
        self._ids = itertools.count(1)
        self._retired: dict[tuple[str, str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        self._convergence_pending: dict[str, tuple[int, float]] = {}  # fleet -> (generation, accepted)
        self._nodes: dict[str, dict[int, list[Any]]] = {}  # under mTLS: node id -> worker -> [(fleet, names)]
        for attribute in FORWARDED_METRICS:
            # The workers count these; the main process exposes their sum (collect()).
            metrics.registry.unregister(getattr(metrics, attribute))
        metrics.registry.register(self)

    # -- lifecycle ----------------------------------------------------------------------------

    async def start(self, address: str) -> None:
        """Reserve the port, start every worker with the current snapshots, and wait until
        each has opened the port. Call after the first publication."""
        self.port = self._reserve(address)
        self.address = f"{address.rpartition(':')[0]}:{self.port}"
        self._supervisors = [asyncio.create_task(self._supervise(slot), name=slot.name) for slot in self._slots]
        try:
            await asyncio.wait_for(asyncio.gather(*(slot.ready.wait() for slot in self._slots)), READY_TIMEOUT)
        except asyncio.TimeoutError:
            await self.stop(0)
            raise OSError(f"xDS workers did not open {self.address} within {READY_TIMEOUT:g} s (see their log lines)") from None

    def _reserve(self, address: str) -> int:
        """Bind (not listen) the address with SO_REUSEPORT and keep the socket, so the port is
        fixed (also for port 0) and ours: the workers join it. A port some other socket holds
        is refused first, so a second control plane cannot silently share it. (The workers of
        a main process killed a moment ago may still hold it while they exit: a few retries.)"""
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        for attempt in range(RESERVE_ATTEMPTS):
            probe = socket.socket(family, socket.SOCK_STREAM)
            # SO_REUSEADDR as grpc sets it: connections in TIME_WAIT do not hold the port.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, int(port)))  # no SO_REUSEPORT: fails if any socket holds the port
                chosen = probe.getsockname()[1]
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                if attempt == RESERVE_ATTEMPTS - 1:
                    raise OSError(f"cannot listen for xDS on {address}: the port is in use") from None
                time.sleep(0.1)
            finally:
                probe.close()
        holder = socket.socket(family, socket.SOCK_STREAM)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind((host, chosen))
        self._placeholder = holder
        return chosen

    async def stop(self, grace: float = 2.0) -> None:
        """Ask every worker to stop (its streams get ``grace`` seconds), then reap them."""
        self._stopping = True
        for slot in self._slots:
            if slot.writer is not None:
                with contextlib.suppress(Exception):
                    slot.writer.write(ipc.encode(("stop", grace)))
        for slot in self._slots:
            if slot.process is not None and slot.process.returncode is None:
                try:
                    await asyncio.wait_for(slot.process.wait(), grace + 5.0)
                except asyncio.TimeoutError:
                    slot.process.kill()
                    await slot.process.wait()
        for task in self._supervisors:
            task.cancel()
        await asyncio.gather(*self._supervisors, return_exceptions=True)
        if self._placeholder is not None:
            self._placeholder.close()
            self._placeholder = None

    async def _supervise(self, slot: _Slot) -> None:
        """Run the slot's worker; restart it with backoff whenever it exits."""
        failures = 0
        while not self._stopping:
            started = time.monotonic()
            try:
                await self._run(slot)
            except Exception:
                log.exception("xDS %s failed to start", slot.name)
            if self._stopping:
                return
            failures = 0 if time.monotonic() - started >= STABLE_AFTER else failures + 1
            delay = self.backoff.delay(failures)
            self.restarts += 1
            self.metrics.worker_restarts.inc()
            log.error("xDS %s (pid %s) exited with code %s; its proxies reconnect to the other workers; "
                      "restarting it in %.2f s", slot.name, slot.pid,
                      slot.process.returncode if slot.process else None, delay)
            await asyncio.sleep(delay)

    async def _run(self, slot: _Slot) -> None:
        parent, child = socket.socketpair()
        slot.started += 1
        slot.ready.clear()
        try:
            slot.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "controlplane.workers.child", str(child.fileno()), pass_fds=(child.fileno(),),
                env=_child_env())
        finally:
            child.close()
        slot.pid = slot.process.pid
        reader, writer = await asyncio.open_unix_connection(sock=parent, limit=1 << 20)
        init = {"worker": slot.index, "address": self.address, "settings": self.settings, "workers": self.count,
                "share_rows": self.share_rows}
        writer.write(ipc.encode(("init", init)))
        full = {fleet: ipc.FleetShipment(s.generation, time.monotonic(), False, ipc.diff(None, s), ipc.diff_delta(None, s))
                for fleet, s in self._shipped.items()}
        writer.write(ipc.encode(("snapshots", full)))
        if self._advanced:
            writer.write(ipc.encode(("advanced", dict(self._advanced))))
        for node_id, holders in self._nodes.items():
            writer.write(ipc.encode(("holders", node_id, holders)))
        slot.writer = writer  # from here on it gets every change (after the full snapshots)
        try:
            await self._read(slot, reader)
        finally:
            slot.writer = None
            writer.close()
            if slot.process.returncode is None and not self._stopping:
                slot.process.kill()  # its pipe broke but it lives on: it must not serve stale config
            await slot.process.wait()
            self._forget(slot)

    async def _read(self, slot: _Slot, reader: asyncio.StreamReader) -> None:
        while True:
            try:
                message = await ipc.read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            kind = message[0]
            if kind == "status":
                await self._status(slot, message[1])
            elif kind == "stats":
                await self._stats(slot, message[1])
            elif kind == "answer":
                _, future = self._asks.pop(message[1], (None, None))
                if future is not None and not future.done():
                    future.set_result(message[2])
            elif kind == "node":
                self._node(slot, message[1], message[2])
            elif kind == "ready":
                log.info("xDS %s (pid %s) serving on %s", slot.name, message[1]["pid"], self.address)
                slot.ready.set()
                self._count_ready()

    # -- shipping snapshots -------------------------------------------------------------------

    def published(self, fleet: str, snapshot: Snapshot, content_changed: bool, accepted_at: float) -> None:
        """The publisher's hook (called with Convergence.published): queue ``snapshot`` for the
        workers; every fleet published in one go is shipped in one message."""
        queued = self._pending.get(fleet)
        if queued is not None:
            content_changed = content_changed or queued[1]
            accepted_at = min(accepted_at, queued[2])
        self._pending[fleet] = (snapshot, content_changed, accepted_at)
        if content_changed:
            self._convergence_pending.setdefault(fleet, (snapshot.generation, accepted_at))
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def advanced(self, fleet: str, generation: int) -> None:
        """The publisher's hook for a store write that changes no snapshot (Convergence.advanced):
        the workers' trackers move to ``generation`` too, or ``?wait=converged`` for it would
        wait for a snapshot that never comes."""
        if generation <= self._advanced.get(fleet, -1):
            return
        self._advanced[fleet] = self._advanced_pending[fleet] = generation
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Ship what was published since the last flush: encoded once, written to every worker."""
        self._flush_handle = None
        self._flush_snapshots()
        if self._advanced_pending:
            frame = ipc.encode(("advanced", self._advanced_pending))
            self._advanced_pending = {}
            for slot in self._slots:
                if slot.writer is not None:
                    slot.writer.write(frame)

    def _flush_snapshots(self) -> None:
        if not self._pending:
            return
        shipments = {fleet: ipc.FleetShipment(s.generation, accepted, changed, ipc.diff(self._shipped.get(fleet), s),
                                              ipc.diff_delta(self._shipped.get(fleet), s))
                     for fleet, (s, changed, accepted) in self._pending.items()}
        for fleet, (snapshot, _, _) in self._pending.items():
            self._shipped[fleet] = snapshot
        self._pending = {}
        frame = ipc.encode(("snapshots", shipments))
        for slot in self._slots:
            if slot.writer is not None:
                slot.writer.write(frame)
                self._check_backlog(slot)

    def _check_backlog(self, slot: _Slot) -> None:
        backlog = slot.writer.transport.get_write_buffer_size() if slot.writer is not None else 0
        if backlog > self.max_backlog and slot.process is not None and slot.process.returncode is None:
            log.error("xDS %s (pid %s) has not read %d bytes of snapshots: killing it (it is restarted with the "
                      "current snapshots)", slot.name, slot.pid, backlog)
            slot.process.kill()

    def seed(self, snapshots: dict[str, Snapshot]) -> None:
        """The snapshots the first workers start with (the first publication)."""
        self._shipped.update(snapshots)

    # -- what the workers report --------------------------------------------------------------

    async def _status(self, slot: _Slot, status: dict[str, dict[str, Any]]) -> None:
        async with self._changed:
            for fleet, summary in status.items():
                self._remote_proxies.setdefault(fleet, {})[slot.name] = summary
            self._observe_convergence()
            self._changed.notify_all()
        self.on_change()

    async def _stats(self, slot: _Slot, stats: dict[str, Any]) -> None:
        key = f"worker:{slot.index}.{slot.started}"
        for cluster, totals in stats["telemetry"].items():
            self._remote_telemetry.setdefault(cluster, {})[key] = totals_from_dict(totals)
        self.telemetry_revision += 1
        slot.metrics = stats["metrics"]

    def _node(self, slot: _Slot, node_id: str, entries: list[Any]) -> None:
        """Relay who holds ``node_id`` to every worker (each ignores its own entry)."""
        holders = self._nodes.setdefault(node_id, {})
        if entries:
            holders[slot.index] = entries
        else:
            holders.pop(slot.index, None)
        if not holders:
            del self._nodes[node_id]
        frame = ipc.encode(("holders", node_id, holders))
        for other in self._slots:
            if other.writer is not None:
                other.writer.write(frame)

    def _forget(self, slot: _Slot) -> None:
        """A worker is gone: its proxies are no longer connected here (they reconnect to the
        others); its counters stay in the sums (kept as retired), its gauges leave them. Its
        telemetry sums stay too: what its proxies reported still counts."""
        for summaries in self._remote_proxies.values():
            summaries.pop(slot.name, None)
        for name, kind, documentation, samples in slot.metrics:
            if kind in ("counter", "histogram"):
                retired = self._retired.setdefault((name, kind, documentation), {})
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    retired[key] = retired.get(key, 0.0) + value
        slot.metrics = []
        for request, (index, future) in list(self._asks.items()):
            if index == slot.index:
                del self._asks[request]
                if not future.done():
                    future.set_exception(ConnectionError(f"{slot.name} exited"))
        for node_id in [n for n, holders in self._nodes.items() if slot.index in holders]:
            self._node(slot, node_id, [])
        slot.ready.clear()
        self._count_ready()
        with contextlib.suppress(RuntimeError):
            asyncio.get_running_loop().create_task(self._changed_now())
        self.on_change()

    def _count_ready(self) -> None:
        self.metrics.workers_ready.set(sum(1 for slot in self._slots if slot.ready.is_set()))

    def _observe_convergence(self) -> None:
        """bluegreen_convergence_seconds for the whole fleet: from the accepted change to the
        last worker reporting every proxy it waits for converged."""
        for fleet, (generation, accepted) in list(self._convergence_pending.items()):
            summaries = self.remote(fleet).values()
            if summaries and all(s["generation"] >= generation and s["converged"] for s in summaries):
                if any(s["acked"] for s in summaries):
                    self.metrics.convergence.labels(fleet).observe(max(0.0, time.monotonic() - accepted))
                del self._convergence_pending[fleet]

    def status(self, fleet: str, local: dict[str, Any], *, require_all: bool = False) -> dict[str, Any]:
        """``local`` (the main process's Convergence.status, which has no streams) with every
        worker's proxies of ``fleet`` added."""
        flag = "all_converged" if require_all else "converged"
        out = dict(local)
        for summary in self.remote(fleet).values():
            out["proxies"] += summary["connected"]
            out["acked"] += summary["acked"]
            out["lagging"] = sorted([*out["lagging"], *summary["lagging"]])
            out["rejecting"] = sorted([*out["rejecting"], *summary["rejecting"]])
            out["converged"] = out["converged"] and summary[flag] and summary["generation"] >= out["generation"]
        return out

    async def rows(self, timeout: float = 10.0) -> list[dict[str, Any]]:
        """Every worker's /v1/proxies rows, asked for now (a worker that does not answer within
        ``timeout`` is left out and logged)."""
        answers, _ = await self._ask("rows", timeout)
        return [row for rows in answers for row in rows]

    async def routing_to(self, fleets: tuple[str, ...], cluster: str, timeout: float = 10.0) -> tuple[str, ...]:
        """Node ids of the workers' proxies of ``fleets`` that may still route to ``cluster``. A
        worker that does not answer is named as one (the guard must not assume it is clear)."""
        answers, silent = await self._ask("routing", timeout, fleets, cluster)
        return tuple(sorted({*(n for nodes in answers for n in nodes), *(f"<{s.name}: no answer>" for s in silent)}))

    async def refresh_stats(self, timeout: float = 5.0) -> None:
        """Have every worker report its telemetry sums and metric samples now."""
        await self._ask("stats", timeout)

    async def _ask(self, kind: str, timeout: float, *args: Any) -> tuple[list[Any], list[_Slot]]:
        """Ask every running worker; their answers, and the workers that gave none in time."""
        asks: list[tuple[_Slot, asyncio.Future[Any]]] = []
        for slot in self._slots:
            if slot.writer is not None and slot.ready.is_set():
                request = next(self._ids)
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._asks[request] = (slot.index, future)
                slot.writer.write(ipc.encode((kind, request, *args)))
                asks.append((slot, future))
        answers: list[Any] = []
        silent: list[_Slot] = []
        for slot, future in asks:
            try:
                answers.append(await asyncio.wait_for(future, timeout))
            except asyncio.TimeoutError:
                log.warning("xDS %s did not answer %r within %g s", slot.name, kind, timeout)
                silent.append(slot)
            except ConnectionError:  # it died meanwhile: its proxies are reconnecting elsewhere
                pass
        return answers, silent

    def workers(self) -> list[dict[str, Any]]:
        """One row per worker for GET /v1/cluster: index, pid, ready, connected proxies, restarts."""
        return [{"worker": slot.index, "pid": slot.pid, "ready": slot.ready.is_set() and slot.writer is not None,
                 "connected_proxies": sum(s.get(slot.name, {}).get("connected", 0) for s in self._remote_proxies.values()),
                 "restarts": max(0, slot.started - 1)}
                for slot in self._slots]

    # -- Prometheus collector: the stream metrics, summed over workers --------------------------

    def collect(self) -> Iterable[Metric]:
        sums: dict[tuple[str, str, str], dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {
            family: dict(samples) for family, samples in self._retired.items()}
        for slot in self._slots:
            for name, kind, documentation, samples in slot.metrics:
                family = sums.setdefault((name, kind, documentation), {})
                for sample, labels, value in samples:
                    key = (sample, tuple(sorted(labels.items())))
                    family[key] = family.get(key, 0.0) + value
        for (name, kind, documentation), samples in sorted(sums.items()):
            metric = Metric(name, documentation, kind)
            for (sample, labels), value in samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric

    def describe(self) -> Iterable[Metric]:
        return []
