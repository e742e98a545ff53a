"""Our control plane against go-control-plane, in one run: ``python bench/convergence.py --peer gcp``.

For each (S services, M proxies) case and each of ``--rounds`` rounds, it runs our server
(``python -m controlplane serve``) and then the go-control-plane peer (``bench/.bin/gcp``, built
from ``bench/peers/gcp`` by ``bench/peers/build.sh``), one after the other, each with a fresh
simulated fleet of M SotW ADS streams (``bench/.bin/simgo`` by default, ``--client python`` for
``bench/simclient.py``), and performs N weight changes of svc-0 on each:

* **Same resources.** The peer serves the bytes our server serves: at the start of the case the
  driver fetches every resource from our server over ADS (one stream that subscribes as Envoy
  does) for the current state (A) and after a switch (B), and posts them to the peer, which
  unmarshals them into go-control-plane's types and sets one snapshot shared by every node, with
  per-type versions. The driver then fetches the peer's DiscoveryResponses the same way and
  compares every resource's bytes with ours (``byte_equal`` in the JSON, printed).
* **A change** on our server is ``POST /v1/services/svc-0/switch`` (or ``/rollback``, alternating),
  without ``?wait``: the call returns once the change is committed and published. On the peer it
  is ``POST /snapshot`` with the other state's route configurations (and any other type that
  differs), which returns once ``SetSnapshot`` did. That call's latency is "API".
* **Convergence** is measured by the clients for both servers, one method: each simulated stream
  records the CLOCK_MONOTONIC time at which it ACKed a new RouteConfiguration version; the
  change's convergence is the last stream's time minus the driver's time.monotonic() just before
  the API call (the same clock across processes on Linux).
* **CPU** of the server and of the client processes over the N changes (utime + stime from
  /proc), per change and per stream; server RSS before the clients connect and after the changes.

Servers and clients are pinned apart with ``taskset`` (``--server-cpus``/``--client-cpus``).
Real Envoys are not used here (``--envoys`` is ignored): the peer has no metrics service for
their stats stream, and their apply time would be the same for both.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import os
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections import defaultdict
from pathlib import Path
from typing import Any

import convergence as conv

BIN = conv.BENCH / ".bin"
TYPES = conv.TYPES
ORDER = ("cds", "eds", "lds", "rds")
Resources = dict[str, dict[str, Any]]  # short type -> {"version": str, "resources": [bytes, ...]}


# ------------------------------------------------------------------------------------------------
# Fetching what a server serves, over ADS, the way Envoy subscribes


async def _fetch(target: str, node_id: str, timeout: float) -> Resources:
    import grpc
    from envoy.config.core.v3 import base_pb2
    from envoy.service.discovery.v3 import discovery_pb2

    import simclient

    request = discovery_pb2.DiscoveryRequest
    got: Resources = {}
    names: dict[str, list[str]] = {k: [] for k in ORDER}
    short = {v: k for k, v in TYPES.items()}
    async with grpc.aio.insecure_channel(target, options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        call = channel.stream_stream(simclient.METHOD, request_serializer=request.SerializeToString,
                                     response_deserializer=discovery_pb2.DiscoveryResponse.FromString)()
        first = request(type_url=TYPES["cds"])
        first.node.CopyFrom(base_pb2.Node(id=node_id, cluster="default"))
        await call.write(first)
        lds_requested = False

        def complete() -> bool:
            return (len(got) == 4 and len(got["eds"]["resources"]) == len(names["eds"])
                    and len(got["rds"]["resources"]) == len(names["rds"]) > 0)

        deadline = time.monotonic() + timeout
        while not complete():
            response = await asyncio.wait_for(call.read(), max(0.01, deadline - time.monotonic()))
            kind = short[response.type_url]
            got[kind] = {"version": response.version_info, "resources": [r.value for r in response.resources],
                         "type_urls": sorted({r.type_url for r in response.resources})}
            await call.write(request(type_url=response.type_url, version_info=response.version_info,
                                     response_nonce=response.nonce, resource_names=names[kind]))
            if not lds_requested and kind == "eds":
                lds_requested = True
                await call.write(request(type_url=TYPES["lds"]))
            if kind in ("cds", "lds"):
                dependent = "eds" if kind == "cds" else "rds"
                names[dependent] = (simclient.cluster_names if kind == "cds" else simclient.route_names)(response)
                await call.write(request(type_url=TYPES[dependent], version_info=got.get(dependent, {}).get("version", ""),
                                         response_nonce="", resource_names=names[dependent]))
        call.cancel()
    return got


def fetch(target: str, node_id: str = "bench-fetch", timeout: float = 30.0) -> Resources:
    """Every resource the server at ``target`` serves to a fresh node of the default fleet."""
    return asyncio.run(_fetch(target, node_id, timeout))


def _message_classes() -> dict[str, Any]:
    from envoy.config.cluster.v3 import cluster_pb2
    from envoy.config.endpoint.v3 import endpoint_pb2
    from envoy.config.listener.v3 import listener_pb2
    from envoy.config.route.v3 import route_pb2

    return {"cds": cluster_pb2.Cluster, "eds": endpoint_pb2.ClusterLoadAssignment, "lds": listener_pb2.Listener,
            "rds": route_pb2.RouteConfiguration}


def compare(ours: Resources, theirs: Resources) -> dict[str, Any]:
    """Per type, whether the peer's resources are ours: byte-identical; or else the same message
    encoded in another field order (re-serializing the peer's bytes with our protobuf library gives
    our bytes exactly, and every resource has the same size)."""
    classes = _message_classes()
    out: dict[str, Any] = {}
    for kind in ORDER:
        a, b = sorted(ours[kind]["resources"]), sorted(theirs[kind]["resources"])
        reserialized = sorted(classes[kind].FromString(x).SerializeToString() for x in b)
        out[kind] = {"resources": len(a), "bytes": sum(map(len, a)), "bytes_identical": a == b,
                     "identical_after_reserializing": a == reserialized,
                     "same_sizes": sorted(map(len, a)) == sorted(map(len, b)),
                     "type_urls_equal": ours[kind]["type_urls"] == theirs[kind]["type_urls"]}
    kinds = [v for v in out.values() if isinstance(v, dict)]
    out["all_bytes_identical"] = all(v["bytes_identical"] and v["type_urls_equal"] for v in kinds)
    out["all_same_messages"] = all(v["identical_after_reserializing"] and v["same_sizes"] and v["type_urls_equal"] for v in kinds)
    return out


# ------------------------------------------------------------------------------------------------
# Simulated fleet


def pinned(argv: list[str], cpus: str | None) -> list[str]:
    return ["taskset", "-c", cpus, *argv] if cpus else argv


def http_json(url: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method="POST" if data else "GET",
                                     headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


class Fleet:
    """M simulated proxies in client processes, each answering /state and /wait over HTTP."""

    def __init__(self, kind: str, target: str, proxies: int, per_process: int, cpus: str | None, case_dir: Path,
                 tag: str, connect_timeout: float) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.logs: list[Path] = []
        n = max(1, math.ceil(proxies / per_process))
        counts = [proxies // n + (1 if i < proxies % n else 0) for i in range(n)]
        try:
            self._start(kind, target, counts, cpus, case_dir, tag, connect_timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, kind: str, target: str, counts: list[int], cpus: str | None, case_dir: Path, tag: str,
               connect_timeout: float) -> None:
        env = {**os.environ, "GOMAXPROCS": str(len(expand(cpus))) if cpus else os.environ.get("GOMAXPROCS", "")}
        if not env["GOMAXPROCS"]:
            del env["GOMAXPROCS"]
        # One process at a time, each once its streams hold the config (connect storms are not measured).
        for i, count in enumerate(counts):
            port_file = case_dir / f"{tag}-client{i}.port"
            log = case_dir / f"{tag}-client{i}.log"
            if kind == "go":
                argv = [str(BIN / "simgo")]
            else:
                argv = [sys.executable, str(conv.BENCH / "simclient.py"), "--stats", str(case_dir / f"{tag}-client{i}.json")]
            argv += ["--target", target, "--count", str(count), "--prefix", f"{tag}-c{i}-", "--port-file", str(port_file)]
            proc = conv.spawn(pinned(argv, cpus), log, env=env)
            self.procs.append(proc)
            self.logs.append(log)
            port = conv.wait_until(lambda: port_file.exists() and port_file.read_text().strip(), 30,
                                   f"client {i} HTTP port", proc, log, interval=0.05)
            self.ports.append(int(port))
            self.wait(i, "", connect_timeout)

    def wait(self, i: int, not_version: str, timeout: float) -> dict[str, Any]:
        """Until every stream of client ``i`` holds one RDS version other than ``not_version``."""
        status, body = http_json(f"http://127.0.0.1:{self.ports[i]}/wait?not={not_version}&timeout={timeout:g}",
                                 timeout=timeout + 30)
        if status != 200:
            raise RuntimeError(f"client {i}: not converged within {timeout:g}s: {json.dumps(body)[:800]}\n"
                               f"{conv.tail(self.logs[i])}")
        return body

    def wait_all(self, not_version: str, timeout: float) -> tuple[str, float, float]:
        """(version, first, last) over all clients once every stream holds the same new version."""
        results = [self.wait(i, not_version, timeout) for i in range(len(self.procs))]
        versions = {r["version"] for r in results}
        if len(versions) != 1:
            raise RuntimeError(f"clients converged on different RDS versions: {versions}")
        return results[0]["version"], min(r["first"] for r in results), max(r["last"] for r in results)

    def states(self) -> list[dict[str, Any]]:
        return [http_json(f"http://127.0.0.1:{p}/state")[1] for p in self.ports]

    def cpu(self) -> float:
        return sum(conv.cpu_seconds(p.pid) for p in self.procs)

    @property
    def pids(self) -> set[int]:
        return {p.pid for p in self.procs}

    def stop(self) -> None:
        for p in self.procs:
            conv.stop(p)


def expand(cpus: str) -> list[int]:
    out: list[int] = []
    for part in cpus.split(","):
        lo, _, hi = part.partition("-")
        out.extend(range(int(lo), int(hi or lo) + 1))
    return out


# ------------------------------------------------------------------------------------------------
# The two servers


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its descendants (the control plane and its xDS workers)."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                raw = (entry / "stat").read_text()
            except OSError:
                continue
            children[int(raw[raw.rindex(")") + 2:].split()[1])].append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        todo.extend(children.get(current, ()))
    return out


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a server summed over its process tree (main process + xDS workers)."""
    total = 0.0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError):
            total += conv.cpu_seconds(p)
    return total


def tree_rss_kib(pid: int) -> int:
    total = 0
    for p in tree_pids(pid):
        with contextlib.suppress(OSError, RuntimeError):
            total += conv.rss_kib(p)
    return total


def our_name(workers: int | None) -> str:
    return "bluegreen" if workers is None else f"bluegreen x{workers}"


class Ours:
    def __init__(self, args: argparse.Namespace, services: int, case_dir: Path, workers: int | None = None) -> None:
        self.name = our_name(workers)
        extra = [] if workers is None else ["--xds-workers", str(workers)]
        self.xds_port, admin_port, listener_port, preview_port = conv.distinct_free_ports(4)
        config = case_dir / "bluegreen.yaml"
        conv.write_cp_config(config, listener_port, preview_port)
        self.log = case_dir / "controlplane.log"
        state = case_dir / f"state-{time.monotonic_ns()}.db"
        self.proc = conv.spawn(pinned([*args.cp_cmd.split(), "--config", str(config), "--state", str(state),
                                       "--xds", f"127.0.0.1:{self.xds_port}", "--admin", f"127.0.0.1:{admin_port}",
                                       "--log-level", "warning", *extra], args.server_cpus), self.log)
        self.admin = conv.Admin(admin_port)
        conv.wait_until(lambda: self.admin.ok("GET", "/healthz"), 30, "control plane /healthz", self.proc, self.log)
        conv.register_services(self.admin, services)

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    def change(self, k: int) -> dict[str, Any]:
        kind = "rollback" if k % 2 else "switch"
        started = time.perf_counter()
        self.admin.ok("POST", f"/v1/services/svc-0/{kind}")
        return {"kind": kind, "api_seconds": time.perf_counter() - started}

    def settle(self, proxies: int, timeout: float) -> float:
        """Until our server has read every proxy's ACK of the change (its convergence tracker says
        all of them acked); the time it saw that."""
        conv.wait_until(lambda: conv.converged_count(self.admin, proxies), timeout, "every ACK read by the server",
                        self.proc, self.log, interval=0.01)
        return time.monotonic()

    def change_waiting(self, k: int) -> float:
        """A change with ?wait=converged: our server's own convergence figure for it."""
        kind = "rollback" if k % 2 else "switch"
        view = self.admin.ok("POST", f"/v1/services/svc-0/{kind}?wait=converged&timeout=60")
        return view["convergence"]["seconds"]

    def capture(self) -> tuple[Resources, Resources, bool]:
        """The resources of state A (now) and B (after a switch); back to A after. The bool: the
        state after the rollback serves A's bytes again."""
        a = fetch(self.target)
        self.admin.ok("POST", "/v1/services/svc-0/switch?wait=converged&timeout=30")
        b = fetch(self.target)
        self.admin.ok("POST", "/v1/services/svc-0/rollback?wait=converged&timeout=30")
        again = fetch(self.target)
        return a, b, compare(a, again)["all_bytes_identical"]

    def stop(self) -> None:
        conv.stop(self.proc)


class Gcp:
    name = "go-control-plane"

    def __init__(self, args: argparse.Namespace, case_dir: Path, states: tuple[Resources, Resources]) -> None:
        self.xds_port, self.admin_port = conv.distinct_free_ports(2)
        self.log = case_dir / "gcp.log"
        self.proc = conv.spawn(pinned([str(BIN / "gcp"), "--xds", f"127.0.0.1:{self.xds_port}",
                                       "--admin", f"127.0.0.1:{self.admin_port}"], args.server_cpus), self.log)
        conv.wait_until(self._up, 30, "gcp peer /healthz", self.proc, self.log, interval=0.05)
        self.states = states
        # Types whose resources differ between A and B: what a change posts.
        self.changing = [k for k in ORDER if states[0][k]["resources"] != states[1][k]["resources"]]
        self.serial = 0
        self.post(states[0], ORDER)

    def _up(self) -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/healthz", timeout=1).close()
            return True
        except OSError:
            return False

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.xds_port}"

    def post(self, state: Resources, kinds: list[str] | tuple[str, ...]) -> dict[str, Any]:
        self.serial += 1
        body = {"types": {TYPES[k]: {"version": f"{k}-{self.serial}",
                                     "resources": [base64.b64encode(r).decode() for r in state[k]["resources"]]}
                          for k in kinds}}
        started = time.perf_counter()
        status, answer = http_json(f"http://127.0.0.1:{self.admin_port}/snapshot", body)
        wall = time.perf_counter() - started
        if status != 200:
            raise RuntimeError(f"gcp /snapshot -> {status}: {answer}")
        return {"api_seconds": wall, "handler_seconds": answer["handler_seconds"]}

    def check(self) -> dict[str, Any]:
        """Byte-compare what the peer serves with our resources, in both states; ends in A."""
        out = {"a": compare(self.states[0], fetch(self.target))}
        self.post(self.states[1], self.changing)
        out["b"] = compare(self.states[1], fetch(self.target))
        self.post(self.states[0], self.changing)
        for key in ("all_bytes_identical", "all_same_messages"):
            out[key] = out["a"][key] and out["b"][key]
        return out

    def stats(self) -> dict[str, int]:
        return http_json(f"http://127.0.0.1:{self.admin_port}/stats")[1]

    def settle(self, proxies: int, timeout: float) -> float:
        """Until the peer has read every proxy's ACK of the change (one request per stream since
        the change); the time it saw that."""
        expected = self.requests_before_change + proxies
        conv.wait_until(lambda: self.stats()["requests"] >= expected, timeout, "every ACK read by the peer",
                        self.proc, self.log, interval=0.01)
        return time.monotonic()

    def change(self, k: int) -> dict[str, Any]:
        self.requests_before_change = self.stats()["requests"]
        result = self.post(self.states[(k + 1) % 2], self.changing)
        result["kind"] = "B" if k % 2 == 0 else "A"
        return result

    def stop(self) -> None:
        conv.stop(self.proc)


# ------------------------------------------------------------------------------------------------
# One server's run


def measure(server: Any, args: argparse.Namespace, proxies: int, case_dir: Path, tag: str) -> dict[str, Any]:
    pid = server.proc.pid
    rss_before = tree_rss_kib(pid)
    t0 = time.monotonic()
    fleet = Fleet(args.client, server.target, proxies, args.streams_per_client, args.client_cpus, case_dir, tag,
                  args.connect_timeout)
    result: dict[str, Any] = {"server": server.name, "connect_seconds": time.monotonic() - t0}
    try:
        time.sleep(0.5)
        rss_connected = tree_rss_kib(pid)
        version, _, _ = fleet.wait_all("", args.timeout)
        states0 = fleet.states()
        tree = tree_pids(pid)
        cpu0, clients0 = tree_cpu_seconds(pid), fleet.cpu()
        system0, own0, procs0 = conv.system_cpu(), conv.own_cpu_seconds(), conv.all_processes_cpu()
        samples = []
        started = time.monotonic()
        for k in range(args.switches):
            t = time.monotonic()
            sample = server.change(k)
            new, first, last = fleet.wait_all(version, args.timeout)
            # The clients have sent every ACK; the next change waits until the server has read them
            # too, as it would with ?wait=converged. (Without this, our server's ACK backlog at
            # M = 5000 carried over into the next change until its lagging-proxy rule fired.)
            settled = server.settle(proxies, args.timeout)
            sample.update({"convergence_seconds": last - t, "first_stream_seconds": first - t, "version": new,
                           "server_read_all_acks_seconds": settled - t})
            samples.append(sample)
            version = new
        elapsed = time.monotonic() - started
        cpu1, clients1 = tree_cpu_seconds(pid), fleet.cpu()
        system1, own1, procs1 = conv.system_cpu(), conv.own_cpu_seconds(), conv.all_processes_cpu()
        others = conv.other_processes(procs0, procs1, {os.getpid(), *tree, *fleet.pids})
        n = args.switches
        states = fleet.states()
        responses = {k: sum(s["responses"].get(TYPES[k], 0) for s in states) - sum(s["responses"].get(TYPES[k], 0) for s in states0)
                     for k in ORDER}
        if hasattr(server, "change_waiting"):
            # Not part of the figures: two more changes, timed by our server and by the clients at
            # once, to show that the two methods agree.
            for k in range(n, n + 2):
                t = time.monotonic()
                server_seconds = server.change_waiting(k)
                new, _, last = fleet.wait_all(version, args.timeout)
                version = new
                result.setdefault("method_check", []).append({"server_seconds": server_seconds, "client_seconds": last - t})
        result.update({
            "samples": samples,
            "convergence_seconds": conv.summarize([s["convergence_seconds"] for s in samples]),
            "api_seconds": conv.summarize([s["api_seconds"] for s in samples]),
            "server_cpu_seconds_per_change": (cpu1 - cpu0) / n,
            "server_cpu_us_per_change_per_stream": 1e6 * (cpu1 - cpu0) / n / proxies,
            "clients_cpu_seconds_per_change": (clients1 - clients0) / n,
            "clients_cpu_us_per_change_per_stream": 1e6 * (clients1 - clients0) / n / proxies,
            "server_processes": len(tree),
            "rss_kib": {"before_clients": rss_before, "clients_connected": rss_connected, "after_changes": tree_rss_kib(pid)},
            "rss_kib_per_stream": (rss_connected - rss_before) / proxies,
            "other_processes_cpu_seconds": others,
            "other_processes_cpu_seconds_per_change": sum(others.values()) / n,
            "driver_cpu_seconds_per_change": (own1 - own0) / n,
            "machine_cpu_utilization": (conv.busy(system1) - conv.busy(system0)) / elapsed / (os.cpu_count() or 1),
            "elapsed_seconds": elapsed,
            "client_errors": {k: v for s in states for k, v in s.get("errors", {}).items()},
            # Should be {rds: M, others: 0}: a weight change pushes the route configurations only.
            "client_responses_per_change": {k: v / n for k, v in responses.items()},
        })
        if "handler_seconds" in samples[0]:
            result["handler_seconds"] = conv.summarize([s["handler_seconds"] for s in samples])
        return result
    finally:
        fleet.stop()


def run_case(services: int, proxies: int, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    case_dir = workdir / f"s{services}-m{proxies}"
    case_dir.mkdir()
    case: dict[str, Any] = {"services": services, "proxies": proxies, "switches": args.switches, "runs": []}
    states: tuple[Resources, Resources] | None = None
    for r in range(args.rounds):
        # ABBA...: each server goes first in every other round, so slow drifts of the machine's load
        # fall on both. Round 1 starts with ours, which provides the resources for the peer (the
        # first round always starts with ours: the peer needs them).
        # With --xds-workers, one run of ours per worker count: ours(w1), ours(w2), ..., gcp.
        order: list[tuple[str, int | None]] = [*(("ours", w) for w in args.xds_workers), ("gcp", None)]
        for kind, workers in (order if r % 2 == 0 else order[::-1]):
            tag = f"r{r}-{kind}" + (f"-w{workers}" if workers is not None else "")
            print(f"   round {r + 1}/{args.rounds}: {kind}" + (f" ({workers} xDS workers)" if workers is not None else ""),
                  file=sys.stderr, flush=True)
            if kind == "ours":
                server: Any = Ours(args, services, case_dir, workers)
                if states is None:
                    a, b, stable = server.capture()
                    states = (a, b)
                    case["our_rollback_serves_a_again"] = stable
                    case["resources"] = {k: {"count": len(a[k]["resources"]), "bytes": sum(map(len, a[k]["resources"]))}
                                         for k in ORDER}
            else:
                assert states is not None
                server = Gcp(args, case_dir, states)
                if "byte_equal" not in case:
                    case["byte_equal"] = server.check()
                    case["types_changed_per_change"] = server.changing
            try:
                run = measure(server, args, proxies, case_dir, tag)
            except BaseException:
                print(f"--- {server.name} log tail:\n{conv.tail(server.log)}", file=sys.stderr)
                raise
            finally:
                server.stop()
            run["round"] = r
            case["runs"].append(run)
    case["summary"] = summarize_case(case)
    return case


# ------------------------------------------------------------------------------------------------
# Report


def summarize_case(case: dict[str, Any]) -> dict[str, Any]:
    """Per server, the samples of all its rounds pooled; CPU and RSS as the mean over rounds."""
    out: dict[str, Any] = {}
    for name in server_names(case):
        runs = [r for r in case["runs"] if r["server"] == name]
        samples = [s for r in runs for s in r["samples"]]
        row = {
            "rounds": len(runs),
            "changes": len(samples),
            "convergence_seconds": conv.summarize([s["convergence_seconds"] for s in samples]),
            "api_seconds": conv.summarize([s["api_seconds"] for s in samples]),
            "server_read_all_acks_seconds": conv.summarize([s["server_read_all_acks_seconds"] for s in samples]),
        }
        for key in ("server_cpu_seconds_per_change", "server_cpu_us_per_change_per_stream", "clients_cpu_seconds_per_change",
                    "clients_cpu_us_per_change_per_stream", "rss_kib_per_stream", "other_processes_cpu_seconds_per_change",
                    "machine_cpu_utilization"):
            row[key] = statistics.fmean(r[key] for r in runs)
        row["rss_mib_after_changes"] = statistics.fmean(r["rss_kib"]["after_changes"] for r in runs) / 1024
        row["client_responses_per_change"] = {k: statistics.fmean(r["client_responses_per_change"][k] for r in runs) for k in ORDER}
        checks = [c for r in runs for c in r.get("method_check", [])]
        if checks:
            row["method_check"] = checks
        if samples and "handler_seconds" in samples[0]:
            row["handler_seconds"] = conv.summarize([s["handler_seconds"] for s in samples])
        out[name] = row
    peer = out["go-control-plane"]

    def ratio(a: float, b: float) -> float | None:
        return a / b if b else None

    for name in server_names(case)[:-1]:
        ours = out[name]
        key = "ratio_ours_to_gcp" if name == "bluegreen" else f"ratio_{name.replace(' ', '_')}_to_gcp"
        out[key] = {
            "convergence_p50": ratio(ours["convergence_seconds"]["p50"], peer["convergence_seconds"]["p50"]),
            "convergence_p99": ratio(ours["convergence_seconds"]["p99"], peer["convergence_seconds"]["p99"]),
            "server_cpu_per_change": ratio(ours["server_cpu_seconds_per_change"], peer["server_cpu_seconds_per_change"]),
            "api_p50": ratio(ours["api_seconds"]["p50"], peer["api_seconds"]["p50"]),
            "rss_after_changes": ratio(ours["rss_mib_after_changes"], peer["rss_mib_after_changes"]),
        }
    return out


def server_names(case: dict[str, Any]) -> list[str]:
    """Our runs (in --xds-workers order), then the peer."""
    ours = list(dict.fromkeys(r["server"] for r in case["runs"] if r["server"] != "go-control-plane"))
    return [*ours, "go-control-plane"]


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), {m['date_utc']}; servers on CPUs {report['pinning']['server_cpus']}, "
             f"clients ({report['client']}) on CPUs {report['pinning']['client_cpus']}.", ""]
    for case in report["cases"]:
        if "error" in case:
            lines.append(f"S={case['services']} M={case['proxies']}: failed: {case['error'].splitlines()[0]}")
            continue
        eq = case["byte_equal"]
        counts = ", ".join(f"{k} {v['resources']}" for k, v in eq["a"].items() if isinstance(v, dict))
        if eq["all_bytes_identical"]:
            same = "byte-identical resources: **yes**"
        elif eq["all_same_messages"]:
            differ = [k for k in ORDER if not eq["a"][k]["bytes_identical"] or not eq["b"][k]["bytes_identical"]]
            same = (f"the same resources: **yes**, same sizes; the bytes of {', '.join(differ)} differ only in field order "
                    "(re-serialized by our protobuf library they are byte-identical)")
        else:
            same = "the same resources: **NO** (see byte_equal in the JSON)"
        lines += [f"S={case['services']}, M={case['proxies']}, {case['switches']} changes x {case['summary']['go-control-plane']['rounds']} rounds "
                  f"per server. The peer serves {same} "
                  f"({counts} resources; "
                  f"a change posts {', '.join(case['types_changed_per_change'])}).", "",
                  "| server | conv. p50 ms | conv. p99 ms | all ACKs read p50 ms | API p50 ms | API p99 ms | server CPU ms/change | server CPU µs/stream/change "
                  "| RSS MiB | RSS KiB/stream | clients CPU ms/change | clients CPU µs/stream/change | other procs CPU ms/change | machine busy % |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in server_names(case):
            r = case["summary"][name]
            api = f"{1000 * r['api_seconds']['p50']:.1f}"
            if "handler_seconds" in r:
                api += f" (handler {1000 * r['handler_seconds']['p50']:.1f})"
            lines.append(f"| {name} | {1000 * r['convergence_seconds']['p50']:.0f} | {1000 * r['convergence_seconds']['p99']:.0f} "
                         f"| {1000 * r['server_read_all_acks_seconds']['p50']:.0f} | {api} | {1000 * r['api_seconds']['p99']:.1f} | {1000 * r['server_cpu_seconds_per_change']:.0f} "
                         f"| {r['server_cpu_us_per_change_per_stream']:.0f} | {r['rss_mib_after_changes']:.0f} | {r['rss_kib_per_stream']:.0f} "
                         f"| {1000 * r['clients_cpu_seconds_per_change']:.0f} | {r['clients_cpu_us_per_change_per_stream']:.0f} "
                         f"| {1000 * r['other_processes_cpu_seconds_per_change']:.0f} | {100 * r['machine_cpu_utilization']:.0f} |")
        lines.append("")
        for name in server_names(case)[:-1]:
            key = "ratio_ours_to_gcp" if name == "bluegreen" else f"ratio_{name.replace(' ', '_')}_to_gcp"
            ratios = case["summary"][key]
            lines.append(f"{name} / go-control-plane: " + ", ".join(f"{k} {v:.2f}" if v is not None else f"{k} -" for k, v in ratios.items()))
        lines.append("")
        pushes = "; ".join(f"{name} " + ", ".join(f"{k} {v:g}" for k, v in case["summary"][name]["client_responses_per_change"].items())
                           for name in server_names(case))
        lines.append(f"Responses per change received by the clients: {pushes}.")
        checks = [c for name in server_names(case)[:-1] for c in case["summary"][name].get("method_check", [])]
        if checks:
            lines.append("Method check (extra changes of our server with ?wait=converged, not in the table), server-measured / "
                         "client-measured ms: " + ", ".join(f"{1000 * c['server_seconds']:.0f} / {1000 * c['client_seconds']:.0f}" for c in checks) + ".")
        lines.append("")
    return "\n".join(lines)


def default_pinning(nproc: int) -> tuple[str | None, str | None]:
    """Servers on the first half of the CPUs, clients on the rest; nothing pinned on one CPU."""
    if nproc < 2:
        return None, None
    half = nproc // 2
    return (f"0-{half - 1}" if half > 1 else "0"), (f"{half}-{nproc - 1}" if nproc - half > 1 else str(half))


def main(args: argparse.Namespace) -> int:
    import shutil
    import tempfile

    missing = [b for b in ("gcp", "simgo") if not (BIN / b).exists()]
    if args.build or missing:
        subprocess.run([str(conv.BENCH / "peers" / "build.sh")], check=True)
    auto_server, auto_client = default_pinning(os.cpu_count() or 1)
    args.server_cpus = auto_server if args.server_cpus == "auto" else (None if args.server_cpus == "none" else args.server_cpus)
    args.client_cpus = auto_client if args.client_cpus == "auto" else (None if args.client_cpus == "none" else args.client_cpus)
    results, stamp = conv.start_run(args.results_dir)
    report: dict[str, Any] = {"command": [Path(sys.argv[0]).name, *sys.argv[1:]], "machine": conv.machine(),
                              "load_average_at_start": os.getloadavg(), "client": args.client,
                              "pinning": {"server_cpus": args.server_cpus, "client_cpus": args.client_cpus},
                              "go": subprocess.run(["go", "version"], capture_output=True, text=True).stdout.strip(),
                              "cases": []}
    workdir = Path(tempfile.mkdtemp(prefix="bluegreen-peer-"))
    started = time.monotonic()
    try:
        for services in args.services:
            for proxies in args.proxies:
                print(f"== S={services} M={proxies} ({args.client} clients) ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    case = run_case(services, proxies, args, workdir)
                except (RuntimeError, TimeoutError, SystemExit) as exc:
                    case = {"services": services, "proxies": proxies, "error": str(exc)[:2000]}
                case["case_seconds"] = time.monotonic() - t0
                report["cases"].append(case)
    except KeyboardInterrupt:
        report["interrupted"] = True
    finally:
        conv.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_seconds"] = time.monotonic() - started
    out = results / f"peer-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nraw results: {out.relative_to(conv.REPO) if out.is_relative_to(conv.REPO) else out}")
    return 130 if report.get("interrupted") else 0
