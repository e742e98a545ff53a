"""Smoke tests of a new version, sent through the proxies' preview entry, and webhooks.

HTTP checks go to the fleet's preview listener (every request there reaches the idle
environment), or, for a fleet without one, to its production listener with the header
``x-bluegreen-preview: 1``. So a passing check proves the path users will take works: Envoy,
routes, clusters and endpoints, not only the application.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from dataclasses import dataclass
from typing import Any, Mapping

import aiohttp

from .spec import HttpCheck, Smoke, Webhook
from ..model import Fleet, Service
from ..resources import PREVIEW_HEADER, PREVIEW_VALUE


@dataclass(frozen=True)
class PreviewTarget:
    base_url: str
    headers: tuple[tuple[str, str], ...]


def _connect_host(address: str) -> str:
    if address == "0.0.0.0":
        return "127.0.0.1"
    if address == "::":
        return "::1"
    return address


def _host_header(service: Service) -> str | None:
    """A Host that the service's virtual hosts match, for checks through a shared listener."""
    for domain in service.domains:
        if domain == "*":
            return None
        if domain.startswith("*"):
            return "preview" + domain[1:]
        if domain.endswith("*"):
            return domain[:-1] + "preview"
        return domain
    return None


def preview_target(fleet: Fleet, service: Service) -> PreviewTarget:
    headers: list[tuple[str, str]] = []
    host = _host_header(service)
    if host is not None:
        headers.append(("Host", host))
    for listener in fleet.listeners:
        if listener.preview_port is not None:
            address = _connect_host(listener.address)
            netloc = f"[{address}]" if ":" in address else address
            return PreviewTarget(f"http://{netloc}:{listener.preview_port}", tuple(headers))
    listener = fleet.listeners[0]
    address = _connect_host(listener.address)
    netloc = f"[{address}]" if ":" in address else address
    return PreviewTarget(f"http://{netloc}:{listener.port}", tuple(headers + [(PREVIEW_HEADER, PREVIEW_VALUE)]))


async def _check(session: aiohttp.ClientSession, target: PreviewTarget, check: HttpCheck) -> str | None:
    """None if the check passes (within its retries), else why it failed."""
    url = target.base_url + check.path
    headers = dict(target.headers)
    headers.update(dict(check.headers))
    problem = "not run"
    for attempt in range(check.retries + 1):
        if attempt:
            await asyncio.sleep(min(0.2 * 2 ** (attempt - 1), 2.0))  # back off between retries of a real request
        try:
            timeout = aiohttp.ClientTimeout(total=check.timeout_seconds)
            # No redirects: a 3xx is the preview's answer (expect_status may be one); following
            # it could leave the preview entry, or reach an address no allowlist admits.
            async with session.request(check.method, url, headers=headers, timeout=timeout, allow_redirects=False) as response:
                body = await response.text(errors="replace")
                if response.status != check.expect_status:
                    problem = f"{check.method} {check.path}: status {response.status}, expected {check.expect_status}"
                elif check.body_contains is not None and check.body_contains not in body:
                    problem = f"{check.method} {check.path}: body does not contain {check.body_contains!r}"
                else:
                    return None
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            problem = f"{check.method} {check.path}: {type(exc).__name__}: {exc}"
    return f"{problem} (after {check.retries + 1} attempts)"


# Smoke commands get this environment plus the BLUEGREEN_* variables describing the target, not
# the control plane's own (which may hold credentials): documented in docs/security.md.
SMOKE_BASE_ENV: Mapping[str, str] = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}

#: Seconds between SIGTERM and SIGKILL when a smoke command's process group is stopped.
KILL_GRACE_SECONDS = 2.0


async def _command(argv: tuple[str, ...], env: Mapping[str, str], timeout: float) -> str | None:
    try:
        # Its own session, hence its own process group: on timeout or shutdown the whole group
        # is killed, including children it started in the background (a plain kill would only
        # reach the direct child and leave those running, holding our pipe open).
        process = await asyncio.create_subprocess_exec(
            *argv, env={**SMOKE_BASE_ENV, **env}, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
    except OSError as exc:
        return f"command {argv[0]!r} could not start: {exc}"
    try:
        output, _ = await asyncio.wait_for(process.communicate(), timeout)
    except asyncio.TimeoutError:
        await _stop_group(process)
        return f"command {list(argv)} timed out after {timeout:g}s"
    except asyncio.CancelledError:  # the control plane is stopping: leave no orphan behind
        await _stop_group(process)
        raise
    _signal_group(process.pid, signal.SIGKILL)  # anything it left running in the background
    if process.returncode != 0:
        tail = output.decode(errors="replace").strip().splitlines()[-3:]
        return f"command {list(argv)} exited {process.returncode}" + (f": {' | '.join(tail)}" if tail else "")
    return None


async def run_command(argv: tuple[str, ...], env: Mapping[str, str], timeout: float) -> str | None:
    """Run an allowlisted command (no shell) with SMOKE_BASE_ENV plus ``env``; None if it exits
    0, else the problem. Its whole process group is stopped on timeout."""
    return await _command(argv, env, timeout)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


async def _stop_group(process: asyncio.subprocess.Process) -> None:
    """SIGTERM the command's process group, SIGKILL it after a grace period, reap the leader.
    Its group id is its pid (it leads its own session)."""
    _signal_group(process.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(asyncio.shield(process.wait()), KILL_GRACE_SECONDS)
    except asyncio.TimeoutError:
        pass
    finally:
        _signal_group(process.pid, signal.SIGKILL)  # members that ignored SIGTERM, or outlived the leader
        await process.wait()


async def call_webhook(session: aiohttp.ClientSession, hook: Webhook, payload: Mapping[str, Any], *,
                       delivery: str | None = None) -> str | None:
    """POST ``payload``; None on a 2xx, else the problem. ``delivery`` goes out as the
    ``X-Bluegreen-Delivery`` header: the same value for every attempt of one event (a new leader
    that repeats a call the old one made before it died sends the same key), so a receiver can
    drop duplicates."""
    headers = {"Content-Type": "application/json"}
    if delivery:
        headers["X-Bluegreen-Delivery"] = delivery
    try:
        timeout = aiohttp.ClientTimeout(total=hook.timeout_seconds)
        # No redirects: the allowlist admitted this URL, not wherever it might redirect to.
        async with session.post(hook.url, data=json.dumps(payload), headers=headers, timeout=timeout,
                                allow_redirects=False) as response:
            if 200 <= response.status < 300:
                return None
            return f"webhook {hook.url}: status {response.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return f"webhook {hook.url}: {type(exc).__name__}: {exc}"


async def run_smoke(session: aiohttp.ClientSession, smoke: Smoke, target: PreviewTarget, context: Mapping[str, str]) -> tuple[bool, str]:
    """Run every check, command and webhook; pass only if all pass. Returns (passed, summary)."""
    failures: list[str] = []
    for check in smoke.checks:
        problem = await _check(session, target, check)
        if problem:
            failures.append(problem)
    env = {"BLUEGREEN_PREVIEW_URL": target.base_url, **{f"BLUEGREEN_{k.upper()}": v for k, v in context.items()}}
    for header, value in target.headers:
        if header.lower() == "host":
            env["BLUEGREEN_PREVIEW_HOST"] = value
    for argv in smoke.commands:
        problem = await _command(argv, env, smoke.command_timeout_seconds)
        if problem:
            failures.append(problem)
    for hook in smoke.webhooks:
        problem = await call_webhook(session, hook, {"event": "smoke", "preview_url": target.base_url, **context},
                                     delivery=f"{context['deployment']}/smoke" if "deployment" in context else None)
        if problem:
            failures.append(problem)
    total = len(smoke.checks) + len(smoke.commands) + len(smoke.webhooks)
    if failures:
        return False, "; ".join(failures)
    return True, f"smoke tests passed ({total} through {target.base_url})" if total else "no smoke tests configured"
