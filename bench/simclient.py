"""Simulated Envoys for the convergence benchmark: many SotW ADS streams in one process.

Run by ``bench/convergence.py`` (one process per ~1000 streams), not meant to be run by hand:

    python bench/simclient.py --target 127.0.0.1:18000 --count 1000 --prefix c0- --stats out.json

Each simulated proxy has its own gRPC channel and its own HTTP/2 connection (local subchannel
pool), and behaves like Envoy over SotW ADS:

* the first request carries the node (id, cluster="default") and subscribes CDS by wildcard;
  like Envoy, it subscribes LDS (wildcard) once its initial clusters have warmed, i.e. after the
  first EDS response (subscribing LDS at once makes the server answer the first RDS request
  with an empty RouteConfiguration set, because routes wait for ACKed clusters and endpoints);
* after each CDS response it ACKs it and (re)subscribes EDS to the cluster names received
  (Envoy re-requests EDS for new or changed clusters, which warm until their endpoints arrive);
* after each LDS response it ACKs it and subscribes RDS to the route configurations the listeners'
  HttpConnectionManagers name;
* it ACKs every EDS and RDS response (version_info and response_nonce of the response, resource
  names = the current subscription).

Only CDS and LDS payloads are decoded (for the names), and only once per distinct version per
process: versions are content hashes, so the names of a version never change.

With ``--port-file`` it also serves the same HTTP reports as ``bench/simgo`` (used by
``bench/convergence.py --peer gcp --client python``): ``GET /state`` and ``GET /wait?not=V&timeout=S``,
from the CLOCK_MONOTONIC time (``time.monotonic()``) at which each stream ACKed a new
RouteConfiguration version.

On SIGTERM/SIGINT it writes counters (responses and bytes per type, errors, CPU) to ``--stats``
and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections import Counter
from typing import Any
from urllib.parse import parse_qs, urlsplit

import grpc
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from envoy.service.discovery.v3 import discovery_pb2

CDS = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
EDS = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment"
LDS = "type.googleapis.com/envoy.config.listener.v3.Listener"
RDS = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
METHOD = "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources"

Request = discovery_pb2.DiscoveryRequest


class Stats:
    def __init__(self) -> None:
        self.responses: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.connected = 0
        self.errors: Counter[str] = Counter()
        self.started = time.monotonic()


STATS = Stats()


class RdsVersions:
    """Per RouteConfiguration version: how many streams hold it, and when the first and the last of
    them took it (time.monotonic() just after the ACK was written)."""

    def __init__(self, streams: int) -> None:
        self.streams = streams
        self.holders: dict[str, dict[str, float]] = {}
        self.changed = asyncio.Event()

    def took(self, old: str, new: str) -> None:
        now = time.monotonic()
        self.left(old)
        held = self.holders.setdefault(new, {"count": 0, "first": now, "last": now})
        held["count"] += 1
        held["last"] = now
        if held["count"] == self.streams:
            self.changed.set()

    def left(self, version: str) -> None:
        held = self.holders.get(version)
        if version and held is not None:
            held["count"] -= 1
            if not held["count"]:
                del self.holders[version]

    def all_on(self, not_version: str) -> dict[str, Any] | None:
        for version, held in self.holders.items():
            if version != not_version and held["count"] == self.streams:
                return {"version": version, "first": held["first"], "last": held["last"]}
        return None

    async def wait(self, not_version: str, timeout: float) -> dict[str, Any] | None:
        deadline = time.monotonic() + timeout
        while (found := self.all_on(not_version)) is None:
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), max(0.0, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                return self.all_on(not_version)
        return found


RDS_VERSIONS = RdsVersions(0)
_CLUSTER_NAMES: dict[str, list[str]] = {}  # CDS version -> sorted cluster names
_ROUTE_NAMES: dict[str, list[str]] = {}  # LDS version -> sorted route config names


def cluster_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    names = _CLUSTER_NAMES.get(response.version_info)
    if names is None:
        names = sorted(cluster_pb2.Cluster.FromString(r.value).name for r in response.resources)
        _CLUSTER_NAMES[response.version_info] = names
    return names


def route_names(response: discovery_pb2.DiscoveryResponse) -> list[str]:
    names = _ROUTE_NAMES.get(response.version_info)
    if names is None:
        found: set[str] = set()
        for any_listener in response.resources:
            listener = listener_pb2.Listener.FromString(any_listener.value)
            for chain in listener.filter_chains:
                for network_filter in chain.filters:
                    if network_filter.typed_config.type_url == HCM:
                        hcm = hcm_pb2.HttpConnectionManager.FromString(network_filter.typed_config.value)
                        if hcm.HasField("rds"):
                            found.add(hcm.rds.route_config_name)
        names = _ROUTE_NAMES[response.version_info] = sorted(found)
    return names


async def proxy(target: str, node_id: str, fleet: str) -> None:
    channel = grpc.aio.insecure_channel(
        target,
        options=[
            ("grpc.use_local_subchannel_pool", 1),  # one TCP connection per proxy, like real Envoys
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            # Envoy's HTTP/2 client sends no bandwidth-delay-product PINGs (grpc's default here),
            # which would cost the server a PING round trip per response.
            ("grpc.http2.bdp_probe", 0),
        ],
    )
    rpc = channel.stream_stream(METHOD, request_serializer=Request.SerializeToString,
                                response_deserializer=discovery_pb2.DiscoveryResponse.FromString)
    call = rpc(wait_for_ready=True)
    # Per type: last received nonce, last accepted version, current subscription.
    nonce: dict[str, str] = {}
    version: dict[str, str] = {}
    names: dict[str, list[str]] = {CDS: [], LDS: [], EDS: [], RDS: []}
    connected = False
    rds_version = ""
    try:
        first = Request(type_url=CDS)
        first.node.CopyFrom(base_pb2.Node(id=node_id, cluster=fleet))
        await call.write(first)
        lds_requested = False
        while True:
            response = await call.read()
            if response is grpc.aio.EOF:
                break
            if not connected:
                connected = True
                STATS.connected += 1
            type_url = response.type_url
            STATS.responses[type_url] += 1
            STATS.bytes[type_url] += response.ByteSize()
            nonce[type_url] = response.nonce
            version[type_url] = response.version_info
            await call.write(Request(type_url=type_url, version_info=response.version_info,
                                     response_nonce=response.nonce, resource_names=names[type_url]))
            if type_url == RDS and response.version_info != rds_version:
                RDS_VERSIONS.took(rds_version, response.version_info)
                rds_version = response.version_info
            if not lds_requested and (type_url == EDS or (type_url == CDS and not response.resources)):
                # Envoy asks for listeners once its initial clusters have warmed (got endpoints).
                lds_requested = True
                await call.write(Request(type_url=LDS))
            if type_url == CDS:
                dependent, wanted = EDS, cluster_names(response)
            elif type_url == LDS:
                dependent, wanted = RDS, route_names(response)
            else:
                continue
            names[dependent] = wanted
            await call.write(Request(type_url=dependent, version_info=version.get(dependent, ""),
                                     response_nonce=nonce.get(dependent, ""), resource_names=wanted))
    except asyncio.CancelledError:
        raise
    except grpc.aio.AioRpcError as exc:
        STATS.errors[exc.code().name] += 1
    except Exception as exc:  # keep the other proxies running; report the failure
        STATS.errors[type(exc).__name__] += 1
    finally:
        if connected:
            STATS.connected -= 1
        RDS_VERSIONS.left(rds_version)  # a closed stream holds nothing
        call.cancel()
        await channel.close()


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def state() -> dict[str, Any]:
    return {"streams": RDS_VERSIONS.streams, "connected": STATS.connected, "errors": dict(STATS.errors),
            "responses": dict(STATS.responses), "bytes": dict(STATS.bytes), "rds": RDS_VERSIONS.holders,
            "cpu_seconds": cpu_seconds()}


async def http_report(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """GET /state and GET /wait?not=V&timeout=S, as bench/simgo answers them (HTTP/1.0, one request)."""
    try:
        request_line = (await reader.readline()).decode()
        while (await reader.readline()) not in (b"\r\n", b"\n", b""):
            pass
        url = urlsplit(request_line.split()[1])
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        status, body = 404, {"error": "not found"}
        if url.path == "/state":
            status, body = 200, state()
        elif url.path == "/wait":
            found = await RDS_VERSIONS.wait(query.get("not", ""), float(query["timeout"]))
            status, body = (200, found) if found else (504, {"error": "timed out", "state": state()})
        payload = json.dumps(body).encode()
        writer.write(f"HTTP/1.0 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n\r\n".encode()
                     + payload)
        await writer.drain()
    finally:
        writer.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--prefix", default="sim-")
    parser.add_argument("--fleet", default="default")
    parser.add_argument("--stats", required=True, help="write counters here on exit (JSON)")
    parser.add_argument("--port-file", help="serve /state and /wait on a free loopback port and write the port here")
    args = parser.parse_args()
    RDS_VERSIONS.streams = args.count
    if args.port_file:
        server = await asyncio.start_server(http_report, "127.0.0.1", 0)
        with open(args.port_file + ".tmp", "w") as f:  # renamed: the driver never reads a partial number
            f.write(str(server.sockets[0].getsockname()[1]))
        os.replace(args.port_file + ".tmp", args.port_file)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [asyncio.create_task(proxy(args.target, f"{args.prefix}{i}", args.fleet)) for i in range(args.count)]
    await stop.wait()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    with open(args.stats, "w") as f:
        json.dump({
            "count": args.count,
            "responses": dict(STATS.responses),
            "bytes": dict(STATS.bytes),
            "errors": dict(STATS.errors),
            "cpu_seconds": cpu_seconds(),
            "wall_seconds": time.monotonic() - STATS.started,
        }, f)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
