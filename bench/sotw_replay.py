"""The SotW hot path in process, without gRPC: ``python bench/sotw_replay.py [--streams N] [--changes C] [--profile]``.

N SotW streams subscribed as Envoy subscribes (CDS and LDS by wildcard, EDS and RDS by name),
a convergence tracker as the server wires it, and C changes of the route table. Per change:
the snapshot is set and published, every stream plans its push (``on_snapshot``), the response
is counted (``response_sent``), its ACK is parsed as the server parses later requests and
handled (``on_request``), and the tracker sees both events (``stream_changed``). Prints the best
process CPU time per stream per change: the protocol and bookkeeping share of the server's
figure in bench/convergence.py, steadier than end-to-end runs on a shared machine.
Run from the repository root (it reuses the snapshots of tests/test_xds_protocol.py).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controlplane.fleet.convergence import Convergence  # noqa: E402
from controlplane.metrics import Metrics  # noqa: E402
from controlplane.typeurls import ROUTE  # noqa: E402
from controlplane.xds.server import _PARSERS, SnapshotCache  # noqa: E402
from controlplane.xds.snapshot import Snapshot  # noqa: E402
from controlplane.xds.stream import SotwStream  # noqa: E402
from tests.test_xds_protocol import SotwProxy, connected_proxy, snapshot, sotw_req  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=2000)
    parser.add_argument("--changes", type=int, default=20)
    parser.add_argument("--profile", action="store_true", help="cProfile the measured changes")
    args = parser.parse_args()
    cache = SnapshotCache(lambda node, peer=None: "fleet")
    tracker = Convergence(cache, Metrics(), timers=False)
    snap = snapshot(1, ["a", "b"])
    cache.set("fleet", snap)
    tracker.published("fleet", snap, True, time.monotonic())
    proxies = [connected_proxy(snap) for _ in range(args.streams)]
    for number, proxy in enumerate(proxies, 1):
        proxy.stream.stream_id = number
        tracker.stream_opened(proxy.stream)
        tracker.stream_changed(proxy.stream)
    profile = cProfile.Profile() if args.profile else None
    best = float("inf")
    for generation in range(2, args.changes + 3):
        # As the publisher builds it: unchanged pools are the previous snapshot's objects.
        snap = snapshot(generation, ["a", "b"], route_tag=f"-{generation}").with_generation(generation, reuse=snap)
        spent = _change(cache, tracker, proxies, snap, profile if generation > 2 else None)
        if generation > 2:  # the first change warms up
            best = min(best, spent)
    print(f"best CPU per stream per change: {best / len(proxies) * 1e6:.1f} µs ({len(proxies)} streams, {args.changes} changes)")
    if profile is not None:
        pstats.Stats(profile).sort_stats("tottime").print_stats(20)


def _change(cache: SnapshotCache, tracker: Convergence, proxies: list[SotwProxy], snap: Snapshot,
            profile: cProfile.Profile | None) -> float:
    """One change through every stream; the server's CPU seconds (the ACKs the proxies send
    are built between the two timed phases, not counted)."""
    parse = _PARSERS[SotwStream][1]
    started = time.process_time()
    if profile is not None:
        profile.enable()
    cache.set("fleet", snap)
    tracker.published("fleet", snap, True, time.monotonic())
    pushed = []
    for proxy in proxies:
        for response in proxy.stream.on_snapshot(snap):
            tracker.response_sent(proxy.stream, response)
            pushed.append((proxy, response))
        tracker.stream_changed(proxy.stream)
    if profile is not None:
        profile.disable()
    spent = time.process_time() - started
    acks = [(proxy, sotw_req(ROUTE, names=["rt"], version=r.version, nonce=r.nonce).SerializeToString()) for proxy, r in pushed]
    started = time.process_time()
    if profile is not None:
        profile.enable()
    for proxy, data in acks:
        if proxy.stream.on_request(parse(data), 0.0):
            raise AssertionError("a plain ACK was answered")
        tracker.stream_changed(proxy.stream)
    if profile is not None:
        profile.disable()
    spent += time.process_time() - started
    if len(tracker.fleet("fleet").converged) != len(proxies):
        raise AssertionError("not every stream converged")
    return spent


if __name__ == "__main__":
    main()
