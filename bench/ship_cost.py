"""What shipping snapshots to xDS workers costs, against each worker building its own.

    python bench/ship_cost.py --services 1000 5000 --rounds 20

For S services (in a temporary SQLite store, through the control plane's own operations) it
measures, in this process:

* ``build``: SnapshotBuilder.build after a weight change of one service (what the main process
  does once per change; what every worker would do if each built its own);
* ``full_build``: a build from nothing (what a starting worker would do);
* ``encode_change`` / ``decode_change``: workers/ipc diff + pickle of that change, and applying it
  on the worker's side (decode + ipc.apply), with the frame's size;
* ``encode_full`` / ``decode_full``: the same for the full snapshots a (re)starting worker gets.

Medians of ``--rounds`` rounds; prints JSON. No servers, no network: it isolates the IPC cost.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import pickle
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from controlplane.config import Settings  # noqa: E402
from controlplane.deploy.operations import Operations  # noqa: E402
from controlplane.fleet.builder import SnapshotBuilder  # noqa: E402
from controlplane.store.repository import Repository  # noqa: E402
from controlplane.store.sqlite import open_sqlite_store  # noqa: E402
from controlplane.workers import ipc  # noqa: E402


def timed(fn: Callable[[], Any], rounds: int) -> tuple[float, Any]:
    samples, result = [], None
    for _ in range(rounds):
        started = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - started)
    return statistics.median(samples), result


async def case(services: int, rounds: int) -> dict[str, Any]:
    settings = Settings()
    with tempfile.TemporaryDirectory() as tmp:
        kv = await open_sqlite_store(Path(tmp) / "state.db")
        repo = Repository(kv)
        ops = Operations(repo, settings.fleets)
        for i in range(services):
            await ops.put_service(f"svc-{i}", {"prefix": f"/svc-{i}"})
            await ops.put_environment(f"svc-{i}", "blue", {"version": "v1", "endpoints": [f"127.0.0.1:{20000 + i % 40000}"]})
            await ops.put_environment(f"svc-{i}", "green", {"version": "v2", "endpoints": [f"127.0.0.1:{30000 + i % 30000}"]})
        builder = SnapshotBuilder(settings.fleets)
        state = await repo.state()
        full_build, before = timed(lambda: SnapshotBuilder(settings.fleets).build(state.revision, state.services, {}), 3)
        before = builder.build(state.revision, state.services, {})
        builds = []
        for k in range(rounds):  # alternating flips of svc-0: each build follows a real change
            await ops.set_traffic("svc-0", {"weights": {"blue": 100 * (k % 2), "green": 100 - 100 * (k % 2)}})
            state = await repo.state()
            previous = before
            started = time.perf_counter()
            after = builder.build(state.revision, state.services, previous)
            builds.append(time.perf_counter() - started)
            before = after if k < rounds - 1 else previous
        build = statistics.median(builds)
        await kv.close()

    def shipment(old: dict[str, Any] | None) -> dict[str, ipc.FleetShipment]:
        return {f: ipc.FleetShipment(s.generation, 0.0, True, ipc.diff(old.get(f) if old else None, s),
                                     ipc.diff_delta(old.get(f) if old else None, s)) for f, s in after.items()}

    encode_change, frame = timed(lambda: ipc.encode(("snapshots", shipment(before))), rounds)
    decode_change, _ = timed(lambda: {f: ipc.apply(before[f], sh) for f, sh in pickle.loads(frame[4:])[1].items()}, rounds)
    encode_full, full_frame = timed(lambda: ipc.encode(("snapshots", shipment(None))), max(3, rounds // 4))
    decode_full, _ = timed(lambda: {f: ipc.apply(None, sh) for f, sh in pickle.loads(full_frame[4:])[1].items()}, max(3, rounds // 4))
    sizes = {f: sum(len(r.any_bytes) for pool in s.resources.values() for r in pool.values()) for f, s in after.items()}
    return {"services": services, "snapshot_resource_bytes": sizes, "build_ms": 1e3 * build, "full_build_ms": 1e3 * full_build,
            "encode_change_ms": 1e3 * encode_change, "decode_apply_change_ms": 1e3 * decode_change, "change_frame_bytes": len(frame),
            "encode_full_ms": 1e3 * encode_full, "decode_apply_full_ms": 1e3 * decode_full, "full_frame_bytes": len(full_frame)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--services", type=int, nargs="+", default=[1000])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    report = {"machine": {"python": platform.python_version(), "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")},
              "cases": [asyncio.run(case(s, args.rounds)) for s in args.services]}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
