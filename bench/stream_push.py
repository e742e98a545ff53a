"""Micro-benchmark: CPU of one switch on one SotW stream, without gRPC or I/O.

    python bench/stream_push.py --services 1 100

It builds the real snapshots in-process, with a temporary SQLite store and the real SnapshotBuilder.
It brings one SotwStream to convergence, then alternates two snapshots that differ only in
svc-0's weights. For each switch it times StreamState.on_snapshot (which plans and encodes the
RDS push) plus on_request (the proxy's ACK), and reports µs per stream per switch. Multiply by
the number of proxies to get the event-loop CPU that the protocol state costs per switch. In the
end-to-end benchmark (bench/convergence.py), grpc writes, queues, callbacks and GC come on top.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

from controlplane import typeurls  # noqa: E402
from controlplane.app import ControlPlane  # noqa: E402
from controlplane.config import Settings  # noqa: E402
from controlplane.store.sqlite import open_sqlite_store  # noqa: E402
from controlplane.xds.stream import Outgoing, SotwStream  # noqa: E402

Request = discovery_pb2.DiscoveryRequest


async def measure(services: int, switches: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cp = ControlPlane(Settings(), await open_sqlite_store(Path(tmp) / "state.db"))
        try:
            for i in range(services):
                name = f"svc-{i}"
                await cp.operations.put_service(name, {"prefix": f"/{name}"})
                await cp.operations.put_environment(name, "blue", {"version": "v1", "endpoints": [f"127.0.0.1:{20000 + i}"]})
                await cp.operations.put_environment(name, "green", {"version": "v2", "endpoints": [f"127.0.0.1:{30000 + i}"]})
            await cp.publisher.publish_once()
            snapshots = [cp.cache.get("default")]
            await cp.operations.switch("svc-0", None)
            await cp.publisher.publish_once()
            snapshots.append(cp.cache.get("default"))
        finally:
            await cp.kv.close()

    stream = SotwStream(1, "bench", "default", snapshots[0], 0.0)

    def ack_all(out: list[Outgoing]) -> None:
        while out:
            response = out.pop(0)
            names = sorted(stream.types[response.type_url].names)
            out += stream.on_request(Request(type_url=response.type_url, version_info=response.version,
                                             response_nonce=response.nonce, resource_names=names), 0.0)

    def named_by(holder_type: str, type_url: str) -> list[str]:
        """The names Envoy subscribes to: those its wildcard resources of ``holder_type`` name
        (the endpoints of its clusters, the route tables of its listeners). Not the whole pool:
        it also holds named-only resources, e.g. the route tables of proxyless gRPC clients."""
        return sorted({name for r in snapshots[0].wildcard_pool(holder_type).values()
                       for t, name in r.warms_with if t == type_url})

    # Envoy's order: CDS, EDS for the clusters, then LDS and RDS.
    ack_all(stream.on_request(Request(type_url=typeurls.CLUSTER), 0.0))
    ack_all(stream.on_request(Request(type_url=typeurls.ENDPOINT, resource_names=named_by(typeurls.CLUSTER, typeurls.ENDPOINT)), 0.0))
    ack_all(stream.on_request(Request(type_url=typeurls.LISTENER), 0.0))
    ack_all(stream.on_request(Request(type_url=typeurls.ROUTE, resource_names=named_by(typeurls.LISTENER, typeurls.ROUTE)), 0.0))
    if not stream.converged():
        raise SystemExit("the stream did not converge on the initial snapshot")

    started = time.perf_counter()
    for k in range(switches):
        out = stream.on_snapshot(snapshots[(k + 1) % 2])
        if [o.type_url for o in out] != [typeurls.ROUTE]:
            raise SystemExit(f"expected one RDS push per switch, got {[o.type_url for o in out]}")
        ack_all(out)
    elapsed = time.perf_counter() - started
    if not stream.converged():
        raise SystemExit("the stream did not converge after the switches")
    return elapsed / switches


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1, 100])
    parser.add_argument("--switches", type=int, default=2000)
    args = parser.parse_args()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    print("| services | µs per stream per switch (RDS push + ACK) |\n|---:|---:|")
    for services in args.services:
        seconds = asyncio.run(measure(services, args.switches))
        print(f"| {services} | {seconds * 1e6:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
