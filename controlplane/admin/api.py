"""The admin HTTP API (aiohttp): JSON under /v1, plus /healthz, /readyz and /metrics.

Handlers are thin: parse and validate the request (query first, so bad input changes nothing),
call :class:`~controlplane.deploy.operations.Operations`, and render the resulting state. Errors from the
one exception tree map to HTTP statuses here and only here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .. import typeurls
from ..app import ControlPlane, service_version
from ..errors import ConflictError, MigrationError, NotFoundError, StoreError, ValidationError
from ..migrations.apply import redact
from ..model import Deployment, Environment, ReleaseGroup, Service, affinity_to_dict, deployment_to_dict
from ..store.repository import Committed
from ..deploy import releases
from ..deploy.spec import parse_deployment_spec, parse_migrations
from .auth import Authenticator, actor_of, content_type_middleware, security_middleware
from .openapi import OPENAPI
from . import ui
from .policy import check_deployment, check_migrations, check_service_notifications

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1024 * 1024
MAX_WAIT_SECONDS = 300.0
DEFAULT_WAIT_SECONDS = 10.0
PUBLISH_TIMEOUT = 10.0  # a mutation not published within this answers 503 (stored, not pushed)
READY_STORE_TIMEOUT = 2.0


CONTROL_PLANE = web.AppKey("control_plane", ControlPlane)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        return _error(400, str(exc))
    except NotFoundError as exc:
        return _error(404, str(exc))
    except ConflictError as exc:
        return _error(409, str(exc))
    except StoreError as exc:
        log.error("store failure: %s", exc)
        return _error(503, f"state store unavailable: {exc}")
    except MigrationError as exc:
        return _error(502, f"migration failed: {exc}")
    except web.HTTPRequestEntityTooLarge:
        return _error(413, f"request body too large: the limit is {MAX_BODY_BYTES} bytes")
    except web.HTTPException as exc:
        if exc.status >= 400:
            return _error(exc.status, exc.reason if exc.status != 405 else f"method {request.method} not allowed on {request.path}")
        raise
    except Exception:
        log.exception("unhandled error in %s %s", request.method, request.path)
        return _error(500, "internal error; see the control plane's log")


# ---------------------------------------------------------------------------------------------
# Request parsing


async def _json_body(request: web.Request, *, optional: bool = False) -> Any:
    raw = await request.read()
    if not raw.strip():
        if optional:
            return {}
        raise ValidationError("request body is empty: expected a JSON object")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValidationError(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ValidationError("request body is not valid JSON: nested too deeply") from None


def _wait_params(request: web.Request) -> float | None:
    """Parse ?wait=converged&timeout=S. Returns the timeout, or None when not waiting."""
    wait = request.query.get("wait")
    raw_timeout = request.query.get("timeout")
    if wait is None:
        if raw_timeout is not None:
            raise ValidationError("timeout is only meaningful with wait=converged")
        return None
    if wait != "converged":
        raise ValidationError(f"unknown wait value {wait!r}: the only value is 'converged'")
    if raw_timeout is None:
        return DEFAULT_WAIT_SECONDS
    try:
        timeout = float(raw_timeout)
    except ValueError:
        raise ValidationError(f"timeout must be a number of seconds, got {raw_timeout!r}") from None
    if not 0 < timeout <= MAX_WAIT_SECONDS:
        raise ValidationError(f"timeout must be > 0 and <= {MAX_WAIT_SECONDS:g} seconds, got {raw_timeout}")
    return timeout


# ---------------------------------------------------------------------------------------------
# Rendering


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat() if ts is not None else None


def _deployment_view(d: Deployment | None) -> dict[str, Any] | None:
    if d is None:
        return None
    view = deployment_to_dict(d)
    migrations = (view.get("spec") or {}).get("migrations")
    if migrations and migrations.get("database"):
        migrations["database"] = redact(migrations["database"])
    for key in ("deployed_at", "activated_at", "updated_at", "deadline"):
        view[key] = _iso(view[key])
    for event in view["history"]:
        event["at"] = _iso(event["at"])
    return view


def _convergence_view(cp: ControlPlane, service: Service) -> dict[str, Any]:
    """``converged``: every proxy the convergence policy waits for holds the current config;
    ``lagging`` and ``rejecting`` name the proxies it does not wait for (unless the service
    sets require_all_proxies, in which case they keep ``converged`` false)."""
    fleets = []
    for fleet in cp.fleets_serving(service.name):
        status = cp.convergence.status(fleet, require_all=service.require_all_proxies)
        flag = "all_converged" if service.require_all_proxies else "converged"
        for view in cp.views:  # xDS workers and other replicas: their proxies, as they report
            for other in view.remote(fleet).values():
                status["proxies"] += other["connected"]
                status["acked"] += other["acked"]
                status["lagging"] = sorted([*status["lagging"], *other["lagging"]])
                status["rejecting"] = sorted([*status["rejecting"], *other["rejecting"]])
                status["converged"] = status["converged"] and other[flag] and other["generation"] >= status["generation"]
        fleets.append({"fleet": fleet, **status})
    return {
        "fleets": fleets,
        "proxies": sum(f["proxies"] for f in fleets),
        "acked": sum(f["acked"] for f in fleets),
        "lagging": sorted(n for f in fleets for n in f["lagging"]),
        "rejecting": sorted(n for f in fleets for n in f["rejecting"]),
        "converged": all(f["converged"] for f in fleets),
    }


async def _service_view(cp: ControlPlane, service: Service,
                        current: dict[Environment, Deployment | None] | None = None) -> dict[str, Any]:
    """The service's API view; ``current``: its current deployments, if already read."""
    if current is None:
        current = await cp.repo.current_deployments(service.name)
    traffic = service.traffic
    envs = {}
    for env in Environment:
        state = service.environment(env)
        envs[env.value] = {
            "version": state.version or None,
            "endpoints": [str(e) for e in state.endpoints],
            "weight": traffic.weight(env),
            "deployment": _deployment_view(current[env]),
        }
    return {
        "name": service.name,
        "domains": list(service.domains),
        "prefix": service.prefix,
        "drain_seconds": service.drain_seconds,
        "standby_seconds": service.standby_seconds,
        "require_all_proxies": service.require_all_proxies,
        "release_group": service.release_group,
        "affinity": affinity_to_dict(service.affinity),
        "notifications": {"webhooks": [h.to_dict() for h in service.notifications]},
        "environments": envs,
        "traffic": {
            "weights": traffic.weights,
            "active": traffic.active.value,
            "idle": traffic.idle.value,
            "previous": traffic.previous.value if traffic.previous else None,
        },
        "xds_version": service_version(service),
        "convergence": _convergence_view(cp, service),
    }


async def _respond_with_state(request: web.Request, committed: Committed | None, service_name: str, timeout: float | None,
                              accepted: float | None = None) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    revision = committed.revision if committed else cp.publisher.generation
    service = committed.change.service if committed else await cp.repo.service(service_name)
    # Without ?wait, no store read once the change is published: the streams are being woken
    # then, and a read's result waits its turn on the event loop behind their pushes and ACKs
    # (measured: 50-80 ms per read at 1000 proxies, bench/RESULTS.md section 6). The commit
    # knows the deployments it left; other answers read them before the publication wait.
    current = committed.deployments if committed is not None and timeout is None else None
    if current is None and timeout is None:
        current = await cp.repo.current_deployments(service.name)
    if committed is not None and not await _published_in_time(cp, revision):
        return _not_pushed(cp, revision)
    status = 200
    wait_result: dict[str, Any] | None = None
    if timeout is not None:
        since = accepted if accepted is not None else time.monotonic()
        # Waits for the proxies the convergence policy waits for; lagging and rejecting ones
        # are named in the answer (all of them with the service's require_all_proxies).
        # With replicas, also every other replica's proxies (cp.wait_fleet_converged).
        result = await cp.wait_fleet_converged(cp.fleets_serving(service_name), revision, since, timeout,
                                               require_all=service.require_all_proxies)
        if result is not None:
            wait_result = {"converged": True, "seconds": round(result.seconds, 6)}
        else:
            wait_result = {"converged": False, "seconds": None, "timed_out_after": timeout}
            status = 202  # the change is stored and being pushed; not every proxy has ACKed it yet
    view = await _service_view(cp, service, current)
    view["store_revision"] = revision
    if wait_result is not None:
        view["convergence"].update(wait_result)
    return web.json_response(view, status=status)


async def _published_in_time(cp: ControlPlane, revision: int) -> bool:
    try:
        await asyncio.wait_for(cp.publisher.wait_published(revision), PUBLISH_TIMEOUT)
        return True
    except asyncio.TimeoutError:
        log.warning("revision %s not published within %ss: %s", revision, PUBLISH_TIMEOUT, cp.publisher.last_error)
        return False


def _not_pushed(cp: ControlPlane, revision: int) -> web.Response:
    """503 for a change that is stored but was not published in time: never 200 for a change the
    proxies cannot have. The publisher keeps retrying; the change goes out once it succeeds."""
    reason = cp.publisher.last_error or f"the publisher has not caught up within {PUBLISH_TIMEOUT:g}s"
    return web.json_response({
        "error": f"stored at revision {revision} but not yet pushed to the proxies: {reason}",
        "stored": True,
        "store_revision": revision,
    }, status=503)


# ---------------------------------------------------------------------------------------------
# Handlers


async def healthz(request: web.Request) -> web.Response:
    """Liveness: 200 whenever the event loop answers. It never looks at the store or the
    publisher, so a supervisor restarting on failure does not restart a process that is merely
    waiting for its disk or database (see /readyz for that)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Readiness: 200 while the store answers and the proxies are served its newest state; 503
    naming the reason otherwise (store unreachable, last publication failed, or published
    revision behind the store's). Proxies keep their last config either way."""
    cp = request.app[CONTROL_PLANE]
    body: dict[str, Any] = {"status": "ready", "published_revision": cp.publisher.generation}
    try:
        # A real read (of a key that need not exist): revision() may be answered from memory.
        await asyncio.wait_for(cp.kv.get("readyz"), READY_STORE_TIMEOUT)
        store_revision = await cp.kv.revision()
    except asyncio.TimeoutError:
        name = getattr(cp.kv, "name", "the state store")
        body.update(status="not ready", error=f"state store unreachable: {name}: no answer within {READY_STORE_TIMEOUT:g}s")
        return web.json_response(body, status=503)
    except (StoreError, OSError) as exc:
        body.update(status="not ready", error=f"state store unreachable: {exc!r}")
        return web.json_response(body, status=503)
    body["store_revision"] = store_revision
    if cp.publisher.last_error is not None:
        body.update(status="not ready", error=cp.publisher.last_error)
    elif cp.publisher.generation < store_revision:
        body.update(status="not ready", error=f"published revision {cp.publisher.generation} is behind the store's revision {store_revision}")
    return web.json_response(body, status=200 if body["status"] == "ready" else 503)


async def metrics(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    if cp.workers is not None:
        await cp.workers.refresh_stats()  # the workers' counters as of now, not of their last report
    body = generate_latest(cp.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def openapi(request: web.Request) -> web.Response:
    return web.json_response(OPENAPI)


async def list_services(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    state = await cp.repo.state()
    views = [await _service_view(cp, s) for s in state.services]
    return web.json_response({"services": views, "store_revision": state.revision})


async def get_service(request: web.Request) -> web.Response:
    timeout = _wait_params(request)
    name = request.match_info["name"]
    await request.app[CONTROL_PLANE].repo.service(name)  # 404 before waiting
    return await _respond_with_state(request, None, name, timeout)


async def _mutate(request: web.Request, operation: Callable[[], Awaitable[Committed]]) -> web.Response:
    timeout = _wait_params(request)
    committed = await operation()
    accepted = time.monotonic()
    request.app[CONTROL_PLANE].rollouts.committed(committed)
    request.app[CONTROL_PLANE].publisher.accepted(committed.revision, accepted)
    return await _respond_with_state(request, committed, request.match_info["name"], timeout, accepted)


async def put_service(request: web.Request) -> web.Response:
    _wait_params(request)
    body = await _json_body(request)
    check_service_notifications(body, request.app[CONTROL_PLANE].settings.allow)  # 400 before anything is stored
    ops = request.app[CONTROL_PLANE].operations
    return await _mutate(request, lambda: ops.put_service(request.match_info["name"], body, actor=actor_of(request)))


async def put_environment(request: web.Request) -> web.Response:
    _wait_params(request)
    Environment.parse(request.match_info["env"])
    body = await _json_body(request)
    ops = request.app[CONTROL_PLANE].operations
    return await _mutate(request, lambda: ops.put_environment(request.match_info["name"], request.match_info["env"], body, actor=actor_of(request)))


async def put_traffic(request: web.Request) -> web.Response:
    _wait_params(request)
    body = await _json_body(request)
    ops = request.app[CONTROL_PLANE].operations
    return await _mutate(request, lambda: ops.set_traffic(request.match_info["name"], body, actor=actor_of(request)))


async def switch(request: web.Request) -> web.Response:
    _wait_params(request)
    body = await _json_body(request, optional=True)
    if not isinstance(body, dict):
        raise ValidationError("switch body must be a JSON object like {\"to\": \"green\"}")
    unknown = sorted(set(body) - {"to"})
    if unknown:
        raise ValidationError(f"unknown field(s) in switch: {', '.join(unknown)}; allowed: to")
    to = body.get("to")
    if to is not None:
        Environment.parse(to)
    ops = request.app[CONTROL_PLANE].operations
    return await _mutate(request, lambda: ops.switch(request.match_info["name"], to, actor=actor_of(request)))


async def rollback(request: web.Request) -> web.Response:
    _wait_params(request)
    body = await _json_body(request, optional=True)
    if body != {}:
        raise ValidationError("rollback takes no body")
    ops = request.app[CONTROL_PLANE].operations
    return await _mutate(request, lambda: ops.rollback(request.match_info["name"], actor=actor_of(request)))


async def list_deployments(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    name = request.match_info["name"]
    await cp.repo.service(name)
    records = await cp.repo.deployments(name)
    return web.json_response({"deployments": [_deployment_view(d) for d in reversed(records)]})


async def create_deployment(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    body = await _json_body(request)
    service = await cp.repo.service(request.match_info["name"])  # 404 first
    # An environment owned by an endpoint source takes its endpoints from it (409 if the body gives some).
    body = cp.sources.deployment_body(service.name, service.traffic.idle, body)
    check_deployment(parse_deployment_spec(body), cp.settings.allow)  # 400 before anything runs or is stored
    # target: the environment the source's endpoints were read for; a switch since then is a 409.
    committed = await cp.rollouts.deploy(request.match_info["name"], body, actor=actor_of(request),
                                         target=service.traffic.idle)
    request.app[CONTROL_PLANE].publisher.accepted(committed.revision, time.monotonic())
    created = next(d for d in committed.change.deployments if d.status.value == "deploying")
    return web.json_response({"id": created.id, "deployment": _deployment_view(created)}, status=202)


async def get_deployment(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    record = await cp.repo.deployment(request.match_info["id"])
    return web.json_response(_deployment_view(record))


async def contract(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    body = await _json_body(request)
    check_migrations(parse_migrations(body), cp.settings.allow)
    return web.json_response(await cp.rollouts.contract(request.match_info["name"], body))


async def _command_options(request: web.Request, action: str, *, force_allowed: bool = True) -> tuple[bool, int | None, bool]:
    """The options of a deployment or release command: no body; ``full`` and ``step`` only for
    promote; ``force`` only for a deployment's decommission. Returns (full, to_step, force)."""
    body = await _json_body(request, optional=True)
    if body != {}:
        raise ValidationError(f"{action} takes no body")
    force = request.query.get("force", "false") if force_allowed else "false"
    if force not in ("true", "false"):
        raise ValidationError(f"force must be true or false, got {force!r}")
    if force == "true" and action != "decommission":
        raise ValidationError("force=true is only for decommission (remove it while proxies still route to it)")
    full = request.query.get("full", "false")
    if full not in ("true", "false"):
        raise ValidationError(f"full must be true or false, got {full!r}")
    if full == "true" and action != "promote":
        raise ValidationError("full=true is only for promote (skip the remaining steps)")
    raw_step = request.query.get("step")
    to_step = None
    if raw_step is not None:
        if action != "promote" or not raw_step.isascii() or not raw_step.isdigit():
            raise ValidationError(f"step must be a step index (0, 1, ...) and is only for promote, got {raw_step!r}")
        to_step = int(raw_step)
    return full == "true", to_step, force == "true"


def _deployment_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        cp = request.app[CONTROL_PLANE]
        full, to_step, force = await _command_options(request, action)
        committed = await cp.rollouts.command(request.match_info["id"], action, full=full, to_step=to_step,
                                              force=force, actor=actor_of(request))
        request.app[CONTROL_PLANE].publisher.accepted(committed.revision, time.monotonic())
        if not await _published_in_time(cp, committed.revision):
            return _not_pushed(cp, committed.revision)
        record = await cp.repo.deployment(request.match_info["id"])
        return web.json_response(_deployment_view(record))

    handler.__name__ = f"deployment_{action}"
    return handler


# ---------------------------------------------------------------------------------------------
# Release groups (docs/releases.md)


async def _release_view(cp: ControlPlane, group: ReleaseGroup) -> dict[str, Any]:
    """The group, and per member its deployment's state, weights and last analysis."""
    members = []
    mine: dict[str, Deployment] = {}
    for name, deployment_id in group.members:
        d = await cp.repo.deployment(deployment_id)
        mine[name] = d
        service = await cp.repo.service(name)
        members.append({
            "service": name,
            "deployment": d.id,
            "version": d.version,
            "environment": d.environment.value,
            "status": d.status.value,
            "step": d.step,
            "baking": d.baking,
            "paused": d.paused_remaining is not None,
            "awaiting_promote": d.awaiting_promote,
            "deadline": _iso(d.deadline),
            "weights": service.traffic.weights,
            "analysis": d.analysis,
            "reason": d.reason,
        })
    return {
        "id": group.id,
        "status": group.status.value,
        "phase": releases.phase_of(group, mine),
        "services": list(group.services),
        "members": members,
        "spec": dict(group.spec),
        "created_at": _iso(group.created_at),
        "updated_at": _iso(group.updated_at),
        "reason": group.reason,
        "history": [{"at": _iso(e.at), "status": e.status, "actor": e.actor, "reason": e.reason} for e in group.history],
    }


async def create_release(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    body = await _sourced_members(cp, await _json_body(request))
    release = releases.parse_release_request(body)
    for spec in release.members.values():
        check_deployment(spec, cp.settings.allow)  # 400 before anything runs or is stored
    try:
        committed = await cp.rollouts.release(release, actor=actor_of(request))
    except NotFoundError as exc:
        raise ValidationError(f"services: {exc}") from None  # a name in the body, not the URL: bad input
    cp.publisher.accepted(committed.revision, time.monotonic())
    return web.json_response({"id": committed.group.id, "release": await _release_view(cp, committed.group)}, status=202)


async def _sourced_members(cp: ControlPlane, body: object) -> object:
    """A member whose idle environment is owned by an endpoint source takes its endpoints from
    it, as a deployment does (409 if the body gives some)."""
    if not isinstance(body, dict) or not isinstance(body.get("services"), dict):
        return body  # parse_release_request names the problem
    members = {}
    for name, member in body["services"].items():
        try:
            service = await cp.repo.service(name)
        except NotFoundError:
            members[name] = member  # named as an unknown service when the release is created
            continue
        members[name] = cp.sources.deployment_body(name, service.traffic.idle, member)
    return {**body, "services": members}


async def list_releases(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    groups = await cp.repo.release_groups()
    return web.json_response({"releases": [await _release_view(cp, g) for g in reversed(groups)]})


async def get_release(request: web.Request) -> web.Response:
    cp = request.app[CONTROL_PLANE]
    return web.json_response(await _release_view(cp, await cp.repo.release_group(request.match_info["id"])))


def _release_action(action: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        cp = request.app[CONTROL_PLANE]
        full, to_step, _ = await _command_options(request, action, force_allowed=False)
        committed = await cp.rollouts.release_command(request.match_info["id"], action, full=full,
                                                      to_step=to_step, actor=actor_of(request))
        cp.publisher.accepted(committed.revision, time.monotonic())
        if not await _published_in_time(cp, committed.revision):
            return _not_pushed(cp, committed.revision)
        return web.json_response(await _release_view(cp, await cp.repo.release_group(request.match_info["id"])))

    handler.__name__ = f"release_{action}"
    return handler


def proxy_row(cp: Any, stream: Any) -> dict[str, Any]:
    """A /v1/proxies row of ``stream``; ``cp`` needs ``convergence`` and ``type_short`` (the
    control plane, or an xDS worker: workers/child.py)."""
    types = {}
    for type_url, state in sorted(stream.types.items(), key=lambda kv: typeurls.PUSH_ORDER.index(kv[0]) if kv[0] in typeurls.PUSH_ORDER else 99):
        nack = state.last_nack
        types[cp.type_short(type_url)] = {
            "type_url": type_url,
            "subscribed": "*" if state.wildcard else sorted(state.names),
            "acked_version": state.acked_version or None,
            "sent_version": state.sent_version or None,
            "pending": state.pending_nonce is not None,
            "responses": state.responses,
            "nacks": state.nacks,
            "last_nack": {"version": nack.version, "message": nack.message, "at": _iso(nack.at)} if nack else None,
        }
    return {
        "stream_id": stream.stream_id,
        "node_id": stream.node_id,
        "fleet": stream.fleet,
        "protocol": stream.protocol.value,
        "connected_since": _iso(stream.connected_since),
        "generation": stream.snapshot.generation,
        "converged": cp.convergence._is_converged(stream),
        "state": cp.convergence.state(stream).value,
        "types": types,
    }


def local_proxy_rows(cp: ControlPlane) -> list[dict[str, Any]]:
    """The /v1/proxies rows of this replica's proxies (what it shares with the other replicas);
    with xDS workers, as they last reported them (see list_proxies for a fresh listing)."""
    rows = [proxy_row(cp, s) for _, s in sorted(cp.ads.streams.items())]
    if cp.workers is not None:
        rows += cp.workers.remote_rows()
    return [{**row, "replica": cp.cluster.replica_id} for row in rows]


async def list_proxies(request: web.Request) -> web.Response:
    """Every proxy of every replica: this replica's live, the others' as they last reported
    through etcd (within ~100 ms; a dead replica's rows vanish with its lease)."""
    cp = request.app[CONTROL_PLANE]
    if cp.workers is not None:  # asked for now: every worker lists its proxies
        proxies = [{**row, "replica": cp.cluster.replica_id} for row in await cp.workers.rows()]
    else:
        proxies = local_proxy_rows(cp)
    if cp.shared is not None:
        proxies += cp.shared.remote_rows()
    return web.json_response({"proxies": proxies})


async def list_endpoint_sources(request: web.Request) -> web.Response:
    """The config's endpoint sources: what each owns, its last good endpoints, when it last
    succeeded, its last error, and why a set is not applied yet (docs/endpoint-sources.md)."""
    cp = request.app[CONTROL_PLANE]
    views = cp.sources.view()
    for view in views:
        for key in ("last_update", "last_error_at"):
            view[key] = _iso(view[key])
        for pair in view["owns"]:
            for key in ("reported_at", "applied_at"):
                pair[key] = _iso(pair[key])
    return web.json_response({"sources": views})


async def get_cluster(request: web.Request) -> web.Response:
    """The replicas sharing this store and which of them leads the workflow."""
    cp = request.app[CONTROL_PLANE]
    return web.json_response(await cp.cluster.view())


ROUTES: list[tuple[str, str, Handler]] = [
    ("GET", "/healthz", healthz),
    ("GET", "/readyz", readyz),
    ("GET", "/metrics", metrics),
    ("GET", "/v1/openapi.json", openapi),
    ("GET", "/v1/services", list_services),
    ("GET", "/v1/services/{name}", get_service),
    ("PUT", "/v1/services/{name}", put_service),
    ("PUT", "/v1/services/{name}/environments/{env}", put_environment),
    ("PUT", "/v1/services/{name}/traffic", put_traffic),
    ("POST", "/v1/services/{name}/switch", switch),
    ("POST", "/v1/services/{name}/rollback", rollback),
    ("GET", "/v1/services/{name}/deployments", list_deployments),
    ("POST", "/v1/services/{name}/deployments", create_deployment),
    ("GET", "/v1/deployments/{id}", get_deployment),
    ("POST", "/v1/services/{name}/migrations/contract", contract),
    *[("POST", f"/v1/deployments/{{id}}/{action}", _deployment_action(action))
      for action in ("promote", "pause", "resume", "rollback", "abort", "decommission")],
    ("GET", "/v1/releases", list_releases),
    ("POST", "/v1/releases", create_release),
    ("GET", "/v1/releases/{id}", get_release),
    *[("POST", f"/v1/releases/{{id}}/{action}", _release_action(action))
      for action in ("promote", "pause", "resume", "rollback", "abort")],
    ("GET", "/v1/proxies", list_proxies),
    ("GET", "/v1/cluster", get_cluster),
    ("GET", "/v1/endpoint-sources", list_endpoint_sources),
    *ui.ROUTES,  # the dashboard, its live feed and whoami (admin/ui/)
]


def build_admin_app(cp: ControlPlane, auth: Authenticator | None, *, hosts: tuple[str, ...] = ()) -> web.Application:
    """The admin app. ``auth=None`` turns authentication, roles and the Host check off: for
    in-process unit tests only; ``bluegreen serve`` always passes an Authenticator."""
    # Security outermost: it sees the final status of every call (errors included) for the audit log.
    middlewares: list[Any] = [security_middleware(auth, hosts)] if auth is not None else []
    middlewares += [errors_middleware, content_type_middleware]
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CONTROL_PLANE] = cp
    ui.install(app, cp.kv.watch, cp.convergence.listeners)
    for method, path, handler in ROUTES:
        app.router.add_route(method, path, handler)
    return app
