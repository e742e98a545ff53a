"""Bytes a proxy receives, and Envoy's CPU to apply them, for one service's weight change, at
several fleet sizes, SotW against Delta (route tables over VHDS; docs/route-tables.md).

    python bench/route_bytes.py --services 10 100 1000 --changes 10

For each size it starts the control plane's real xDS server in this process (AdsServer,
SnapshotBuilder, grpc.aio; the same code `bluegreen serve` runs), N services each on its own
domain, and two real Envoys (`--concurrency 1`): one on SotW ADS, one on Delta ADS. Then it
changes svc-0's weights ``--changes`` times (0 <-> 50 % green), waiting after each until both
proxies ACKed it, and records per proxy:

* bytes: the payload of every response the server wrote to that proxy for the change
  (server-side, all types);
* Envoy CPU: utime + stime of the Envoy process (from /proc, 10 ms ticks) across the changes,
  divided by their number: what applying one change costs that Envoy;
* rds/vhds config reloads Envoy counted.

It also times, in-process and without gRPC, what one Delta stream's state machine costs per
change (on_snapshot plus the ACKs, as bench/stream_push.py does for SotW), with the route split
and with whole tables (``xds.route_split: off``).

Raw JSON goes to bench/results/route-bytes-<stamp>.json. The machine is shared: CPU figures
include contention; bytes do not depend on it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# gRPC's fork handlers crash the forked Envoy child now and then (see tests/conftest.py).
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")

from envoy.service.discovery.v3 import discovery_pb2  # noqa: E402

from controlplane import typeurls  # noqa: E402
from controlplane.fleet import SnapshotBuilder  # noqa: E402
from controlplane.model import DEFAULT_FLEET, Endpoint  # noqa: E402
from controlplane.xds.stream import DeltaStream, Outgoing  # noqa: E402
from tests.test_route_split_envoy import envoy, make_fleet, service, xds_plane  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def reloads(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if k.endswith(".config_reload") and (".rds." in k or "vhds." in k)}


async def measure(count: int, changes: int) -> dict[str, Any]:
    fleet = make_fleet()
    blue, green = Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 10)  # never dialled: no requests are sent
    services = [service(i, blue, green) for i in range(count)]
    async with xds_plane(fleet, services=services) as plane, \
            envoy(plane, "delta", delta=True) as delta, envoy(plane, "sotw", delta=False) as sotw:
        await plane.converged("delta", "sotw", timeout=600)
        proxies = {"delta": delta, "sotw": sotw}
        stats0 = {n: reloads(await p.stats()) for n, p in proxies.items()}
        cpu0 = {n: cpu_seconds(p.process.pid) for n, p in proxies.items()}
        per_change: dict[str, list[int]] = {"delta": [], "sotw": []}
        by_type: dict[str, dict[str, int]] = {"delta": {}, "sotw": {}}
        started = time.monotonic()
        for k in range(changes):
            mark = len(plane.recorder.sent)
            services[0] = service(0, blue, green, 50 if k % 2 == 0 else 0)
            plane.publish(services)
            await plane.converged("delta", "sotw", timeout=600)
            for node in per_change:
                outs = plane.recorder.since(mark, node)
                per_change[node].append(sum(len(o.payload) for o in outs))
                for o in outs:
                    short = o.type_url.rsplit(".", 1)[1]
                    by_type[node][short] = by_type[node].get(short, 0) + len(o.payload)
        await asyncio.sleep(0.5)  # let the worker threads' thread-local route updates finish
        cpu1 = {n: cpu_seconds(p.process.pid) for n, p in proxies.items()}
        stats1 = {n: reloads(await p.stats()) for n, p in proxies.items()}
        elapsed = time.monotonic() - started
    return {
        "services": count,
        "changes": changes,
        "delta_stream_plan_us_per_change": {"vhds": delta_plan_microseconds(count, True),
                                            "whole_tables": delta_plan_microseconds(count, False)},
        "elapsed_seconds": elapsed,
        "proxies": {
            node: {
                "bytes_per_change_median": statistics.median(per_change[node]),
                "bytes_per_change": per_change[node],
                "bytes_by_type_per_change": {t: b / changes for t, b in by_type[node].items()},
                "envoy_cpu_seconds_per_change": (cpu1[node] - cpu0[node]) / changes,
                "config_reloads": {k: stats1[node].get(k, 0) - stats0[node].get(k, 0) for k in stats1[node]},
            }
            for node in per_change
        },
    }


def delta_plan_microseconds(count: int, vhds: bool, changes: int = 200) -> float:
    """CPU of one Delta stream per weight change: on_snapshot and the ACKs, no I/O."""
    builder = SnapshotBuilder((DEFAULT_FLEET,), vhds=vhds)
    blue, green = Endpoint("127.0.0.1", 9), Endpoint("127.0.0.1", 10)
    services = [service(i, blue, green) for i in range(count)]
    snapshots, previous = [], {}
    for generation in (1, 2, 3):
        services[0] = service(0, blue, green, 50 if generation == 2 else 0)
        previous = builder.build(generation, tuple(services), previous)
        snapshots.append(previous[DEFAULT_FLEET.name])
    stream = DeltaStream(1, "bench", DEFAULT_FLEET.name, snapshots[0], 0.0)

    def ack_all(out: list[Outgoing]) -> None:
        while out:
            response = out.pop(0)
            out += stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=response.type_url,
                                                                         response_nonce=response.nonce), 0.0)

    view = snapshots[0].for_delta()
    for type_url, names in ((typeurls.CLUSTER, []), (typeurls.ENDPOINT, sorted(view.of_type(typeurls.ENDPOINT))),
                            (typeurls.LISTENER, []), (typeurls.ROUTE, ["default-routes", "default-preview-routes"]),
                            (typeurls.VIRTUAL_HOST, [])):
        if type_url == typeurls.VIRTUAL_HOST and not vhds:
            continue
        ack_all(stream.on_request(discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, resource_names_subscribe=names), 0.0))
    assert stream.converged()
    started = time.process_time()
    for k in range(changes):
        ack_all(stream.on_snapshot(snapshots[1 + k % 2]))
    return (time.process_time() - started) / changes * 1e6


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "loadavg": os.getloadavg()}


def table(runs: list[dict[str, Any]]) -> str:
    lines = ["| services | SotW bytes/change | Delta bytes/change | SotW Envoy CPU ms/change | Delta Envoy CPU ms/change "
             "| Delta stream plan µs/change (VHDS / whole tables) |",
             "|---:|---:|---:|---:|---:|---:|"]
    for run in runs:
        s, d = run["proxies"]["sotw"], run["proxies"]["delta"]
        plan = run["delta_stream_plan_us_per_change"]
        lines.append(f"| {run['services']} | {s['bytes_per_change_median']:,.0f} | {d['bytes_per_change_median']:,.0f} "
                     f"| {1000 * s['envoy_cpu_seconds_per_change']:.1f} | {1000 * d['envoy_cpu_seconds_per_change']:.1f} "
                     f"| {plan['vhds']:.0f} / {plan['whole_tables']:.0f} |")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--services", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--changes", type=int, default=10)
    args = parser.parse_args()
    report = {"machine": machine(), "runs": []}
    for count in args.services:
        run = await measure(count, args.changes)
        report["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "proxies"}), flush=True)
    out = ROOT / "bench" / "results" / f"route-bytes-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(report, indent=2))
    print(table(report["runs"]))
    print(f"raw: {out.relative_to(ROOT)}")


if __name__ == "__main__":
    asyncio.run(main())
