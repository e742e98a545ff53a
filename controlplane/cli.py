"""The `bluegreen` command line.

``serve`` and ``envoy-bootstrap`` run locally; ``status``, ``traffic``, ``switch`` and
``rollback`` are thin clients of the admin API for on-call humans (``--admin URL`` or
``$BLUEGREEN_ADMIN``; the token as :func:`resolve_token` finds it; ``--cacert FILE`` or
``$BLUEGREEN_CACERT`` to verify an admin API served over TLS with a private CA).

Exit codes: 0 success; 1 the API refused (the message says why); 2 bad usage or config;
3 the change was stored but not every proxy ACKed it within the wait; 4 cannot reach the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import logging
import os
import ssl
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from .bootstrap import render_bootstrap, render_grpc_bootstrap
from .config import load_settings
from .errors import BlueGreenError, ConfigError

DEFAULT_ADMIN_URL = "http://127.0.0.1:18001"
DEFAULT_TOKEN_FILE = Path("bluegreen.db.token")  # what `bluegreen serve` generates beside ./bluegreen.db


def resolve_token(args: argparse.Namespace) -> str | None:
    """The first of: --token, $BLUEGREEN_TOKEN, --token-file, $BLUEGREEN_TOKEN_FILE, and the token
    `bluegreen serve` (or `bluegreen sandbox`) generated beside the default state, ./bluegreen.db.token.
    A token file named explicitly must exist; the default one is only used when it does."""
    token = getattr(args, "token", None) or os.environ.get("BLUEGREEN_TOKEN")
    if token:
        return token.strip()
    named = getattr(args, "token_file", None) or os.environ.get("BLUEGREEN_TOKEN_FILE")
    path = Path(named) if named else DEFAULT_TOKEN_FILE
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if named:
            raise ConfigError(f"token file {path} does not exist") from None
        return None
    except OSError as exc:
        raise ConfigError(f"cannot read the token file {path}: {exc}") from None


def _ssl_context(args: argparse.Namespace) -> ssl.SSLContext | None:
    cacert = getattr(args, "cacert", None) or os.environ.get("BLUEGREEN_CACERT")
    if not args.admin.startswith("https:"):
        return None
    try:
        return ssl.create_default_context(cafile=cacert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the CA certificate {cacert}: {exc}") from None


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None, query: str = "") -> tuple[int, Any]:
    url = args.admin.rstrip("/") + path + (f"?{query}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = resolve_token(args)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout + 10, context=_ssl_context(args)) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", exc.reason)
        except (ValueError, AttributeError):
            message = str(exc.reason)
        raise ApiError(exc.code, message) from None


def _convergence_line(view: dict[str, Any]) -> str:
    conv = view["convergence"]
    text = f"{conv['acked']}/{conv['proxies']} proxies on the current config"
    if conv.get("seconds") is not None:
        text += f", converged in {conv['seconds'] * 1000:.1f} ms"
    elif conv.get("timed_out_after") is not None:
        text += f", NOT converged after {conv['timed_out_after']:g} s"
    for kind in ("lagging", "rejecting"):
        if conv.get(kind):
            text += f"; {kind}: {', '.join(conv[kind])}"
    return text


def _print_service(view: dict[str, Any]) -> None:
    weights = view["traffic"]["weights"]
    print(f"{view['name']}  domains={','.join(view['domains'])} prefix={view['prefix']}  xds_version={view['xds_version']}")
    for env in ("blue", "green"):
        e = view["environments"][env]
        marker = "active" if view["traffic"]["active"] == env else "idle"
        dep = e["deployment"]
        status = f"{dep['status']} ({dep['id']})" if dep else "-"
        print(f"  {env:<5} {weights[env]:>3}%  {marker:<6} version={e['version'] or '-'}  endpoints={len(e['endpoints'])}  deployment={status}")
    print(f"  {_convergence_line(view)}")


def _mutation(args: argparse.Namespace, method: str, path: str, body: Any = None) -> int:
    query = f"wait=converged&timeout={args.timeout:g}" if args.timeout > 0 else ""
    status, view = _request(args, method, path, body, query)
    if args.json:
        print(json.dumps(view, indent=2))
    else:
        _print_service(view)
    return 3 if status == 202 else 0


def _live_feed(args: argparse.Namespace) -> Any:
    """A threading.Event set whenever the admin API's live feed reports a change."""
    import threading

    from .watch import follow_events

    changed = threading.Event()
    token = resolve_token(args)
    follow_events(args.admin.rstrip("/") + "/v1/events", {"Authorization": f"Bearer {token}"} if token else {}, changed,
                  _ssl_context(args))
    changed.set()
    return changed


def _watch_status(args: argparse.Namespace) -> int:
    """Redraw the compact view: re-read on each live event, redraw each second (countdowns)."""
    import shutil
    import time as _time

    from .watch import redraw, status_frame

    changed = _live_feed(args)
    views: list[dict[str, Any]] = []
    try:
        while True:
            if changed.is_set():
                changed.clear()
                if args.service:
                    views = [_request(args, "GET", f"/v1/services/{args.service}")[1]]
                else:
                    views = _request(args, "GET", "/v1/services")[1]["services"]
            redraw(status_frame(views, _time.time(), shutil.get_terminal_size().columns) + [f"(live; {_time.strftime('%H:%M:%S')}; Ctrl-C to quit)"], sys.stdout.write)
            sys.stdout.flush()
            changed.wait(1.0)
    except KeyboardInterrupt:
        return 0


def cmd_status(args: argparse.Namespace) -> int:
    if getattr(args, "watch", False):
        return _watch_status(args)
    if args.service:
        _, view = _request(args, "GET", f"/v1/services/{args.service}")
        views = [view]
    else:
        _, listing = _request(args, "GET", "/v1/services")
        views = listing["services"]
    _, proxies = _request(args, "GET", "/v1/proxies")
    _, cluster = _request(args, "GET", "/v1/cluster")
    if args.json:
        print(json.dumps({"services": views, "proxies": proxies["proxies"], "cluster": cluster}, indent=2))
        return 0
    replicas = cluster["replicas"]
    print(f"leader {cluster['leader'] or '(none: election under way)'}; {len(replicas)} replica{'s' if len(replicas) != 1 else ''}")
    for r in replicas:
        print(f"  {r['id']}{' (leader)' if r['id'] == cluster['leader'] else ''} xds={r['xds']} admin={r['admin']} "
              f"proxies={r['connected_proxies']} revision={r['store_revision']}")
    if not views:
        print("no services registered")
    for view in views:
        _print_service(view)
        _, listing = _request(args, "GET", f"/v1/services/{view['name']}/deployments")
        for d in listing["deployments"][:3]:
            if d.get("spec") or d["status"] in ("draining", "standby"):
                print(f"  deployment {_deployment_line(d)}")
    print(f"{len(proxies['proxies'])} proxies connected")
    for proxy in proxies["proxies"]:
        nacks = [f"{t}: {v['last_nack']['message']}" for t, v in proxy["types"].items() if v["last_nack"]]
        state = "converged" if proxy["converged"] else "converging"
        print(f"  {proxy['node_id']} fleet={proxy['fleet']} {proxy['protocol']} {state}" +
              (f" replica={proxy['replica']}" if len(replicas) > 1 else "") + (f"  last NACK {'; '.join(nacks)}" if nacks else ""))
    return 0


def cmd_traffic(args: argparse.Namespace) -> int:
    if (args.green is None) == (args.blue is None):
        raise ConfigError("give exactly one of --green N or --blue N (the other gets 100 - N)")
    flag, value = ("--green", args.green) if args.green is not None else ("--blue", args.blue)
    if not 0 <= value <= 100:
        raise ConfigError(f"{flag} must be between 0 and 100, got {value}")
    green = args.green if args.green is not None else 100 - args.blue
    return _mutation(args, "PUT", f"/v1/services/{args.service}/traffic", {"weights": {"blue": 100 - green, "green": green}})


def cmd_switch(args: argparse.Namespace) -> int:
    body = {"to": args.to} if args.to else {}
    return _mutation(args, "POST", f"/v1/services/{args.service}/switch", body)


def cmd_rollback(args: argparse.Namespace) -> int:
    return _mutation(args, "POST", f"/v1/services/{args.service}/rollback")


def _scaling_text(d: dict[str, Any], steps: list[int]) -> str:
    """`` SCALING: needs capacity N for step K/L (P%)``: what the capacity guard waits for
    (docs/capacity.md), computed as the control plane does from the record."""
    step = d.get("scaling_step")
    if step is None or not 0 <= step < len(steps):
        return " SCALING"
    headroom = ((d.get("spec") or {}).get("scale") or {}).get("headroom_percent", 0)
    baseline = d.get("baseline_capacity") or 0
    needed = math.ceil(round(baseline * steps[step] * (100 + headroom), 6) / 10_000)
    return f" SCALING: needs capacity {needed} for step {step + 1}/{len(steps)} ({steps[step]}%)"


def _deployment_line(d: dict[str, Any]) -> str:
    steps = (d.get("spec") or {}).get("strategy", {}).get("steps", [])
    text = f"{d['id']} {d['version']} -> {d['environment']}: {d['status']}"
    if d.get("step", -1) >= 0 and steps:
        text += f" at step {d['step'] + 1}/{len(steps)} ({steps[d['step']]}%)"
    if d.get("baking"):
        text += " baking"
    if d.get("paused_remaining") is not None:
        text += f" PAUSED ({d['paused_remaining']:.0f}s left)"
    if d.get("awaiting_promote"):
        text += " waiting for promote"
    if d.get("phase") == "scaling":
        text += _scaling_text(d, steps)
    if d.get("deadline"):
        text += f" until {d['deadline'][11:19]}Z"
    analysis = d.get("analysis") or {}
    if analysis:
        rate = analysis.get("error_rate")
        p99 = analysis.get("p99_ms")
        text += f"  [{analysis.get('requests', 0)} req, errors {rate if rate is not None else '-'}, p99 {p99 if p99 is not None else '-'} ms, {analysis.get('verdict')}]"
    if d.get("reason"):
        text += f"  reason: {d['reason']}"
    return text


_SETTLED = {"active", "failed", "rolled_back"}


def cmd_deploy(args: argparse.Namespace) -> int:
    import time as _time

    body: dict[str, Any] = {"version": args.version,
                            # Left out for an environment an endpoint source owns: the API takes its endpoints
                            # from the source and refuses a body that names some (docs/endpoint-sources.md).
                            **({"endpoints": args.endpoint} if args.endpoint else {}),
                            "strategy": {"steps": [int(x) for x in args.steps.split(",")], "step_seconds": args.step_seconds,
                                         "bake_seconds": args.bake_seconds, "auto_promote": not args.manual_promote}}
    if args.smoke_path:
        body["smoke"] = {"checks": [{"path": p} for p in args.smoke_path]}
    if args.max_error_rate is not None or args.max_p99_ms is not None:
        body["analysis"] = {k: v for k, v in (("max_error_rate", args.max_error_rate), ("max_p99_ms", args.max_p99_ms)) if v is not None}
    _, created = _request(args, "POST", f"/v1/services/{args.service}/deployments", body)
    print(f"deployment {created['id']} accepted")
    if not args.watch:
        return 0
    if sys.stdout.isatty():
        return _watch_deployment(args, created["id"])
    last = ""
    while True:
        _, d = _request(args, "GET", f"/v1/deployments/{created['id']}")
        line = _deployment_line(d)
        if line != last:
            print(line, flush=True)
            last = line
        if d["status"] in _SETTLED and not d.get("baking"):
            return 0 if d["status"] == "active" else 1
        _time.sleep(0.5)  # a person watching; the API has no push channel


def _watch_deployment(args: argparse.Namespace, deployment_id: str) -> int:
    """On a terminal: a progress bar per step, redrawn until the deployment settles."""
    import time as _time

    from .watch import deployment_frame, redraw

    changed = _live_feed(args)
    d: dict[str, Any] = {}
    while True:
        if changed.is_set():
            changed.clear()
            _, d = _request(args, "GET", f"/v1/deployments/{deployment_id}")
        redraw(deployment_frame(d, _time.time()), sys.stdout.write)
        sys.stdout.flush()
        if d["status"] in _SETTLED and not d.get("baking"):
            return 0 if d["status"] == "active" else 1
        changed.wait(1.0)


def cmd_deployment_action(args: argparse.Namespace) -> int:
    query = "full=true" if getattr(args, "full", False) else ""
    _, d = _request(args, "POST", f"/v1/deployments/{args.id}/{args.action}", None, query)
    print(json.dumps(d, indent=2) if args.json else _deployment_line(d))
    return 0


def _release_lines(r: dict[str, Any]) -> list[str]:
    text = f"{r['id']}: {r['status']}" + (f" ({r['phase']})" if r["phase"] != r["status"] else "")
    lines = [text + (f"  reason: {r['reason']}" if r.get("reason") else "")]
    steps = (r.get("spec") or {}).get("strategy", {}).get("steps", [])
    for m in r["members"]:
        where = f" step {m['step'] + 1}/{len(steps)}" if m["step"] >= 0 and steps else ""
        lines.append(f"  {m['service']:<16} {m['deployment']:<20} {m['version']} -> {m['environment']}: {m['status']}{where}"
                     f"  blue {m['weights']['blue']}% / green {m['weights']['green']}%")
    return lines


def _release_members(specs: list[str]) -> dict[str, Any]:
    """``NAME=VERSION[@IP:PORT[,IP:PORT...]]`` per member; without endpoints for a member whose
    idle environment an endpoint source owns (the API takes them from the source)."""
    members: dict[str, Any] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        version, at, endpoints = rest.partition("@")
        if not sep or not name or not version or (at and not endpoints):
            raise ConfigError(f"--member {spec!r}: expected NAME=VERSION[@IP:PORT[,IP:PORT...]]")
        members[name] = {"version": version, **({"endpoints": endpoints.split(",")} if at else {})}
    return members


def cmd_release(args: argparse.Namespace) -> int:
    """bluegreen release create|status|list|promote|pause|resume|rollback|abort."""
    import time as _time

    if args.release_command == "list":
        _, listing = _request(args, "GET", "/v1/releases")
        if args.json:
            print(json.dumps(listing, indent=2))
        for r in listing["releases"] if not args.json else []:
            print(_release_lines(r)[0])
        return 0
    if args.release_command == "create":
        if args.file:
            from pathlib import Path

            text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text()
            body = json.loads(text)
        else:
            if not args.member:
                raise ConfigError("release create needs --member NAME=VERSION[@IP:PORT] (repeat) or --file")
            body = {"services": _release_members(args.member),
                    "strategy": {"steps": [int(x) for x in args.steps.split(",")], "step_seconds": args.step_seconds,
                                 "bake_seconds": args.bake_seconds, "auto_promote": not args.manual_promote}}
            if args.max_error_rate is not None or args.max_p99_ms is not None:
                body["analysis"] = {k: v for k, v in (("max_error_rate", args.max_error_rate), ("max_p99_ms", args.max_p99_ms)) if v is not None}
        _, created = _request(args, "POST", "/v1/releases", body)
        print(f"release {created['id']} accepted ({', '.join(created['release']['services'])})")
        release_id, watch = created["id"], args.watch
    elif args.release_command == "status":
        release_id, watch = args.id, args.watch
    else:
        query = "full=true" if getattr(args, "full", False) else ""
        _, r = _request(args, "POST", f"/v1/releases/{args.id}/{args.release_command}", None, query)
        print(json.dumps(r, indent=2) if args.json else "\n".join(_release_lines(r)))
        return 0
    last: list[str] = []
    while True:
        _, r = _request(args, "GET", f"/v1/releases/{release_id}")
        lines = _release_lines(r)
        if args.json and not watch:
            print(json.dumps(r, indent=2))
        elif lines != last:
            print("\n".join(lines), flush=True)
            last = lines
        if not watch or r["status"] != "in_progress":
            return 0 if r["status"] in ("in_progress", "complete") else 1
        _time.sleep(0.5)  # a person watching; the API has no push channel


def cmd_migrate(args: argparse.Namespace) -> int:
    """lint: 0 clean, 1 errors found. expand/contract: 0 applied (or nothing to do), 1 refused
    (contract while an old version can still take traffic) or failed; 2 malformed set."""
    from .errors import ContractBlocked, MigrationError
    from .migrations.files import Phase, load_migration_set

    try:
        migration_set = load_migration_set(args.directory)
    except MigrationError as exc:
        raise ConfigError(str(exc)) from None
    if args.migrate_command == "lint":
        from .migrations.lint import format_text, lint, lint_exit_code

        report = lint(migration_set, locking=args.locking)
        print(json.dumps(report.to_dict(), indent=2) if args.json else format_text(report))
        return lint_exit_code(report)
    from .migrations.apply import apply_phase, redact

    try:
        if args.migrate_command == "contract":
            from .migrations.gate import contract_blockers, refusal
            from .model import deployment_from_dict
            from .deploy.driver import expanded_by_deployment

            _, listing = _request(args, "GET", f"/v1/services/{args.service}/deployments")
            records = [deployment_from_dict(_stored_times(d)) for d in listing["deployments"]]
            blockers = contract_blockers(records, expanded_by_deployment(migration_set, args.database))
            if blockers:
                raise ContractBlocked(refusal(args.service, blockers))
            report = apply_phase(migration_set, Phase.CONTRACT, args.database)
        else:
            report = apply_phase(migration_set, Phase.EXPAND, args.database, deployment_id=args.deployment)
    except MigrationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"{args.migrate_command} on {redact(args.database)}: applied {len(report.applied)}"
          + (f" ({', '.join(report.applied)})" if report.applied else "") + f", already applied {len(report.skipped)}")
    return 0


def _stored_times(view: dict[str, Any]) -> dict[str, Any]:
    """The API shows times as ISO strings; the model stores epoch seconds."""
    from datetime import datetime

    out = dict(view)
    for key in ("deployed_at", "activated_at", "updated_at", "deadline"):
        if isinstance(out.get(key), str):
            out[key] = datetime.fromisoformat(out[key]).timestamp()
    out["history"] = [dict(e, at=datetime.fromisoformat(e["at"]).timestamp()) for e in out.get("history", [])]
    return out


def cmd_bootstrap(args: argparse.Namespace) -> int:
    text = render_bootstrap(node_id=args.node_id, fleet=args.fleet, xds=args.xds or ["127.0.0.1:18000"], admin_address=args.admin_address,
                            admin_port=args.admin_port, delta=args.delta, stats_flush_seconds=args.stats_flush,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, ca=args.ca)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_grpc_bootstrap(args: argparse.Namespace) -> int:
    text = render_grpc_bootstrap(node_id=args.node_id, fleet=args.fleet, xds=args.xds, tls_cert=args.tls_cert,
                                 tls_key=args.tls_key, ca=args.ca)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, check_options, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from .store.url import parse_store_url

    store = parse_store_url(args.store) if args.store else None
    if store is not None and hasattr(store, "path") and args.state is not None:
        raise ConfigError("give --store sqlite:///PATH or --state PATH, not both (they say the same)")
    # With --store etcd://, --state only says where a generated admin token lives (beside it).
    state = Path(args.state or "bluegreen.db")
    if store is not None and hasattr(store, "path"):
        state = store.path  # the generated token goes beside the SQLite file, as with --state
    options = ServeOptions(settings=load_settings(args.config), state_path=state, xds=args.xds, admin=args.admin,
                           store=store, replica_id=args.replica_id, lease_ttl=args.lease_ttl,
                           xds_workers=args.xds_workers)
    check_options(options)
    asyncio.run(serve(options))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import SandboxOptions, run_sandbox

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = SandboxOptions(
        listener_port=args.port, preview_port=args.preview_port, xds=args.xds, admin=args.admin,
        envoy_admin_port=args.envoy_admin_port, state_path=Path(args.state) if args.state else None, delta=args.delta,
        # Without --state the sandbox's token goes where the CLI looks by default, so
        # `bluegreen traffic demo --green 10` in another terminal needs no token handling.
        token_path=None if args.state else DEFAULT_TOKEN_FILE,
    )
    asyncio.run(run_sandbox(options))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import DemoOptions, run_demo
    from .sandbox import SandboxOptions

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    steps = tuple(int(x) for x in args.steps.split(","))
    options = DemoOptions(
        rate=args.rate, steps=steps, step_seconds=args.step_seconds, drain_seconds=args.drain_seconds, chart=Path(args.chart),
        sandbox=SandboxOptions(listener_port=args.port, preview_port=args.preview_port, xds=args.xds, admin=args.admin,
                               envoy_admin_port=args.envoy_admin_port),
    )
    try:
        return asyncio.run(run_demo(options))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("demo interrupted; everything it started is stopped", file=sys.stderr)
        return 130


def _auth_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token", help="bearer token (default: $BLUEGREEN_TOKEN, then the token file)")
    parser.add_argument("--token-file", help="file holding the bearer token (default: $BLUEGREEN_TOKEN_FILE, then ./bluegreen.db.token)")
    parser.add_argument("--cacert", help="CA certificate to verify an https:// admin API (default: $BLUEGREEN_CACERT, then the system's)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bluegreen", description="Blue-green deployment control plane for Envoy.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the control plane (xDS server + admin API)")
    p.add_argument("--config", help="YAML config file (fleets, listeners, admin token)")
    p.add_argument("--state", help="SQLite state file (default: ./bluegreen.db); same as --store sqlite:///PATH")
    p.add_argument("--store", help="state store URL: sqlite:///PATH, or etcd://HOST:PORT[,HOST:PORT...][/prefix] "
                                   "for several replicas (default: --state)")
    p.add_argument("--replica-id", help="this replica's name in /v1/cluster and the leader election "
                                        "(default: <hostname>:<admin port>)")
    p.add_argument("--lease-ttl", type=int, default=5,
                   help="etcd lease TTL in seconds: a dead leader is replaced, and a dead replica's proxies "
                        "leave the fleet-wide views, within it (default 5)")
    p.add_argument("--xds", default="127.0.0.1:18000", help="xDS gRPC listen address (default 127.0.0.1:18000)")
    p.add_argument("--xds-workers", type=int, default=None, metavar="N",
                   help="processes serving xDS on that port (SO_REUSEPORT); 1 serves it in the main process "
                        "(default: the config's xds.workers, else one per core)")
    p.add_argument("--admin", default="127.0.0.1:18001", help="admin HTTP listen address (default 127.0.0.1:18001)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("demo", help="a one-minute scripted blue-green release under load, with a chart")
    p.add_argument("--rate", type=float, default=100.0, help="requests per second, open loop (default 100)")
    p.add_argument("--steps", default="10,50,100", help="weights of the stepped deployment (default 10,50,100)")
    p.add_argument("--step-seconds", type=float, default=5.0, help="seconds per step (default 5)")
    p.add_argument("--drain-seconds", type=int, default=5, help="drain of the old environment (default 5)")
    p.add_argument("--chart", default="bluegreen-demo.png", help="where to write the PNG chart")
    p.add_argument("--port", type=int, default=10000)
    p.add_argument("--preview-port", type=int, default=10001)
    p.add_argument("--xds", default="127.0.0.1:18000")
    p.add_argument("--admin", default="127.0.0.1:18001")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("sandbox", help="run a control plane, a real Envoy and blue/green demo apps locally")
    p.add_argument("--port", type=int, default=10000, help="Envoy listener port (default 10000)")
    p.add_argument("--preview-port", type=int, default=10001, help="Envoy preview listener port (default 10001)")
    p.add_argument("--xds", default="127.0.0.1:18000")
    p.add_argument("--admin", default="127.0.0.1:18001")
    p.add_argument("--envoy-admin-port", type=int, default=9901)
    p.add_argument("--state", help="SQLite state file (default: a temporary one)")
    p.add_argument("--delta", action="store_true", help="Envoy uses Delta xDS")
    p.set_defaults(func=cmd_sandbox)

    p = sub.add_parser("envoy-bootstrap", help="print an Envoy bootstrap that connects to this control plane")
    p.add_argument("--node-id", required=True)
    p.add_argument("--fleet", default="default", help="fleet name, sent as node.cluster (default: default)")
    p.add_argument("--xds", action="append",
                   help="control plane xDS address; repeat it for every replica (Envoy reconnects to another "
                        "when its replica dies; default 127.0.0.1:18000)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    p.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin bind address (default 127.0.0.1)")
    p.add_argument("--delta", action="store_true", help="use incremental (Delta) xDS instead of State of the World")
    p.add_argument("--stats-flush", type=float, default=1.0,
                   help="seconds between Envoy's stats pushes to the control plane (analysis data; default 1)")
    p.add_argument("--tls-cert", help="PEM certificate Envoy presents to the control plane (mTLS; with --tls-key, --ca)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--ca", help="PEM CA that signed the control plane's certificate: turns on TLS for xDS")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_bootstrap)

    p = sub.add_parser("grpc-bootstrap", help="print the xDS bootstrap (JSON, for GRPC_XDS_BOOTSTRAP) of a proxyless gRPC client")
    p.add_argument("--node-id", required=True)
    p.add_argument("--fleet", default="default", help="fleet name, sent as node.cluster (default: default)")
    p.add_argument("--xds", default="127.0.0.1:18000", help="control plane xDS address (default 127.0.0.1:18000)")
    p.add_argument("--tls-cert", help="PEM certificate the client presents to the control plane (mTLS; with --tls-key, --ca)")
    p.add_argument("--tls-key", help="PEM private key of --tls-cert")
    p.add_argument("--ca", help="PEM CA that signed the control plane's certificate: turns on TLS for xDS")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_grpc_bootstrap)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--admin", default=os.environ.get("BLUEGREEN_ADMIN", DEFAULT_ADMIN_URL), help="admin API URL")
        _auth_arguments(c)
        c.add_argument("--json", action="store_true", help="print the API's JSON")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for every proxy to ACK (0: do not wait)")
        return c

    p = client("status", "show services, traffic, deployments and proxies")
    p.add_argument("service", nargs="?")
    p.add_argument("--watch", action="store_true", help="redraw a compact live view (weights, phase, countdown, convergence) until Ctrl-C")
    p.set_defaults(func=cmd_status)

    p = client("traffic", "set the traffic split of a service")
    p.add_argument("service")
    p.add_argument("--green", type=int, help="percent to green (blue gets the rest)")
    p.add_argument("--blue", type=int, help="percent to blue (green gets the rest)")
    p.set_defaults(func=cmd_traffic)

    p = client("switch", "send 100%% of traffic to the idle environment (atomic)")
    p.add_argument("service")
    p.add_argument("--to", choices=["blue", "green"])
    p.set_defaults(func=cmd_switch)

    p = client("deploy", "deploy a version to the idle environment: smoke tests, shift, analysis, drain, standby")
    p.add_argument("service")
    p.add_argument("--version", required=True)
    p.add_argument("--endpoint", action="append",
                   help="IP:PORT of the new version (repeat); leave out when an endpoint source owns the idle environment")
    p.add_argument("--steps", default="100", help="comma-separated weights ending at 100, e.g. 10,50,100 (default 100: atomic)")
    p.add_argument("--step-seconds", type=float, default=30.0)
    p.add_argument("--bake-seconds", type=float, default=60.0)
    p.add_argument("--manual-promote", action="store_true", help="hold before 100%% until `bluegreen promote ID`")
    p.add_argument("--smoke-path", action="append", help="HTTP GET smoke check through the preview entry, expecting 200 (repeat)")
    p.add_argument("--max-error-rate", type=float, help="enable analysis: roll back above this 5xx share")
    p.add_argument("--max-p99-ms", type=float, help="enable analysis: roll back above this p99 latency")
    p.add_argument("--watch", action="store_true",
                   help="show progress until the deployment settles (a progress bar per step on a terminal, a line per change otherwise)")
    p.set_defaults(func=cmd_deploy)

    for action, text in (("promote", "advance a deployment to its next step (--full: to 100%%)"), ("pause", "pause a deployment's timer"),
                         ("resume", "resume a paused deployment"), ("abort", "abort a deployment (rolls back if it took traffic)"),
                         ("decommission", "end the standby of the environment a deployment replaced")):
        p = client(action, text)
        p.add_argument("id", help="deployment id, e.g. shop-3")
        if action == "promote":
            p.add_argument("--full", action="store_true")
        p.set_defaults(func=cmd_deployment_action, action=action)

    p = sub.add_parser("release", help="release several services together, in lockstep (docs/releases.md)")
    rsub = p.add_subparsers(dest="release_command", required=True)

    def release_client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = rsub.add_parser(name, help=help_text)
        c.add_argument("--admin", default=os.environ.get("BLUEGREEN_ADMIN", DEFAULT_ADMIN_URL), help="admin API URL")
        _auth_arguments(c)
        c.add_argument("--json", action="store_true", help="print the API's JSON")
        c.add_argument("--timeout", type=float, default=10.0)
        c.set_defaults(func=cmd_release)
        return c

    r = release_client("create", "start a release: one deployment per member, shifted, judged and rolled back together")
    r.add_argument("--member", action="append", help="NAME=VERSION@IP:PORT[,IP:PORT...] (repeat, at least two); "
                   "NAME=VERSION when an endpoint source owns the member's idle environment")
    r.add_argument("--file", help="the POST /v1/releases body as JSON ('-': stdin) instead of --member and the options below")
    r.add_argument("--steps", default="100", help="comma-separated weights ending at 100, e.g. 10,50,100 (default 100: atomic)")
    r.add_argument("--step-seconds", type=float, default=30.0)
    r.add_argument("--bake-seconds", type=float, default=60.0)
    r.add_argument("--manual-promote", action="store_true", help="hold before 100%% until `bluegreen release promote ID`")
    r.add_argument("--max-error-rate", type=float, help="enable analysis: roll every member back when one is above this 5xx share")
    r.add_argument("--max-p99-ms", type=float, help="enable analysis: roll every member back when one is above this p99 latency")
    r.add_argument("--watch", action="store_true", help="print the release's state on every change until it settles")
    r = release_client("status", "show a release and its members")
    r.add_argument("id", help="release id, e.g. release-3")
    r.add_argument("--watch", action="store_true", help="print the release's state on every change until it settles")
    release_client("list", "list releases, newest first")
    for action, text in (("promote", "advance every member to its next step (--full: to 100%%)"), ("pause", "pause the release's timers"),
                         ("resume", "resume a paused release"), ("rollback", "roll every member back, in one change"),
                         ("abort", "abort the release (rolls every member back if it took traffic)")):
        r = release_client(action, text)
        r.add_argument("id", help="release id, e.g. release-3")
        if action == "promote":
            r.add_argument("--full", action="store_true")

    p = sub.add_parser("migrate", help="expand/contract database migrations: lint, expand, contract")
    msub = p.add_subparsers(dest="migrate_command", required=True)
    m = msub.add_parser("lint", help="lint a migration set with Squawk; expand files must not break the old version")
    m.add_argument("directory")
    m.add_argument("--locking", choices=["warning", "error"], default="warning", help="severity of locking hazards")
    m.add_argument("--json", action="store_true")
    m.set_defaults(func=cmd_migrate)
    m = msub.add_parser("expand", help="apply the expand files (idempotent, serialized by an advisory lock)")
    m.add_argument("directory")
    m.add_argument("--database", required=True, help="postgresql:// URL")
    m.add_argument("--deployment", help="deployment id to record with the files")
    m.set_defaults(func=cmd_migrate)
    m = msub.add_parser("contract", help="apply the contract files, refused while an old version can take traffic")
    m.add_argument("directory")
    m.add_argument("--database", required=True, help="postgresql:// URL")
    m.add_argument("--service", required=True, help="the service whose deployments decide whether contract may run")
    m.add_argument("--admin", default=os.environ.get("BLUEGREEN_ADMIN", DEFAULT_ADMIN_URL), help="admin API URL")
    _auth_arguments(m)
    m.add_argument("--timeout", type=float, default=10.0)
    m.set_defaults(func=cmd_migrate)

    p = client("rollback", "send 100%% back to the previously active environment (rolls back a deployment in progress)")
    p.add_argument("service")
    p.set_defaults(func=cmd_rollback)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ApiError as exc:
        print(f"error ({exc.status}): {exc}", file=sys.stderr)
        return 1
    except BlueGreenError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        print(f"error: cannot reach the admin API at {args.admin}: {exc}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
