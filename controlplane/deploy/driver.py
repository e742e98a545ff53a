"""Drives deployments: runs smoke tests, moves through the steps on their deadlines, analyses each
interval, drains, keeps the standby, decommissions and calls the hooks.

One task per service that needs attention, started on demand (a deployment request, a command)
and at start-up for every service with unfinished work, which is what makes a restart safe: all
deadlines are stored as wall-clock times, so a control plane killed mid-shift resumes the step
it was in, with the time that was left, and never repeats a weight change.

Every change goes through a pure transition of ``transitions.py`` inside ``Repository.mutate``; a
transition that no longer applies (a command got there first) raises ConflictError, and the loop
simply looks again.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
from typing import Any, Awaitable, Callable, Mapping, Protocol, TypeVar

import aiohttp

from . import releases, transitions
from .promql import breach_of, evaluate as evaluate_prometheus
from .spec import Analysis, DeploymentSpec, Migrations, Scale, parse_deployment_spec, parse_migrations
from ..errors import ConflictError, ContractBlocked, MigrationError, NotFoundError, NotLeader
from ..migrations.files import MigrationSet, Phase
from ..migrations.gate import contract_blockers, refusal
from ..metrics import Metrics
from ..model import Change, Deployment, DeploymentStatus as S, Environment, Fleet, ReleaseGroup, ReleaseGroupStatus, Service
from ..resources import cluster_name
from .operations import with_actor
from .smoke import call_webhook, preview_target, run_command, run_smoke
from ..store.repository import Committed, GroupCommitted, Repository

log = logging.getLogger(__name__)

T = TypeVar("T")

CONVERGE_BEFORE_SMOKE_SECONDS = 30.0
# While a due decommission waits for proxies that still route to the environment, look again
# this often (proxy state is in memory; looking is cheap, and nothing is written unless it changed).
DECOMMISSION_RECHECK_SECONDS = 1.0
# While a deployment waits for capacity (the scaling phase), look at its endpoints this often.
SCALING_RECHECK_SECONDS = 1.0
RELEASE_LOOP = "release:"  # task keys of release groups' loops (service names cannot contain ':')


class Telemetry(Protocol):
    """Per-cluster request figures measured by the proxies (see telemetry.py)."""

    def snapshot(self) -> Any: ...

    def since(self, snapshot: Any, cluster: str) -> Mapping[str, Any]:
        """Figures for ``cluster`` since ``snapshot``: requests, errors, error_rate, p99_ms."""
        ...


class Waiter(Protocol):
    def __call__(self, fleets: tuple[str, ...], revision: int, timeout: float, *, require_all: bool = False) -> Any:
        """Awaitable: a result naming the proxies not waited for (``lagging``, ``rejecting``),
        or None if the proxies the policy waits for did not converge within ``timeout``."""
        ...


# (fleets, cluster) -> node ids still routing to it; may be async (xDS workers are asked: workers/pool.py)
RoutingTo = Callable[[tuple[str, ...], str], "tuple[str, ...] | Awaitable[tuple[str, ...]]"]


class Leadership(Protocol):
    """Whether this replica runs the workflow, and the fence its writes carry (controlplane.cluster)."""

    @property
    def is_leader(self) -> bool: ...

    def fence(self) -> Any: ...


def judge(analysis: Analysis, figures: Mapping[str, Any]) -> tuple[str, str | None]:
    """('ok' | 'breach' | 'wait', reason). Pure."""
    requests = int(figures.get("requests") or 0)
    if requests < analysis.min_requests:
        reason = f"only {requests} requests in {analysis.interval_seconds:g}s (min_requests {analysis.min_requests})"
        if analysis.no_data == "fail":
            return "breach", reason
        if analysis.no_data == "wait":
            return "wait", reason
        return "ok", None
    error_rate = figures.get("error_rate")
    if error_rate is not None and error_rate > analysis.max_error_rate:
        return "breach", f"error rate {error_rate:.3f} > max_error_rate {analysis.max_error_rate:g}"
    p99 = figures.get("p99_ms")
    if analysis.max_p99_ms is not None and p99 is not None and p99 > analysis.max_p99_ms:
        return "breach", f"p99 {p99:.1f} ms > max_p99_ms {analysis.max_p99_ms:g}"
    return _judge_prometheus(analysis, figures.get("prometheus") or ())


def _judge_prometheus(analysis: Analysis, results: Any) -> tuple[str, str | None]:
    """The Prometheus queries' results: a breach beyond a bound; an error or an empty answer
    follows ``no_data`` like too little traffic does."""
    for result in results:
        if result.get("error") is not None or result.get("value") is None:
            reason = f"prometheus {result['name']}: {result.get('error') or 'no data'}"
            if analysis.no_data == "fail":
                return "breach", reason
            if analysis.no_data == "wait":
                return "wait", reason
            continue
        breach = breach_of(result)
        if breach:
            return "breach", breach
    return "ok", None


class Rollouts:
    def __init__(self, repo: Repository, fleets: tuple[Fleet, ...], metrics: Metrics, wait_converged: Waiter,
                 routing_to: RoutingTo | None = None, telemetry: Telemetry | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.repo = repo
        self.routing_to = routing_to
        self.fleets = fleets
        self.metrics = metrics
        self.wait_converged = wait_converged
        self.telemetry = telemetry
        self.clock = clock
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._events: dict[str, asyncio.Event] = {}
        # service -> ((deployment id, step, baking), telemetry snapshot, started): one analysis
        # interval of one phase; a new step or the bake starts a new one.
        self._windows: dict[str, tuple[tuple[str, int, bool, str | None], object, float]] = {}
        self._specs: dict[str, tuple[tuple[str, float], DeploymentSpec]] = {}  # service -> ((id, deployed_at), parsed spec)
        self._session: aiohttp.ClientSession | None = None
        self._scale_called: set[tuple[str, int]] = set()  # (deployment, step) whose scale hooks this process called
        self._stopping = False
        # None: one process, always in charge. With replicas only the leader's driver runs
        # loops, and each of its writes is fenced by its election (see controlplane.cluster).
        self.leadership: Leadership | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def leading(self) -> bool:
        return self.leadership is None or self.leadership.is_leader

    def _fence(self) -> tuple[str, int] | None:
        """The fence of a workflow write now; NotLeader once this replica does not lead."""
        if self.leadership is None:
            return None
        if not self.leadership.is_leader:
            raise NotLeader("this replica is not the leader: the workflow runs on the leader")
        fence = self.leadership.fence()
        return (fence.key, fence.mod_revision) if fence is not None else None

    async def start(self) -> None:
        """Open the HTTP session, and resume the deployments under way if this replica leads."""
        self._session = aiohttp.ClientSession()
        if self.leadership is None:
            await self.activate()

    async def activate(self) -> None:
        """Take charge (start-up, or elected leader): resume every service with unfinished work
        from its stored deadlines."""
        for service in (await self.repo.state()).services:
            records = await self.repo.deployments(service.name)
            if any(r.deadline is not None or r.in_progress or r.hooks_pending for r in records):
                self.poke(service.name)
        for group in await self.repo.release_groups():
            if group.status is ReleaseGroupStatus.IN_PROGRESS:
                self.poke_release(group.id)

    async def deactivate(self) -> None:
        """Stop every loop (deposed): the new leader resumes them from the store."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        self._windows.clear()

    async def stop(self) -> None:
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    def poke(self, service: str) -> None:
        """Look at ``service`` now (after a command, or to resume its work)."""
        if self._stopping or not self.leading:
            return  # not the leader: the leader sees the change through the store watch
        self._events.setdefault(service, asyncio.Event()).set()
        task = self._tasks.get(service)
        if task is None or task.done():
            self._tasks[service] = asyncio.create_task(self._loop(service, self._step), name=f"rollout-{service}")

    def poke_release(self, release_id: str) -> None:
        """Look at release group ``release_id`` now (its own loop, beside its members' loops)."""
        if self._stopping or not self.leading:
            return
        key = f"{RELEASE_LOOP}{release_id}"
        self._events.setdefault(key, asyncio.Event()).set()
        task = self._tasks.get(key)
        if task is None or task.done():
            self._tasks[key] = asyncio.create_task(self._loop(key, lambda _: self._release_step(release_id)), name=f"release-{release_id}")

    # -- commands (called by the admin API) -----------------------------------------------------

    async def deploy(self, name: str, body: object, *, actor: str = transitions.API,
                     target: Environment | None = None) -> Committed:
        """Start a deployment into the service's idle environment. ``target`` is the idle
        environment the caller prepared ``body`` for (e.g. with an endpoint source's endpoints
        for it): if a switch made the other one idle meanwhile, ConflictError (409), nothing
        stored. Without it, the idle environment read here is the one checked in the commit."""
        spec = parse_deployment_spec(body)
        service = await self.repo.service(name)
        idle = service.traffic.idle
        if target is not None and target is not idle:
            raise _idle_changed(name, target, idle)
        still = await self._still_routing(name, idle)
        if still and transitions.in_progress(await self.repo.current_deployments(name)) is None:
            # (A deployment under way is refused below with a message naming it.)
            # Deploying replaces the idle environment's endpoints: proxies that never took the
            # route moving production traffic away from it would send it to the new version.
            raise ConflictError(f"{name}: proxies still routing production traffic to {idle.value}: {', '.join(still)}; "
                                f"deploy once they have converged, or decommission {idle.value} with force=true first")
        if spec.migrations is not None:
            await asyncio.to_thread(check_migrations, spec.migrations)  # bad set or lint errors: 400, nothing stored
        def start(service: Service | None, current: Any, now: float) -> Change:
            releases.refuse_if_held(_require(service), "a deployment of it alone")
            if _require(service).traffic.idle is not idle:  # a switch since the checks above
                raise _idle_changed(name, idle, _require(service).traffic.idle)
            return transitions.start(_require(service), current, spec, now, actor)

        committed = await self.repo.mutate(name, start)
        self.poke(name)
        return committed

    async def command(self, deployment_id: str, action: str, *, full: bool = False, to_step: int | None = None,
                      force: bool = False, actor: str = transitions.API) -> Committed:
        record = await self.repo.deployment(deployment_id)
        name = record.service
        still: tuple[str, ...] = ()
        if action == "decommission":
            # Proxy state lives in memory, not in the store: look it up before the transaction.
            current = await self.repo.current_deployments(name)
            standby = next(r for r in current.values() if r is not None and r.id == _standby_of(current, deployment_id))
            still = await self._still_routing(name, standby.environment)
        # Not named `transitions`: that would shadow the module the lambdas call.
        actions: dict[str, Callable[[Service, Any, float], Change]] = {
            "promote": lambda s, c, now: transitions.promote(s, c, deployment_id, now, full=full, to_step=to_step),
            "pause": lambda s, c, now: transitions.pause(s, c, deployment_id, now),
            "resume": lambda s, c, now: transitions.resume(s, c, deployment_id, now),
            "rollback": lambda s, c, now: transitions.rollback(s, c, deployment_id, now, transitions.API, "rollback requested"),
            "abort": lambda s, c, now: transitions.abort(s, c, deployment_id, now),
            "decommission": lambda s, c, now: transitions.decommission(
                s, c, _standby_of(c, deployment_id), now, transitions.API, "decommissioned on request, ending standby early",
                still_routing=still, force=force),
        }
        transition = actions[action]

        def steer(service: Service | None, current: Any, now: float) -> Change:
            held = _require(service)
            if action != "decommission" and held.release_group is not None:
                # Decommission stays per member (it moves no member's traffic); the rest would split the release.
                raise ConflictError(f"deployment {deployment_id} is part of release {held.release_group}: {action} it with "
                                    f"POST /v1/releases/{held.release_group}/{action} (the members move together)")
            return with_actor(transition(held, current, now), actor, now)

        committed = await self.repo.mutate(name, steer)
        self.committed(committed)
        return committed

    # -- release groups (docs/releases.md) --------------------------------------------------------

    async def release(self, request: releases.ReleaseRequest, *, actor: str = transitions.API) -> GroupCommitted:
        """Start a release group: one deployment per member, all in one transaction."""
        names = tuple(request.members)
        for name in names:
            idle = (await self.repo.service(name)).traffic.idle  # NotFoundError names an unknown service
            still = await self._still_routing(name, idle)
            if still:
                raise ConflictError(f"{name}: proxies still routing production traffic to {idle.value}: {', '.join(still)}; "
                                    f"release once they have converged, or decommission {idle.value} with force=true first")
        committed = await self.repo.mutate_group(
            names, lambda members, _, group_id, now: releases.create(members, group_id, request, now, actor))
        self._group_committed(committed)
        return committed

    async def release_command(self, release_id: str, action: str, *, full: bool = False, to_step: int | None = None,
                              actor: str = transitions.API) -> GroupCommitted:
        group = await self.repo.release_group(release_id)

        def steer(members: Any, stored: ReleaseGroup | None, _: str, now: float) -> Any:
            assert stored is not None
            changes, updated = releases.command_all(stored, members, action, now, full=full, to_step=to_step)
            return {n: with_actor(c, actor, now) for n, c in changes.items()}, _credited(updated, actor, now)

        committed = await self.repo.mutate_group(group.services, steer, release_id=release_id)
        self._group_committed(committed)
        return committed

    def _group_committed(self, committed: GroupCommitted) -> None:
        for per_service in committed.per_service():
            self.committed(per_service)
        self.poke_release(committed.group.id)

    async def _group_mutate(self, group: ReleaseGroup, mutation: Callable[[ReleaseGroup, Any, float], Any]) -> GroupCommitted:
        committed = await self.repo.mutate_group(
            group.services, lambda members, stored, _, now: mutation(_present(stored), members, now),
            release_id=group.id, fence=self._fence())
        for per_service in committed.per_service():
            self._count(per_service)
            for record in per_service.change.deployments:
                if _just_activated(record):
                    self._observe_cutover(record, committed.revision)
            self.poke(per_service.change.service.name)  # drain, standby, decommission per member
        return committed

    async def _release_step(self, release_id: str) -> tuple[bool, float | None]:
        """Do the next due thing for a release group: the members' smoke tests, then each step,
        judged and timed for all members together. Returns (did something, when to look again)."""
        group = await self.repo.release_group(release_id)
        key = f"{RELEASE_LOOP}{release_id}"
        if group.status is not ReleaseGroupStatus.IN_PROGRESS:
            self._windows.pop(key, None)
            return False, None
        members = {name: (await self.repo.service(name), await self.repo.current_deployments(name)) for name in group.services}
        mine = releases.records(group, members)
        now = self.clock()
        stopped = [d for d in mine.values() if d.status in (S.FAILED, S.ROLLED_BACK)]
        if stopped:
            first = stopped[0]
            reason = f"{first.service} {first.status.value}: {first.history[-1].reason if first.history else first.reason}"
            if first.status is S.ROLLED_BACK:
                await self._group_mutate(group, lambda g, m, t: releases.rollback_all(g, m, t, transitions.AUTOMATIC, reason))
            else:
                await self._group_mutate(group, lambda g, m, t: releases.fail_unshifted(g, m, t, reason))
            return True, None
        deploying = [d for d in mine.values() if d.status is S.DEPLOYING]
        if deploying:
            await asyncio.gather(*(self._smoke(members[d.service][0], d) for d in deploying))
            return True, None
        if all(d.status is S.READY for d in mine.values()):
            await self._group_mutate(group, lambda g, m, t: releases.proceed_all(g, m, t))
            return True, None
        if all(d.status is S.ACTIVE and not d.baking for d in mine.values()):
            await self._group_mutate(group, lambda g, m, t: releases.settle(g, m, {}, t, transitions.AUTOMATIC, "release complete"))
            return True, None
        analysis = self._spec(next(iter(mine.values()))).analysis
        paused = any(d.paused_remaining is not None for d in mine.values())
        phase = tuple(_phase(d) for d in mine.values())
        if analysis is not None and not paused and self.telemetry is not None:
            window = self._windows.get(key)
            if window is None or window[0] != phase:
                self._windows[key] = (phase, self.telemetry.snapshot(), self.clock())  # type: ignore[assignment]
            elif now >= window[2] + analysis.interval_seconds:
                self._windows[key] = (phase, self.telemetry.snapshot(), self.clock())  # type: ignore[assignment]
                verdicts = {name: self._verdict(members[name][0], d, analysis, window[1]) for name, d in mine.items()}
                await self._group_mutate(group, lambda g, m, t: releases.judged_all(g, m, verdicts, analysis, t))
                return True, None
        if any(transitions.timer_due(d, analysis, now) for d in mine.values()):
            await self._group_mutate(group, lambda g, m, t: releases.timers_due(g, m, analysis, t))
            return True, None
        wakes = [d.deadline for d in mine.values() if d.deadline is not None and d.paused_remaining is None and
                 (d.deadline > now or transitions.timer_due(d, analysis, now))]
        window = self._windows.get(key)
        if analysis is not None and window is not None and window[0] == phase and not paused:
            wakes.append(window[2] + analysis.interval_seconds)
        return False, min(wakes) if wakes else now + 3600.0  # paused or awaiting promote: a command pokes us

    def _verdict(self, service: Service, d: Deployment, analysis: Analysis, snapshot: object) -> releases.Verdict:
        """One member's interval since ``snapshot``, judged as a deployment's would be (the
        Prometheus source is not offered to releases yet: spec validation keeps it per deployment)."""
        figures = self._interval_figures(service, d, analysis, snapshot)
        verdict, reason = self._judge(service, d, analysis, figures)
        return releases.Verdict(verdict, figures, reason)

    def _interval_figures(self, service: Service, d: Deployment, analysis: Analysis, snapshot: object) -> dict[str, Any]:
        """The proxies' figures for ``d``'s cluster since ``snapshot``."""
        assert self.telemetry is not None
        stats = self.telemetry.since(snapshot, cluster_name(service.name, d.environment))
        figures = dict(stats.as_dict() if hasattr(stats, "as_dict") else stats)
        figures["interval_seconds"] = analysis.interval_seconds
        return figures

    def _judge(self, service: Service, d: Deployment, analysis: Analysis, figures: dict[str, Any]) -> tuple[str, str | None]:
        """Export the interval's figures, judge them, and note the verdict (and its reason) in them."""
        for key, gauge in (("error_rate", self.metrics.analysis_error_rate), ("p99_ms", self.metrics.analysis_p99_ms)):
            if figures.get(key) is not None:
                gauge.labels(service.name, d.environment.value).set(figures[key])
        verdict, reason = judge(analysis, figures)
        figures["verdict"] = verdict
        if reason:
            figures["reason"] = reason
        return verdict, reason

    def committed(self, committed: Committed) -> None:
        """Bookkeeping after any change to a service's deployments, whoever made it (a command,
        a timer, a manual traffic change): metrics, cutover timing, and a look at its timers."""
        self._count(committed)
        for record in committed.change.deployments:
            if _just_activated(record):
                self._observe_cutover(record, committed.revision)
        self.poke(committed.change.service.name)

    # -- the loop ------------------------------------------------------------------------------

    async def _loop(self, name: str, step: Callable[[str], Any]) -> None:
        event = self._events.setdefault(name, asyncio.Event())
        while not self._stopping:
            event.clear()
            try:
                acted, wake_at = await step(name)
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                return
            except NotLeader as exc:
                log.warning("deployment driver for %s stops: %s", name, exc)
                self._tasks.pop(name, None)
                return
            except ConflictError as exc:
                # Someone else changed the deployment first; look again, but never spin on a
                # transition that keeps refusing: wait a moment or for the next poke.
                log.debug("%s: transition no longer applies (%s); looking again", name, exc)
                acted, wake_at = False, self.clock() + 0.2
            except Exception:
                log.exception("deployment driver for %s failed; retrying in 1s", name)
                acted, wake_at = False, self.clock() + 1.0
            if acted:
                continue
            if wake_at is None:
                self._tasks.pop(name, None)
                return
            try:
                await asyncio.wait_for(event.wait(), max(0.0, wake_at - self.clock()))
            except asyncio.TimeoutError:
                pass

    async def _step(self, name: str) -> tuple[bool, float | None]:
        """Do the next due thing for ``name``. Returns (did something, when to look again)."""
        service = await self.repo.service(name)
        records = await self.repo.deployments(name)
        current = await self.repo.current_deployments(name)
        now = self.clock()
        self._export_phase(service, current)

        for record in records:
            if record.hooks_pending:
                await self._decommission_hooks(record)
                return True, None

        d = transitions.in_progress(current)
        if d is not None and service.release_group is not None:
            # A release group drives its members in lockstep (_release_step); this loop keeps
            # only the per-member work: drain, standby and decommission of the old environment.
            self.poke_release(service.release_group)
            d = None
        if d is not None:
            if d.status is S.DEPLOYING:
                migrations = self._spec(d).migrations
                if migrations is not None and not transitions.expand_done(d):
                    await self._expand(service, d, migrations)
                    return True, None
                await self._smoke(service, d)
                return True, None
            if d.status is S.READY and d.phase is None:
                await self._mutate(name, lambda s, c, t: transitions.proceed(s, c, d.id, t))
                return True, None
            paused = d.paused_remaining is not None
            if d.phase == transitions.SCALING and not paused and await self._scaling(service, d, now):
                return True, None
            analysis = self._spec(d).analysis
            if analysis is not None and not paused:
                window = self._windows.get(name)
                if window is None or window[0] != _phase(d):
                    self._start_window(name, d)
                elif now >= window[2] + analysis.interval_seconds:
                    await self._analyse(service, d, analysis, window[1])
                    return True, None
            if d.phase != transitions.SCALING and transitions.timer_due(d, analysis, now):
                if d.phase is not None:  # mirror or targeting, before the steps
                    await self._mutate(name, lambda s, c, t: transitions.phase_due(s, c, d.id, t))
                elif d.status is S.SHIFTING:
                    await self._mutate(name, lambda s, c, t: transitions.step_due(s, c, d.id, t))
                else:
                    await self._mutate(name, lambda s, c, t: transitions.bake_due(s, c, d.id, t))
                return True, None

        waiting = False
        for record in current.values():
            if record is None or record.deadline is None or record.deadline > now or record is d:
                continue
            if record.status is S.DRAINING:
                await self._mutate(name, lambda s, c, t, rid=record.id: transitions.drain_due(s, c, rid, t))
                return True, None
            if record.status is S.STANDBY:
                if await self._decommission_due(name, record):
                    return True, None
                waiting = True

        wakes = [r.deadline for r in current.values()
                 if r is not None and r is not d and r.deadline is not None and r.status in (S.DRAINING, S.STANDBY)
                 and r.deadline > now]
        if waiting:
            wakes.append(now + DECOMMISSION_RECHECK_SECONDS)
        if d is not None and d.spec:
            wakes.extend(self._wakes(name, d, now))
        if d is not None and not wakes:
            return False, now + 3600.0  # paused or awaiting promote: a command will poke us
        return False, min(wakes) if wakes else None

    # -- decommission guard --------------------------------------------------------------------

    async def _still_routing(self, service: str, env: Environment) -> tuple[str, ...]:
        """Connected proxies of the fleets serving ``service`` that may still send production
        traffic to ``env`` (their route configuration gives its cluster a weight)."""
        if self.routing_to is None:
            return ()
        fleets = tuple(f.name for f in self.fleets if f.serves(service))
        found = self.routing_to(fleets, cluster_name(service, env))
        return await found if inspect.isawaitable(found) else found

    async def _decommission_due(self, name: str, record: Deployment) -> bool:
        """The standby of ``record`` is over: decommission it, unless a proxy still routes to it,
        in which case record what the decommission waits for (once). True if something was stored."""
        still = await self._still_routing(name, record.environment)
        if still:
            if record.waiting_for == transitions.routing_text(record, still):
                return False
            await self._mutate(name, lambda s, c, t: transitions.decommission_waiting(s, c, record.id, t, still))
            return True
        reason = "standby of {}s is over"
        if record.waiting_for is not None:
            reason += "; no connected proxy routes to it any more"
        await self._mutate(name, lambda s, c, t: transitions.decommission(
            s, c, record.id, t, transitions.AUTOMATIC, reason.format(s.standby_seconds)))
        return True

    def _wakes(self, name: str, d: Deployment, now: float) -> list[float]:
        """When the in-progress deployment ``d`` needs a look: its deadline, unless it has passed
        and only a judged interval can end the phase now; the end of its analysis interval."""
        if d.paused_remaining is not None:
            return []
        analysis = self._spec(d).analysis
        wakes: list[float] = []
        if d.deadline is not None and (d.deadline > now or transitions.timer_due(d, analysis, now)):
            wakes.append(d.deadline)
        window = self._windows.get(name)
        if analysis is not None and window is not None and window[0] == _phase(d):
            wakes.append(window[2] + analysis.interval_seconds)
        if d.phase == transitions.SCALING:
            # Endpoints may arrive by any path (API, endpoint sources, another replica): look again soon.
            wakes.append(now + SCALING_RECHECK_SECONDS)
        return wakes

    def _spec(self, d: Deployment) -> DeploymentSpec:
        """``d``'s stored spec, parsed once per deployment (the loop asks on every pass). A spec
        stored by an older release parses too: fields it lacks take their defaults."""
        assert d.spec is not None, f"{d.id} is not a workflow deployment"
        key = (d.id, d.deployed_at)
        cached = self._specs.get(d.service)
        if cached is None or cached[0] != key:
            cached = self._specs[d.service] = (key, parse_deployment_spec(d.spec))
        return cached[1]

    async def _mutate(self, name: str, transition: Callable[[Service, Any, float], Change]) -> Committed:
        committed = await self.repo.mutate(name, lambda s, c, now: transition(_require(s), c, now), fence=self._fence())
        self._count(committed)
        for record in committed.change.deployments:
            if _just_activated(record):
                self._observe_cutover(record, committed.revision)
        return committed  # the loop that called us looks again by itself

    def _observe_cutover(self, record: Deployment, revision: int) -> None:
        """bluegreen_cutover_seconds: first weight change of the shift -> every proxy at 100 %."""
        shifted = [e.at for e in record.history if e.status in (S.SHIFTING.value, S.ACTIVE.value)]
        fleets = tuple(f.name for f in self.fleets if f.serves(record.service))

        async def observe() -> None:
            if await self.wait_converged(fleets, revision, 60.0):
                self.metrics.cutover.labels(record.service).observe(max(0.0, self.clock() - shifted[0]))

        if shifted:
            asyncio.create_task(observe(), name=f"cutover-{record.id}")

    def _count(self, committed: Committed) -> None:
        for record in committed.change.deployments:
            if record.spec is None or not record.history:
                continue
            last = record.history[-1]
            if last.status in (S.FAILED.value, S.ROLLED_BACK.value) and record.status.value == last.status:
                result = "failed" if record.status is S.FAILED else "rolled_back"
                self.metrics.deployments.labels(record.service, result).inc()
                if record.status is S.ROLLED_BACK:
                    self.metrics.rollbacks.labels(record.service, "automatic" if last.actor == transitions.AUTOMATIC else "api").inc()
            elif last.status == S.ACTIVE.value and not record.baking and last.reason.startswith("bake finished"):
                self.metrics.deployments.labels(record.service, "succeeded").inc()

    def _export_phase(self, service: Service, current: Mapping[Environment, Deployment | None]) -> None:
        d = transitions.in_progress(current)
        phase = d.status.value if d is not None else "idle"
        if d is not None and d.baking:
            phase = "baking"
        if d is not None and d.paused_remaining is not None:
            phase = "paused"
        for known in ("idle", "deploying", "ready", "shifting", "baking", "paused"):
            self.metrics.deployment_phase.labels(service.name, known).set(1 if known == phase else 0)
        self._init_counters(service.name)

    def _init_counters(self, name: str) -> None:
        """Create the service's result counters at 0, so the first deployment's end and the first
        rollback are an increase that rate(), increase() and alert rules can see."""
        for result in ("succeeded", "failed", "rolled_back"):
            self.metrics.deployments.labels(name, result)
        for reason in ("automatic", "api"):
            self.metrics.rollbacks.labels(name, reason)

    # -- migrations ----------------------------------------------------------------------------

    async def _expand(self, service: Service, d: Deployment, migrations: Migrations) -> None:
        """Apply the expand files (idempotent: files already recorded are skipped, so a restart
        in the middle re-runs safely) before the new version is smoke-tested."""
        try:
            report = await run_cancellable(lambda cancellation: run_expand(migrations, d.id, cancellation))
        except MigrationError as exc:
            await self._mutate(service.name, lambda s, c, t: transitions.smoke_failed(s, c, d.id, t, f"expand migrations failed: {exc}"))
            return
        summary = f"{len(report.applied)} applied, {len(report.skipped)} already there"
        await self._mutate(service.name, lambda s, c, t: transitions.expand_applied(s, c, d.id, t, summary))

    async def contract(self, name: str, body: object) -> dict[str, Any]:
        """Apply a set's contract files, unless a version that may need the old schema can
        still take traffic (ContractBlocked, HTTP 409, naming it and its standby deadline)."""
        spec = parse_migrations(body)
        await self.repo.service(name)  # 404 for an unknown service
        migration_set = await asyncio.to_thread(check_migrations, spec)
        records = await self.repo.deployments(name)
        expanded_by = await asyncio.to_thread(expanded_by_deployment, migration_set, spec.database)
        blockers = contract_blockers(records, expanded_by)
        if blockers:
            raise ContractBlocked(refusal(name, blockers))
        report = await run_cancellable(lambda cancellation: apply_phase(migration_set, Phase.CONTRACT, spec.database, cancellation))
        return {"service": name, "phase": "contract", "applied": list(report.applied), "skipped": list(report.skipped),
                "expanded_by": expanded_by}

    # -- smoke tests ---------------------------------------------------------------------------

    async def _smoke(self, service: Service, d: Deployment) -> None:
        spec = self._spec(d)
        fleets = tuple(f for f in self.fleets if f.serves(service.name))
        revision = (await self.repo.kv.revision())
        require_all = spec.require_all_proxies if spec.require_all_proxies is not None else service.require_all_proxies
        converged = await self.wait_converged(tuple(f.name for f in fleets), revision, CONVERGE_BEFORE_SMOKE_SECONDS,
                                              require_all=require_all)
        if not converged:
            which = "every connected proxy (require_all_proxies)" if require_all else "the healthy proxies"
            await self._mutate(service.name, lambda s, c, t: transitions.smoke_failed(
                s, c, d.id, t, f"{which} did not ACK the new endpoints within {CONVERGE_BEFORE_SMOKE_SECONDS:g}s"))
            return
        await self._note_skipped(d, "smoke tests", converged)
        if not fleets:
            await self._mutate(service.name, lambda s, c, t: transitions.smoke_failed(s, c, d.id, t, "no fleet serves this service"))
            return
        target = preview_target(fleets[0], service)
        context = {"service": service.name, "deployment": d.id, "version": d.version, "environment": d.environment.value}
        assert self._session is not None
        passed, summary = await run_smoke(self._session, spec.smoke, target, context)
        if passed:
            await self._mutate(service.name, lambda s, c, t: transitions.smoke_passed(s, c, d.id, t, summary))
        else:
            await self._mutate(service.name, lambda s, c, t: transitions.smoke_failed(s, c, d.id, t, summary))

    async def _note_skipped(self, d: Deployment, gate: str, result: Any) -> None:
        """Record in the history that a gate went ahead without proxies the policy does not wait
        for (lagging or rejecting), naming them; nothing when it waited for every proxy."""
        parts = [f"{kind}: {', '.join(names)}" for kind, names in (("lagging", result.lagging), ("rejecting", result.rejecting)) if names]
        if not parts:
            return
        text = f"{gate} proceeded without proxies that did not converge ({'; '.join(parts)})"
        log.warning("%s: %s", d.id, text)
        await self.repo.update_record(d.service, d.id, lambda r, now: _noted(r, now, text), fence=self._fence())

    # -- analysis ------------------------------------------------------------------------------

    def _start_window(self, name: str, d: Deployment) -> None:
        if self.telemetry is not None:
            self._windows[name] = (_phase(d), self.telemetry.snapshot(), self.clock())

    async def _analyse(self, service: Service, d: Deployment, analysis: Analysis, snapshot: object) -> None:
        figures = self._interval_figures(service, d, analysis, snapshot)
        self._start_window(service.name, d)
        if analysis.prometheus is not None:
            figures["prometheus"] = await self._prometheus_figures(service, d, analysis)
        verdict, reason = self._judge(service, d, analysis, figures)
        if verdict == "wait":
            await self._mutate(service.name, lambda s, c, t: transitions.analysis_wait(
                s, c, d.id, t, figures, reason or "no data", no_data_limit=analysis.no_data_limit, failure_limit=analysis.failure_limit))
        else:
            await self._mutate(service.name, lambda s, c, t: transitions.analysis_result(
                s, c, d.id, t, figures, reason if verdict == "breach" else None, analysis.failure_limit))

    async def _prometheus_figures(self, service: Service, d: Deployment, analysis: Analysis) -> list[dict[str, Any]]:
        assert analysis.prometheus is not None and self._session is not None
        old = service.environment(d.environment.other)
        contexts = {
            "new": {"service": service.name, "environment": d.environment.value, "version": d.version},
            "old": {"service": service.name, "environment": d.environment.other.value, "version": old.version or ""},
        }
        return await evaluate_prometheus(self._session, analysis.prometheus, contexts, analysis.interval_seconds)

    # -- capacity guard and scale hooks -------------------------------------------------------------

    async def _scaling(self, service: Service, d: Deployment, now: float) -> bool:
        """The scaling phase of ``d``: shift once the capacity is there, call the scale hooks
        once per step (again after a restart: at least once), fail or roll back at the timeout.
        True if something was done."""
        assert d.scaling_step is not None
        weight = transitions.scaling_weight(service, d)
        if transitions.capacity_shortfall(service, d, weight) is None:
            await self._mutate(service.name, lambda s, c, t: transitions.capacity_ready(s, c, d.id, t))
            return True
        scale = self._spec(d).scale
        assert scale is not None
        if (d.id, d.scaling_step) not in self._scale_called:
            self._scale_called.add((d.id, d.scaling_step))
            needed = transitions.required_capacity(d, weight) or 0
            summary = await self._call_scale_hooks(scale, service.name, d.environment, d.id, needed,
                                                   service.environment(d.environment).capacity, f"{d.id}/scale/{d.scaling_step}")
            await self.repo.update_record(d.service, d.id, lambda r, t: _noted(r, t, summary), fence=self._fence())
            return True
        if d.deadline is not None and d.deadline <= now:
            await self._mutate(service.name, lambda s, c, t: transitions.scale_timeout(s, c, d.id, t))
            return True
        return False

    async def _call_scale_hooks(self, scale: Scale, service: str, env: Environment, deployment: str, desired: int,
                                current: int, delivery: str) -> str:
        """Ask the infrastructure for ``desired`` capacity in ``env``: POST to every webhook, run
        every command (the same fields as BLUEGREEN_* variables). Returns what happened, for the history."""
        assert self._session is not None
        payload = {"service": service, "environment": env.value, "deployment": deployment,
                   "desired_capacity": desired, "current_capacity": current}
        problems = []
        for hook in scale.webhooks:
            problem = await call_webhook(self._session, hook, payload, delivery=delivery)
            self.metrics.scale_hook_calls.labels("failed" if problem else "ok").inc()
            if problem:
                problems.append(problem)
        variables = {f"BLUEGREEN_{key.upper()}": str(value) for key, value in payload.items()}
        for argv in scale.commands:
            problem = await run_command(argv, variables, scale.command_timeout_seconds)
            self.metrics.scale_hook_calls.labels("failed" if problem else "ok").inc()
            if problem:
                problems.append(problem)
        count = len(scale.webhooks) + len(scale.commands)
        outcome = "; ".join(problems) if problems else f"{count} called"
        return f"scale hooks for {env.value}: desired capacity {desired}, current {current}: {outcome}"

    async def _standby_scale(self, record: Deployment, owner: Deployment) -> str | None:
        """After ``record``'s environment is decommissioned: tell the scale hooks of the
        deployment that replaced it (``owner``) to shrink it to the warm pool."""
        if owner is record or not owner.spec:
            return None
        scale = parse_deployment_spec(owner.spec).scale
        if scale is None or (not scale.webhooks and not scale.commands):
            return None
        desired = math.ceil((owner.baseline_capacity or 0) * scale.standby_capacity_percent / 100)
        return await self._call_scale_hooks(scale, record.service, record.environment, record.id, desired, 0,
                                            f"{record.id}/scale/standby")

    # -- decommission hooks ----------------------------------------------------------------------

    async def _decommission_hooks(self, record: Deployment) -> None:
        """Call the decommission webhooks of the deployment that replaced ``record`` (that is
        where the user said what to do with the old version), or else its own."""
        owner = record
        if record.counterpart is not None:
            try:
                owner = await self.repo.deployment(record.counterpart)
            except NotFoundError:
                owner = record
        hooks = parse_deployment_spec(owner.spec).decommission_webhooks if owner.spec else ()
        if not hooks and owner is not record and record.spec:
            hooks = parse_deployment_spec(record.spec).decommission_webhooks
        assert self._session is not None
        problems = []
        for hook in hooks:
            problem = await call_webhook(self._session, hook, {
                "event": "decommission", "service": record.service, "deployment": record.id,
                "version": record.version, "environment": record.environment.value,
            }, delivery=f"{record.id}/decommission")
            if problem:
                problems.append(problem)
        reason = "decommission hooks: " + ("; ".join(problems) if problems else f"{len(hooks)} called") if hooks else "no decommission hooks"
        scaled = await self._standby_scale(record, owner)
        if scaled is not None:
            reason = f"{reason}; {scaled}"
        await self.repo.update_record(record.service, record.id, lambda r, now: _hooks_done(r, now, reason), fence=self._fence())


def _present(group: ReleaseGroup | None) -> ReleaseGroup:
    assert group is not None, "an existing release group was asked for"
    return group


def _credited(group: ReleaseGroup, actor: str, now: float) -> ReleaseGroup:
    """As :func:`with_actor`, for the group's own history."""
    if actor == transitions.API:
        return group
    from dataclasses import replace

    return replace(group, history=tuple(replace(e, actor=actor) if e.actor == transitions.API and e.at == now else e
                                        for e in group.history))


def _hooks_done(record: Deployment, now: float, reason: str) -> Deployment:
    from dataclasses import replace

    from ..model import Event

    return replace(record, hooks_pending=False, updated_at=now, history=record.history + (Event(now, record.status.value, transitions.AUTOMATIC, reason),))


def _noted(record: Deployment, now: float, reason: str) -> Deployment:
    from dataclasses import replace

    from ..model import Event

    return replace(record, updated_at=now, history=record.history + (Event(now, record.status.value, transitions.AUTOMATIC, reason),))


def _just_activated(record: Deployment) -> bool:
    """This change put ``record`` at 100 % (not a later event of its bake: a breach, an
    extension, a pause), so its cutover is timed once."""
    statuses = [e.status for e in record.history[-2:]]
    return record.status is S.ACTIVE and record.baking and statuses[-1:] == [S.ACTIVE.value] and statuses[:-1] != [S.ACTIVE.value]


def _phase(d: Deployment) -> tuple[str, int, bool, str | None]:
    """The step, bake, mirror or targeting phase an analysis interval belongs to: an interval
    never spans two."""
    return d.id, d.step, d.baking, d.phase


def _require(service: Service | None) -> Service:
    if service is None:
        raise NotFoundError("service disappeared")
    return service


def _standby_of(current: Mapping[Environment, Deployment | None], deployment_id: str) -> str:
    """`decommission` accepts the standby record's id or the id of the deployment it serves."""
    for record in current.values():
        if record is not None and record.id == deployment_id and record.status in (S.STANDBY, S.DRAINING):
            return record.id
    for record in current.values():
        if record is not None and record.counterpart == deployment_id and record.status in (S.STANDBY, S.DRAINING):
            return record.id
    raise ConflictError(f"deployment {deployment_id} has no draining or standby environment to decommission")


# Migration I/O, run in a worker thread (psycopg and squawk block).

def check_migrations(spec: Migrations) -> MigrationSet:
    """Load the set and lint it; an expand file that would break the running version is refused
    before anything is stored (ValidationError, HTTP 400)."""
    from ..errors import ValidationError
    from ..migrations.files import load_migration_set
    from ..migrations.lint import format_text, lint

    try:
        migration_set = load_migration_set(spec.directory)
        report = lint(migration_set, locking=spec.locking)
    except MigrationError as exc:
        raise ValidationError(f"migrations: {exc}") from None
    if not report.ok:
        raise ValidationError(f"migrations: lint found errors:\n{format_text(report)}")
    return migration_set


def run_expand(spec: Migrations, deployment_id: str, cancellation: Any = None) -> Any:
    from ..migrations.apply import apply_phase
    from ..migrations.files import load_migration_set

    return apply_phase(load_migration_set(spec.directory), Phase.EXPAND, spec.database, deployment_id=deployment_id,
                       cancellation=cancellation)


def apply_phase(migration_set: MigrationSet, phase: Phase, database: str, cancellation: Any = None) -> Any:
    from ..migrations.apply import apply_phase as apply

    return apply(migration_set, phase, database, cancellation=cancellation)


async def run_cancellable(run: Callable[[Any], T]) -> T:
    """A blocking migration call in a thread that the driver's shutdown can cancel (see
    :func:`controlplane.migrations.apply.run_cancellable`)."""
    from ..migrations.apply import run_cancellable as run_in_thread

    return await run_in_thread(run)


def expanded_by_deployment(migration_set: MigrationSet, database: str) -> str | None:
    """The deployment that applied this set's expand files (the newest one recorded), if any."""
    from ..migrations.apply import applied

    names = {f.name for f in migration_set.phase(Phase.EXPAND)}
    rows = [r for r in applied(database) if r["name"] in names and r.get("deployment_id")]
    if not rows:
        return None
    return str(max(rows, key=lambda r: r["applied_at"])["deployment_id"])


def _idle_changed(name: str, expected: Environment, idle: Environment) -> ConflictError:
    return ConflictError(f"{name}: the idle environment changed from {expected.value} to {idle.value} while the "
                         f"deployment was being prepared (a switch or rollback landed); send it again")
