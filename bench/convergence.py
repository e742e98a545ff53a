"""Convergence benchmark: how long a blue/green switch takes to reach M proxies, and what it costs.

    python bench/convergence.py --proxies 100 1000 --switches 20 --services 1 100

For every (S services, M proxies) it starts a fresh control plane (``python -m controlplane
serve``, its own process), registers S services, starts K real Envoys (``--envoys``, default 10,
``--concurrency 1``, one process each, same fleet) and connects M simulated SotW ADS proxies from
separate client processes (``bench/simclient.py``, one per ~1000 streams), waits until all M + K
hold the current config, then performs N switches of svc-0 with ``?wait=converged`` and records:

* ``convergence.seconds`` as measured by the server (change accepted -> last proxy ACKed) and the
  client-observed wall time of the HTTP call;
* control-plane CPU seconds per switch (utime+stime from /proc/<pid>/stat over the N switches);
* control-plane RSS (VmRSS) before the proxies connect and after all of them converged;
* bytes per RDS response, from /metrics deltas over the switches;
* for the real Envoys: their CPU seconds per switch, their RSS, and from each Envoy's admin /stats
  the deltas of its RDS ``update_success`` / ``update_rejected`` counters over the switches (every
  Envoy should have applied every switch and rejected none).

Optionally (``--profile``, on by default for the largest M) it runs py-spy on the control plane
during extra switches that are *not* part of the figures, and writes a flame graph (SVG) and a
top-functions summary next to the JSON in bench/results/.

It prints a markdown table and writes bench/results/convergence-<UTC timestamp>.json. Every process
it starts is stopped on exit, also on Ctrl-C or error. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import math
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BENCH = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
TYPES = {
    "cds": "type.googleapis.com/envoy.config.cluster.v3.Cluster",
    "eds": "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment",
    "lds": "type.googleapis.com/envoy.config.listener.v3.Listener",
    "rds": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration",
}

_children: list[subprocess.Popen[bytes]] = []


# ------------------------------------------------------------------------------------------------
# Processes


def _pdeathsig() -> None:
    """Child side: get SIGKILL if the benchmark dies without cleaning up (Linux only)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def spawn(argv: list[str], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                preexec_fn=_pdeathsig, start_new_session=True, cwd=REPO, **kwargs)
    _children.append(proc)
    return proc


def stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(sig)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()
    if proc in _children:
        _children.remove(proc)


def stop_all() -> None:
    for proc in list(reversed(_children)):
        stop(proc, grace=5.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, from /proc/<pid>/stat (all its threads)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def thread_cpu_seconds(pid: int) -> dict[str, float]:
    """CPU seconds per thread name (comm), summed over threads of the same name."""
    out: dict[str, float] = defaultdict(float)
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            raw = (task / "stat").read_text()
            comm = raw[raw.index("(") + 1:raw.rindex(")")]
            fields = raw[raw.rindex(")") + 2:].split()
            out[comm] += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return dict(out)


_STAT_COLUMNS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds per /proc/stat column (all CPUs)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return {name: value / CLK_TCK for name, value in zip(_STAT_COLUMNS, fields)}


def busy(stat: dict[str, float]) -> float:
    return sum(v for k, v in stat.items() if k not in ("idle", "iowait"))


def all_processes_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (comm, own + reaped children's CPU seconds) for every process on the machine."""
    out: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            raw = (entry / "stat").read_text()
            fields = raw[raw.rindex(")") + 2:].split()
            out[int(entry.name)] = (raw[raw.index("(") + 1:raw.rindex(")")], sum(int(f) for f in fields[11:15]) / CLK_TCK)
    return out


def other_processes(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                    ours: set[int]) -> dict[str, float]:
    """CPU seconds used meanwhile by processes that are not ours (their reaped children included),
    by "comm (pid)"; only those above 0.05 s."""
    out = {}
    for pid, (comm, value) in after.items():
        if pid in ours:
            continue
        delta = value - before.get(pid, (comm, 0.0))[1] if pid in before else 0.0
        if delta >= 0.05:
            out[f"{comm} ({pid})"] = round(delta, 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


def rss_breakdown_kib(pid: int) -> dict[str, int]:
    """VmRSS and its parts: RssAnon (private heap), RssFile (mapped files: for Envoy mostly its
    binary, whose pages K Envoys share) and RssShmem."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(":", 1)[0]
        if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
            out[key] = int(line.split()[1])
    return out


def tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


# ------------------------------------------------------------------------------------------------
# Admin API


# The admin API needs a bearer token; the benchmark writes this one into the control plane's config.
ADMIN_TOKEN = secrets.token_hex(16)


class Admin:
    def __init__(self, port: int, token: str = ADMIN_TOKEN) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def call(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> tuple[int, Any]:
        data = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {self.token}"}
        if data:
            headers["Content-Type"] = "application/json"
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            status, raw = exc.code, exc.read()
        ctype_json = raw[:1] in (b"{", b"[")
        return status, json.loads(raw) if ctype_json else raw.decode()

    def ok(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        status, result = self.call(method, path, body, timeout)
        if status >= 300:
            raise RuntimeError(f"{method} {path} -> {status}: {result}")
        return result

    def metrics(self) -> dict[tuple[str, str], float]:
        """(metric name, type_url) -> value for the per-type xDS counters."""
        _, text = self.call("GET", "/metrics")
        out: dict[tuple[str, str], float] = {}
        pattern = re.compile(r'^(bluegreen_xds_(?:responses|response_bytes|nacks)_total)\{type_url="([^"]+)"\} (\S+)$')
        build = re.compile(r"^bluegreen_snapshot_build_seconds_(sum|count) (\S+)$")
        for line in text.splitlines():
            m = pattern.match(line)
            if m:
                out[(m.group(1), m.group(2))] = float(m.group(3))
            b = build.match(line)
            if b:  # the control plane's own timing of building + serializing every fleet's snapshot
                out[("snapshot_build", b.group(1))] = float(b.group(2))
        return out


def wait_until(condition: Any, timeout: float, what: str, proc: subprocess.Popen[bytes] | None = None,
               log: Path | None = None, interval: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited ({proc.returncode}) while waiting for {what}:\n{tail(log) if log else ''}")
        try:
            result = condition()
            if result:
                return result
        except (OSError, urllib.error.URLError, RuntimeError) as exc:
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what} (last error: {last_error})")


# ------------------------------------------------------------------------------------------------
# Real Envoys


def distinct_free_ports(n: int, taken: set[int] | None = None) -> list[int]:
    """n free loopback ports, distinct from each other and from ``taken``."""
    seen = set(taken or ())
    out: list[int] = []
    while len(out) < n:
        port = free_port()
        if port not in seen:
            seen.add(port)
            out.append(port)
    return out


def write_cp_config(path: Path, listener_port: int, preview_port: int) -> int:
    """The control plane's --config: the default fleet, with listener ports picked free at run time
    (instead of the built-in 10000/10001, which may be in use on this machine). Returns the number
    of listeners every Envoy of the fleet gets. The admin API's token is ``ADMIN_TOKEN``."""
    path.write_text(f"admin:\n  token: {ADMIN_TOKEN}\n"
                    "fleets:\n  default:\n    listeners:\n"
                    f"      - {{name: http, address: 127.0.0.1, port: {listener_port}, preview_port: {preview_port}}}\n")
    return 2


class RealEnvoy:
    """One Envoy process of the fleet: its own node id, bootstrap and admin port."""

    def __init__(self, index: int, binary: str, xds_port: int, admin_port: int, case_dir: Path) -> None:
        from controlplane.bootstrap import render_bootstrap

        self.node_id = f"envoy-{index}"
        self.admin_port = admin_port
        self.log = case_dir / f"{self.node_id}.log"
        self.config = case_dir / f"{self.node_id}.yaml"
        # The project's own bootstrap (as `bluegreen envoy-bootstrap` writes it): SotW ADS, fleet
        # "default", and its defaults, including the metrics-service stats sink to the control plane.
        self.config.write_text(render_bootstrap(node_id=self.node_id, fleet="default", xds=f"127.0.0.1:{xds_port}",
                                                admin_port=admin_port))
        # --disable-hot-restart: no shared-memory region, so several Envoys need no distinct --base-id.
        self.proc = spawn([binary, "-c", str(self.config), "--concurrency", "1", "--disable-hot-restart",
                           "--log-level", "info"], self.log)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}{path}", timeout=timeout) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode(errors="replace")

    def stats(self) -> dict[str, int]:
        """Counters and gauges of the RDS subscriptions and the listener manager, from /stats?format=json."""
        query = urllib.parse.urlencode({"format": "json", "filter": r"\.rds\.|^listener_manager\."})
        status, text = self.get(f"/stats?{query}")
        if status != 200:
            raise RuntimeError(f"{self.node_id} /stats -> {status}: {text[:200]}")
        return {s["name"]: int(s["value"]) for s in json.loads(text)["stats"]
                if "name" in s and isinstance(s.get("value"), (int, float))}

    def check_rejections(self) -> None:
        """SystemExit if this Envoy rejected any config (CDS/LDS/RDS update_rejected) or failed to
        create a listener, e.g. because it could not bind the fleet's port; nothing while its
        admin endpoint is not up yet."""
        query = urllib.parse.urlencode({"format": "json", "filter": r"update_rejected$|listener_create_failure$"})
        try:
            status, text = self.get(f"/stats?{query}", timeout=2.0)
        except OSError:
            return
        if status != 200:
            return
        bad = {s["name"]: s["value"] for s in json.loads(text)["stats"] if s.get("value")}
        if bad:
            raise SystemExit(f"{self.node_id} rejected config: {bad}:\n{tail(self.log)}")

    def check_alive(self) -> None:
        # SystemExit, not RuntimeError: wait_until retries on RuntimeError, and a dead Envoy stays dead.
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.node_id} exited ({self.proc.returncode}):\n{tail(self.log)}")


# http.<HCM stat_prefix>.rds.<route config name>.<counter>; the control plane's stat_prefix is the
# listener name, but both parts are discovered here rather than assumed.
_RDS_STAT = re.compile(r"^http\.(?P<prefix>.+?)\.rds\.(?P<config>.+)\."
                       r"(?P<stat>update_success|update_rejected|update_attempt|update_failure|update_empty|config_reload)$")


def rds_counters(stats: dict[str, int]) -> dict[str, dict[str, int]]:
    """'<stat_prefix> <route config>' -> {update_success: n, update_rejected: n, ...}."""
    out: dict[str, dict[str, int]] = defaultdict(dict)
    for name, value in stats.items():
        m = _RDS_STAT.match(name)
        if m:
            out[f"{m['prefix']} {m['config']}"][m["stat"]] = value
    return dict(out)


def envoy_ready(envoy: RealEnvoy, listeners: int) -> dict[str, int] | None:
    """The Envoy's stats once /ready answers 200, all ``listeners`` are active and every listener's
    route configuration has been applied at least once; None before that."""
    envoy.check_alive()
    envoy.check_rejections()
    status, _ = envoy.get("/ready")
    if status != 200:
        return None
    stats = envoy.stats()
    rds = rds_counters(stats)
    if stats.get("listener_manager.total_listeners_active") != listeners or len(rds) != listeners:
        return None
    return stats if all(c.get("update_success", 0) >= 1 for c in rds.values()) else None


def listening_inodes(ports: list[int]) -> dict[int, set[int]]:
    """port -> socket inodes in LISTEN state on it (IPv4 and IPv6), from /proc/net/tcp{,6}."""
    out: dict[int, set[int]] = {p: set() for p in ports}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                port = int(fields[1].rsplit(":", 1)[1], 16)
                if fields[3] == "0A" and port in out:  # 0A = TCP_LISTEN
                    out[port].add(int(fields[9]))
    return out


def socket_inodes(pid: int) -> set[int]:
    out = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                out.add(int(target[8:-1]))
    return out


def shared_listeners(envoys: list[RealEnvoy], ports: list[int]) -> dict[str, Any]:
    """Whether every Envoy holds its own listening socket on each of the fleet's ports (SO_REUSEPORT)."""
    listening = listening_inodes(ports)
    per_port = {}
    for port in ports:
        holders = [e.node_id for e in envoys if socket_inodes(e.pid) & listening[port]]
        per_port[str(port)] = {"listen_sockets": len(listening[port]), "envoys_listening": len(holders)}
    return {"ports": per_port, "every_envoy_listens_on_every_port": all(v["envoys_listening"] == len(envoys)
                                                                        for v in per_port.values())}


def rds_deltas(envoys: list[RealEnvoy], before: dict[str, dict[str, dict[str, int]]],
               after: dict[str, dict[str, dict[str, int]]], switches: int) -> dict[str, Any]:
    """Per Envoy and route configuration: counter deltas over the measured switches, and whether
    every Envoy applied every switch (update_success +N) and rejected none."""
    per_envoy: dict[str, dict[str, dict[str, int]]] = {}
    ok: list[int] = []
    rejected = 0
    for e in envoys:
        rows = {}
        for key in sorted(set(before[e.node_id]) | set(after[e.node_id])):
            b, a = before[e.node_id].get(key, {}), after[e.node_id].get(key, {})
            rows[key] = {stat: a.get(stat, 0) - b.get(stat, 0) for stat in sorted(set(a) | set(b))}
            ok.append(rows[key].get("update_success", 0))
            rejected += rows[key].get("update_rejected", 0)
        per_envoy[e.node_id] = rows
    return {"expected_update_success": switches, "route_configs_per_envoy": sorted({k for r in per_envoy.values() for k in r}),
            "update_success_min": min(ok) if ok else 0, "update_success_max": max(ok) if ok else 0,
            "update_rejected_total": rejected,
            "all_applied": bool(ok) and min(ok) == max(ok) == switches and rejected == 0,
            "per_envoy": per_envoy}


# ------------------------------------------------------------------------------------------------
# One (S, M) case


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): with N=20 samples p99 is the max."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def summarize(values: list[float]) -> dict[str, float]:
    return {"p50": percentile(values, 50), "p99": percentile(values, 99), "max": max(values),
            "min": min(values), "mean": statistics.fmean(values)}


def metric_delta(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = defaultdict(dict)
    for (name, type_url), value in after.items():
        if name == "snapshot_build":
            continue
        delta = value - before.get((name, type_url), 0.0)
        short = next((k for k, v in TYPES.items() if v == type_url), type_url)
        out[name.removeprefix("bluegreen_xds_").removesuffix("_total")][short] = delta
    return dict(out)


def _build_ms(before: dict[tuple[str, str], float], after: dict[tuple[str, str], float]) -> float | None:
    """Mean time the control plane spent building and serializing snapshots per publish."""
    count = after.get(("snapshot_build", "count"), 0.0) - before.get(("snapshot_build", "count"), 0.0)
    total = after.get(("snapshot_build", "sum"), 0.0) - before.get(("snapshot_build", "sum"), 0.0)
    return 1000 * total / count if count else None


def register_services(admin: Admin, services: int) -> None:
    for i in range(services):
        name = f"svc-{i}"
        admin.ok("PUT", f"/v1/services/{name}", {"prefix": f"/{name}"})
        admin.ok("PUT", f"/v1/services/{name}/environments/blue", {"version": "v1", "endpoints": [f"127.0.0.1:{20000 + i}"]})
        admin.ok("PUT", f"/v1/services/{name}/environments/green", {"version": "v2", "endpoints": [f"127.0.0.1:{30000 + i}"]})


def converged_count(admin: Admin, proxies: int, *, at_least: bool = False) -> dict[str, Any] | None:
    view = admin.ok("GET", "/v1/services/svc-0")
    conv = view["convergence"]
    enough = conv["proxies"] >= proxies if at_least else conv["proxies"] == proxies
    return view if enough and conv["acked"] == conv["proxies"] else None


def switch_once(admin: Admin, timeout: float, kind: str = "switch") -> dict[str, Any]:
    """One switch of svc-0 (``kind`` "switch": to the idle environment) or one rollback (to the
    previous one, ``POST .../rollback``), waiting until every proxy ACKed it."""
    started_at = time.time()
    started = time.perf_counter()
    status, view = admin.call("POST", f"/v1/services/svc-0/{kind}?wait=converged&timeout={timeout:g}", timeout=timeout + 30)
    wall = time.perf_counter() - started
    if status != 200:
        raise RuntimeError(f"{kind} -> {status}: {view}")
    conv = view["convergence"]
    return {"kind": kind, "started_at": started_at, "server_seconds": conv["seconds"], "wall_seconds": wall, "active": view["traffic"]["active"],
            "proxies": conv["proxies"], "acked": conv["acked"], "store_revision": view["store_revision"]}


def run_case(services: int, proxies: int, args: argparse.Namespace, workdir: Path, stamp: str) -> dict[str, Any]:
    case_dir = workdir / f"s{services}-m{proxies}"
    case_dir.mkdir()
    xds_port, admin_port, listener_port, preview_port = distinct_free_ports(4)
    listeners = write_cp_config(case_dir / "bluegreen.yaml", listener_port, preview_port)
    cp_log = case_dir / "controlplane.log"
    cp = spawn([*args.cp_cmd.split(), "--config", str(case_dir / "bluegreen.yaml"), "--state", str(case_dir / "state.db"),
                "--xds", f"127.0.0.1:{xds_port}", "--admin", f"127.0.0.1:{admin_port}", "--log-level", "warning"], cp_log)
    clients: list[subprocess.Popen[bytes]] = []
    envoys: list[RealEnvoy] = []
    k = args.envoys
    result: dict[str, Any] = {"services": services, "proxies": proxies, "envoys": k, "switches": args.switches}
    try:
        admin = Admin(admin_port)
        wait_until(lambda: admin.ok("GET", "/healthz"), 30, "control plane /healthz", cp, cp_log)
        t0 = time.monotonic()
        register_services(admin, services)
        result["register_seconds"] = time.monotonic() - t0
        time.sleep(0.5)  # let the publisher settle before reading RSS
        rss_before = rss_kib(cp.pid)

        # Clients: one process per ~streams_per_client streams.
        n_clients = max(1, math.ceil(proxies / args.streams_per_client))
        per = [proxies // n_clients + (1 if i < proxies % n_clients else 0) for i in range(n_clients)]
        t0 = time.monotonic()
        cp_cpu0 = cpu_seconds(cp.pid)
        # K real Envoys of the same fleet, started first: they take longer to come up than the
        # simulated proxies, and the convergence wait below counts them (M + K proxies).
        if k:
            from controlplane.sandbox import find_envoy

            binary = find_envoy()
            ports = distinct_free_ports(k, {xds_port, admin_port, listener_port, preview_port})
            envoys.extend(RealEnvoy(i, binary, xds_port, ports[i], case_dir) for i in range(k))
        def all_converged(expected: int, at_least: bool = False) -> Any:
            for c in clients:
                if c.poll() is not None:
                    raise SystemExit(f"client exited ({c.returncode}):\n{tail(case_dir / 'client0.log')}")
            for e in envoys:
                e.check_alive()
                e.check_rejections()
            return converged_count(admin, expected, at_least=at_least)

        # One client process at a time, each once the previous one's proxies hold the config.
        # Started all at once, 5000 simulated proxies connecting in the same second left about
        # 40 % of them stuck in grpc's client reconnect for over a minute (bench/README.md).
        connected = 0
        for i, count in enumerate(per):
            clients.append(spawn([sys.executable, str(BENCH / "simclient.py"), "--target", f"127.0.0.1:{xds_port}",
                                  "--count", str(count), "--prefix", f"c{i}-", "--stats", str(case_dir / f"client{i}.json")],
                                 case_dir / f"client{i}.log"))
            connected += count
            if connected < proxies:
                # Some Envoys may be in already: at least this many, every one of them converged.
                wait_until(lambda: all_converged(connected, at_least=True), args.connect_timeout,
                           f"{connected} simulated proxies connected and converged", cp, cp_log, interval=0.25)
        wait_until(lambda: all_converged(proxies + k), args.connect_timeout,
                   f"{proxies} simulated proxies and {k} Envoys connected and converged", cp, cp_log, interval=0.25)
        # Every Envoy ready (/ready 200: its listeners warmed, which needs their routes), with all
        # the fleet's listeners active and each listener's route configuration applied.
        for e in envoys:
            wait_until(lambda e=e: envoy_ready(e, listeners), args.connect_timeout, f"{e.node_id} ready with {listeners} active listeners",
                       interval=0.05)
        result["connect_seconds"] = time.monotonic() - t0
        result["connect_cp_cpu_seconds"] = cpu_seconds(cp.pid) - cp_cpu0
        time.sleep(0.5)
        rss_after = rss_kib(cp.pid)
        result["rss_kib"] = {"before_proxies": rss_before, "after_proxies": rss_after}
        # Per connected proxy, simulated and real (a real Envoy also holds a metrics-service stream).
        result["rss_kib_per_stream"] = (rss_after - rss_before) / (proxies + k)
        if envoys:
            # SO_REUSEPORT: every Envoy binds the fleet's listener ports itself.
            result["envoy_listeners"] = shared_listeners(envoys, [listener_port, preview_port])
            if not result["envoy_listeners"]["every_envoy_listens_on_every_port"]:
                raise SystemExit(f"not every Envoy listens on the fleet's ports: {result['envoy_listeners']}")

        # Measured switches.
        metrics0 = admin.metrics()
        cpu0 = cpu_seconds(cp.pid)
        threads0 = thread_cpu_seconds(cp.pid)
        client_cpu0 = sum(cpu_seconds(c.pid) for c in clients)
        envoy_rds0 = {e.node_id: rds_counters(e.stats()) for e in envoys}
        envoy_rss0 = {e.node_id: rss_breakdown_kib(e.pid) for e in envoys}
        envoy_cpu0 = {e.node_id: cpu_seconds(e.pid) for e in envoys}
        system0, own0, procs0 = system_cpu(), own_cpu_seconds(), all_processes_cpu()
        t0 = time.monotonic()
        # Every other change is a rollback of the one before, through the rollback API.
        samples = [switch_once(admin, args.timeout, "rollback" if k % 2 else "switch") for k in range(args.switches)]
        elapsed = time.monotonic() - t0
        cpu1 = cpu_seconds(cp.pid)
        threads1 = thread_cpu_seconds(cp.pid)
        client_cpu1 = sum(cpu_seconds(c.pid) for c in clients)
        envoy_cpu1 = {e.node_id: cpu_seconds(e.pid) for e in envoys}
        system1, own1, procs1 = system_cpu(), own_cpu_seconds(), all_processes_cpu()
        others = other_processes(procs0, procs1, {os.getpid(), cp.pid, *(c.pid for c in clients), *(e.pid for e in envoys)})
        envoy_cpu = sum(envoy_cpu1.values()) - sum(envoy_cpu0.values())
        envoy_rss1 = {e.node_id: rss_breakdown_kib(e.pid) for e in envoys}
        envoy_rds1 = {e.node_id: rds_counters(e.stats()) for e in envoys}
        metrics1 = admin.metrics()
        deltas = metric_delta(metrics0, metrics1)
        rds_responses = deltas.get("responses", {}).get("rds", 0.0)
        result.update({
            "samples": samples,
            "server_seconds": summarize([s["server_seconds"] for s in samples]),
            "rollback_server_seconds": summarize([s["server_seconds"] for s in samples if s["kind"] == "rollback"]),
            "wall_seconds": summarize([s["wall_seconds"] for s in samples]),
            "switches_elapsed_seconds": elapsed,
            "cp_cpu_seconds_per_switch": (cpu1 - cpu0) / args.switches,
            "clients_cpu_seconds_per_switch": (client_cpu1 - client_cpu0) / args.switches,
            "cp_cpu_utilization_during_switches": (cpu1 - cpu0) / elapsed,
            # Other processes on the machine during the switches (their reaped children included):
            # if this is not near 0, something else competed for the CPUs and the figures are disturbed.
            "other_processes_cpu_seconds": others,
            "other_processes_cpu_seconds_per_switch": sum(others.values()) / args.switches,
            # Busy CPU in /proc/stat that no process accounts for. On the reference VM this is
            # ~25 % of the busy time even on a quiet machine (tick-based vs. precise accounting).
            "unattributed_cpu_seconds_per_switch": max(0.0, busy(system1) - busy(system0) - (cpu1 - cpu0) - (client_cpu1 - client_cpu0)
                                                       - envoy_cpu - (own1 - own0) - sum(others.values())) / args.switches,
            "machine_cpu_seconds_per_switch_by_column": {
                k: round((system1[k] - system0[k]) / args.switches, 4) for k in _STAT_COLUMNS},
            "machine_cpu_utilization_during_switches": (busy(system1) - busy(system0)) / elapsed / (os.cpu_count() or 1),
            "cp_cpu_seconds_per_switch_by_thread": {
                name: round((threads1.get(name, 0.0) - threads0.get(name, 0.0)) / args.switches, 4)
                for name in sorted(set(threads0) | set(threads1))
                if threads1.get(name, 0.0) - threads0.get(name, 0.0) > 0
            },
            "xds_metric_deltas": deltas,
            "rds_responses_per_switch": rds_responses / args.switches,
            "bytes_per_rds_push": deltas.get("response_bytes", {}).get("rds", 0.0) / rds_responses if rds_responses else None,
            "snapshot_build_ms_per_publish": _build_ms(metrics0, metrics1),
        })
        if envoys:
            result["envoy"] = {
                "cpu_seconds_per_switch": envoy_cpu / args.switches,
                "cpu_seconds_per_switch_by_envoy": {n: round((envoy_cpu1[n] - envoy_cpu0[n]) / args.switches, 4) for n in envoy_cpu1},
                # VmRSS (with RssAnon/RssFile) before and after the measured switches, per Envoy and in
                # total. The total counts the shared pages of the Envoy binary (RssFile) K times.
                "rss_kib_before_switches": envoy_rss0,
                "rss_kib_after_switches": envoy_rss1,
                "rss_kib_total_after_switches": sum(v["VmRSS"] for v in envoy_rss1.values()),
                "rss_kib_mean_after_switches": statistics.fmean(v["VmRSS"] for v in envoy_rss1.values()),
                "rss_kib_max_after_switches": max(v["VmRSS"] for v in envoy_rss1.values()),
                "rss_anon_kib_total_after_switches": sum(v.get("RssAnon", 0) for v in envoy_rss1.values()),
                "rss_anon_kib_mean_after_switches": statistics.fmean(v.get("RssAnon", 0) for v in envoy_rss1.values()),
                # Δ http.<stat_prefix>.rds.<route config>.* over the measured switches.
                "rds": rds_deltas(envoys, envoy_rds0, envoy_rds1, args.switches),
                "admin_ports": {e.node_id: e.admin_port for e in envoys},
            }

        if args.profile_switches > 0 and args.profile_for(services, proxies):
            result["profile"] = profile(cp.pid, admin, args, services, proxies, stamp)

        # Stop the clients first (they write their counters), then the Envoys, then the control plane.
        for c in clients:
            stop(c)
        for e in envoys:
            stop(e.proc)
        stats = []
        for i in range(len(clients)):
            path = case_dir / f"client{i}.json"
            if path.exists():
                stats.append(json.loads(path.read_text()))
        result["clients"] = {"processes": len(clients), "streams_per_process": per, "stats": stats}
        errors = Counter()
        for s in stats:
            errors.update(s.get("errors", {}))
        if errors:
            result["clients"]["errors"] = dict(errors)
        return result
    except BaseException:
        print(f"--- control plane log tail ({cp_log}):\n{tail(cp_log)}", file=sys.stderr)
        for e in envoys[:1]:
            print(f"--- {e.node_id} log tail ({e.log}):\n{tail(e.log)}", file=sys.stderr)
        raise
    finally:
        for c in clients:
            stop(c)
        for e in envoys:
            stop(e.proc)
        stop(cp)


# ------------------------------------------------------------------------------------------------
# Profiling (py-spy)


def profile(pid: int, admin: Admin, args: argparse.Namespace, services: int, proxies: int, stamp: str) -> dict[str, Any]:
    """Extra switches (not part of the figures) under py-spy.

    Two recordings, one after the other (two samplers on one process would disturb each other):
    a flame graph (SVG, busy samples only) and the collapsed stacks with idle samples and thread
    names, from which the event-loop thread's busy share and its top functions are computed.
    py-spy runs with --nonblocking (it does not stop the process to sample), at --profile-rate.
    """
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return {"error": "py-spy not installed (pip install py-spy)"}
    results = Path(args.results_dir)
    base = results / f"profile-{stamp}-s{services}-m{proxies}"
    outputs = {"svg": Path(f"{base}.svg"), "raw": Path(f"{base}.collapsed.txt")}
    samples: list[dict[str, Any]] = []
    for fmt, path, extra in (("flamegraph", outputs["svg"], []), ("raw", outputs["raw"], ["--threads", "--idle"])):
        log = results / f".py-spy-{fmt}.log"
        rec = spawn([py_spy, "record", "--pid", str(pid), "--rate", str(args.profile_rate), "--format", fmt, "-o", str(path),
                     "--duration", "600", "--nonblocking", *extra], log)
        time.sleep(1.0)  # let it attach
        t0 = time.monotonic()
        for _ in range(args.profile_switches):
            samples.append(switch_once(admin, args.timeout))
        recorded = time.monotonic() - t0
        time.sleep(0.2)
        stop(rec, signal.SIGINT, grace=30)
        if not path.exists():
            return {"error": f"py-spy wrote no {fmt} output:\n{tail(log)}"}
        with contextlib.suppress(OSError):
            log.unlink()
    info: dict[str, Any] = {
        "files": {k: str(v.relative_to(REPO)) if v.is_relative_to(REPO) else str(v) for k, v in outputs.items()},
        "switches": len(samples),
        "server_seconds_under_profiler": summarize([s["server_seconds"] for s in samples]),
        "raw_recording_seconds": recorded,
    }
    info.update(top_functions(outputs["raw"]))
    return info


# The event loop waiting for I/O (epoll) is idle time.
_IDLE_LEAF = re.compile(r"^(EpollSelector\.select|select) \(selectors\.py")


def _frame_name(frame: str) -> str:
    # py-spy frames look like "function (path/to/file.py:123)"; drop the line number.
    return re.sub(r":\d+\)$", ")", frame.strip())


def top_functions(path: Path, n: int = 25) -> dict[str, Any]:
    """From py-spy collapsed stacks recorded with --threads --idle: the main (event loop) thread's
    idle/busy split, and self and inclusive shares of its busy samples per function."""
    self_counts: Counter[str] = Counter()
    total_counts: Counter[str] = Counter()
    lines_counts: Counter[str] = Counter()
    per_thread: Counter[str] = Counter()
    busy = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1] if frames[0].startswith("thread (") else "?"
        frames = frames[1:] if frames[0].startswith("thread (") else frames
        per_thread[thread] += count
        if thread != "MainThread" or not frames:
            continue
        if _IDLE_LEAF.match(frames[-1]):
            idle += count
            continue
        busy += count
        lines_counts[frames[-1].strip()] += count
        names = [_frame_name(f) for f in frames]
        self_counts[names[-1]] += count
        for name in set(names):
            total_counts[name] += count

    def table(counter: Counter[str]) -> list[dict[str, Any]]:
        return [{"function": f, "samples": c, "pct_of_busy": round(100 * c / busy, 1) if busy else 0.0}
                for f, c in counter.most_common(n)]

    main_total = busy + idle
    return {"main_thread_samples": main_total, "main_thread_busy_samples": busy,
            "busy_pct": round(100 * busy / main_total, 1) if main_total else 0.0,
            "samples_per_thread": dict(per_thread.most_common()),
            "top_self": table(self_counts), "top_inclusive": table(total_counts), "top_lines": table(lines_counts)}


# ------------------------------------------------------------------------------------------------
# Report


def machine() -> dict[str, Any]:
    model = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    date = subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip()
    versions = {}
    for mod in ("grpc", "aiohttp", "google.protobuf"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod, fromlist=["__version__"]).__version__
    return {"nproc": os.cpu_count(), "cpu_model": model, "python": platform.python_version(),
            "platform": platform.platform(), "date_utc": date, "packages": versions}


def markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Python {m['python']}, {m['date_utc']}. "
        "Control plane, simulated proxies, real Envoys and this driver share these CPUs.",
        "",
        "| services S | proxies M | Envoys K | switches | conv. p50 s | conv. p99 s | conv. max s | rollback p99 s | HTTP wall p50 s | CP CPU s/switch "
        "| clients CPU s/switch | Envoy CPU s/switch | other procs CPU s/switch | machine busy % | KiB RSS/stream | bytes/RDS push "
        "| RDS pushes/switch | build ms/publish | connect s | Envoy RSS MiB each | Envoy RDS updates ok/rejected |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in report["cases"]:
        if "error" in r:
            lines.append(f"| {r['services']} | {r['proxies']} | {r.get('envoys', '')} | {r.get('switches', '')} | failed: {r['error'].splitlines()[0] if r['error'] else ''} |||||||||||||||||")
            continue
        s, w = r["server_seconds"], r["wall_seconds"]
        envoy = r.get("envoy")
        if envoy:
            rds = envoy["rds"]
            ok = (f"{rds['update_success_min']}" if rds["update_success_min"] == rds["update_success_max"]
                  else f"{rds['update_success_min']}-{rds['update_success_max']}")
            envoy_cells = (f"{envoy['cpu_seconds_per_switch']:.3f}",
                           f"{envoy['rss_kib_mean_after_switches'] / 1024:.1f} (anon {envoy['rss_anon_kib_mean_after_switches'] / 1024:.1f})",
                           f"{ok}/{rds['update_rejected_total']}" + ("" if rds["all_applied"] else " **not all applied**"))
        else:
            envoy_cells = ("", "", "")
        lines.append(
            f"| {r['services']} | {r['proxies']} | {r.get('envoys', 0)} | {r['switches']} | {s['p50']:.3f} | {s['p99']:.3f} | {s['max']:.3f} "
            f"| {r['rollback_server_seconds']['p99']:.3f} | {w['p50']:.3f} | {r['cp_cpu_seconds_per_switch']:.3f} | {r['clients_cpu_seconds_per_switch']:.3f} | {envoy_cells[0]} "
            f"| {r['other_processes_cpu_seconds_per_switch']:.3f} | {100 * r['machine_cpu_utilization_during_switches']:.0f} "
            f"| {r['rss_kib_per_stream']:.1f} | {r['bytes_per_rds_push']:.0f} | {r['rds_responses_per_switch']:.0f} "
            f"| {r['snapshot_build_ms_per_publish'] if r.get('snapshot_build_ms_per_publish') is None else round(r['snapshot_build_ms_per_publish'], 2)} "
            f"| {r['connect_seconds']:.1f} | {envoy_cells[1]} | {envoy_cells[2]} |"
        )
    lines.append("")
    lines.append("p99 is nearest-rank: with 20 switches it equals the max. Every other change is a rollback "
                 "(`POST /v1/services/svc-0/rollback?wait=converged`); conv. columns cover all changes, rollback p99 "
                 "the rollbacks alone (nearest-rank of N/2, so their max).")
    if any(r.get("envoy") for r in report["cases"]):
        lines.append("Envoy RDS updates ok/rejected: Δ`update_success` over the measured switches, for every Envoy and each of its "
                     "route configurations (min-max if they differ; N = switches is expected), / the sum of Δ`update_rejected`. "
                     "Envoy RSS: mean VmRSS of the K Envoys after the switches "
                     "(anon: RssAnon, their private memory; the rest is mostly the shared Envoy binary).")
    for r in report["cases"]:
        prof = r.get("profile")
        if not prof or "top_self" not in prof:
            continue
        lines += ["", f"py-spy, S={r['services']} M={r['proxies']} ({prof['switches']} extra switches, not in the table; "
                      f"event-loop thread busy {prof['busy_pct']}% of its samples; flame graph {prof['files']['svg']}). "
                      "Shares are of the event-loop thread's busy samples; Cython frames of grpc.aio are invisible, "
                      "so time inside them is charged to the calling Python line.", "",
                  "| self % | function | | inclusive % | function |", "|---:|---|---|---:|---|"]
        inclusive = [row for row in prof["top_inclusive"] if not re.match(r"^(_run_module_as_main|_run_code|<module>|main|cmd_serve|run|Runner\.run|BaseEventLoop\.(run_until_complete|run_forever|_run_once)|Handle\._run) ", row["function"])]
        for a, b in zip(prof["top_self"][:15], inclusive[:15]):
            lines.append(f"| {a['pct_of_busy']} | `{a['function']}` | | {b['pct_of_busy']} | `{b['function']}` |")
        threads = r.get("cp_cpu_seconds_per_switch_by_thread")
        if threads:
            lines += ["", "Control-plane CPU s/switch by thread (measured switches): "
                      + ", ".join(f"{k} {v:.3f}" for k, v in sorted(threads.items(), key=lambda kv: -kv[1]))]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Blue/green switch convergence benchmark (see bench/README.md).")
    parser.add_argument("--proxies", type=int, nargs="+", default=[100, 1000], help="M: simulated proxies (several values allowed)")
    parser.add_argument("--services", type=int, nargs="+", default=[1, 100], help="S: registered services (several values allowed)")
    parser.add_argument("--switches", type=int, default=20, help="N: measured switches per case")
    parser.add_argument("--timeout", type=float, default=60.0, help="wait=converged timeout per switch (s)")
    parser.add_argument("--connect-timeout", type=float, default=300.0, help="max seconds for M proxies to connect and converge")
    parser.add_argument("--streams-per-client", type=int, default=1000, help="simulated proxies per client process")
    parser.add_argument("--envoys", type=int, default=10,
                        help="K: real Envoy processes (--concurrency 1) in the same fleet, besides the M simulated proxies; 0: none")
    parser.add_argument("--profile", choices=["largest", "all", "none"], default="largest",
                        help="run py-spy during extra switches: for the largest M of each S (default), all cases, or none")
    parser.add_argument("--profile-switches", type=int, default=10, help="extra switches per py-spy recording")
    parser.add_argument("--profile-rate", type=int, default=200, help="py-spy samples per second")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    parser.add_argument("--cp-cmd", default=f"{sys.executable} -m controlplane serve",
                        help="command that starts the control plane (for A/B runs of a patched build); "
                             "--config, --state, --xds, --admin and --log-level are appended")
    peer = parser.add_argument_group("comparison with a peer server (bench/peer_compare.py)")
    peer.add_argument("--peer", choices=["gcp"], help="compare with go-control-plane instead of the single-server run: "
                      "both servers in the same run, alternating, with client-measured convergence")
    peer.add_argument("--client", choices=["go", "python"], default="go",
                      help="--peer only: the fleet simulator, bench/simgo (default) or bench/simclient.py")
    peer.add_argument("--rounds", type=int, default=2, help="--peer only: rounds of (ours, peer) per case")
    peer.add_argument("--server-cpus", default="auto", help="--peer only: taskset CPU list for the servers "
                      "(auto: the first half of the CPUs; none: not pinned)")
    peer.add_argument("--client-cpus", default="auto", help="--peer only: taskset CPU list for the client processes "
                      "(auto: the other half; none: not pinned)")
    peer.add_argument("--xds-workers", type=int, nargs="+", default=[None], metavar="N",
                      help="--peer only: run our server once per value with `serve --xds-workers N` (e.g. 1 2); "
                           "CPU and RSS are summed over its processes (default: one run with the server's default)")
    peer.add_argument("--build", action="store_true", help="--peer only: run bench/peers/build.sh first "
                      "(it also runs when bench/.bin/gcp or bench/.bin/simgo is missing)")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be >= 1")
    if args.envoys < 0:
        parser.error("--envoys must be >= 0")
    largest = max(args.proxies)
    args.profile_for = lambda s, m: args.profile == "all" or (args.profile == "largest" and m == largest)
    return args


def start_run(results_dir: str) -> tuple[Path, str]:
    """The results folder (created) and the run's UTC stamp; SIGTERM and SIGINT then raise
    KeyboardInterrupt, so every process a run started is stopped on the way out."""
    results = Path(results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%SZ")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    # Also when started from a non-interactive shell with `&`, which leaves SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return results, stamp


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.peer:
        import peer_compare

        return peer_compare.main(args)
    results, stamp = start_run(args.results_dir)
    report: dict[str, Any] = {"command": [Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])],
                              "machine": machine(), "cases": []}
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="bluegreen-bench-"))
    try:
        for services in args.services:
            for proxies in args.proxies:
                print(f"== S={services} M={proxies} K={args.envoys} ...", file=sys.stderr, flush=True)
                t0 = time.monotonic()
                try:
                    case = run_case(services, proxies, args, workdir, stamp)
                except (RuntimeError, TimeoutError, SystemExit) as exc:
                    case = {"services": services, "proxies": proxies, "envoys": args.envoys, "switches": args.switches,
                            "error": str(exc)[:500]}
                case["case_seconds"] = time.monotonic() - t0
                report["cases"].append(case)
                print(f"   done in {case['case_seconds']:.0f}s", file=sys.stderr, flush=True)
    except KeyboardInterrupt:
        print("interrupted; stopping every process started", file=sys.stderr)
        report["interrupted"] = True
    finally:
        stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report["total_seconds"] = time.monotonic() - started
    out = results / f"convergence-{stamp}.json"
    out.write_text(json.dumps(report, indent=2))
    print(markdown(report))
    print(f"\nraw results: {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    return 130 if report.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
