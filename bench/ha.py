"""Replicas on etcd: admin write latency (SQLite vs etcd) and convergence with 1 and 3 replicas.

    python bench/ha.py [--proxies 300] [--flips 15] [--writes 40]

Starts a real 3-member etcd on loopback (Debian's etcd-server, as the tests do), real
``bluegreen serve`` processes, and simulated SotW proxies (``bench/simclient.py``, one process
per replica, the M proxies spread evenly over the replicas). Scenarios:

* **write latency**: ``PUT /v1/services/shop/traffic`` without ``?wait``, one at a time, timed
  at the client: the API answers after the change is stored *and* published by the replica
  that took it (not after the proxies ACKed). SQLite (one process) vs etcd (one replica).
* **convergence**: ``PUT .../traffic?wait=converged`` alternating 90/10 and 10/90; the
  server-measured ``wait.seconds`` (change accepted -> every proxy the policy waits for ACKed;
  with 3 replicas that includes the other replicas' proxies, reported through etcd) and the
  client-observed request time. Runs: SQLite 1 process, etcd 1 replica, etcd 3 replicas.

Writes bench/results/ha-<UTC timestamp>.json (every sample, the machine, the load average).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import aiohttp
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.etcd import fresh_prefix, run_etcd_cluster  # noqa: E402
from tests.harness import ControlPlane, ManagedProcess, free_port, run_control_plane, run_replicas, wait_for  # noqa: E402


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"n": len(ordered), "p50_ms": 1000 * statistics.median(ordered),
            "p90_ms": 1000 * ordered[int(0.9 * (len(ordered) - 1))], "max_ms": 1000 * ordered[-1]}


async def setup_service(cp: ControlPlane) -> None:
    async with cp.session() as session:
        for path, body in (("/v1/services/shop", {}),
                           ("/v1/services/shop/environments/blue", {"version": "v1", "endpoints": ["127.0.0.1:9"]}),
                           ("/v1/services/shop/environments/green", {"version": "v2", "endpoints": ["127.0.0.1:10"]})):
            async with session.put(cp.admin_url + path, json=body) as response:
                assert response.status == 200, await response.text()


async def write_latency(cp: ControlPlane, writes: int) -> list[float]:
    samples = []
    async with cp.session() as session:
        for i in range(writes):
            green = 10 if i % 2 else 90
            started = time.perf_counter()
            async with session.put(f"{cp.admin_url}/v1/services/shop/traffic", json={"weights": {"blue": 100 - green, "green": green}}) as r:
                await r.read()
                assert r.status == 200, r.status
            samples.append(time.perf_counter() - started)
    return samples


async def convergence(cp: ControlPlane, flips: int) -> tuple[list[float], list[float]]:
    server, client = [], []
    async with cp.session() as session:
        for i in range(flips):
            green = 10 if i % 2 else 90
            started = time.perf_counter()
            async with session.put(f"{cp.admin_url}/v1/services/shop/traffic", params={"wait": "converged", "timeout": "30"},
                                   json={"weights": {"blue": 100 - green, "green": green}}) as r:
                view = await r.json()
                assert r.status == 200 and view["convergence"]["converged"], view
            client.append(time.perf_counter() - started)
            server.append(view["convergence"]["seconds"])
    return server, client


async def start_proxies(replicas: list[ControlPlane], total: int, workdir: Path) -> list[ManagedProcess]:
    procs = []
    for i, cp in enumerate(replicas):
        count = total // len(replicas) + (1 if i < total % len(replicas) else 0)
        procs.append(await ManagedProcess.start(
            [sys.executable, str(ROOT / "bench" / "simclient.py"), "--target", cp.xds_address, "--count", str(count),
             "--prefix", f"r{i}-", "--stats", str(workdir / f"sim{i}.json")], name=f"sim{i}", log_dir=workdir))
    return procs


async def proxies_seen(cp: ControlPlane, total: int) -> bool:
    async with cp.session() as session, session.get(f"{cp.admin_url}/v1/services/shop") as r:
        conv = (await r.json())["convergence"]
        return conv["proxies"] == total and conv["acked"] == total


async def run_scenario(name: str, replicas: list[ControlPlane], proxies: int, flips: int, workdir: Path) -> dict[str, Any]:
    await setup_service(replicas[0])
    sims = await start_proxies(replicas, proxies, workdir / name)
    try:
        # The service view counts the proxies of every replica (through etcd).
        await wait_for(lambda: proxies_seen(replicas[0], proxies), timeout=120, message=f"{name}: {proxies} proxies converged")
        server, client = await convergence(replicas[0], flips)
    finally:
        for sim in sims:
            await sim.stop()
    return {"scenario": name, "replicas": len(replicas), "proxies": proxies, "server_s": server, "client_s": client,
            "server": summary(server), "client": summary(client)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="bluegreen-bench-ha-"))
    config = workdir / "config.yaml"
    config.write_text(yaml.safe_dump({"fleets": {"default": {"listeners": [{"name": "http", "address": "127.0.0.1", "port": free_port()}]}}}))
    results: dict[str, Any] = {"write_latency": {}, "convergence": []}
    with run_etcd_cluster(3) as etcd:
        async with run_control_plane(state_path=workdir / "sqlite" / "state.db", config_path=config, log_dir=workdir / "sqlite") as cp:
            await setup_service(cp)
            samples = await write_latency(cp, args.writes)
            results["write_latency"]["sqlite"] = {"samples_s": samples, **summary(samples)}
            results["convergence"].append(await run_scenario("sqlite-1", [cp], args.proxies, args.flips, workdir))
        for count in (1, 3):
            async with run_replicas(count, store_url=etcd.url(fresh_prefix()), config_path=config,
                                    log_dir=workdir / f"etcd{count}", lease_ttl=5) as replicas:
                if count == 1:
                    await setup_service(replicas[0])
                    samples = await write_latency(replicas[0], args.writes)
                    results["write_latency"]["etcd"] = {"samples_s": samples, **summary(samples)}
                results["convergence"].append(await run_scenario(f"etcd-{count}", replicas, args.proxies, args.flips, workdir))
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--proxies", type=int, default=300)
    parser.add_argument("--flips", type=int, default=15)
    parser.add_argument("--writes", type=int, default=40)
    args = parser.parse_args()
    load_before = os.getloadavg()
    started = datetime.now(timezone.utc)
    results = asyncio.run(main(args))
    results.update(date=started.isoformat(timespec="seconds"), machine={"platform": platform.platform(), "cpus": os.cpu_count(),
                   "python": platform.python_version()}, load_average_at_start=load_before, args=vars(args))
    out = ROOT / "bench" / "results" / f"ha-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"write latency (PUT /traffic, stored + published), ms p50/p90/max:")
    for store, r in results["write_latency"].items():
        print(f"  {store:<7} {r['p50_ms']:.1f} / {r['p90_ms']:.1f} / {r['max_ms']:.1f}  (n={r['n']})")
    print(f"convergence with {args.proxies} simulated proxies, ms p50/p90/max (server-measured | client):")
    for r in results["convergence"]:
        s, c = r["server"], r["client"]
        print(f"  {r['scenario']:<9} {s['p50_ms']:.1f} / {s['p90_ms']:.1f} / {s['max_ms']:.1f} | {c['p50_ms']:.1f} / {c['p90_ms']:.1f} / {c['max_ms']:.1f}")
    print(f"raw: {out.relative_to(ROOT)}")
