"""Demo upstream application: one environment (blue or green) of a service.

Used by the integration tests and the demo as the thing Envoy routes to.

Contract:

* ``GET /healthz`` -> 200 ``ok`` (text); never subject to error injection.
* ``/slow?seconds=S`` (any method) -> prints ``slow request started: ...`` to stdout, waits
  ``min(S, 120)`` seconds, then answers like the catch-all; this simulates a long in-flight request
  for drain / graceful-shutdown tests.
* Any other method and path -> 200 with JSON ``{"environment", "version", "method", "path"}``.
* Every response except ``/healthz`` carries ``x-bluegreen-environment`` and ``x-bluegreen-version``;
  with ``--error-rate R`` a share ``R`` of those responses is a 500 (same headers, JSON body with
  an ``"error"`` key).
* After binding, exactly one line ``listening on HOST:PORT`` (the real bound port, so ``--port 0``
  works) is printed to stdout and flushed.
* SIGTERM / SIGINT: stop accepting connections, close idle keep-alive connections, let in-flight
  requests finish, and exit within about ``--shutdown-timeout`` seconds (requests still running
  then are cancelled).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys

from aiohttp import web

ENVIRONMENT_HEADER = "x-bluegreen-environment"
VERSION_HEADER = "x-bluegreen-version"
MAX_SLOW_SECONDS = 120.0
PREVIEW_HEADER = "x-bluegreen-preview"


def build_app(environment: str, version: str, error_rate: float = 0.0) -> web.Application:
    """Build the application; ``error_rate`` (0..1) is the share of non-healthz requests answered 500."""
    if not 0.0 <= error_rate <= 1.0:
        raise ValueError(f"error_rate must be within [0, 1], got {error_rate}")
    identity = {ENVIRONMENT_HEADER: environment, VERSION_HEADER: version}
    # Requests by entry: Envoy marks what came through the preview entry with the preview
    # header, so tests can prove an unverified version never saw production traffic.
    seen = {"preview": 0, "production": 0}

    def respond(request: web.Request) -> web.Response:
        seen["preview" if request.headers.get(PREVIEW_HEADER) == "1" else "production"] += 1
        body: dict[str, object] = {
            "environment": environment,
            "version": version,
            "method": request.method,
            "path": request.path,
        }
        # `random.random() < 0.0` is never true and `< 1.0` always is, so 0 and 1 are exact.
        if random.random() < error_rate:
            body["error"] = "injected failure"
            return web.json_response(body, status=500, headers=identity)
        return web.json_response(body, headers=identity)

    async def healthz(request: web.Request) -> web.Response:
        seen["preview" if request.headers.get(PREVIEW_HEADER) == "1" else "production"] += 1
        return web.Response(text="ok")

    async def requests_seen(request: web.Request) -> web.Response:
        return web.json_response(seen)

    async def slow(request: web.Request) -> web.Response:
        try:
            seconds = float(request.query.get("seconds", "1"))
        except ValueError:
            raise web.HTTPBadRequest(text="seconds must be a number") from None
        if seconds != seconds:  # NaN: asyncio.sleep would raise
            raise web.HTTPBadRequest(text="seconds must be a number")
        seconds = min(max(seconds, 0.0), MAX_SLOW_SECONDS)
        # Logged so tests can await "the request is in flight" instead of sleeping.
        print(f"slow request started: {request.method} {request.path_qs} ({seconds:g}s)", flush=True)
        await asyncio.sleep(seconds)
        return respond(request)

    async def catch_all(request: web.Request) -> web.Response:
        return respond(request)

    app = web.Application()
    # Order matters: the dispatcher takes the first resource whose path and method match, so the
    # specific routes go first. A non-GET /healthz falls through to the catch-all.
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/_bluegreen/requests", requests_seen)
    app.router.add_route("*", "/slow", slow)
    app.router.add_route("*", "/{tail:.*}", catch_all)
    return app


async def serve(app: web.Application, host: str, port: int, shutdown_timeout: float) -> None:
    """Serve ``app`` until SIGTERM/SIGINT, then shut down gracefully (see module docstring)."""
    # access_log=None: the tests push thousands of requests through; per-request lines would only
    # bloat the log files the harness keeps.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=shutdown_timeout)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound_port = runner.addresses[0][1]
        print(f"listening on {host}:{bound_port}", flush=True)

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        # cleanup() closes the listening socket, then idle keep-alive connections, then waits up to
        # shutdown_timeout for in-flight handlers. aiohttp 3.14 then waits up to shutdown_timeout
        # *again* before cancelling a handler that is still running (worst case ~2x), so the outer
        # wait_for enforces the documented bound; whatever is left is cancelled by asyncio.run.
        try:
            await asyncio.wait_for(runner.cleanup(), timeout=shutdown_timeout)
        except TimeoutError:
            print(f"shutdown timeout ({shutdown_timeout}s) reached; dropping in-flight requests", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m controlplane.demoapp", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080, help="0 picks a free port (see the 'listening on' line)")
    parser.add_argument("--environment", required=True, help="e.g. blue or green")
    parser.add_argument("--version", required=True, help="application version, e.g. v1")
    parser.add_argument("--error-rate", type=float, default=0.0, help="share of requests answered 500 (0..1)")
    parser.add_argument("--shutdown-timeout", type=float, default=30.0, help="seconds to let in-flight requests finish")
    args = parser.parse_args(argv)
    if not 0.0 <= args.error_rate <= 1.0:
        parser.error("--error-rate must be within [0, 1]")

    app = build_app(args.environment, args.version, args.error_rate)
    try:
        asyncio.run(serve(app, args.host, args.port, args.shutdown_timeout))
    except KeyboardInterrupt:  # SIGINT before the signal handlers were installed
        sys.exit(130)


if __name__ == "__main__":
    main()
