"""The `bluegreen` command line.

``serve`` and ``envoy-bootstrap`` run locally; ``status``, ``traffic``, ``switch`` and
``rollback`` are thin clients of the admin API for on-call humans (``--admin URL`` or
``$BLUEGREEN_ADMIN``, token from ``--token`` or ``$BLUEGREEN_TOKEN``).

Exit codes: 0 success; 1 the API refused (the message says why); 2 bad usage or config;
3 the change was stored but not every proxy ACKed it within the wait; 4 cannot reach the API.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Sequence

from .bootstrap import render_bootstrap
from .config import load_settings
from .errors import BlueGreenError, ConfigError

DEFAULT_ADMIN_URL = "http://127.0.0.1:18001"


class ApiError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _request(args: argparse.Namespace, method: str, path: str, body: Any = None, query: str = "") -> tuple[int, Any]:
    url = args.admin.rstrip("/") + path + (f"?{query}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    token = args.token or os.environ.get("BLUEGREEN_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=args.timeout + 10) as response:
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


def cmd_status(args: argparse.Namespace) -> int:
    if args.service:
        _, view = _request(args, "GET", f"/v1/services/{args.service}")
        views = [view]
    else:
        _, listing = _request(args, "GET", "/v1/services")
        views = listing["services"]
    _, proxies = _request(args, "GET", "/v1/proxies")
    if args.json:
        print(json.dumps({"services": views, "proxies": proxies["proxies"]}, indent=2))
        return 0
    if not views:
        print("no services registered")
    for view in views:
        _print_service(view)
    print(f"{len(proxies['proxies'])} proxies connected")
    for proxy in proxies["proxies"]:
        nacks = [f"{t}: {v['last_nack']['message']}" for t, v in proxy["types"].items() if v["last_nack"]]
        state = "converged" if proxy["converged"] else "converging"
        print(f"  {proxy['node_id']} fleet={proxy['fleet']} {proxy['protocol']} {state}" + (f"  last NACK {'; '.join(nacks)}" if nacks else ""))
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


def cmd_bootstrap(args: argparse.Namespace) -> int:
    text = render_bootstrap(node_id=args.node_id, fleet=args.fleet, xds=args.xds, admin_address=args.admin_address,
                            admin_port=args.admin_port, delta=args.delta)
    if args.output:
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeOptions, check_options, serve

    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(settings=load_settings(args.config), state_path=Path(args.state), xds=args.xds, admin=args.admin)
    check_options(options)
    asyncio.run(serve(options))
    return 0


def cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox import SandboxOptions, run_sandbox

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = SandboxOptions(
        listener_port=args.port, preview_port=args.preview_port, xds=args.xds, admin=args.admin,
        envoy_admin_port=args.envoy_admin_port, state_path=Path(args.state) if args.state else None, delta=args.delta,
    )
    asyncio.run(run_sandbox(options))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bluegreen", description="Blue-green deployment control plane for Envoy.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", help="run the control plane (xDS server + admin API)")
    p.add_argument("--config", help="YAML config file (fleets, listeners, admin token)")
    p.add_argument("--state", default="bluegreen.db", help="SQLite state file (default: ./bluegreen.db)")
    p.add_argument("--xds", default="127.0.0.1:18000", help="xDS gRPC listen address (default 127.0.0.1:18000)")
    p.add_argument("--admin", default="127.0.0.1:18001", help="admin HTTP listen address (default 127.0.0.1:18001)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

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
    p.add_argument("--xds", default="127.0.0.1:18000", help="control plane xDS address (default 127.0.0.1:18000)")
    p.add_argument("--admin-port", type=int, default=9901, help="Envoy admin port (default 9901)")
    p.add_argument("--admin-address", default="127.0.0.1", help="Envoy admin bind address (default 127.0.0.1)")
    p.add_argument("--delta", action="store_true", help="use incremental (Delta) xDS instead of State of the World")
    p.add_argument("-o", "--output", help="write to this file instead of stdout")
    p.set_defaults(func=cmd_bootstrap)

    def client(name: str, help_text: str) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--admin", default=os.environ.get("BLUEGREEN_ADMIN", DEFAULT_ADMIN_URL), help="admin API URL")
        c.add_argument("--token", help="bearer token (default: $BLUEGREEN_TOKEN)")
        c.add_argument("--json", action="store_true", help="print the API's JSON")
        c.add_argument("--timeout", type=float, default=10.0, help="seconds to wait for every proxy to ACK (0: do not wait)")
        return c

    p = client("status", "show services, traffic, deployments and proxies")
    p.add_argument("service", nargs="?")
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

    p = client("rollback", "send 100%% back to the previously active environment")
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
