"""The alternative a user might pick instead of a control plane: Envoy's file-based dynamic config.

    python bench/filebased.py --rate 500 --protocol both --variants rds lds --duration-per-phase 10

No control plane. Envoy reads ``dynamic_resources`` from files (``path_config_source``): CDS and
LDS, and in the ``rds`` variant RDS too. Envoy watches each file with inotify and reloads it when
a file is *moved* onto its path, so every update here is written to a temporary file in the same
directory and renamed over the old one (atomic). The same two clusters as the control plane
serves (blue v1, green v2 demo apps; STATIC clusters with the same timeouts, circuit breakers and
retry policy) and one route with ``weighted_clusters``.

Variants (each with a fresh Envoy, per protocol):
* ``rds``: the listener names a route configuration that comes from its own file; the switch
  rewrites that file, like the control plane's RDS push;
* ``lds``: the route configuration is inline in the listener; the switch rewrites the listener
  file. Envoy then replaces the listener's filter chain and *drains* the connections of the old
  one (``--drain-time-s``, ``--drain-strategy``), which keep using the old routes meanwhile.

Under the same open-loop load as bench/cutover.py (its load generator, in its own process, over
HTTP/1.1 keep-alive and HTTP/2 h2c), each run does: an atomic switch blue -> green (file rename),
a rollback green -> blue (file rename), and a rejected file (invalid config) to show what the
writer learns about it. Long requests (``/slow``) are in flight on the old environment at each
switch. Figures: failed requests, latency before / during / after, rename -> Envoy applied it
(its update_success counter, polled every 5 ms), rename -> first and -> 100 % responses from the
new environment.

Writes ``bench/results/filebased-<UTC>.json`` and ``.png`` and prints a markdown table and what
the run shows. Every process it starts is stopped on exit, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cutover import (  # noqa: E402 - bench/ is not a package
    BENCH,
    LoadGen,
    Phase,
    Proc,
    envoy_stats,
    extras_table,
    fmt_failed,
    fmt_lat,
    fmt_ms,
    fmt_s,
    fmt_share,
    free_port,
    install_signal_handlers,
    require_h2,
    launch_long,
    machine,
    machine_line,
    rel_path,
    run_report,
    stamp_now,
    stats_delta,
    tail,
    write_chart,
)

T_CLUSTER = "type.googleapis.com/envoy.config.cluster.v3.Cluster"
T_LISTENER = "type.googleapis.com/envoy.config.listener.v3.Listener"
T_ROUTES = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration"
T_HCM = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
T_ROUTER = "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
ROUTES_NAME = "routes"


# ------------------------------------------------------------------------------------------------
# Config files: what a user would write by hand (or template), mirroring controlplane/resources.py


def cluster(name: str, address: str) -> dict[str, Any]:
    host, port = address.rsplit(":", 1)
    limits = {"max_connections": 100000, "max_pending_requests": 100000, "max_requests": 100000}
    return {
        "@type": T_CLUSTER, "name": name, "type": "STATIC", "connect_timeout": "2s", "lb_policy": "ROUND_ROBIN",
        "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", **limits}, {"priority": "HIGH", **limits}]},
        "ignore_health_on_host_removal": True,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": {"socket_address": {"address": host, "port_value": int(port)}}}}]}]},
    }


def route_configuration(blue: int, valid: bool = True) -> dict[str, Any]:
    clusters = [{"name": "demo-blue", "weight": blue}, {"name": "demo-green", "weight": 100 - blue}] if valid else []
    return {
        "@type": T_ROUTES, "name": ROUTES_NAME,
        "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [{
            "name": "demo", "match": {"prefix": "/"},
            "route": {"weighted_clusters": {"clusters": clusters},  # an empty list is invalid: the "rejected" step
                      "retry_policy": {"retry_on": "connect-failure,refused-stream", "num_retries": 2}}}]}],
    }


def listener(port: int, variant: str, rds_path: Path, blue: int, valid: bool = True) -> dict[str, Any]:
    hcm: dict[str, Any] = {"@type": T_HCM, "stat_prefix": "http", "codec_type": "AUTO",
                           "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {"@type": T_ROUTER}}]}
    if variant == "rds":
        hcm["rds"] = {"route_config_name": ROUTES_NAME,
                      "config_source": {"resource_api_version": "V3", "path_config_source": {"path": str(rds_path)}}}
    else:
        route = route_configuration(blue, valid)
        route.pop("@type")
        hcm["route_config"] = route
    return {"@type": T_LISTENER, "name": "http",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}]}


def write_atomically(path: Path, resources: list[dict[str, Any]], version: str) -> float:
    """Write a DiscoveryResponse to a temporary file next to ``path`` and rename it over ``path``
    (the move is what Envoy's inotify watch reacts to). Returns the monotonic time of the rename."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"version_info": version, "resources": resources}, indent=1))
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    t = time.monotonic()
    os.rename(tmp, path)
    return t


class Files:
    def __init__(self, directory: Path, variant: str, port: int, apps: dict[str, str]) -> None:
        self.dir, self.variant, self.port, self.apps = directory, variant, port, apps
        self.cds, self.lds, self.rds = directory / "cds.json", directory / "lds.json", directory / "rds.json"
        self.version = 0

    def _next(self) -> str:
        self.version += 1
        return f"v{self.version}"

    def initial(self) -> None:
        write_atomically(self.cds, [cluster("demo-blue", self.apps["blue"]), cluster("demo-green", self.apps["green"])], "clusters-1")
        if self.variant == "rds":
            write_atomically(self.rds, [route_configuration(100)], self._next())
        write_atomically(self.lds, [listener(self.port, self.variant, self.rds, 100)], self._next())

    def set_weights(self, blue: int, valid: bool = True) -> float:
        """The switch: one atomic rename. Returns when the rename happened."""
        if self.variant == "rds":
            return write_atomically(self.rds, [route_configuration(blue, valid)], self._next())
        return write_atomically(self.lds, [listener(self.port, self.variant, self.rds, blue, valid)], self._next())

    def counters(self) -> tuple[str, str]:
        """Envoy's counters for an accepted / rejected update of the file that changes."""
        prefix = f"http.http.rds.{ROUTES_NAME}" if self.variant == "rds" else "listener_manager.lds"
        return f"{prefix}.update_success", f"{prefix}.update_rejected"


def bootstrap(files: Files, admin_port: int) -> dict[str, Any]:
    return {
        "node": {"id": "filebased-envoy", "cluster": "filebased"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            "cds_config": {"resource_api_version": "V3", "path_config_source": {"path": str(files.cds)}},
            "lds_config": {"resource_api_version": "V3", "path_config_source": {"path": str(files.lds)}},
        },
    }


# ------------------------------------------------------------------------------------------------
# One run: a variant over a protocol


async def wait_counter(http: Any, admin_port: int, names: tuple[str, str], before: dict[str, int], timeout: float = 5.0
                       ) -> tuple[str | None, float | None]:
    """Poll Envoy's counters every 5 ms until one of ``names`` moves; (which, when)."""
    deadline = time.monotonic() + timeout
    pattern = "^(" + "|".join(n.replace(".", r"\.") for n in names) + ")$"
    while time.monotonic() < deadline:
        now = await envoy_stats(http, admin_port, pattern)
        for name in names:
            if now.get(name, 0) > before.get(name, 0):
                return name, time.monotonic()
        await asyncio.sleep(0.005)
    return None, None


async def run_variant(variant: str, protocol: str, args: argparse.Namespace, workdir: Path, apps: dict[str, str],
                      app_logs: list[Path]) -> dict[str, Any]:
    import aiohttp

    from controlplane.sandbox import find_envoy

    config_dir = workdir / "config"
    config_dir.mkdir()
    port, admin_port = free_port(), free_port()
    files = Files(config_dir, variant, port, apps)
    files.initial()
    boot = workdir / "bootstrap.json"
    boot.write_text(json.dumps(bootstrap(files, admin_port), indent=1))
    envoy = await Proc.start(f"envoy-{variant}-{protocol}", [
        find_envoy(), "-c", str(boot), "--concurrency", "1", "--disable-hot-restart", "--drain-time-s", str(args.drain_time_s),
        "--drain-strategy", args.drain_strategy, "--log-level", "info"], workdir / "envoy.log")
    D = args.duration_per_phase
    phases: list[Phase] = []
    raw: dict[str, Any] | None = None
    load: LoadGen | None = None
    tag = f"{variant}/{protocol}"
    try:
        async with aiohttp.ClientSession() as http:
            deadline = time.monotonic() + 30
            while True:  # Envoy up and serving blue from the files
                if envoy.process.returncode is not None:
                    raise RuntimeError(f"Envoy exited with {envoy.process.returncode}:\n{tail(envoy.log)}")
                try:
                    async with http.get(f"http://127.0.0.1:{port}/") as r:
                        if r.status == 200 and r.headers.get("x-bluegreen-environment") == "blue":
                            break
                except aiohttp.ClientError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Envoy did not serve blue from the files within 30 s:\n{tail(envoy.log)}")
                await asyncio.sleep(0.05)
            print(f"[{tag}] Envoy :{port} serving from files in {config_dir}", file=sys.stderr, flush=True)
            stats0 = await envoy_stats(http, admin_port)
            load = await LoadGen.start("127.0.0.1", port, protocol, args.rate, args.timeout, workdir)
            warm = Phase("warm-up", None, None, load.began)
            phases.append(warm)
            await asyncio.sleep(args.warmup)

            async def finish(ph: Phase) -> None:
                ph.t_end = time.monotonic()
                if "envoy_stats_before" in ph.server:
                    ph.server["envoy_stats"] = stats_delta(ph.server.pop("envoy_stats_before"), await envoy_stats(http, admin_port))

            async def begin(name: str, old: str | None, new: str | None) -> Phase:
                await finish(phases[-1])
                now = phases[-1].t_end
                ph = Phase(name, old, new, now)
                phases.append(ph)
                print(f"[{tag}] {name}", file=sys.stderr, flush=True)
                ph.server["envoy_stats_before"] = await envoy_stats(http, admin_port)
                return ph

            async def switch(ph: Phase, blue: int, valid: bool = True) -> None:
                assert load is not None
                if valid and args.long_requests:
                    if not await launch_long(load, app_logs, args.long_requests, args.long_seconds, f"{ph.name}-long", args.timeout):
                        ph.notes.append("long requests not seen in the app logs within 5 s; switched anyway")
                before = await envoy_stats(http, admin_port, "^(" + "|".join(files.counters()).replace(".", r"\.") + ")$")
                ph.t_action = files.set_weights(blue, valid)
                ph.events.append((ph.t_action, f"{ph.name}: rename {'rds' if variant == 'rds' else 'lds'}.json"))
                which, when = await wait_counter(http, admin_port, files.counters(), before)
                ph.t_action_done = when
                ph.server["envoy_counter"] = which
                ph.server["applied_after_s"] = round(when - ph.t_action, 4) if when else None
                if when:
                    ph.events.append((when, f"{ph.name}: {(which or '').rsplit('.', 1)[-1]}"))

            ph = await begin("atomic", "blue", "green")
            await asyncio.sleep(D)
            await switch(ph, 0)
            await asyncio.sleep(D)
            ph = await begin("rollback", "green", "blue")
            await asyncio.sleep(D)
            await switch(ph, 100)
            await asyncio.sleep(D)
            ph = await begin("rejected", None, None)
            await asyncio.sleep(min(D, 2.0))
            await switch(ph, 0, valid=False)
            await asyncio.sleep(min(D, 2.0))
            await finish(ph)
            print(f"[{tag}] stopping the load", file=sys.stderr, flush=True)
            raw = await load.stop(args.timeout)
            load = None
            stats1 = await envoy_stats(http, admin_port)
    finally:
        if load is not None:
            await load.proc.stop()
        await envoy.stop()
    rejected_log = [line.strip() for line in envoy.text().splitlines() if "gRPC config for" in line or "rejected" in line.lower()]
    report = run_report(raw, phases, {"variant": variant, "protocol": protocol, "run": tag, "rate": args.rate,
                                      "envoy_stats_whole_run": stats_delta(stats0, stats1),
                                      "envoy_log_rejections": rejected_log[-5:],
                                      "envoy_downstream": {k.split(".")[-1]: stats1.get(k, 0) - stats0.get(k, 0) for k in (
                                          "http.http.downstream_cx_http1_total", "http.http.downstream_cx_http2_total",
                                          "http.http.downstream_cx_drain_close")}})
    return report


# ------------------------------------------------------------------------------------------------
# Report


def markdown(report: dict[str, Any]) -> str:
    p = report["parameters"]
    lines = [machine_line(report["machine"]) + " Envoy (--concurrency 1), both apps and the load generator share these CPUs.", "",
             f"Open loop at {p['rate']:g} req/s; {p['duration_per_phase']:g} s of steady load before and after each rename; "
             f"Envoy --drain-time-s {p['drain_time_s']} --drain-strategy {p['drain_strategy']}; {p['long_requests']} × "
             f"/slow?seconds={p['long_seconds']:g} in flight at each switch. Latency in ms from the scheduled start, p50 / p99 / max.",
             "",
             "| variant | protocol | scenario | requests | failed | before | during | after | rename → Envoy applied "
             "| % new env before → after | rename → first new env | rename → 100 % new env | old-env answers after rename (connections; opened before) |",
             "|---|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|"]
    for run in report["runs"]:
        if "error" in run:
            lines.append(f"| {run['run']} | failed: {run['error']} |||||||||||")
            continue
        for ph in run["phases"]:
            if ph["name"] == "warm-up":
                continue
            f, s = ph["figures"], ph["server"]
            lat = f["latency"]
            applied = fmt_s(s.get("applied_after_s"), "ms") if s.get("applied_after_s") is not None else "not seen"
            if s.get("envoy_counter", "") and s["envoy_counter"].endswith("update_rejected"):
                applied = f"**rejected** after {fmt_s(s.get('applied_after_s'), 'ms')}"
            first = f.get("first_new_ms")
            answered = ", ".join(f"{k} {v}" for k, v in sorted(f["answered_by"].items()))
            c = f.get("old_env_after_action_connections") or {}
            old_after = (f"{f.get('old_env_responses_after_action', '–')} ({c.get('count', 0)}; {c.get('opened_before_action', 0)})"
                         if ph["name"] != "rejected" else f"answered by: {answered}")
            share = (f"{fmt_share(f, ph['new_env'], 'before')} → {fmt_share(f, ph['new_env'], 'after')}"
                     if ph["new_env"] else "–")
            lines.append(
                f"| {run['variant']} | {run['protocol']} | {ph['name']} | {f['requests']} | {fmt_failed(f)} | {fmt_lat(lat.get('before'))} "
                f"| {fmt_lat(lat.get('during'))} | {fmt_lat(lat.get('after'))} | {applied} | {share} "
                f"| {fmt_ms(first) + ' ms' if first is not None else '–'} | {fmt_s(f.get('all_new_s'))} | {old_after} |")
    lines += ["", "Long requests in flight at each switch:", ""]
    lines += extras_table([r for r in report["runs"] if "error" not in r], "run")
    lines.append("")
    for run in report["runs"]:
        if "error" in run:
            continue
        ds, c = run["envoy_downstream"], run["client"]
        h2 = (f", GOAWAYs received {len(c['h2']['goaways'])}, requests retried because a GOAWAY marked them unprocessed "
              f"{c['goaway_retries']}") if "h2" in c else ""
        lines.append(f"{run['run']}: Envoy counted {ds.get('downstream_cx_http1_total', 0)} HTTP/1.1 and "
                     f"{ds.get('downstream_cx_http2_total', 0)} HTTP/2 downstream connections, "
                     f"{ds.get('downstream_cx_drain_close', 0)} closed by its drain{h2}; client lag (send − scheduled) p99 "
                     f"{c['client_lag_p99_ms']} ms, max {c['client_lag_max_ms']} ms; load generator CPU "
                     f"{c.get('cpu_percent_of_one_core')} % of one core.")
    lines += ["", "What this shows:"]
    lines += shows(report)
    return "\n".join(lines)


def stale_responses(run: dict[str, Any]) -> list[dict[str, Any]]:
    """After each accepted rename, until the next one: responses from the environment the config no
    longer routes to (old routes still in use), independent of the phase windows."""
    smp = run["samples"]
    switches = [(ph["t_action"], ph["new_env"], ph["name"]) for ph in run["phases"]
                if ph["name"] in ("atomic", "rollback") and ph["t_action"] is not None]
    out = []
    for k, (t, target, name) in enumerate(switches):
        until = switches[k + 1][0] if k + 1 < len(switches) else float("inf")
        stale = [i for i, sent in enumerate(smp["sent"]) if t <= sent < until and not smp["err_names"][smp["err"][i]]
                 and 200 <= smp["status"][i] < 300 and smp["env_names"][smp["env"][i]] != target]
        conns = {smp["conn"][i] for i in stale} if smp.get("conn") else set()
        out.append({"after": name, "target": target, "stale": len(stale), "connections": len(conns),
                    "last_after_s": round(max(smp["sent"][i] for i in stale) - t, 3) if stale else None,
                    "window_s": round((until if until != float("inf") else max(smp["sent"])) - t, 3)})
    return out


def shows(report: dict[str, Any]) -> list[str]:
    out = []
    runs = [r for r in report["runs"] if "error" not in r]
    applied = [ph["server"]["applied_after_s"] for r in runs for ph in r["phases"]
               if ph["name"] in ("atomic", "rollback") and ph["server"].get("applied_after_s") is not None]
    if applied:
        out.append(f"- **Propagation.** inotify plus Envoy's reload took {min(applied) * 1000:.1f}–{max(applied) * 1000:.1f} ms "
                   "from the rename to Envoy's update_success counter (polled every 5 ms, so ±5 ms) on this one Envoy.")
    for r in runs:
        r["stale_after_rename"] = stale_responses(r)
        for st in r["stale_after_rename"]:
            if st["stale"] or r["variant"] == "lds":
                last = f", the last {st['last_after_s']:.2f} s after the rename" if st["last_after_s"] is not None else ""
                out.append(f"- **{r['run']}, after the {st['after']} rename** (to {st['target']}; next {st['window_s']:.1f} s): "
                           f"{st['stale']} responses came from the environment the config no longer routes to, over "
                           f"{st['connections']} client connection(s){last}.")
    lds = [r for r in runs if r["variant"] == "lds"]
    if lds:
        out.append("- **Why (lds):** a connection keeps the filter chain, and so the routes, it was accepted with. Any "
                   "connection opened before a listener change keeps answering from the old environment while it lives: "
                   "for example the connection of a long request, which returns to the HTTP/1.1 client's pool when the "
                   "request ends and then carries new requests on the old routes.")
        drains = {r["protocol"]: r["envoy_downstream"].get("downstream_cx_drain_close", 0) for r in lds}
        goaways = {r["protocol"]: len(r["client"].get("h2", {}).get("goaways", [])) for r in lds}
        out.append("- **A listener-level change drains connections.** The new routes apply only to connections opened after "
                   "it; a connection opened before keeps the old filter chain, and so the *old* routes, until Envoy's drain "
                   "closes it (HTTP/1.1: `Connection: close` on a response; HTTP/2: GOAWAY), with a probability that grows over "
                   f"--drain-time-s ({report['parameters']['drain_time_s']} s, strategy {report['parameters']['drain_strategy']}); "
                   "whatever is still open at its end is closed. Drain closes counted by Envoy: "
                   + ", ".join(f"{k} {v}" for k, v in drains.items())
                   + "; GOAWAYs seen by the HTTP/2 client: " + ", ".join(f"{k} {v}" for k, v in goaways.items() if k == "http2") + ".")
    if any(r["variant"] == "rds" for r in runs):
        out.append("- **A route-file change (rds) does not touch connections:** the next request on every open connection uses the "
                   "new weights, as with the control plane's RDS push.")
    rejected = [ph for r in runs for ph in r["phases"] if ph["name"] == "rejected"]
    if rejected:
        seen = sum(1 for ph in rejected if (ph["server"].get("envoy_counter") or "").endswith("update_rejected"))
        out.append(f"- **Rejected file ({seen}/{len(rejected)} runs saw update_rejected):** Envoy keeps the last good config and says "
                   "so only in its own log and an `update_rejected` counter on that host. The writer of the file gets no answer; the "
                   "control plane records the NACK per proxy, exports it and never re-sends the config.")
    out.append("- **What you lose without the control plane:** no ACK per proxy, so no measured convergence (here a test "
               "harness polls one Envoy's counters; with N hosts you must ship the files to each and check each one); no "
               "make-before-break ordering between CDS and RDS files (a route naming a cluster that Envoy has not loaded yet "
               "answers 503 `NC`; not exercised here, both clusters are static); no gradual steps with Envoy-measured analysis and "
               "automatic rollback, no smoke tests through a preview entry, no drain/standby/decommission bookkeeping, no durable "
               "history. What you keep: the same data plane.")
    failed = {v: sum(ph["figures"]["failed"] for r in runs if r["variant"] == v for ph in r["phases"]) for v in ("rds", "lds")}
    out.append("- **Failed requests** (whole runs, warm-up included): " + ", ".join(
        f"{v} {n}" for v, n in failed.items() if any(r["variant"] == v for r in runs)) + ".")
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Blue/green with Envoy's file-based dynamic config, no control plane (see bench/README.md).")
    parser.add_argument("--rate", type=float, default=500.0, help="requests per second, open loop (default 500)")
    parser.add_argument("--protocol", choices=["http1", "http2", "both"], default="both")
    parser.add_argument("--variants", nargs="+", choices=["rds", "lds"], default=["rds", "lds"],
                        help="rds: switch by rewriting the route file; lds: routes inline, switch by rewriting the listener file")
    parser.add_argument("--duration-per-phase", type=float, default=10.0,
                        help="seconds of steady load before and again after each rename (default 10)")
    parser.add_argument("--drain-time-s", type=int, default=600, help="Envoy --drain-time-s (default 600, Envoy's default)")
    parser.add_argument("--drain-strategy", choices=["gradual", "immediate"], default="gradual",
                        help="Envoy --drain-strategy (default gradual, Envoy's default)")
    parser.add_argument("--long-requests", type=int, default=2, help="slow requests in flight at each switch (default 2)")
    parser.add_argument("--long-seconds", type=float, default=3.0, help="their duration (default 3)")
    parser.add_argument("--timeout", type=float, default=10.0, help="client timeout per request, s (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the first phase (default 2)")
    parser.add_argument("--bucket", type=float, default=0.25, help="chart time bucket, s (default 0.25)")
    parser.add_argument("--results-dir", default=str(BENCH / "results"))
    args = parser.parse_args(argv)
    if args.rate <= 0:
        parser.error("--rate must be > 0")
    require_h2(parser, args.protocol)
    return args


async def amain(args: argparse.Namespace, argv: list[str]) -> int:
    install_signal_handlers()
    results = Path(args.results_dir)
    results.mkdir(parents=True, exist_ok=True)
    stamp = stamp_now()
    report: dict[str, Any] = {"command": ["bench/filebased.py", *argv], "machine": machine(),
                              "parameters": {k: v for k, v in vars(args).items() if k != "results_dir"}, "runs": []}
    protocols = ["http1", "http2"] if args.protocol == "both" else [args.protocol]
    workdir = Path(tempfile.mkdtemp(prefix="bluegreen-filebased-"))
    interrupted = False
    try:
        apps: dict[str, str] = {}
        app_logs = []
        for env, version in (("blue", "v1"), ("green", "v2")):
            log = workdir / f"app-{env}.log"
            app = await Proc.start(f"app-{env}", [sys.executable, "-m", "controlplane.demoapp", "--port", "0",
                                                  "--environment", env, "--version", version], log)
            apps[env] = (await app.wait_line("listening on ")).removeprefix("listening on ").strip()
            app_logs.append(log)
        for variant in args.variants:
            for protocol in protocols:
                run_dir = workdir / f"{variant}-{protocol}"
                run_dir.mkdir()
                try:
                    report["runs"].append(await run_variant(variant, protocol, args, run_dir, apps, app_logs))
                except (RuntimeError, OSError, asyncio.TimeoutError) as exc:
                    print(f"[{variant}/{protocol}] failed: {exc}", file=sys.stderr)
                    for log in sorted(run_dir.glob("*.log")):
                        print(f"--- {log.name}:\n{tail(log, 15)}", file=sys.stderr)
                    report["runs"].append({"variant": variant, "protocol": protocol, "run": f"{variant}/{protocol}",
                                           "error": str(exc)[:500]})
    except asyncio.CancelledError:
        interrupted = True
        report["interrupted"] = True
        print("interrupted; every process started was stopped", file=sys.stderr)
    finally:
        for proc in list(Proc.live):
            await proc.stop()
        Proc.kill_all()
        shutil.rmtree(workdir, ignore_errors=True)
    out = results / f"filebased-{stamp}.json"
    out.write_text(json.dumps(report))
    done = [r for r in report["runs"] if "error" not in r]
    if done:
        chart = results / f"filebased-{stamp}.png"
        write_chart(done, chart, "file-based Envoy config", "run", args.bucket)
        print(markdown(report))
        print(f"\nraw results: {rel_path(out)}\nchart: {rel_path(chart)}")
    else:
        print(f"no run completed; raw results: {rel_path(out)}")
    if interrupted:
        return 130
    return 0 if done and len(done) == len(report["runs"]) else 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    try:
        return asyncio.run(amain(args, argv))
    except KeyboardInterrupt:
        Proc.kill_all()
        return 130


if __name__ == "__main__":
    sys.exit(main())
