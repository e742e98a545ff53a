"""An xDS worker process: serves ADS (SotW and Delta) and Envoy's metrics service on the
shared xDS port, from snapshots the main process ships, and reports back what its proxies hold.

Started by the main process as ``python -m controlplane.workers.child FD`` with one end of a
socketpair on ``FD``. Messages from the main process (``ipc.py`` framing):

    ("init", {"worker": int, "address": str, "settings": Settings, "workers": int, "share_rows": bool})
    ("snapshots", {fleet: FleetShipment})           changes since the previous shipment
    ("advanced", {fleet: generation})               store writes that changed no snapshot
    ("rows", request_id)                            reply ("answer", request_id, [/v1/proxies rows])
    ("stats", request_id)                           reply ("stats", {...}) now, then ("answer", request_id, None)
    ("routing", request_id, fleets, cluster)        reply ("answer", request_id, node ids routing to cluster)
    ("holders", node_id, {worker: [(fleet, names)]})  under mTLS: who holds a node id elsewhere
    ("stop", grace_seconds)                         close the port, end streams, exit

Messages to the main process:

    ("ready", {"port": int, "pid": int})           the port is open (after the first snapshots)
    ("status", {fleet: summary})                    after every convergence change (coalesced)
    ("stats", {"telemetry": {...}, "metrics": [...]}) telemetry sums and metric samples, when changed
    ("node", node_id, [(fleet, names)])             under mTLS: the streams of a node here, on change

The worker exits when the pipe closes (the main process is gone, even by SIGKILL), and the
kernel also kills it then (PR_SET_PDEATHSIG), so no worker outlives its main process.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import logging
import os
import signal
import socket
import sys
from typing import Any

from ..admin.api import proxy_row
from ..cluster.shared import MonotonicSums
from ..config import Settings
from ..fleet import Convergence, fleet_resolver
from ..fleet.telemetry_auth import _FleetClusters, telemetry_authorizer
from ..typeurls import CLUSTER
from ..metrics import Metrics
from ..telemetry import MetricsSink, add_metrics_service
from ..xds.peer import StreamLimiter
from ..xds.server import AdsServer, SnapshotCache
from . import ipc
from .serving import FORWARDED_METRICS, grpc_server, listen, worker_limits

log = logging.getLogger("bluegreen.worker")

STATUS_PAUSE = 0.005  # seconds between two status messages: coalesces a burst of ACKs into one
STATS_INTERVAL = 0.25  # seconds between looks at telemetry and metrics
PR_SET_PDEATHSIG = 1



def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere the pipe's
    end of file does it)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(1)


class Worker:
    """One worker's xDS parts, assembled like the single-process control plane's."""

    def __init__(self, worker: int, settings: Settings, workers: int, share_rows: bool,
                 writer: asyncio.StreamWriter) -> None:
        self.worker = worker
        self.settings = settings
        self.share_rows = share_rows
        self.writer = writer
        self.metrics = Metrics()
        self.cache = SnapshotCache(fleet_resolver(settings))
        self.convergence = Convergence(self.cache, self.metrics, lagging_after=settings.lagging_after_seconds)
        self.limiter = StreamLimiter(worker_limits(settings, workers), self._count_refused)
        self.mtls = settings.xds.tls is not None
        self.ads = AdsServer(self.cache, _Observers(self.convergence, self), limiter=self.limiter,
                             on_refused=self._count_refused)
        self.ads.first_request_timeout = settings.xds.first_request_timeout_seconds
        # Under mTLS, node ids held in the other workers (node -> worker -> [(fleet, names)]),
        # relayed by the main process: a node id belongs to one certificate across all workers,
        # and telemetry on this worker is believed for a node whose ADS stream is on another.
        self.others: dict[str, dict[int, list[tuple[str, tuple[str, ...]]]]] = {}
        self.ads.other_holders = lambda node_id: {names for entries in self.others.get(node_id, {}).values()
                                                  for _, names in entries}
        local = telemetry_authorizer(self.ads, self.cache, mtls=self.mtls)
        self.telemetry = MetricsSink(
            authorize=lambda node_id, peer: self._authorize(local, node_id, peer),
            on_dropped=lambda reason, n: self.metrics.telemetry_dropped.labels(reason=reason).inc(n),
        )
        self.sums = MonotonicSums(self.telemetry)
        self.server: Any = None
        self._status_due = asyncio.Event()
        self.convergence.listeners.append(self._status_due.set)
        self._sent_status: dict[str, Any] | None = None
        self._sent_stats: dict[str, Any] | None = None

    def _authorize(self, local: Any, node_id: str, peer: Any) -> Any:
        verdict = local(node_id, peer)
        if verdict[0] != "node_mismatch":
            return verdict
        fleets = {fleet for entries in self.others.get(node_id, {}).values() for fleet, names in entries
                  if names == peer.names}
        if not fleets:
            return verdict
        return (None, _FleetClusters(tuple(self.cache.get(fleet).of_type(CLUSTER) for fleet in fleets)))

    def node_changed(self, node_id: str) -> None:
        """Under mTLS, tell the main process who holds ``node_id`` here now (relayed to the others)."""
        if self.mtls:
            entries = sorted({(s.fleet, p.names) for s, p in self.ads.streams_of(node_id)})
            self.send(("node", node_id, entries))

    def _count_refused(self, reason: str) -> None:
        self.metrics.streams_refused.labels(reason=reason).inc()

    def type_short(self, type_url: str) -> str:  # for proxy_row
        from .. import typeurls
        return typeurls.SHORT_NAMES.get(type_url, type_url)

    def apply(self, shipments: dict[str, ipc.FleetShipment]) -> None:
        for fleet, shipment in shipments.items():
            previous = self.cache.get(fleet) if fleet in self.cache.groups() else None
            snapshot = ipc.apply(previous, shipment)
            self.cache.set(fleet, snapshot)
            self.convergence.published(fleet, snapshot, shipment.content_changed, shipment.accepted_at)

    async def open_port(self, address: str) -> int:
        server = grpc_server(self.settings, reuseport=True)
        self.ads.add_to_server(server)
        add_metrics_service(server, self.telemetry, self.limiter)
        port = listen(server, self.settings, address)
        if not port:
            raise OSError(f"worker {self.worker}: cannot listen for xDS on {address}")
        await server.start()
        self.server = server
        return port

    def rows(self) -> list[dict[str, Any]]:
        return [{**proxy_row(self, s), "worker": self.worker} for _, s in sorted(self.ads.streams.items())]

    def status(self) -> dict[str, Any]:
        rows = self.rows() if self.share_rows else []
        out = {}
        for fleet in (f.name for f in self.settings.fleets):
            policy, strict = self.convergence.status(fleet), self.convergence.status(fleet, require_all=True)
            fleet_rows = [r for r in rows if r["fleet"] == fleet]
            out[fleet] = {"worker": self.worker, "generation": policy["generation"], "connected": policy["proxies"],
                          "acked": policy["acked"], "converged": policy["converged"],
                          "all_converged": strict["converged"], "lagging": policy["lagging"],
                          "rejecting": policy["rejecting"], "rows": fleet_rows}
        return out

    def stats(self) -> dict[str, Any]:
        samples = []
        for attribute in FORWARDED_METRICS:
            for family in getattr(self.metrics, attribute).collect():
                samples.append((family.name, family.type, family.documentation,
                                [(s.name, s.labels, s.value) for s in family.samples if not s.name.endswith("_created")]))
        return {"telemetry": self.sums.look(), "metrics": samples}

    def send(self, message: Any) -> None:
        self.writer.write(ipc.encode(message))

    async def report_status(self) -> None:
        while True:
            await self._status_due.wait()
            self._status_due.clear()
            status = self.status()
            if status != self._sent_status:
                self.send(("status", status))
                self._sent_status = status
            await asyncio.sleep(STATUS_PAUSE)

    async def report_stats(self) -> None:
        while True:
            stats = self.stats()
            if stats != self._sent_stats:
                self.send(("stats", stats))
                self._sent_stats = stats
            await asyncio.sleep(STATS_INTERVAL)


async def run(fd: int) -> None:
    sock = socket.socket(fileno=fd)
    reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
    kind, init = await ipc.read_message(reader)
    assert kind == "init", kind
    worker = Worker(init["worker"], init["settings"], init["workers"], init["share_rows"], writer)
    kind, shipments = await ipc.read_message(reader)
    assert kind == "snapshots", kind
    worker.apply(shipments)  # before the port opens: never serve an empty config
    port = await worker.open_port(init["address"])
    worker.send(("ready", {"port": port, "pid": os.getpid()}))
    gc.freeze()  # as serve.py does: start-up objects leave the collector's view
    gc.set_threshold(20_000, 10, 10)
    tasks = [asyncio.create_task(worker.report_status(), name="status"),
             asyncio.create_task(worker.report_stats(), name="stats")]
    worker._status_due.set()
    grace = 0.0
    try:
        while True:
            try:
                message = await ipc.read_message(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                log.warning("worker %s: the main process is gone; exiting", worker.worker)
                break
            kind = message[0]
            if kind == "snapshots":
                worker.apply(message[1])
            elif kind == "advanced":  # store writes that changed no snapshot
                for fleet, generation in message[1].items():
                    worker.convergence.advanced(fleet, generation)
            elif kind == "rows":
                worker.send(("answer", message[1], worker.rows()))
            elif kind == "routing":  # the decommission guard: who may still route to a cluster
                worker.send(("answer", message[1], worker.convergence.routing_to(message[2], message[3])))
            elif kind == "stats":
                stats = worker.stats()
                worker.send(("stats", stats))
                worker._sent_stats = stats
                worker.send(("answer", message[1], None))
            elif kind == "holders":  # node id -> {worker: entries}, for the other workers' streams
                node_id, holders = message[1], {w: e for w, e in message[2].items() if w != worker.worker and e}
                if holders:
                    worker.others[node_id] = holders
                else:
                    worker.others.pop(node_id, None)
            elif kind == "stop":
                grace = float(message[1])
                break
    finally:
        for task in tasks:
            task.cancel()
        worker.convergence.close()
        if worker.server is not None:
            await worker.server.stop(grace)


class _Observers:
    """The ADS server's callbacks: the convergence tracker, plus stream open/close to the worker."""

    def __init__(self, convergence: Convergence, worker: Worker) -> None:
        self.convergence = convergence
        self.worker = worker
        self.response_sent = convergence.response_sent
        self.nack_received = convergence.nack_received
        self.stream_changed = convergence.stream_changed

    def stream_opened(self, stream: Any) -> None:
        self.convergence.stream_opened(stream)
        self.worker.node_changed(stream.node_id)

    def stream_closed(self, stream: Any) -> None:
        self.convergence.stream_closed(stream)
        self.worker.node_changed(stream.node_id)


def main(argv: list[str]) -> int:
    die_with_parent()
    logging.basicConfig(level=os.environ.get("BLUEGREEN_WORKER_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")
    # Ctrl-C, and systemd's SIGTERM to the whole service, reach every process: the main process
    # then stops the workers itself, letting streams finish (kill -9 a worker to restart it).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    asyncio.run(run(int(argv[1])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
